//! Prompt → images, as diffusers' `FluxPipeline` does it. Components are loaded in stages and
//! dropped when done (text encoders, then the transformer, then the VAE), so peak memory is the
//! largest component rather than the sum.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::engine::clip::ClipText;
use crate::engine::flux::model::BlockSource;
use crate::engine::flux::{self, Flux, FluxInput};
use crate::engine::lora::{LoraCache, LoraSet, set_clip_loras, set_loras};
use crate::engine::memory::{JobSize, MemoryPlan};
use crate::engine::noise::torch_randn;
use crate::engine::sampler::{ScheduleConfig, StepEvent, denoise};
use crate::engine::streaming::{StreamedFlux, StreamedT5};
use crate::engine::t5::T5Encoder;
use crate::engine::tokenize::{FluxTokenizers, MIN_T5_LENGTH};
use crate::engine::vae;

/// Where each component of a model comes from.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub transformer: PathBuf,
    pub vae: PathBuf,
    pub clip: PathBuf,
    pub t5: PathBuf,
    /// A diffusers `scheduler_config.json`; without one the kind's preset is used.
    pub scheduler: Option<PathBuf>,
    /// Folder with `t5/tokenizer.json` and `clip/tokenizer.json` (or a diffusers folder with
    /// `tokenizer*/tokenizer.json`); None: the tokenizers built into the binary.
    pub tokenizers: Option<PathBuf>,
}

impl ModelFiles {
    /// A diffusers pipeline folder (`model_index.json`, `transformer/`, `vae/`, `text_encoder/`,
    /// `text_encoder_2/`, `scheduler/`). Its own `tokenizer*/tokenizer.json` files win over
    /// `tokenizers`.
    pub fn from_diffusers(dir: &Path, tokenizers: Option<&Path>) -> Result<Self> {
        if !dir.join("model_index.json").exists() {
            bail!("{} is not a diffusers pipeline folder (no model_index.json)", dir.display());
        }
        for sub in ["transformer", "vae", "text_encoder", "text_encoder_2"] {
            if !dir.join(sub).is_dir() {
                bail!("diffusers folder {} has no {sub}/", dir.display());
            }
        }
        let scheduler = dir.join("scheduler/scheduler_config.json");
        let own_tokenizers =
            dir.join("tokenizer/tokenizer.json").exists() && dir.join("tokenizer_2/tokenizer.json").exists();
        Ok(ModelFiles {
            transformer: dir.join("transformer"),
            vae: dir.join("vae"),
            clip: dir.join("text_encoder"),
            t5: dir.join("text_encoder_2"),
            scheduler: scheduler.exists().then_some(scheduler),
            tokenizers: if own_tokenizers { Some(dir.to_path_buf()) } else { tokenizers.map(Path::to_path_buf) },
        })
    }

    /// Reads every component's header (no tensor data): each must be a checkpoint of its kind
    /// in a layout we load, hold the tensors its configuration needs, and be sized for the
    /// transformer. A missing or wrong VAE or encoder is refused here, before any compute,
    /// rather than after the whole denoise. Returns the transformer's configuration.
    pub fn check(&self) -> Result<flux::FluxConfig> {
        let (_, flux) = flux::open_checked(&self.transformer, None)?;
        let (_, vae) = vae::open_checked(&self.vae, None).with_context(|| format!("the VAE {}", self.vae.display()))?;
        let t5 = T5Encoder::check(&self.t5, None)?;
        let clip = ClipText::check(&self.clip, None)?;
        let fits = [
            ("VAE's latent channels × 4", vae.z_channels * 4, flux.in_channels),
            ("T5 encoder's width", t5.d_model, flux.context_in_dim),
            ("CLIP encoder's width", clip.hidden, flux.vec_in_dim),
        ];
        for (what, has, wants) in fits {
            if has != wants {
                bail!(
                    "the {what} is {has} but the transformer takes {wants}: the components belong to different models"
                );
            }
        }
        Ok(flux)
    }

