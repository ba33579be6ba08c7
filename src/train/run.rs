//! The training run: check everything, cache the encodings, then steps of (batch → loss and
//! LoRA gradients → AdamW), with progress, a loss log, checkpoints, samples and the export.
//!
//! Every random draw of step s (which images, caption dropout, σ, ε) comes from generators
//! seeded with (seed, s), never from a generator carried across steps: a run resumed at step
//! k draws exactly what the uninterrupted run draws.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::engine::flux::{self, Flux, FluxConfig};
use crate::engine::noise::{Mt19937, TorchGenerator};
use crate::engine::pipeline::ModelFiles;

use super::adamw::{AdamWConfig, LossScale, LrSchedule, StepOutcome};
use super::cache::{self, CachedLatents, CachedText};
use super::checkpoint;
use super::dataset::{self, Item};
use super::export::{self, Format, RunInfo};
use super::full::FullParams;
use super::objective::{Backprop, Batch, Timesteps, sample_sigmas};
use super::params::{Targets, TrainableLora};
use super::samples;
use super::text::TrainedText;
use super::trainee::Trainee;
use crate::engine::weights::StoreDtype;

/// The settings of a run (`atelier train`'s options).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    pub trigger: String,
    pub steps: usize,
    pub rank: usize,
    pub alpha: f32,
    pub adamw: AdamWConfig,
    pub batch: usize,
    pub resolution: usize,
    pub timesteps: Timesteps,
    pub targets: Targets,
    pub caption_dropout: f32,
    pub seed: u64,
    pub format: Format,
    /// Checkpoint every this many steps (0: never).
    pub save_every: usize,
    /// Samples every this many steps (0: never), one image per prompt.
    pub sample_every: usize,
    pub sample_prompts: Vec<String>,
    pub max_images: usize,
    /// T5 length of the cached captions (None: 512 for dev, 256 for schnell).
    pub max_sequence_length: Option<usize>,
    /// Block-level recompute (default) or one autodiff graph over the whole model.
    pub recompute: bool,
    /// Train every weight of the transformer instead of a LoRA (`--full`).
    #[serde(default)]
    pub full: bool,
    /// What a full run writes its transformer in.
    #[serde(default = "default_save_dtype")]
    pub save_dtype: StoreDtype,
    /// Warmup and decay of the learning rate (`adamw.lr` is its peak).
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// With `full`: train the T5 and CLIP encoders too (see `train::text`).
    #[serde(default)]
    pub train_text_encoders: bool,
}

fn default_save_dtype() -> StoreDtype {
    StoreDtype::F32
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            trigger: String::new(),
            steps: 1000,
            rank: 16,
            alpha: 16.0,
            adamw: AdamWConfig::default(),
            batch: 1,
            resolution: 512,
            timesteps: Timesteps::Sigmoid,
            targets: Targets::All,
            caption_dropout: 0.05,
            seed: 0,
            format: Format::Kohya,
            save_every: 0,
            sample_every: 0,
            sample_prompts: Vec::new(),
            max_images: 30,
            max_sequence_length: None,
            recompute: true,
            full: false,
            save_dtype: StoreDtype::F32,
            lr_schedule: LrSchedule::default(),
            train_text_encoders: false,
        }
    }
}

/// Where a run reads from and writes to.
#[derive(Debug, Clone)]
pub struct Job {
    pub files: ModelFiles,
    pub images: PathBuf,
    /// The LoRA file written at the end. Beside it, `<stem>_train/` holds `loss.csv`,
    /// `checkpoints/step_N/` and `samples/`.
    pub out: PathBuf,
    pub resume: Option<PathBuf>,
    /// Full training from random weights of this configuration (`--init random --transformer-config`):
    /// drawn from the seed into `<stem>_train/init.safetensors`, which stands in for
    /// `files.transformer`.
    pub init: Option<FluxConfig>,
    pub dtype: DType,
    /// Stop after this many steps of this invocation (tests of `--resume`); None: run to
    /// `settings.steps`.
    pub stop_after: Option<usize>,
}

