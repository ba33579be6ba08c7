//! The device-memory budget and the plan made against it before each job.
//!
//! burn cannot recover from an allocation failure inside a kernel (the process aborts or the
//! device is lost), so a job that would not fit must be refused before it starts. The plan
//! is made from the component headers (bytes as the device will hold them: packed bytes for
//! quantized weights, dtype size × parameters otherwise) and an estimate of the activations
//! for the job's size. Each component is then resident (kept between jobs), staged (loaded in
//! its stage and dropped after it) or, for the transformer and T5, streamed block by block
//! from host memory (ComfyUI's lowvram and stable-diffusion.cpp's layer streaming): the
//! non-block layers stay loaded and each block is uploaded just before it runs.

use std::str::FromStr;

use serde::Serialize;

/// `[engine] memory_budget`: bytes, or `auto` (what the device says it has, minus a margin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryBudget {
    #[default]
    Auto,
    Bytes(u64),
}

impl FromStr for MemoryBudget {
    type Err = String;
    /// `auto`, a plain number of bytes, or a number with a unit: `12GiB`, `800MiB`, `1.5GB`,
    /// `512k` (B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB; decimal units count in 1000s).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(MemoryBudget::Auto);
        }
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (number, unit) = (&t[..split], t[split..].trim());
        let bad = || format!("memory budget {s:?}: expected \"auto\", bytes, or a size like \"12GiB\" or \"800MiB\"");
        let value: f64 = number.parse().map_err(|_| bad())?;
        let scale: u64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "kb" => 1_000,
            "m" | "mib" => 1 << 20,
            "mb" => 1_000_000,
            "g" | "gib" => 1 << 30,
            "gb" => 1_000_000_000,
            "t" | "tib" => 1 << 40,
            "tb" => 1_000_000_000_000,
            _ => return Err(bad()),
        };
        let bytes = value * scale as f64;
        if !bytes.is_finite() || bytes < 1.0 {
            return Err(format!("memory budget {s:?} must be at least one byte"));
        }
        Ok(MemoryBudget::Bytes(bytes as u64))
    }
}

impl<'de> serde::Deserialize<'de> for MemoryBudget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A TOML integer is bytes; a string is parsed with its unit.
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(0) => Err(serde::de::Error::custom("memory_budget must be at least one byte")),
            Raw::Int(n) => Ok(MemoryBudget::Bytes(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// What `auto` leaves to the rest of the machine (and to allocator slack): the larger of
/// 1 GiB and a tenth of what was found.
pub fn margin(found: u64) -> u64 {
    (found / 10).max(1 << 30)
}

/// The budget in bytes with how it was found, for the log; None: no budget (every job is
/// planned and logged, none refused or streamed). `device_memory`: a GPU's device-local heap,
/// where it could be read.
pub fn resolve(setting: MemoryBudget, is_gpu: bool, device_memory: Option<u64>) -> (Option<u64>, String) {
    match setting {
        MemoryBudget::Bytes(b) => (Some(b), format!("{} as configured", mib(b))),
        MemoryBudget::Auto if !is_gpu => match mem_available() {
            Some(found) => {
                let b = found.saturating_sub(margin(found)).max(1);
                (Some(b), format!("{}: auto, MemAvailable {} minus a margin of {}", mib(b), mib(found), mib(margin(found))))
            }
            None => (None, "none: auto could not read MemAvailable from /proc/meminfo".into()),
        },
        MemoryBudget::Auto => match device_memory {
            Some(found) => {
                let b = found.saturating_sub(margin(found)).max(1);
                (Some(b), format!("{}: auto, the GPU's device-local heap {} minus a margin of {}", mib(b), mib(found), mib(margin(found))))
            }
            // wgpu has no portable query of a card's memory (read here through Vulkan only).
            None => (
                None,
                "none: the GPU's memory cannot be read through wgpu on this graphics API; set [engine] memory_budget (e.g. \"22GiB\" on a 24 GB card) so jobs are planned against it".into(),
            ),
        },
    }
}

/// /proc/meminfo's MemAvailable (Linux): what can be allocated without swapping.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

pub fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Device bytes of a model's components, read off their headers, and the sizes that drive
/// the activation estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSizes {
    pub t5: u64,
    /// T5's embedding, final norm and position-bias table: what stays while its blocks stream.
    pub t5_stem: u64,
    /// T5's largest block (0: nothing to stream).
    pub t5_block: u64,
    /// What T5's per-layer dequantization holds at once (see `dequant_bytes`).
    pub t5_dequant_bytes: u64,
    pub clip: u64,
    pub vae: u64,
    /// The transformer's non-block layers (embedders, final layer).
    pub transformer_stem: u64,
    /// Each double then single block.
    pub transformer_blocks: Vec<u64>,
    /// What the transformer's per-layer dequantization holds at once: for packed weights,
    /// the largest Linear as a dense matrix four times over (`footprint::DEQUANT_COPIES`); 0
    /// when nothing is packed.
    pub dequant_bytes: u64,
    pub hidden: usize,
    pub heads: usize,
    pub mlp: usize,
    pub t5_heads: usize,
    pub t5_d_ff: usize,
    /// The VAE decoder's widest feature map, as channels at full resolution (FLUX's: 256, the
    /// upsampled level-1 maps; a level at 1/2^i resolution counts 1/4^i of its channels).
    pub vae_channels: usize,
    /// Bytes per element of the compute dtype (transformer and VAE).
    pub dtype_bytes: usize,
}

impl ModelSizes {
    pub fn transformer(&self) -> u64 {
        self.transformer_stem + self.transformer_blocks.iter().sum::<u64>()
    }

    /// A transformer alone (the other components of size 0): what `bench` plans.
    pub fn of_transformer(t: crate::engine::footprint::TransformerSizes, dtype_bytes: usize) -> Self {
        ModelSizes {
            t5: 0,
            t5_stem: 0,
            t5_block: 0,
            t5_dequant_bytes: 0,
            clip: 0,
            vae: 0,
            transformer_stem: t.stem,
            transformer_blocks: t.blocks,
            dequant_bytes: t.dequant_bytes,
            hidden: t.config.hidden_size,
            heads: t.config.num_heads,
            mlp: t.config.mlp_hidden_dim,
            t5_heads: 0,
            t5_d_ff: 0,
            vae_channels: 0,
            dtype_bytes,
        }
    }
}

/// The size of a job, as the activations see it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JobSize {
    pub width: usize,
    pub height: usize,
    /// Images (made one after the other, so activations are those of one).
    pub batch: usize,
    pub text_tokens: usize,
}