    pub fn load_tokenizers(&self) -> Result<FluxTokenizers> {
        let Some(dir) = &self.tokenizers else { return FluxTokenizers::builtin() };
        if dir.join("tokenizer_2/tokenizer.json").exists() {
            FluxTokenizers::from_files(&dir.join("tokenizer_2/tokenizer.json"), &dir.join("tokenizer/tokenizer.json"))
        } else {
            FluxTokenizers::from_dir(dir)
        }
    }
}

/// FLUX.1-dev's distilled guidance when none is given (diffusers' `FluxPipeline` default).
pub const DEFAULT_GUIDANCE: f32 = 3.5;

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Set from another thread to stop between steps; `generate` then fails with [`Canceled`].
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// A [`Progress::Preview`] every this many steps (and at the last); 0: none.
    pub preview_every: usize,
    pub prompt: String,
    pub seed: u64,
    /// None: the model kind's default (schnell 4, dev 28).
    pub steps: Option<usize>,
    pub width: usize,
    pub height: usize,
    /// Distilled guidance (dev only); None: [`DEFAULT_GUIDANCE`].
    pub guidance: Option<f32>,
    /// T5 length; None: the length the transformer was trained with where its file says so,
    /// else 256 for schnell and 512 for dev.
    pub max_sequence_length: Option<usize>,
    /// Images to make; image i uses seed + i.
    pub batch: usize,
    /// LoRAs applied for this request (unmerged, beside the base weights).
    pub loras: Vec<crate::engine::lora::LoraChoice>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            cancel: None,
            preview_every: 0,
            prompt: String::new(),
            seed: 0,
            steps: None,
            width: 1024,
            height: 1024,
            guidance: None,
            max_sequence_length: None,
            batch: 1,
            loras: Vec::new(),
        }
    }
}

/// The error `generate` returns when [`GenerateRequest::cancel`] was set.
#[derive(Debug, thiserror::Error)]
#[error("canceled")]
pub struct Canceled;

/// Progress of a running generation.
#[derive(Debug, Clone)]
pub enum Progress {
    Stage(&'static str),
    Step {
        image: usize,
        step: usize,
        steps: usize,
        seconds: f64,
    },
    /// A cheap look at the current denoised estimate: the latents projected linearly to RGB at
    /// 1/8 of the image size (see [`crate::engine::preview`]).
    Preview {
        image: usize,
        step: usize,
        rgb: image::RgbImage,
    },
}

/// What was generated, with the settings actually used.
pub struct Generated {
    pub images: Vec<image::RgbImage>,
    /// Seeds per image.
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    pub guidance: Option<f32>,
    pub is_dev: bool,
    pub warnings: Vec<String>,
}

/// Size rounded down to a multiple of 16 (the VAE's 8 × the 2×2 packing), as the reference does.
pub fn snap_size(width: usize, height: usize) -> (usize, usize, Vec<String>) {
    let mut warnings = Vec::new();
    let snap = |v: usize, what: &str, warnings: &mut Vec<String>| {
        let s = v / 16 * 16;
        if s != v {
            warnings.push(format!("{what} {v} is not a multiple of 16; using {s}"));
        }
        s
    };
    (snap(width, "width", &mut warnings), snap(height, "height", &mut warnings), warnings)
}

/// Packs latents [16, H, W] into tokens [(H/2)(W/2), 64], channels in (c, dy, dx) order.
pub fn pack(latents: &[f32], channels: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(latents.len());
    for r in 0..h / 2 {
        for c in 0..w / 2 {
            for ch in 0..channels {
                for dy in 0..2 {
                    for dx in 0..2 {
                        out.push(latents[(ch * h + 2 * r + dy) * w + 2 * c + dx]);
                    }
                }
            }
        }
    }
    out
}

/// The inverse of [`pack`].
pub fn unpack(tokens: &[f32], channels: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; tokens.len()];
    let mut i = 0;
    for r in 0..h / 2 {
        for c in 0..w / 2 {
            for ch in 0..channels {
                for dy in 0..2 {
                    for dx in 0..2 {
                        out[(ch * h + 2 * r + dy) * w + 2 * c + dx] = tokens[i];
                        i += 1;
                    }
                }
            }
        }
    }
    out
}