/// What a run reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    Stage(String),
    Warning(String),
    Step {
        step: usize,
        steps: usize,
        loss: f32,
        mean: f32,
        its: f64,
        eta_s: f64,
        skipped: bool,
    },
    Saved(PathBuf),
    Sample(PathBuf),
    /// Step `done` is complete (its checkpoint and samples too): the caller's answer
    /// ([`Control`]) says how to go on.
    Boundary {
        done: usize,
    },
}

/// What a run does at a step boundary (the answer to [`Event::Boundary`]; other events'
/// answers are ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Save a checkpoint now, then continue.
    Checkpoint,
    /// Save a checkpoint and return (to be resumed from it later).
    Pause,
    /// Return now without saving anything.
    Stop,
}

/// The result of a run.
pub struct Trained {
    /// The LoRA (None for full training, whose result is the file written).
    pub lora: Option<TrainableLora>,
    pub losses: Vec<f32>,
    /// The file written, None when the run stopped early (`stop_after`).
    pub out: Option<PathBuf>,
}

/// The folder beside `out` with the run's log, checkpoints and samples.
pub fn run_dir(out: &Path) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("lora");
    out.with_file_name(format!("{stem}_train"))
}

/// Runs the training. Every input is checked before any compute.
pub fn train(job: &Job, settings: &Settings, device: &Device, mut on: impl FnMut(Event)) -> Result<Trained> {
    train_with(job, settings, device, |e| {
        on(e);
        Control::Continue
    })
}

