//! `atelier bench`: one FLUX transformer step timed on a chosen device, and the resident
//! memory of loading its checkpoint and of its steps (the transformer's own memory: RSS above
//! what the process held before the load), optionally with the checkpoint quantized to a
//! city96-layout GGUF first (`--quant`), whose blocks stay packed in memory.

pub mod pipeline;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::{DType, Tensor, TensorData};

use crate::engine::device::SelectedDevice;
use crate::engine::flux::{self, FluxConfig, FluxInput};
use crate::engine::noise::torch_randn;

#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// An existing checkpoint; when absent, a random one of `config` is written to a temp file.
    pub checkpoint: Option<PathBuf>,
    pub config: FluxConfig,
    pub img_tokens: usize,
    pub txt_tokens: usize,
    pub batch: usize,
    pub steps: usize,
    pub dtype: DType,
    /// Random LoRAs of `lora_rank` on every Linear, applied unmerged (side path).
    pub random_loras: usize,
    pub lora_rank: usize,
    /// Convert the checkpoint to a GGUF of this type first (`q8_0`, `q4_k`, … see
    /// `to_gguf::parse_target`) and bench that file.
    pub quant: Option<String>,
    /// Plan the transformer against this many bytes of device memory (`engine::memory`):
    /// resident when it fits, else streamed block by block; refused when not even that fits.
    pub memory_budget: Option<u64>,
    /// Time LoRA training steps (forward + backward + AdamW, LoRA of `lora_rank` on every
    /// block Linear) instead of forwards.
    pub train: Option<TrainBench>,
    /// Record where the timed steps spend their time, by operation (`engine::profile`).
    pub profile: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct TrainBench {
    /// Block-level recompute (else one autodiff graph over the model).
    pub recompute: bool,
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub device: String,
    pub file_bytes: u64,
    pub rss_before_load: u64,
    pub peak_rss_during_load: u64,
    /// RSS once the model is loaded: what it keeps resident.
    pub rss_after_load: u64,
    /// Peak RSS over the steps (the peak counter restarted after the load).
    pub peak_rss_during_steps: u64,
    pub load_seconds: f64,
    pub step_seconds: Vec<f64>,
    /// Bytes per GGUF block type of the file benched, when it was quantized first.
    pub quantized: Option<crate::engine::to_gguf::Written>,
    pub loras: Option<LoraBench>,
    /// The transformer's memory plan, with `--memory-budget`.
    pub plan: Option<crate::engine::memory::MemoryPlan>,
    /// Time per operation summed over the timed steps, with `profile`.
    pub profile: Vec<crate::engine::profile::Total>,
}

/// What the LoRAs of a bench cost besides step time.
#[derive(Debug, Clone)]
pub struct LoraBench {
    /// The first `set_loras` (factors uploaded beside the base).
    pub apply_seconds: f64,
    /// Median of switching between no LoRAs and the set (what a change between jobs costs).
    pub switch_seconds: f64,
    /// RSS added by parsing and applying them (host copies kept for switching + device copies).
    pub rss_added: u64,
    /// The parsed factors (f32 on the host).
    pub host_bytes: u64,
    /// What the same LoRAs take as bf16 files.
    pub bf16_file_bytes: u64,
}

impl BenchReport {
    pub fn median_step(&self) -> f64 {
        median(&self.step_seconds)
    }