/// One component: loaded when a stage needs it, and afterwards kept (when the slot keeps
/// its component) or dropped, so that peak memory is the largest component.
pub struct Slot<T> {
    keep: bool,
    value: Option<T>,
    /// How many times the component was loaded from disk.
    pub loads: u64,
}

impl<T> Slot<T> {
    pub fn new(keep: bool) -> Self {
        Slot { keep, value: None, loads: 0 }
    }

    /// Whether the component stays loaded after its stage; dropping it now when not.
    fn set_keep(&mut self, keep: bool) {
        self.keep = keep;
        if !keep {
            self.value = None;
        }
    }

    /// Runs `stage` with the component, loading it first when it is not resident.
    pub fn with<R>(&mut self, load: impl FnOnce() -> Result<T>, stage: impl FnOnce(&mut T) -> Result<R>) -> Result<R> {
        let mut value = match self.value.take() {
            Some(value) => value,
            None => {
                self.loads += 1;
                load()?
            }
        };
        let out = stage(&mut value);
        if self.keep {
            self.value = Some(value);
        }
        out
    }
}

/// The components of one model, kept loaded between generations (`keep_resident`) or loaded
/// per stage and dropped after it (the default).
pub struct Resident {
    t5: Slot<T5Encoder>,
    clip: Slot<ClipText>,
    flux: Slot<Flux>,
    vae: Slot<vae::Vae>,
    /// Parsed LoRAs kept between jobs (switching sets re-parses nothing used recently).
    pub loras: LoraCache,
    /// The compute dtype of the transformer and the VAE. The text encoders stay in f32: T5's
    /// activations overflow f16, and both are a small part of the time.
    dtype: DType,
    placement: Placement,
    /// The plan of the last job that started (None before the first, or after a refusal).
    last_plan: Option<MemoryPlan>,
    /// The tokenizers last loaded and the folder they came from (None: the built-in ones):
    /// building T5's unigram model takes longer than encoding a prompt with the small models.
    tokenizers: Option<(Option<PathBuf>, FluxTokenizers)>,
}

/// Parsed LoRA factors kept between jobs, at most (f32 on the host).
pub const LORA_CACHE_BYTES: usize = 2 << 30;

/// How many times each component was loaded from disk (what `/metrics` shows: with resident
/// components, a change of LoRAs between jobs loads nothing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loads {
    pub t5: u64,
    pub clip: u64,
    pub transformer: u64,
    pub vae: u64,
}

/// How a worker holds a model: its components kept between jobs or loaded per stage, and the
/// compute dtype of the transformer and the VAE.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub keep_resident: bool,
    pub dtype: DType,
    /// Device memory jobs are planned against (`engine::memory`); None: planned, never refused.
    pub memory_budget: Option<u64>,
    /// Stream the transformer and T5 block by block whatever the budget (tests).
    pub stream_blocks: bool,
}

impl Placement {
    /// Per stage, in `dtype`, without a budget.
    pub fn staged(dtype: DType) -> Self {
        Placement { keep_resident: false, dtype, memory_budget: None, stream_blocks: false }
    }
}

impl Resident {
    /// Components in f32.
    pub fn new(keep: bool) -> Self {
        Self::placed(Placement { keep_resident: keep, ..Placement::staged(DType::F32) })
    }

    pub fn placed(p: Placement) -> Self {
        let keep = p.keep_resident;
        Resident {
            t5: Slot::new(keep),
            clip: Slot::new(keep),
            flux: Slot::new(keep),
            vae: Slot::new(keep),
            loras: LoraCache::new(LORA_CACHE_BYTES),
            dtype: p.dtype,
            placement: p,
            last_plan: None,
            tokenizers: None,
        }
    }