/// Where a component lives during a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Loaded once and kept between jobs.
    Resident,
    /// Loaded for its stage and dropped after it.
    Staged,
    /// Non-block layers loaded for the stage; each block uploaded just before it runs (the
    /// transformer and T5).
    Streamed,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentPlan {
    pub name: &'static str,
    /// Its weights on the device.
    pub bytes: u64,
    /// Estimated activations of its stage.
    pub activations: u64,
    pub mode: Mode,
}

/// What a job will hold on the device, decided before it starts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    /// None: no budget known (nothing refused, nothing streamed).
    pub budget: Option<u64>,
    pub job: JobSize,
    pub components: Vec<ComponentPlan>,
    /// The estimated peak over the job's stages.
    pub peak: u64,
}

impl MemoryPlan {
    pub fn mode(&self, name: &str) -> Option<Mode> {
        self.components.iter().find(|c| c.name == name).map(|c| c.mode)
    }

    pub fn transformer_streamed(&self) -> bool {
        self.mode("transformer") == Some(Mode::Streamed)
    }

    /// Whether every component is kept between jobs.
    pub fn all_resident(&self) -> bool {
        self.components.iter().all(|c| c.mode == Mode::Resident)
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .components
            .iter()
            .map(|c| format!("{} {} ({:?}, +{} activations)", c.name, mib(c.bytes), c.mode, mib(c.activations)))
            .collect();
        format!(
            "{}×{} ×{}: peak ≈ {} of {}; {}",
            self.job.width,
            self.job.height,
            self.job.batch,
            mib(self.peak),
            self.budget.map_or_else(|| "no budget".to_string(), mib),
            parts.join(", ")
        )
    }
}

/// A job refused by its plan: it would not fit the device even with the transformer and T5
/// streamed where they do not fit whole.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "this job needs about {} of device memory at {width}×{height} ({what}), more than the memory budget of {}; {hint}",
    mib(*.needed), mib(*.budget)
)]
pub struct OutOfBudget {
    pub needed: u64,
    pub budget: u64,
    pub width: usize,
    pub height: usize,
    /// The stage that does not fit and its parts.
    pub what: String,
    /// What the user can change: the image size for the transformer's and the VAE's stages,
    /// the T5 length for T5's (its activations do not depend on the size).
    pub hint: &'static str,
}