/// [`train`] with a say at each step boundary ([`Control`]): the caller may ask for a
/// checkpoint, pause (checkpoint and return; resume later from it) or stop. A run that returns
/// early has `out: None`.
pub fn train_with(
    job: &Job,
    settings: &Settings,
    device: &Device,
    mut on: impl FnMut(Event) -> Control,
) -> Result<Trained> {
    let s = settings;
    if s.steps == 0 || s.batch == 0 {
        bail!("--steps and --batch must be at least 1");
    }
    if !(0.0..1.0).contains(&s.caption_dropout) {
        bail!("--caption-dropout must be in [0, 1), not {}", s.caption_dropout);
    }
    if !(s.adamw.lr > 0.0 && s.adamw.lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    if s.resolution < 16 || !s.resolution.is_multiple_of(16) {
        bail!("--resolution must be a positive multiple of 16, not {}", s.resolution);
    }
    if s.sample_every > 0 && s.sample_prompts.is_empty() {
        bail!("--sample-every needs at least one --sample-prompt");
    }
    if job.init.is_some() && !s.full {
        bail!("--init random starts every weight from scratch: it needs --full");
    }
    if s.train_text_encoders && !s.full {
        bail!("--train-text-encoders trains the encoders with every transformer weight: it needs --full");
    }
    if s.full && job.dtype != DType::F32 {
        bail!("full training keeps the weights in f32: use --dtype f32 (or auto on the CPU)");
    }
    let alpha_ok = s.alpha > 0.0 && s.alpha.is_finite();
    if !s.full && !alpha_ok {
        bail!("--alpha must be a positive number, not {} (the LoRA's scale is alpha / rank)", s.alpha);
    }
    if s.sample_prompts.iter().any(|p| p.trim().is_empty()) {
        bail!("--sample-prompt must not be empty");
    }
    crate::engine::outfile::check_writable(&job.out)?;
    let items = dataset::scan(&job.images, &s.trigger, s.resolution, s.max_images)?;
    let settings_json = serde_json::to_string(&Restartable::new(s, job.init.as_ref()))?;
    if let Some(dir) = &job.resume {
        checkpoint::check_settings(dir, &settings_json)?;
    }
    // Model files: headers only (a model without a transformer, or with mismatched parts, is
    // refused here, before the run's folder exists). A random init is checked once written.
    let checked = if job.init.is_none() { Some(job.files.check()?) } else { None };
    if let Some(config) = &checked {
        let rank_limit = config.hidden_size.min(config.mlp_hidden_dim);
        if !s.full && (s.rank == 0 || s.rank > rank_limit) {
            bail!("--rank {} does not fit this model: it must be 1..={rank_limit} (its hidden size)", s.rank);
        }
        if let (Some(dir), false) = (&job.resume, s.full) {
            checkpoint::check_fits(dir, config).with_context(|| format!("resuming from {}", dir.display()))?;
        }
    }
    if s.train_text_encoders {
        super::text::check_sources(&job.files)?;
    }
    let out_dir = run_dir(&job.out);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let files = match &job.init {
        Some(config) => {
            let path = out_dir.join("init.safetensors");
            flux::write_random_checkpoint(config, &path, s.seed)?;
            ModelFiles { transformer: path, ..job.files.clone() }
        }
        None => job.files.clone(),
    };
    let config = match checked {
        Some(config) => config,
        None => files.check()?,
    };

    on(Event::Stage(format!("encoding {} images and their captions", items.len())));
    let is_dev = config.guidance_embed;
    let max_len = s.max_sequence_length.unwrap_or_else(|| flux::default_sequence_length(&files.transformer, is_dev));
    let latents = cache::encode_images(&files, &items, device)?;
    let mut texts: Vec<String> = items.iter().flat_map(|i| i.variants()).map(String::from).collect();
    texts.push(String::new()); // the caption-dropout text
    texts.extend(s.sample_prompts.iter().cloned());
    let mut warnings = Vec::new();
    let text_cache = cache::encode_texts(&files, &texts, max_len, device, &mut warnings)?;
    for w in warnings {
        on(Event::Warning(w));
    }

    on(Event::Stage("loading the transformer".into()));
    let (mut model, mut trainee, mut opt, start) = if s.full && s.train_text_encoders {
        let (mut model, named, tensors) = flux::load_transformer_named(&files.transformer, device, job.dtype, None)?;
        let mut text = TrainedText::load(&files, FullParams::new(named, tensors)?, &texts, max_len, device)?;
        let (opt, start) = match &job.resume {
            Some(dir) => text.load_checkpoint(dir, &mut model, device)?,
            None => (text.optimizer(&model, s.adamw), 0),
        };
        (model, Trainee::FullWithText(Box::new(text)), opt, start)
    } else if s.full {
        let (model, named, tensors) = flux::load_transformer_named(&files.transformer, device, job.dtype, None)?;
        let params = FullParams::new(named, tensors)?;
        match &job.resume {
            Some(dir) => {
                let (model, opt, step) = params.load_checkpoint(dir, model, device)?;
                (model, Trainee::Full(params), opt, step)
            }
            None => {
                let trainee = Trainee::Full(params);
                let opt = trainee.optimizer(&model, s.adamw);
                (model, trainee, opt, 0)
            }
        }
    } else {
        let mut model = flux::load_transformer(&files.transformer, device, job.dtype, None)?;
        match &job.resume {
            Some(dir) => {
                let r = checkpoint::load(dir, device)?;
                (model, Trainee::Lora(r.lora), r.optimizer, r.step)
            }
            None => {
                let trainee =
                    Trainee::Lora(TrainableLora::new(&mut model, s.targets, s.rank, s.alpha, s.seed, device)?);
                let mut opt = trainee.optimizer(&model, s.adamw);
                // f16 activations: dynamic loss scaling (a resumed run keeps its checkpoint's).
                opt.loss_scale = LossScale::for_dtype(crate::engine::cpu::activation_dtype(device, job.dtype));
                (model, trainee, opt, 0)
            }
        }
    };
    on(Event::Stage(trainee.describe()));

    let csv_path = out_dir.join("loss.csv");
    let mut csv = open_log(&csv_path, start, "step,loss,mean,grad_norm,seconds")?;
    let how = if s.recompute { Backprop::Recompute } else { Backprop::Plain };
    // bf16 on a CPU with AMX: f32 activations over bf16 Linear tiles (`engine::cpu::amx`).
    let activations = crate::engine::cpu::activation_dtype(device, job.dtype);
    let end = job.stop_after.map_or(s.steps, |n| (start + n).min(s.steps));
    let mut losses = Vec::new();
    // The running mean spans a resume (the last 50 losses logged before it), and the speed
    // counts only time spent on steps: a pause for image jobs is not slowness.
    let mut window = recent_losses(&csv_path, start, MEAN_WINDOW);
    let mut busy = std::time::Duration::ZERO;
    for step in start..end {
        let t0 = Instant::now();
        let batch = make_batch(&model, &items, &latents, &text_cache, s, step, activations, device)?;
        opt.config.lr = s.lr_schedule.lr(s.adamw.lr, step, s.steps);
        let (loss, outcome) = trainee.step(&mut model, &mut opt, &batch, how)?;
        losses.push(loss);
        // A skipped (non-finite) step stays out of the mean rather than spoil 50 steps of it.
        if loss.is_finite() {
            if window.len() == MEAN_WINDOW {
                window.pop_front();
            }
            window.push_back(loss);
        }
        let mean = if window.is_empty() { loss } else { window.iter().sum::<f32>() / window.len() as f32 };
        let done = step + 1 - start;
        busy += t0.elapsed();
        let its = done as f64 / busy.as_secs_f64();
        let norm = match outcome {
            StepOutcome::Applied { grad_norm } => grad_norm,
            StepOutcome::SkippedNonFinite => f64::NAN,
        };
        writeln!(csv, "{},{},{},{},{:.3}", step + 1, loss, mean, norm, t0.elapsed().as_secs_f64())?;
        on(Event::Step {
            step: step + 1,
            steps: s.steps,
            loss,
            mean,
            its,
            eta_s: (s.steps - step - 1) as f64 / its,
            skipped: outcome == StepOutcome::SkippedNonFinite,
        });
        let n = step + 1;
        if s.save_every > 0 && n % s.save_every == 0 && n < s.steps {
            let dir = out_dir.join("checkpoints").join(format!("step_{n}"));
            trainee.save(&dir, &model, &opt, n, s.seed, &settings_json)?;
            on(Event::Saved(dir));
        }
        if s.sample_every > 0 && (n % s.sample_every == 0 || n == s.steps) {
            for (i, prompt) in s.sample_prompts.iter().enumerate() {
                let path = out_dir.join("samples").join(format!("step_{n:06}_{i}.png"));
                let seed = s.seed.wrapping_add(i as u64);
                // Trained encoders encode the prompt as they are now; frozen ones were cached.
                let fresh = match &trainee {
                    Trainee::FullWithText(t) => Some(t.encode(prompt, device)?),
                    _ => None,
                };
                samples::render(
                    &files,
                    &mut model,
                    trainee.lora(),
                    fresh.as_ref().unwrap_or(&text_cache[prompt]),
                    s.resolution,
                    seed,
                    &path,
                    device,
                )?;
                on(Event::Sample(path));
            }
        }
        if n < end {
            let saved = s.save_every > 0 && n % s.save_every == 0;
            match on(Event::Boundary { done: n }) {
                Control::Continue => {}
                Control::Checkpoint if saved => {}
                c @ (Control::Checkpoint | Control::Pause) => {
                    if !saved {
                        let dir = out_dir.join("checkpoints").join(format!("step_{n}"));
                        trainee.save(&dir, &model, &opt, n, s.seed, &settings_json)?;
                        on(Event::Saved(dir));
                    }
                    if c == Control::Pause {
                        return Ok(Trained { lora: trainee.into_lora(), losses, out: None });
                    }
                }
                Control::Stop => return Ok(Trained { lora: trainee.into_lora(), losses, out: None }),
            }
        }
    }
    if end < s.steps {
        // Stopped early: leave a checkpoint to resume from.
        let dir = out_dir.join("checkpoints").join(format!("step_{end}"));
        trainee.save(&dir, &model, &opt, end, s.seed, &settings_json)?;
        on(Event::Saved(dir));
        return Ok(Trained { lora: trainee.into_lora(), losses, out: None });
    }
    match &trainee {
        Trainee::Lora(lora) => {
            let info = RunInfo {
                trigger: s.trigger.clone(),
                steps: s.steps,
                resolution: s.resolution,
                images: items.len(),
                base_model: model_name(&job.files.transformer),
                base_model_hash: base_model_hash(&files.transformer)?,
                is_dev,
                lr: s.adamw.lr,
                seed: s.seed,
            };
            export::write(lora, s.format, &info, &job.out)?
        }
        Trainee::Full(params) => {
            let meta = full_metadata(&model, &settings_json, items.len(), max_len)?;
            params.export(&model, &job.out, s.save_dtype, &as_pairs(&meta))?
        }
        Trainee::FullWithText(text) => {
            let meta = full_metadata(&model, &settings_json, items.len(), max_len)?;
            for dir in text.export(&model, &job.out, s.save_dtype, &as_pairs(&meta))? {
                on(Event::Saved(dir));
            }
        }
    }
    on(Event::Saved(job.out.clone()));
    Ok(Trained { lora: trainee.into_lora(), losses, out: Some(job.out.clone()) })
}

/// What a fully trained transformer file records besides its tensors.
fn full_metadata(model: &Flux, settings_json: &str, images: usize, max_len: usize) -> Result<Vec<(String, String)>> {
    Ok(vec![
        // The RoPE split cannot be read off the shapes: it travels in the metadata.
        ("axes_dims_rope".into(), serde_json::to_string(&model.config.axes_dim)?),
        ("atelier_training".into(), settings_json.to_string()),
        ("atelier_images".into(), images.to_string()),
        // The captions' T5 length: generation defaults to it (flux::default_sequence_length).
        ("max_sequence_length".into(), max_len.to_string()),
    ])
}

fn as_pairs(meta: &[(String, String)]) -> Vec<(&str, &str)> {
    meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Steps the running mean of the loss spans.
const MEAN_WINDOW: usize = 50;

/// The run's `loss.csv`, open for appending: new (with `header`) for a run from step 0; for a
/// resume from step `start`, without the rows an earlier run logged past `start` (they are
/// about to be logged again).
pub(crate) fn open_log(path: &Path, start: usize, header: &str) -> Result<std::fs::File> {
    let mut kept = format!("{header}\n");
    if start > 0 {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        for line in old.lines().skip(1) {
            if line.split(',').next().and_then(|f| f.parse::<usize>().ok()).is_some_and(|step| step <= start) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    // Replaced whole, so a crash here keeps the old log.
    crate::engine::outfile::write_replacing(path, |f| Ok(f.write_all(kept.as_bytes())?))?;
    std::fs::OpenOptions::new().append(true).open(path).with_context(|| format!("cannot write {}", path.display()))
}

/// The last `n` losses `loss.csv` logged for steps up to `upto` (a resumed run's earlier
/// steps; a step logged twice counts once, the later row).
fn recent_losses(csv: &Path, upto: usize, n: usize) -> std::collections::VecDeque<f32> {
    let text = if upto == 0 { String::new() } else { std::fs::read_to_string(csv).unwrap_or_default() };
    let mut by_step = BTreeMap::new();
    for line in text.lines().skip(1) {
        let mut f = line.split(',');
        if let (Some(Ok(step)), Some(Ok(loss))) = (f.next().map(str::parse::<usize>), f.next().map(str::parse::<f32>))
            && step <= upto
        {
            by_step.insert(step, loss);
        }
    }
    let all: Vec<f32> = by_step.into_values().filter(|l| l.is_finite()).collect();
    all[all.len().saturating_sub(n)..].iter().copied().collect()
}

/// The settings a resumed run must share with the run that wrote the checkpoint (sampling
/// and saving may change).
#[derive(serde::Serialize)]
struct Restartable {
    trigger: String,
    steps: usize,
    rank: usize,
    alpha: f32,
    adamw: AdamWConfig,
    batch: usize,
    resolution: usize,
    timesteps: Timesteps,
    targets: Targets,
    caption_dropout: f32,
    seed: u64,
    // The fields below are only written when set, so the settings of LoRA checkpoints from
    // before they existed still match.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    full: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_sequence_length: Option<usize>,
    /// The configuration of a random start (`--init random`), which no shape may reveal (RoPE axes).
    #[serde(skip_serializing_if = "Option::is_none")]
    init: Option<String>,
    #[serde(skip_serializing_if = "LrSchedule::is_constant")]
    lr_schedule: LrSchedule,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    train_text_encoders: bool,
}

impl Restartable {
    fn new(s: &Settings, init: Option<&FluxConfig>) -> Self {
        Restartable {
            trigger: s.trigger.clone(),
            steps: s.steps,
            rank: s.rank,
            alpha: s.alpha,
            adamw: s.adamw,
            batch: s.batch,
            resolution: s.resolution,
            timesteps: s.timesteps,
            targets: s.targets,
            caption_dropout: s.caption_dropout,
            seed: s.seed,
            full: s.full,
            max_sequence_length: s.max_sequence_length,
            init: init.map(|c| format!("{c:?}")),
            lr_schedule: s.lr_schedule,
            train_text_encoders: s.train_text_encoders,
        }
    }
}

/// The items of step `step`: the epoch's shuffled order (a permutation drawn from the seed and
/// the epoch), from position step·batch on; the rest of the batch are the next items of the
/// same bucket in that order (a batch must share one size).
pub(super) fn pick(items: &[Item], seed: u64, batch: usize, step: usize) -> Vec<usize> {
    let n = items.len();
    let pos = step * batch;
    let (epoch, at) = (pos / n, pos % n);
    let mut rng = Mt19937::new(seed ^ 0x5eed_0000_0000 ^ epoch as u64);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.next_u32() as usize % (i + 1));
    }
    let first = order[at];
    let size = (items[first].width, items[first].height);
    let mut chosen = vec![first];
    let mut k = at;
    while chosen.len() < batch {
        k = (k + 1) % n;
        let i = order[k];
        if (items[i].width, items[i].height) == size {
            chosen.push(i); // with fewer images in the bucket than the batch, images repeat
        }
    }
    chosen
}

#[allow(clippy::too_many_arguments)]
fn make_batch(
    model: &Flux,
    items: &[Item],
    latents: &[CachedLatents],
    texts: &BTreeMap<String, CachedText>,
    s: &Settings,
    step: usize,
    dtype: DType,
    device: &Device,
) -> Result<Batch> {
    let chosen = pick(items, s.seed, s.batch, step);
    let mut rng = TorchGenerator::new(s.seed.wrapping_mul(1_000_003).wrapping_add(step as u64));
    let mut coin = Mt19937::new(s.seed.wrapping_add(coin_offset(step)));
    let first = &latents[chosen[0]];
    let (tokens, width) = (first.tokens(), first.channels * 4);
    let b = chosen.len();
    let sigmas = sample_sigmas(s.timesteps, b, tokens, &mut rng);
    let noise = rng.randn(b * tokens * width);
    let mut x0 = Vec::with_capacity(b * tokens * width);
    let (mut txts, mut ys, mut captions) = (Vec::new(), Vec::new(), Vec::new());
    for &i in &chosen {
        x0.extend_from_slice(&latents[i].packed);
        let caption = choose_caption(&items[i], s.caption_dropout, &mut coin);
        let (t, y) = texts[caption].upload(device, dtype);
        txts.push(t);
        ys.push(y);
        captions.push(caption.to_string());
    }
    let txt = Tensor::cat(txts, 0);
    let txt_len = txt.dims()[1];
    let up = |v: Vec<f32>| Tensor::<3>::from_data(TensorData::new(v, [b, tokens, width]), device).cast(dtype);
    Ok(Batch {
        x0: up(x0),
        noise: up(noise),
        guidance: model.config.guidance_embed.then(|| vec![1.0; b]),
        sigmas,
        txt,
        y: Tensor::cat(ys, 0),
        rope: model.rope(txt_len, first.rows / 2, first.cols / 2, device),
        captions,
    })
}

/// The caption item `item` trains with this time: "" with probability `dropout`, else one of
/// its [`Item::variants`] (drawn only when there are several, so single captions draw exactly
/// what they did before variants existed).
fn choose_caption<'a>(item: &'a Item, dropout: f32, coin: &mut Mt19937) -> &'a str {
    let dropped = (coin.next_u32() as f64 / (u32::MAX as f64 + 1.0)) < dropout as f64;
    let variants = item.variants();
    match (dropped, variants.len()) {
        (true, _) => "",
        (false, 1) => variants[0],
        (false, n) => variants[coin.next_u32() as usize % n],
    }
}