    /// The tokenizers of `files`, loaded once per tokenizer folder.
    fn tokenizers(&mut self, files: &ModelFiles) -> Result<&FluxTokenizers> {
        if self.tokenizers.as_ref().is_none_or(|(dir, _)| *dir != files.tokenizers) {
            self.tokenizers = Some((files.tokenizers.clone(), files.load_tokenizers()?));
        }
        Ok(&self.tokenizers.as_ref().expect("just loaded").1)
    }

    /// The memory plan of the last job that started.
    pub fn last_plan(&self) -> Option<&MemoryPlan> {
        self.last_plan.as_ref()
    }

    /// Plans `prepared` against the budget from the component headers (no tensor data), and
    /// lets go of kept components the plan does not keep. A job that cannot fit is refused
    /// here, before any compute, with a [`crate::engine::memory::OutOfBudget`] error.
    pub fn plan(&mut self, files: &ModelFiles, prepared: &Prepared, req: &GenerateRequest) -> Result<MemoryPlan> {
        self.last_plan = None;
        let sizes =
            crate::engine::footprint::model_sizes(&files.transformer, &files.t5, &files.clip, &files.vae, self.dtype)?;
        let job = JobSize {
            width: prepared.width,
            height: prepared.height,
            batch: req.batch,
            text_tokens: prepared.max_sequence_length,
        };
        let p = &self.placement;
        let plan = crate::engine::memory::plan(&sizes, job, p.memory_budget, p.keep_resident, p.stream_blocks)?;
        let keep = plan.all_resident();
        self.t5.set_keep(keep);
        self.clip.set_keep(keep);
        self.flux.set_keep(keep);
        self.vae.set_keep(keep);
        log::info!("memory plan: {}", plan.summary());
        self.last_plan = Some(plan.clone());
        Ok(plan)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn loads(&self) -> Loads {
        Loads { t5: self.t5.loads, clip: self.clip.loads, transformer: self.flux.loads, vae: self.vae.loads }
    }
}

/// The longest T5 sequence: what FLUX.1-dev was trained with and diffusers' maximum (schnell
/// uses 256 by default). Beyond it the text and RoPE tables only grow, up to an allocation
/// failure that aborts the process.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// What a request resolves to for a model, known before any compute: the settings the images
/// will be made (and labelled) with.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    /// Some for dev models (the guidance used), None for schnell.
    pub guidance: Option<f32>,
    pub is_dev: bool,
    pub max_sequence_length: usize,
    pub warnings: Vec<String>,
    /// The request's LoRAs, read and parsed.
    pub loras: Vec<LoraSet>,
    /// A1111's `Model hash` of the transformer file (None for a sharded transformer).
    pub model_hash: Option<String>,
}

impl Prepared {
    /// Seeds per image: image i uses seed + i.
    pub fn seeds(&self, req: &GenerateRequest) -> Vec<u64> {
        (0..req.batch as u64).map(|i| req.seed.wrapping_add(i)).collect()
    }

    /// The A1111 `parameters` text of the image made with `seed`, which A1111/Forge's PNG Info
    /// (and parsers of it) read back: LoRAs as `<lora:name:w>` after the prompt and a
    /// `Lora hashes` field, the transformer file's `Model hash` before the model's name (A1111's
    /// order), dev guidance as Forge's `Distilled CFG Scale` (a plain `Guidance` key is read by
    /// nothing).
    pub fn parameters(&self, prompt: &str, seed: u64, model: &str) -> String {
        let (tags, hashes) = crate::engine::lora::a1111_tags(&self.loras);
        let (steps, width, height) = (self.steps, self.width, self.height);
        let mut s = format!("{prompt}{tags}\nSteps: {steps}, Sampler: Euler, Seed: {seed}, Size: {width}x{height}");
        if let Some(h) = &self.model_hash {
            s += &format!(", Model hash: {h}");
        }
        s += &format!(", Model: {model}");
        if let Some(g) = self.guidance {
            s += &format!(", Distilled CFG Scale: {g}");
        }
        if let Some(h) = hashes {
            s += &format!(", {h}");
        }
        s
    }
}