/// Activations of one transformer forward (one image): the attention scores and
/// probabilities of every head (kept in f32 by the attention without a fused kernel), the
/// widest projections of a single block (q, k, v and the MLP input, its GELU and the
/// concatenation for linear2) in the compute dtype, f32 copies of q and k for RoPE and the
/// norms, the residual streams, and one dequantized weight.
pub fn transformer_activations(s: &ModelSizes, job: &JobSize) -> u64 {
    let img = (job.width / 16) * (job.height / 16);
    let l = (img + job.text_tokens) as u64;
    let (h, mlp, d) = (s.hidden as u64, s.mlp as u64, s.dtype_bytes as u64);
    let scores = 2 * s.heads as u64 * l * l * 4;
    let projections = l * ((3 * h + mlp) + mlp + (h + mlp)) * d;
    let f32_copies = 4 * l * h * 4;
    let streams = 4 * l * h * d;
    scores + projections + f32_copies + streams + s.dequant_bytes
}

/// Activations of the VAE decode: up to 1024² in one piece (larger in tiles of about that),
/// the widest feature maps (input, output and the norm's temporary) and the mid-block
/// attention's scores over the latent pixels (f32, without a fused kernel).
pub fn vae_activations(s: &ModelSizes, job: &JobSize) -> u64 {
    let area = (job.width * job.height).min(1024 * 1024) as u64;
    let d = s.dtype_bytes as u64;
    let maps = 3 * s.vae_channels as u64 * area * d;
    let latent = area / 64;
    maps + latent * latent * 4 * 2
}

/// Activations of the T5 encoder (f32): scores of every head, the gated FFN, and one
/// dequantized weight.
pub fn t5_activations(s: &ModelSizes, job: &JobSize) -> u64 {
    let l = job.text_tokens as u64;
    2 * s.t5_heads as u64 * l * l * 4 + 3 * l * s.t5_d_ff as u64 * 4 + s.t5_dequant_bytes
}

/// CLIP's 77 tokens: small beside its weights; a fixed allowance.
const CLIP_ACTIVATIONS: u64 = 8 << 20;