    /// `--json`: the figures of [`BenchReport::print`], in seconds and bytes.
    pub fn json(&self, spec: &BenchSpec) -> serde_json::Value {
        let c = &spec.config;
        serde_json::json!({
            "device": self.device,
            "config": {
                "hidden": c.hidden_size, "heads": c.num_heads, "double_blocks": c.depth,
                "single_blocks": c.depth_single_blocks, "mlp": c.mlp_hidden_dim,
                "img_tokens": spec.img_tokens, "txt_tokens": spec.txt_tokens, "batch": spec.batch,
                "dtype": format!("{:?}", spec.dtype), "train": spec.train.is_some(),
            },
            "file_bytes": self.file_bytes,
            "load_seconds": self.load_seconds,
            "step": {"median_seconds": self.median_step(), "seconds": self.step_seconds,
                     "profile": profile_json(&self.profile, self.step_seconds.len())},
            "rss_bytes": {
                "before_load": self.rss_before_load, "after_load": self.rss_after_load,
                "peak_during_load": self.peak_rss_during_load, "peak_during_steps": self.peak_rss_during_steps,
            },
            "gguf_file_bytes": self.quantized.as_ref().map(|q| q.file_bytes),
            "loras": self.loras.as_ref().map(|l| serde_json::json!({
                "apply_seconds": l.apply_seconds, "switch_seconds": l.switch_seconds,
                "rss_added_bytes": l.rss_added, "host_bytes": l.host_bytes,
            })),
            "memory_plan_peak_bytes": self.plan.as_ref().map(|p| p.peak),
        })
    }

    pub fn print(&self, spec: &BenchSpec) {
        let c = &spec.config;
        println!("device: {}", self.device);
        println!(
            "config: hidden {} ({} heads), {} double + {} single blocks, mlp {}, {} image + {} text tokens, batch {}, {:?}",
            c.hidden_size,
            c.num_heads,
            c.depth,
            c.depth_single_blocks,
            c.mlp_hidden_dim,
            spec.img_tokens,
            spec.txt_tokens,
            spec.batch,
            spec.dtype
        );
        if spec.random_loras > 0 {
            println!(
                "LoRAs: {} random, rank {}, on every Linear (unmerged side path)",
                spec.random_loras, spec.lora_rank
            );
        }
        println!(
            "load: {:.2} s; checkpoint {:.1} MiB; peak RSS during load {:.1} MiB ({:.1} MiB before load, {:.2}x the file)",
            self.load_seconds,
            mib(self.file_bytes),
            mib(self.peak_rss_during_load),
            mib(self.rss_before_load),
            self.peak_rss_during_load as f64 / self.file_bytes as f64
        );
        if let Some(l) = &self.loras {
            println!(
                "loras: apply {:.3} s, switch median {:.3} s; RSS +{:.1} MiB ({:.1} MiB parsed f32 factors kept for switching, the rest on the device); as bf16 files {:.1} MiB",
                l.apply_seconds,
                l.switch_seconds,
                mib(l.rss_added),
                mib(l.host_bytes),
                mib(l.bf16_file_bytes)
            );
        }
        if let Some(t) = spec.train {
            println!(
                "training steps: LoRA rank {} on every block Linear, {}, AdamW",
                spec.lora_rank,
                if t.recompute { "block recompute" } else { "plain autodiff" }
            );
        }
        let list: Vec<String> = self.step_seconds.iter().map(|s| format!("{s:.3}")).collect();
        println!("step: median {:.3} s over {} runs [{}]", self.median_step(), list.len(), list.join(", "));
        print_profile(&self.profile, &self.step_seconds);
        if let Some(q) = &self.quantized {
            let types: Vec<String> =
                q.per_type.iter().map(|(t, n, b)| format!("{} {n} tensors {:.1} MiB", t.name(), mib(*b))).collect();
            println!("gguf: {:.1} MiB: {}", mib(q.file_bytes), types.join(", "));
        }
        if let Some(p) = &self.plan {
            let t = &p.components[2];
            println!(
                "memory plan: transformer {:?}: {:.1} MiB of weights + {:.1} MiB of activations, peak ≈ {:.1} MiB of a budget of {:.1} MiB",
                t.mode,
                mib(t.bytes),
                mib(t.activations),
                mib(p.peak),
                mib(p.budget.unwrap_or(0))
            );
        }
        let own = |b: u64| mib(b.saturating_sub(self.rss_before_load));
        println!(
            "rss load: resident after load {:.1} MiB (+{:.1} MiB over before load), peak {:.1} MiB (+{:.1} MiB, {:.2}x the file)",
            mib(self.rss_after_load),
            own(self.rss_after_load),
            mib(self.peak_rss_during_load),
            own(self.peak_rss_during_load),
            self.peak_rss_during_load.saturating_sub(self.rss_before_load) as f64 / self.file_bytes as f64
        );
        println!(
            "rss steps: peak {:.1} MiB (+{:.1} MiB over before load, {:.2}x the file)",
            mib(self.peak_rss_during_steps),
            own(self.peak_rss_during_steps),
            self.peak_rss_during_steps.saturating_sub(self.rss_before_load) as f64 / self.file_bytes as f64
        );
    }
}