/// Checks a request against a model without computing anything: the request's bounds, every
/// component's header (see [`ModelFiles::check`]), and the settings the model kind implies.
pub fn prepare(files: &ModelFiles, req: &GenerateRequest) -> Result<Prepared> {
    prepare_with(files, req, &mut LoraCache::new(0))
}

/// [`prepare`] with LoRAs taken from `loras` when it parsed them before.
pub fn prepare_with(files: &ModelFiles, req: &GenerateRequest, loras: &mut LoraCache) -> Result<Prepared> {
    let checked = crate::spec::Limits::engine().check(&crate::spec::Params {
        prompt: &req.prompt,
        width: req.width as u64,
        height: req.height as u64,
        steps: req.steps.map(|s| s as u64),
        guidance: req.guidance.map(f64::from),
        batch: req.batch as u64,
    })?;
    if let Some(n) = req.max_sequence_length
        && !(MIN_T5_LENGTH..=MAX_SEQUENCE_LENGTH).contains(&n)
    {
        bail!(
            "the maximum sequence length (--max-sequence-length) must be between {MIN_T5_LENGTH} and {MAX_SEQUENCE_LENGTH} T5 tokens, not {n}"
        );
    }
    let (width, height, warnings) = (checked.width as usize, checked.height as usize, checked.warnings);
    // The transformer's own weights say whether it is dev (guidance embedding) or schnell.
    let is_dev = files.check()?.guidance_embed;
    let steps = req.steps.unwrap_or(if is_dev { 28 } else { 4 });
    let loras = req.loras.iter().map(|c| loras.open(c)).collect::<Result<Vec<_>>>()?;
    let model_hash = match single_file(&files.transformer) {
        Some(f) => Some(crate::engine::filehash::model_hash(&f)?),
        None => None,
    };
    Ok(Prepared {
        steps,
        width,
        height,
        guidance: is_dev.then(|| req.guidance.unwrap_or(DEFAULT_GUIDANCE)),
        is_dev,
        max_sequence_length: req
            .max_sequence_length
            .unwrap_or_else(|| flux::default_sequence_length(&files.transformer, is_dev)),
        warnings,
        loras,
        model_hash,
    })
}

/// The one file a component is in: the path itself, or the only `.safetensors` / `.gguf` in a
/// component folder; None when sharded.
fn single_file(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    let mut found = std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors" || x == "gguf"));
    match (found.next(), found.next()) {
        (Some(f), None) => Some(f),
        _ => None,
    }
}

/// Runs text → image for every image of the request on `device`, loading each component in
/// its stage and dropping it afterwards.
pub fn generate(
    files: &ModelFiles,
    req: &GenerateRequest,
    device: &Device,
    progress: impl FnMut(Progress),
) -> Result<Generated> {
    generate_with(files, req, device, &mut Resident::new(false), progress)
}

/// [`generate`] with components kept in `resident` between calls when `resident.keep` is set.
pub fn generate_with(
    files: &ModelFiles,
    req: &GenerateRequest,
    device: &Device,
    resident: &mut Resident,
    progress: impl FnMut(Progress),
) -> Result<Generated> {
    let prepared = prepare_with(files, req, &mut resident.loras)?;
    generate_prepared(files, req, &prepared, device, resident, progress)
}