/// A per-step seed offset for the caption-dropout coin, distinct from the noise stream's.
fn coin_offset(step: usize) -> u64 {
    (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn model_name(transformer: &Path) -> String {
    // A diffusers folder's transformer/ is named after the pipeline folder above it.
    let p = if transformer.file_name().is_some_and(|n| n == "transformer") {
        transformer.parent().unwrap_or(transformer)
    } else {
        transformer
    };
    p.file_stem().and_then(|s| s.to_str()).unwrap_or("flux").to_string()
}

/// sha256 of the transformer's weight file(s) (a diffusers folder: its safetensors files in
/// name order), hex: the base model's identity in the LoRA's metadata.
fn base_model_hash(transformer: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut files: Vec<PathBuf> = if transformer.is_dir() {
        std::fs::read_dir(transformer)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect()
    } else {
        vec![transformer.to_path_buf()]
    };
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        let mut file = std::fs::File::open(&f).with_context(|| format!("cannot open {}", f.display()))?;
        std::io::copy(&mut file, &mut h)?;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_runs_mean_starts_from_the_losses_logged_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("loss.csv");
        let text =
            "step,loss,mean,grad_norm,seconds\n1,1,1,0,0\n2,2,1.5,0,0\n3,9,4,0,0\n3,3,2,0,0\n4,NaN,2,0,0\n5,5,3,0,0\n";
        std::fs::write(&csv, text).unwrap();
        // Resumed at step 4: steps 1-4 count, step 3 once (its later row), the NaN not at all.
        assert_eq!(recent_losses(&csv, 4, 50), [1.0, 2.0, 3.0]);
        assert_eq!(recent_losses(&csv, 4, 2), [2.0, 3.0]);
        assert!(recent_losses(&csv, 0, 50).is_empty(), "a fresh run starts empty");
    }

    #[test]
    fn every_caption_variant_is_drawn_and_dropout_still_applies() {
        let item = Item {
            path: PathBuf::new(),
            caption: "cat\ncat face\ncat face, animal".into(),
            source: (1, 1),
            width: 16,
            height: 16,
        };
        let mut seen = std::collections::BTreeMap::new();
        for step in 0..300 {
            let mut coin = Mt19937::new(5u64.wrapping_add(coin_offset(step)));
            *seen.entry(choose_caption(&item, 0.1, &mut coin)).or_insert(0) += 1;
        }
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), ["", "cat", "cat face", "cat face, animal"]);
        assert!(seen.values().all(|n| *n >= 15), "{seen:?}");
        let single = Item { caption: "cat".into(), ..item };
        let mut coin = Mt19937::new(1);
        assert_eq!(choose_caption(&single, 0.0, &mut coin), "cat");
    }

    #[test]
    fn batches_share_a_bucket_and_epochs_cover_every_image() {
        let item =
            |w: usize| Item { path: PathBuf::new(), caption: String::new(), source: (1, 1), width: w, height: 16 };
        let items = vec![item(16), item(32), item(16), item(32), item(16)];
        let mut seen = vec![0; 5];
        for step in 0..5 {
            let c = pick(&items, 3, 1, step);
            seen[c[0]] += 1;
        }
        assert_eq!(seen, vec![1; 5], "one epoch of batch 1 visits every image once");
        for step in 0..10 {
            let c = pick(&items, 3, 2, step);
            assert_eq!(items[c[0]].width, items[c[1]].width);
        }
        assert_eq!(pick(&items, 3, 2, 7), pick(&items, 3, 2, 7));
    }
}