/// The per-operation profile as JSON: label, ms per run, calls per run.
fn profile_json(profile: &[crate::engine::profile::Total], runs: usize) -> serde_json::Value {
    let n = runs.max(1) as f64;
    profile
        .iter()
        .map(|t| serde_json::json!({"op": t.label, "ms_per_run": t.seconds / n * 1e3, "calls_per_run": t.calls as f64 / n}))
        .collect()
}

/// Bytes as MiB, for the printed lines.
pub(crate) fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

pub(crate) fn median(runs: &[f64]) -> f64 {
    let mut s = runs.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

/// One line per operation: time per run, share of the run, calls per run; then what ran
/// outside the spans (embedders, casts, the host side).
fn print_profile(profile: &[crate::engine::profile::Total], runs: &[f64]) {
    if profile.is_empty() {
        return;
    }
    let n = runs.len() as f64;
    let total: f64 = runs.iter().sum();
    let line = |label: &str, seconds: f64, calls: Option<u64>| {
        let calls = calls.map(|c| format!(", {:.0} calls/run", c as f64 / n)).unwrap_or_default();
        println!("profile: {label:<26} {:8.1} ms/run {:5.1}%{calls}", seconds / n * 1e3, 100.0 * seconds / total);
    };
    for t in profile {
        line(t.label, t.seconds, Some(t.calls));
    }
    line("(outside spans)", total - profile.iter().map(|t| t.seconds).sum::<f64>(), None);
}

/// Current and peak resident set size of this process, from /proc (Linux).
pub(crate) fn rss_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Restarts the kernel's peak-RSS counter so VmHWM measures only what follows.
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn run(spec: &BenchSpec, device: &SelectedDevice) -> Result<BenchReport> {
    if spec.steps == 0 || spec.img_tokens == 0 || spec.batch == 0 {
        bail!("steps, image tokens and batch must be at least 1");
    }
    let temp;
    let mut path = match &spec.checkpoint {
        Some(p) => p.clone(),
        None => {
            temp = TempFile(std::env::temp_dir().join(format!("atelier-bench-{}.safetensors", std::process::id())));
            eprintln!("writing a random checkpoint to {}", temp.0.display());
            flux::write_random_checkpoint(&spec.config, &temp.0, 0)?;
            temp.0.clone()
        }
    };
    let temp_gguf;
    let mut quantized = None;
    if let Some(target) = &spec.quant {
        temp_gguf = TempFile(std::env::temp_dir().join(format!("atelier-bench-{}-{target}.gguf", std::process::id())));
        eprintln!("quantizing to {target} in {}", temp_gguf.0.display());
        quantized = Some(crate::engine::to_gguf::convert_transformer(&path, &temp_gguf.0, target, None)?);
        path = temp_gguf.0.clone();
        // The conversion's freed buffers would otherwise stay in the heap, counted in the RSS
        // before the load and then reused by it, hiding part of the model's own memory.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
    }
    let file_bytes = crate::engine::weights::WeightSet::open(&path)?.file_bytes();

    let plan = match spec.memory_budget {
        Some(budget) => Some(plan_transformer(&path, spec, budget)?),
        None => None,
    };
    let streamed = plan.as_ref().is_some_and(|p| p.transformer_streamed());

    let (rss_before_load, _) = rss_bytes();
    reset_peak_rss();
    let t0 = Instant::now();
    let (mut model, stream) = if streamed {
        let s = crate::engine::streaming::StreamedFlux::load(&path, &device.device, spec.dtype)?;
        (s.stem.clone(), Some(s))
    } else {
        (flux::load_transformer(&path, &device.device, spec.dtype, None)?, None)
    };
    device.device.sync().ok();
    let load_seconds = t0.elapsed().as_secs_f64();
    let (rss_after_load, peak_rss_during_load) = rss_bytes();

    let mut loras = None;
    if spec.random_loras > 0 && stream.is_some() {
        bail!("--random-loras with a streamed transformer is not benched");
    }
    if spec.random_loras > 0 {
        use crate::engine::lora::{LoraSet, random_for, set_loras};
        let (rss0, _) = rss_bytes();
        let sets: Vec<LoraSet> = (0..spec.random_loras as u64)
            .map(|i| LoraSet { lora: std::sync::Arc::new(random_for(&mut model, spec.lora_rank, i)), weight: 0.8 })
            .collect();
        let t = Instant::now();
        set_loras(&mut model, &sets)?;
        device.device.sync().ok();
        let apply_seconds = t.elapsed().as_secs_f64();
        let (rss1, _) = rss_bytes();
        let mut switches = Vec::new();
        for _ in 0..3 {
            for to in [&[][..], &sets[..]] {
                let t = Instant::now();
                set_loras(&mut model, to)?;
                device.device.sync().ok();
                switches.push(t.elapsed().as_secs_f64());
            }
        }
        switches.sort_by(|a, b| a.total_cmp(b));
        let host_bytes: u64 = sets.iter().map(|s| s.lora.host_bytes() as u64).sum();
        loras = Some(LoraBench {
            apply_seconds,
            switch_seconds: switches[switches.len() / 2],
            rss_added: rss1.saturating_sub(rss0),
            host_bytes,
            bf16_file_bytes: host_bytes / 2,
        });
    }
    let c = model.config.clone();
    let dev = &device.device;
    let dtype = crate::engine::cpu::activation_dtype(dev, spec.dtype);
    let upload = |seed: u64, shape: [usize; 3]| {
        Tensor::<3>::from_data(TensorData::new(torch_randn(seed, &shape), shape), dev).cast(dtype)
    };
    let img = upload(1, [spec.batch, spec.img_tokens, c.in_channels]);
    let txt = upload(2, [spec.batch, spec.txt_tokens, c.context_in_dim]);
    let y = Tensor::<2>::from_data(
        TensorData::new(torch_randn(3, &[spec.batch, c.vec_in_dim]), [spec.batch, c.vec_in_dim]),
        dev,
    )
    .cast(dtype);
    let (rows, cols) = grid_for(spec.img_tokens);
    let rope = model.rope(spec.txt_tokens, rows, cols, dev);
    let timesteps = vec![0.5f32; spec.batch];
    let guidance = vec![3.5f32; spec.batch];

    let mut step_seconds = Vec::new();
    reset_peak_rss();
    if spec.train.is_some() && stream.is_some() {
        bail!("--train with a streamed transformer is not benched (training keeps the base resident)");
    }
    if let Some(t) = spec.train {
        use crate::train::{adamw, objective, params};
        let mut lora = params::TrainableLora::new(
            &mut model,
            params::Targets::All,
            spec.lora_rank,
            spec.lora_rank as f32,
            0,
            dev,
        )?;
        let mut opt = adamw::AdamW::for_lora(adamw::AdamWConfig::default(), &lora);
        opt.loss_scale = adamw::LossScale::for_dtype(dtype);
        let batch = objective::Batch {
            x0: img.clone(),
            noise: upload(4, [spec.batch, spec.img_tokens, c.in_channels]),
            sigmas: timesteps.clone(),
            txt: txt.clone(),
            y: y.clone(),
            guidance: c.guidance_embed.then(|| vec![1.0; spec.batch]),
            rope,
            captions: Vec::new(),
        };
        let how = if t.recompute { objective::Backprop::Recompute } else { objective::Backprop::Plain };
        for i in 0..=spec.steps {
            if i == 1 && spec.profile {
                crate::engine::profile::enable(true);
            }
            let t = Instant::now();
            let g = objective::loss_and_grads(&mut model, &lora, &batch, how, opt.loss_scale.scale)?;
            let outcome = crate::engine::profile::span("optimizer", || opt.step(&mut lora, g.grads));
            opt.loss_scale.update(outcome);
            let _ = lora.pairs[0].down.clone().into_data();
            if i > 0 {
                step_seconds.push(t.elapsed().as_secs_f64());
            }
        }
    } else {
        // One untimed warm-up step: kernel compilation and autotuning on GPUs.
        for i in 0..=spec.steps {
            if i == 1 && spec.profile {
                crate::engine::profile::enable(true);
            }
            let t = Instant::now();
            let input = FluxInput {
                img: img.clone(),
                txt: txt.clone(),
                y: y.clone(),
                timesteps: &timesteps,
                guidance: c.guidance_embed.then_some(&guidance[..]),
                rope: &rope,
            };
            let out = match &stream {
                Some(s) => model.forward_with(input, s)?,
                None => model.forward(input)?,
            };
            let _ = out.into_data();
            if i > 0 {
                step_seconds.push(t.elapsed().as_secs_f64());
            }
        }
    }
    let (_, peak_rss_during_steps) = rss_bytes();
    let profile = crate::engine::profile::totals();
    crate::engine::profile::enable(false);
    Ok(BenchReport {
        device: device.description.clone(),
        file_bytes,
        rss_before_load,
        peak_rss_during_load,
        rss_after_load,
        peak_rss_during_steps,
        load_seconds,
        step_seconds,
        quantized,
        loras,
        plan,
        profile,
    })
}

/// The transformer's plan against `budget` for the bench's size (the text encoders and the
/// VAE are not part of a bench).
fn plan_transformer(
    path: &std::path::Path,
    spec: &BenchSpec,
    budget: u64,
) -> Result<crate::engine::memory::MemoryPlan> {
    use crate::engine::memory::{JobSize, ModelSizes, plan};
    let t = crate::engine::footprint::transformer_sizes(path, spec.dtype)?;
    let sizes = ModelSizes::of_transformer(t, spec.dtype.size());
    // The bench's tokens as a square image of that many 16-pixel patches.
    let (rows, cols) = grid_for(spec.img_tokens);
    let job = JobSize { width: cols * 16, height: rows * 16, batch: spec.batch, text_tokens: spec.txt_tokens };
    Ok(plan(&sizes, job, Some(budget), true, false)?)
}

/// A latent grid with `n` cells, as square as possible.
fn grid_for(n: usize) -> (usize, usize) {
    let mut rows = (n as f64).sqrt() as usize;
    while rows > 1 && !n.is_multiple_of(rows) {
        rows -= 1;
    }
    (rows.max(1), n / rows.max(1))
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `atelier bench --vae`: FLUX.1's autoencoder (its real architecture, random weights), one
/// decode of the latents of the image the tokens describe and one encode of that image.
#[derive(Debug, Clone)]
pub struct VaeReport {
    pub device: String,
    pub width: usize,
    pub height: usize,
    pub decode_seconds: Vec<f64>,
    pub encode_seconds: Vec<f64>,
    pub decode_profile: Vec<crate::engine::profile::Total>,
    pub encode_profile: Vec<crate::engine::profile::Total>,
    /// RSS once the VAE is built, and the peak over the decodes and over the encodes.
    pub rss_after_build: u64,
    pub peak_rss_decode: u64,
    pub peak_rss_encode: u64,
}

pub fn run_vae(spec: &BenchSpec, device: &SelectedDevice) -> Result<VaeReport> {
    use crate::engine::loader::Walk;
    use crate::engine::vae::{Vae, VaeConfig};
    if spec.steps == 0 || spec.img_tokens == 0 || spec.batch == 0 {
        bail!("steps, image tokens and batch must be at least 1");
    }
    let dev = &device.device;
    let walk = Walk::random(dev, spec.dtype, 0);
    let vae = Vae::build(&walk.root(), VaeConfig::flux())?;
    let (rss_after_build, _) = rss_bytes();
    let (rows, cols) = grid_for(spec.img_tokens);
    let (h, w) = (2 * rows, 2 * cols);
    let z_shape = [spec.batch, 16, h, w];
    let dtype = crate::engine::cpu::activation_dtype(dev, spec.dtype);
    let z = Tensor::<4>::from_data(TensorData::new(torch_randn(1, &z_shape), z_shape), dev).cast(dtype);
    let x_shape = [spec.batch, 3, 8 * h, 8 * w];
    let x = Tensor::<4>::from_data(TensorData::new(torch_randn(2, &x_shape), x_shape), dev).cast(dtype);
    let timed = |f: &dyn Fn()| -> (Vec<f64>, Vec<crate::engine::profile::Total>, u64) {
        f(); // warm-up: kernel compilation and autotuning on GPUs
        reset_peak_rss();
        crate::engine::profile::enable(spec.profile);
        let runs = (0..spec.steps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect();
        let profile = crate::engine::profile::totals();
        crate::engine::profile::enable(false);
        (runs, profile, rss_bytes().1)
    };
    let (decode_seconds, decode_profile, peak_rss_decode) = timed(&|| {
        let _ = vae.decode(z.clone()).into_data();
    });
    let (encode_seconds, encode_profile, peak_rss_encode) = timed(&|| {
        let _ = vae.encode(x.clone()).into_data();
    });
    Ok(VaeReport {
        device: device.description.clone(),
        width: 8 * w,
        height: 8 * h,
        decode_seconds,
        encode_seconds,
        decode_profile,
        encode_profile,
        rss_after_build,
        peak_rss_decode,
        peak_rss_encode,
    })
}

impl VaeReport {
    /// `--json`: the same figures as [`VaeReport::print`], seconds and bytes.
    pub fn json(&self, spec: &BenchSpec) -> serde_json::Value {
        serde_json::json!({
            "device": self.device,
            "vae": {"width": self.width, "height": self.height, "batch": spec.batch, "dtype": format!("{:?}", spec.dtype)},
            "decode": {"median_seconds": median(&self.decode_seconds), "seconds": self.decode_seconds,
                       "peak_rss_bytes": self.peak_rss_decode, "profile": profile_json(&self.decode_profile, self.decode_seconds.len())},
            "encode": {"median_seconds": median(&self.encode_seconds), "seconds": self.encode_seconds,
                       "peak_rss_bytes": self.peak_rss_encode, "profile": profile_json(&self.encode_profile, self.encode_seconds.len())},
            "rss_after_build_bytes": self.rss_after_build,
        })
    }

    pub fn print(&self, spec: &BenchSpec) {
        println!("device: {}", self.device);
        println!(
            "vae: FLUX.1 architecture (random weights), {}x{} image, batch {}, {:?}",
            self.width, self.height, spec.batch, spec.dtype
        );
        for (what, runs, profile) in [
            ("decode", &self.decode_seconds, &self.decode_profile),
            ("encode", &self.encode_seconds, &self.encode_profile),
        ] {
            let list: Vec<String> = runs.iter().map(|s| format!("{s:.3}")).collect();
            println!("vae {what}: median {:.3} s over {} runs [{}]", median(runs), runs.len(), list.join(", "));
            print_profile(profile, runs);
        }
        println!(
            "rss vae: {:.1} MiB after building it, peak {:.1} MiB decoding, {:.1} MiB encoding",
            mib(self.rss_after_build),
            mib(self.peak_rss_decode),
            mib(self.peak_rss_encode)
        );
    }
}