/// [`generate_with`] for a request already [`prepare`]d (by a caller that needed the settings
/// before the compute, e.g. to check that the images can be saved).
pub fn generate_prepared(
    files: &ModelFiles,
    req: &GenerateRequest,
    prepared: &Prepared,
    device: &Device,
    resident: &mut Resident,
    mut progress: impl FnMut(Progress),
) -> Result<Generated> {
    let Prepared { steps, width, height, guidance, is_dev, max_sequence_length: max_len, .. } = *prepared;
    let mut warnings = prepared.warnings.clone();
    let plan = resident.plan(files, prepared, req)?;

    progress(Progress::Stage("encoding the prompt"));
    let stream_t5 = plan.mode("t5") == Some(crate::engine::memory::Mode::Streamed);
    let prompt =
        encode_prompt(files, &req.prompt, max_len, &prepared.loras, device, resident, stream_t5, &mut warnings)?;

    progress(Progress::Stage("loading the transformer"));
    let schedule = match &files.scheduler {
        Some(path) => ScheduleConfig::from_file(path)?,
        None if is_dev => ScheduleConfig::dev(),
        None => ScheduleConfig::schnell(),
    };
    let dtype = resident.dtype;
    let (grid, latents) = if plan.transformer_streamed() {
        let mut streamed = StreamedFlux::load(&files.transformer, device, dtype)?;
        resident.flux.loads += 1;
        warnings.extend(streamed.set_loras(&prepared.loras)?);
        sample(&streamed.stem, &streamed, &prompt, &schedule, prepared, req, device, &mut progress)?
    } else {
        resident.flux.with(
            || flux::load_transformer(&files.transformer, device, dtype, None),
            |model| {
                warnings.extend(set_loras(model, &prepared.loras)?);
                sample(model, &*model, &prompt, &schedule, prepared, req, device, &mut progress)
            },
        )?
    };

    if is_canceled(req) {
        return Err(Canceled.into());
    }
    non_finite_check(&latents, "the transformer's latents", &prepared.loras)?;
    progress(Progress::Stage("decoding"));
    let pixels = decode(files, &grid, latents, device, resident)?;
    non_finite_check(&pixels, "the VAE's decoded image", &prepared.loras)?;
    let images = pixels.iter().map(|p| to_rgb(p, width, height)).collect();
    Ok(Generated { images, seeds: prepared.seeds(req), steps, width, height, guidance, is_dev, warnings })
}

/// A NaN or infinity would quantize to a black (or white) image that looks like a result: the
/// job fails instead, naming what usually causes it.
fn non_finite_check(values: &[Vec<f32>], what: &str, loras: &[LoraSet]) -> Result<()> {
    let bad: usize = values.iter().map(|v| v.iter().filter(|x| !x.is_finite()).count()).sum();
    if bad == 0 {
        return Ok(());
    }
    let total: usize = values.iter().map(Vec::len).sum();
    let cause = if loras.is_empty() {
        "the model's weights (a file with NaN or huge values?) or f16 overflow (compute in f32: --dtype f32 or [engine] dtype)".to_string()
    } else {
        let names: Vec<String> = loras.iter().map(|l| format!("{} at {}", l.lora.name, l.weight)).collect();
        format!("the LoRAs ({}: NaN values or too high a strength?) or the model's weights", names.join(", "))
    };
    bail!("{what} have {bad} of {total} values that are not finite (NaN or infinity): check {cause}")
}