/// Plans a job: everything resident when asked and it fits; else each component staged;
/// else the transformer and/or T5 streamed where their own stage does not fit staged; else
/// refused, naming the stage that does not fit.
/// `force_stream` streams the transformer and T5 whatever the budget (tests).
pub fn plan(
    s: &ModelSizes,
    job: JobSize,
    budget: Option<u64>,
    keep_resident: bool,
    force_stream: bool,
) -> Result<MemoryPlan, OutOfBudget> {
    let acts = [
        ("t5", s.t5, t5_activations(s, &job)),
        ("clip", s.clip, CLIP_ACTIVATIONS),
        ("transformer", s.transformer(), transformer_activations(s, &job)),
        ("vae", s.vae, vae_activations(s, &job)),
    ];
    let fits = |need: u64| budget.is_none_or(|b| need <= b);
    let make = |modes: [Mode; 4], peak: u64| MemoryPlan {
        budget,
        job,
        components: acts
            .iter()
            .zip(modes)
            .map(|(&(name, bytes, activations), mode)| ComponentPlan { name, bytes, activations, mode })
            .collect(),
        peak,
    };
    let all: u64 = acts.iter().map(|a| a.1).sum();
    let resident_peak = all + acts.iter().map(|a| a.2).max().unwrap_or(0);
    if keep_resident && !force_stream && fits(resident_peak) {
        return Ok(make([Mode::Resident; 4], resident_peak));
    }
    let staged_peak = acts.iter().map(|a| a.1 + a.2).max().unwrap_or(0);
    if !force_stream && fits(staged_peak) {
        return Ok(make([Mode::Staged; 4], staged_peak));
    }
    // A component whose own stage does not fit (or every one that can, when forced) streams
    // block by block: its non-block layers, its activations and two blocks (a GPU runs its
    // queue behind the host, so the next block is uploaded while the last one's kernels may
    // still hold theirs).
    let t5_stream = s.t5_block > 0 && (force_stream || !fits(acts[0].1 + acts[0].2));
    let flux_stream = force_stream || !fits(acts[2].1 + acts[2].2);
    let flux_block = s.transformer_blocks.iter().copied().max().unwrap_or(0);
    let stream = |(name, bytes, activations): (&'static str, u64, u64), on: bool, stem: u64, block: u64| {
        if on {
            let what = format!(
                "the {name} streamed block by block: {} of non-block layers + 2 × {} for its largest block + {} of activations",
                mib(stem),
                mib(block),
                mib(activations)
            );
            (stem + 2 * block + activations, what, Mode::Streamed)
        } else {
            let what = format!("the {name} stage: {} of weights + {} of activations", mib(bytes), mib(activations));
            (bytes + activations, what, Mode::Staged)
        }
    };
    let stages = [
        stream(acts[0], t5_stream, s.t5_stem, s.t5_block),
        stream(acts[1], false, 0, 0),
        stream(acts[2], flux_stream, s.transformer_stem, flux_block),
        stream(acts[3], false, 0, 0),
    ];
    let (stage, (needed, what, _)) =
        stages.iter().cloned().enumerate().max_by_key(|(_, st)| st.0).expect("four stages");
    if fits(needed) {
        return Ok(make(stages.map(|st| st.2), needed));
    }
    let budget = budget.expect("fits() is true without a budget");
    let hint = match stage {
        0 => {
            "T5's stage does not depend on the image size: it needs fewer T5 tokens (--max-sequence-length) or a larger budget"
        }
        1 => "CLIP's stage does not depend on the job: it needs a larger budget",
        _ => "a smaller size may fit",
    };
    Err(OutOfBudget { needed, budget, width: job.width, height: job.height, what, hint })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> ModelSizes {
        ModelSizes {
            t5: 100 << 20,
            t5_stem: 20 << 20,
            t5_block: 10 << 20,
            t5_dequant_bytes: 0,
            clip: 10 << 20,
            vae: 20 << 20,
            transformer_stem: 10 << 20,
            transformer_blocks: vec![40 << 20; 10],
            dequant_bytes: 1 << 20,
            hidden: 64,
            heads: 2,
            mlp: 256,
            t5_heads: 2,
            t5_d_ff: 128,
            vae_channels: 256,
            dtype_bytes: 4,
        }
    }

    fn job(side: usize) -> JobSize {
        JobSize { width: side, height: side, batch: 1, text_tokens: 64 }
    }

    #[test]
    fn budgets_parse_with_and_without_units() {
        let p = |s: &str| s.parse::<MemoryBudget>();
        assert_eq!(p("auto"), Ok(MemoryBudget::Auto));
        assert_eq!(p("AUTO"), Ok(MemoryBudget::Auto));
        assert_eq!(p("12GiB"), Ok(MemoryBudget::Bytes(12 << 30)));
        assert_eq!(p("800MiB"), Ok(MemoryBudget::Bytes(800 << 20)));
        assert_eq!(p("800 MiB"), Ok(MemoryBudget::Bytes(800 << 20)));
        assert_eq!(p("1.5GB"), Ok(MemoryBudget::Bytes(1_500_000_000)));
        assert_eq!(p("4096"), Ok(MemoryBudget::Bytes(4096)));
        assert_eq!(p("512k"), Ok(MemoryBudget::Bytes(512 << 10)));
        for bad in ["", "12 furlongs", "GiB", "-3GiB", "0", "1e9"] {
            let err = p(bad).unwrap_err();
            assert!(err.contains("memory budget"), "{bad}: {err}");
        }
        #[derive(serde::Deserialize)]
        struct T {
            b: MemoryBudget,
        }
        assert_eq!(toml::from_str::<T>("b = 1048576").unwrap().b, MemoryBudget::Bytes(1 << 20));
        assert_eq!(toml::from_str::<T>("b = \"2GiB\"").unwrap().b, MemoryBudget::Bytes(2 << 30));
        assert!(toml::from_str::<T>("b = 0").is_err());
    }

    #[test]
    fn auto_on_the_cpu_is_what_the_machine_has_left_minus_a_margin() {
        let (bytes, why) = resolve(MemoryBudget::Auto, false, None);
        let found = mem_available().expect("Linux has /proc/meminfo");
        let b = bytes.expect("a budget on the CPU");
        assert!(b < found && b + margin(found) >= found - (256 << 20), "{b} of {found}: {why}");
        assert!(why.contains("MemAvailable"), "{why}");
        let (none, why) = resolve(MemoryBudget::Auto, true, None);
        assert!(none.is_none() && why.contains("memory_budget"), "{why}");
        let (card, why) = resolve(MemoryBudget::Auto, true, Some(24 << 30));
        assert_eq!(card, Some((24 << 30) - (24 << 30) / 10), "{why}");
        assert_eq!(resolve(MemoryBudget::Bytes(7), true, Some(24 << 30)).0, Some(7));
    }

    #[test]
    fn a_job_is_resident_staged_streamed_or_refused_as_the_budget_shrinks() {
        let s = sizes();
        let resident = plan(&s, job(64), Some(1 << 30), true, false).unwrap();
        assert!(resident.all_resident(), "{}", resident.summary());
        // Without keep_resident the components are staged even when all would fit.
        assert_eq!(plan(&s, job(64), Some(1 << 30), false, false).unwrap().mode("transformer"), Some(Mode::Staged));
        // Too small for all four at once: staged.
        let staged = plan(&s, job(64), Some(440 << 20), true, false).unwrap();
        assert_eq!(staged.mode("transformer"), Some(Mode::Staged), "{}", staged.summary());
        assert!(staged.peak <= 440 << 20);
        // A quarter of the transformer: streamed, 40 MiB blocks two at a time.
        let quarter = s.transformer() / 4;
        let streamed = plan(&s, job(64), Some(quarter), false, false).unwrap();
        assert!(streamed.transformer_streamed(), "{}", streamed.summary());
        assert_eq!(streamed.mode("t5"), Some(Mode::Staged));
        // Not even a block and T5 fit: refused, naming the numbers.
        let err = plan(&s, job(64), Some(30 << 20), false, false).unwrap_err();
        assert!(err.needed > err.budget && err.to_string().contains("memory budget of 30.0 MiB"), "{err}");
        // The same budget refuses a larger image that the smaller one fits in.
        let fits = plan(&s, job(64), Some(200 << 20), false, false).unwrap();
        let err = plan(&s, job(2048), Some(200 << 20), false, false).unwrap_err();
        assert!(
            err.to_string().contains("2048×2048")
                && err.what.contains("activations")
                && err.to_string().ends_with("a smaller size may fit"),
            "{err} / {}",
            fits.summary()
        );
        // No budget: planned, never refused.
        assert!(plan(&s, job(4096), None, false, false).is_ok());
        let forced = plan(&s, job(64), None, false, true).unwrap();
        assert!(forced.transformer_streamed() && forced.mode("t5") == Some(Mode::Streamed));
    }

    #[test]
    fn t5_streams_when_its_own_stage_does_not_fit() {
        // 95 MiB: neither T5 (100 MiB) nor the transformer (410 MiB) fits whole; streamed, T5
        // holds its 20 MiB stem and two 10 MiB blocks.
        let s = sizes();
        let both = plan(&s, job(64), Some(95 << 20), false, false).unwrap();
        assert_eq!((both.mode("t5"), both.mode("transformer")), (Some(Mode::Streamed), Some(Mode::Streamed)));
        assert_eq!(both.mode("clip"), Some(Mode::Staged));
        // A T5 larger than the transformer (T5-XXL in f32 beside a quantized FLUX): only T5
        // streams, the transformer stays whole.
        let big_t5 = ModelSizes { t5: 600 << 20, t5_stem: 40 << 20, t5_block: 10 << 20, ..sizes() };
        let p = plan(&big_t5, job(64), Some(500 << 20), false, false).unwrap();
        assert_eq!(
            (p.mode("t5"), p.mode("transformer")),
            (Some(Mode::Streamed), Some(Mode::Staged)),
            "{}",
            p.summary()
        );
        assert!(p.peak <= 500 << 20);
        // A T5 stem alone over the budget: refused, naming T5's streamed needs.
        let err = plan(&ModelSizes { t5_stem: 600 << 20, ..big_t5.clone() }, job(64), Some(500 << 20), false, false)
            .unwrap_err();
        assert!(err.what.contains("t5 streamed block by block"), "{err}");
        // What the user can change there is T5's length, not the image size.
        assert!(err.to_string().ends_with("fewer T5 tokens (--max-sequence-length) or a larger budget"), "{err}");
        // Nothing to stream (no block sizes known): refused as a stage.
        let err = plan(&ModelSizes { t5_block: 0, ..big_t5 }, job(64), Some(500 << 20), false, false).unwrap_err();
        assert!(err.what.contains("the t5 stage"), "{err}");
    }
}