/// The transformer's part: for each image, its seed's noise denoised into clean latents
/// (unpacked, on the host). `blocks` gives the transformer's blocks (its own, or streamed).
#[allow(clippy::too_many_arguments)]
fn sample(
    model: &Flux,
    blocks: &dyn BlockSource,
    prompt: &PromptEmbeds,
    schedule: &ScheduleConfig,
    prepared: &Prepared,
    req: &GenerateRequest,
    device: &Device,
    progress: &mut impl FnMut(Progress),
) -> Result<(LatentGrid, Vec<Vec<f32>>)> {
    let steps = prepared.steps;
    let grid = LatentGrid {
        channels: model.config.in_channels / 4,
        rows: 2 * (prepared.height / 16),
        cols: 2 * (prepared.width / 16),
    };
    let sigmas = schedule.sigmas(steps, grid.tokens());
    let timesteps = schedule.timesteps(&sigmas);
    let rope = model.rope(prepared.max_sequence_length, grid.rows / 2, grid.cols / 2, device);
    let guidance = prepared.guidance.map(|g| [g]);
    // The sampler's state stays f32 (as diffusers' scheduler upcasts); the transformer sees
    // its compute dtype.
    let dtype = model.img_in.weight.dtype();
    let (txt, y) = (prompt.txt.clone().cast(dtype), prompt.y.clone().cast(dtype));
    // The transformer's velocity v(x, t); diffusers hands it timestep / 1000, in f32.
    let velocity = |x: &Tensor<3>, i: usize| {
        let v = model.forward_with(
            FluxInput {
                img: x.clone().cast(dtype),
                txt: txt.clone(),
                y: y.clone(),
                timesteps: &[timesteps[i] / 1000.0],
                guidance: guidance.as_ref().map(|g| &g[..]),
                rope: &rope,
            },
            blocks,
        )?;
        Ok(v.cast(DType::F32))
    };
    let mut latents = Vec::new();
    for (image, seed) in prepared.seeds(req).into_iter().enumerate() {
        let noise = grid.upload(&pack(&torch_randn(seed, &grid.shape()), grid.channels, grid.rows, grid.cols), device);
        let started = Instant::now();
        let x = denoise(noise, &sigmas, &velocity, |event| {
            match event {
                StepEvent::Start { .. } if is_canceled(req) => return Err(Canceled.into()),
                StepEvent::Start { .. } => {}
                StepEvent::Velocity { step, x, v, sigma } => {
                    let every = req.preview_every;
                    if every > 0 && ((step + 1) % every == 0 || step + 1 == steps) {
                        // The flow's estimate of the clean latents: x0 = x_t − σ·v.
                        let x0 = grid.read(x.clone() - v.clone() * sigma)?;
                        let rgb = crate::engine::preview::latents_to_rgb(&x0, grid.channels, grid.rows, grid.cols);
                        progress(Progress::Preview { image, step: step + 1, rgb });
                    }
                }
                StepEvent::Done { step } => {
                    progress(Progress::Step { image, step: step + 1, steps, seconds: started.elapsed().as_secs_f64() });
                }
            }
            Ok(())
        })?;
        latents.push(grid.read(x)?);
    }
    Ok((grid, latents))
}

fn is_canceled(req: &GenerateRequest) -> bool {
    req.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
}

/// The prompt's conditioning: T5's states and CLIP's pooled output.
pub struct PromptEmbeds {
    /// T5 last hidden state [1, max_len, d_model].
    pub txt: Tensor<3>,
    /// CLIP pooled [1, hidden].
    pub y: Tensor<2>,
}

/// Tokenizes the prompt and runs both text encoders (each loaded in its turn; T5 block by
/// block with `stream_t5`, the memory plan's choice when it does not fit whole); truncation is
/// reported in `warnings`.
#[allow(clippy::too_many_arguments)]
pub fn encode_prompt(
    files: &ModelFiles,
    prompt: &str,
    max_len: usize,
    loras: &[LoraSet],
    device: &Device,
    resident: &mut Resident,
    stream_t5: bool,
    warnings: &mut Vec<String>,
) -> Result<PromptEmbeds> {
    let tokenizers = resident.tokenizers(files)?;
    let t5_tokens = tokenizers.t5(prompt, max_len)?;
    let clip_tokens = tokenizers.clip(prompt)?;
    if t5_tokens.truncated() {
        warnings.push(format!(
            "the prompt has {} T5 tokens; only the first {max_len} are used (raise --max-sequence-length)",
            t5_tokens.untruncated_len
        ));
    }
    if clip_tokens.truncated() {
        warnings
            .push(format!("the prompt has {} CLIP tokens; CLIP sees only the first 77", clip_tokens.untruncated_len));
    }
    let ids = std::slice::from_ref(&t5_tokens.ids);
    let txt = if stream_t5 {
        let streamed = StreamedT5::load(&files.t5, device)?;
        resident.t5.loads += 1;
        streamed.forward(ids, device)?
    } else {
        resident.t5.with(|| T5Encoder::load(&files.t5, device, None), |t5| t5.forward(ids, device))?
    };
    let y = resident.clip.with(
        || ClipText::load(&files.clip, device, None),
        |clip| {
            warnings.extend(set_clip_loras(clip, loras)?);
            Ok(clip.forward(std::slice::from_ref(&clip_tokens.ids))?.pooled)
        },
    )?;
    Ok(PromptEmbeds { txt, y })
}

/// Latents [channels, rows, cols] and their packed form [1, (rows/2)(cols/2), 4·channels].
#[derive(Debug, Clone, Copy)]
struct LatentGrid {
    channels: usize,
    rows: usize,
    cols: usize,
}

impl LatentGrid {
    fn tokens(&self) -> usize {
        (self.rows / 2) * (self.cols / 2)
    }

    fn shape(&self) -> [usize; 4] {
        [1, self.channels, self.rows, self.cols]
    }

    fn upload(&self, packed: &[f32], device: &Device) -> Tensor<3> {
        Tensor::from_data(TensorData::new(packed.to_vec(), [1, self.tokens(), self.channels * 4]), device)
    }

    /// Packed latents on the device → unpacked [channels, rows, cols] on the host.
    fn read(&self, x: Tensor<3>) -> Result<Vec<f32>> {
        let tokens = x.into_data().try_to_vec::<f32>().map_err(|e| anyhow::anyhow!("reading latents: {e:?}"))?;
        Ok(unpack(&tokens, self.channels, self.rows, self.cols))
    }
}

/// Latents → pixels [3, 8·rows, 8·cols] through the VAE (loaded in its turn). Up to 1024² in
/// one piece; larger images in 512-pixel tiles with 128 pixels of overlap.
fn decode(
    files: &ModelFiles,
    grid: &LatentGrid,
    latents: Vec<Vec<f32>>,
    device: &Device,
    resident: &mut Resident,
) -> Result<Vec<Vec<f32>>> {
    let dtype = resident.dtype;
    // bf16 on a CPU with AMX: f32 activations, the products on bf16 tiles (`engine::cpu::amx`).
    let activations = crate::engine::cpu::activation_dtype(device, dtype);
    resident.vae.with(
        || vae::load_vae(&files.vae, device, dtype, None),
        |vae| {
            Ok(latents
                .into_iter()
                .map(|z| {
                    let z = Tensor::<4>::from_data(TensorData::new(z, grid.shape()), device).cast(activations);
                    vae.decode_tiled(z, 128, 16)
                })
                .collect())
        },
    )
}

/// Decoded [3, H, W] in about [-1, 1] → 8-bit RGB: (x/2 + 0.5) clamped, rounded.
pub fn to_rgb(chw: &[f32], width: usize, height: usize) -> image::RgbImage {
    let plane = width * height;
    image::RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let i = y as usize * width + x as usize;
        let q = |c: usize| ((chw[c * plane + i] / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8;
        image::Rgb([q(0), q(1), q(2)])
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_slot_keeps_its_component_only_when_told_to() {
        for keep in [false, true] {
            let mut slot = super::Slot::new(keep);
            let mut loads = 0;
            for _ in 0..2 {
                let got = slot
                    .with(
                        || {
                            loads += 1;
                            Ok(7)
                        },
                        |v| Ok(*v + 1),
                    )
                    .unwrap();
                assert_eq!(got, 8);
            }
            assert_eq!(loads, if keep { 1 } else { 2 });
        }
    }

    #[test]
    fn pack_and_unpack_are_inverse() {
        let v: Vec<f32> = (0..2 * 4 * 6).map(|i| i as f32).collect();
        let p = super::pack(&v, 2, 4, 6);
        // Token 0 holds channel 0's 2×2 patch then channel 1's.
        assert_eq!(&p[..8], &[0., 1., 6., 7., 24., 25., 30., 31.]);
        assert_eq!(super::unpack(&p, 2, 4, 6), v);
    }
}
