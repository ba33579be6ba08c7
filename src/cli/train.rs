//! `atelier train`: its options and the progress printer. The work is in `crate::train`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;

use crate::engine::flux::FluxConfig;
use crate::engine::pipeline::ModelFiles;
use crate::engine::weights::StoreDtype;
use crate::train::adamw::{AdamWConfig, LrSchedule};
use crate::train::export::Format;
use crate::train::objective::Timesteps;
use crate::train::params::Targets;
use crate::train::run::{self, Event, Job, Settings};

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub files: super::ModelArgs,
    /// Folder of training images (png, jpg, webp), each with an optional caption `.txt`.
    #[arg(long)]
    pub images: PathBuf,
    /// The trigger word: the caption of images without a `.txt`, and `[trigger]` in captions.
    /// May be left out when every image has its caption.
    #[arg(long, default_value = "")]
    pub trigger: String,
    /// The file to write (the LoRA; with --full the transformer); `<stem>_train/` beside it
    /// gets loss.csv, checkpoints, samples.
    #[arg(long)]
    pub out: PathBuf,
    /// Train every weight of the transformer (f32) instead of a LoRA; the result is a
    /// BFL-layout transformer file. --rank, --alpha, --targets and --format are LoRA options.
    #[arg(long)]
    pub full: bool,
    /// With --full: train the T5 and CLIP text encoders too (both must be transformers folders);
    /// they are written as `<stem>_text_encoder/` and `<stem>_text_encoder_2/` beside --out.
    #[arg(long)]
    pub train_text_encoders: bool,
    /// Where a full run starts: the model's transformer, or random weights of --transformer-config.
    #[arg(long, value_enum, default_value = "checkpoint")]
    pub init: Init,
    /// With --init random: a diffusers transformer config.json giving every size (hidden size
    /// = attention_head_dim × num_attention_heads, num_layers, num_single_layers, ...).
    #[arg(long)]
    pub transformer_config: Option<PathBuf>,
    /// What a full run stores its transformer in (default f32).
    #[arg(long, value_enum)]
    pub save_dtype: Option<StoreDtype>,
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Learning-rate warmup and decay.
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// AdamW weight decay (torch's default).
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// AdamW eps (torch's default).
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Global gradient-norm clip; 0 turns it off.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Bucket area is resolution²; sides are multiples of 16.
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    #[arg(long, value_enum, default_value = "sigmoid")]
    pub timesteps: Timesteps,
    #[arg(long, value_enum, default_value = "all")]
    pub targets: Targets,
    #[arg(long, default_value_t = 0.05)]
    pub caption_dropout: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value = "kohya")]
    pub format: Format,
    /// Checkpoint (LoRA + optimizer state + step) every N steps; 0: never.
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Sample images with the LoRA every N steps (and at the end); 0: never.
    #[arg(long, default_value_t = 0)]
    pub sample_every: usize,
    /// A sample prompt (repeatable); sample i uses seed + i.
    #[arg(long = "sample-prompt")]
    pub sample_prompts: Vec<String>,
    /// Continue from a checkpoint folder (`<stem>_train/checkpoints/step_N`).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 30)]
    pub max_images: usize,
    /// T5 tokens per caption; default: what the transformer was trained with where its file
    /// records it, else 512 for dev and 256 for schnell.
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// One autodiff graph over the whole model instead of block-level recompute (faster,
    /// activation memory grows with the depth).
    #[arg(long)]
    pub no_recompute: bool,
    /// auto, cpu, wgpu or vulkan.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto (f32 on the CPU, bf16 on a GPU), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

/// `--lr-schedule` and `--warmup-steps` (`--lr` is the peak rate).
#[derive(Args, Debug, Clone)]
pub struct ScheduleArgs {
    /// constant, or cosine: decays from the peak towards 0 at the last step.
    #[arg(long, value_enum, default_value = "constant")]
    pub lr_schedule: LrDecay,
    /// Steps over which the rate rises linearly from 0 to --lr.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LrDecay {
    Constant,
    Cosine,
}

impl ScheduleArgs {
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule { warmup_steps: self.warmup_steps, cosine: self.lr_schedule == LrDecay::Cosine }
    }
}

/// `--init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Init {
    /// The model's own transformer weights.
    Checkpoint,
    /// Random weights (U(±1/√fan_in), norm scales 1) drawn from --seed, sized by --transformer-config.
    Random,
}

impl TrainArgs {
    /// The random-init configuration, after refusing option combinations that would be
    /// ignored.
    pub fn init_config(&self) -> Result<Option<FluxConfig>> {
        if self.save_dtype.is_some() && !self.full {
            bail!("--save-dtype is for --full runs (a LoRA is written in f32)");
        }
        if self.train_text_encoders && !self.full {
            bail!("--train-text-encoders is for --full runs (a LoRA trains the transformer only)");
        }
        if self.full {
            let d = Settings::default();
            let lora_options = [
                ("--rank", self.rank != d.rank),
                ("--alpha", self.alpha != d.alpha),
                ("--targets", self.targets != d.targets),
                ("--format", self.format != d.format),
                ("--no-recompute", self.no_recompute),
            ];
            if let Some((flag, _)) = lora_options.iter().find(|(_, given)| *given) {
                bail!("{flag} is a LoRA option: --full trains every weight");
            }
        }
        match (self.init, &self.transformer_config) {
            (Init::Checkpoint, None) => Ok(None),
            (Init::Checkpoint, Some(_)) => bail!("--transformer-config sizes a random model: it needs --init random"),
            (Init::Random, None) => {
                bail!("--init random needs --transformer-config (a diffusers transformer config.json)")
            }
            (Init::Random, Some(_)) if self.files.transformer.is_some() => {
                bail!("--init random draws the transformer: leave out --transformer")
            }
            (Init::Random, Some(path)) => Ok(Some(read_config(path, FluxConfig::from_diffusers_json)?)),
        }
    }

    pub fn settings(&self) -> Settings {
        Settings {
            trigger: self.trigger.clone(),
            steps: self.steps,
            rank: self.rank,
            alpha: self.alpha,
            adamw: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                eps: self.eps,
                max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
                ..AdamWConfig::default()
            },
            batch: self.batch,
            resolution: self.resolution,
            timesteps: self.timesteps,
            targets: self.targets,
            caption_dropout: self.caption_dropout,
            seed: self.seed,
            format: self.format,
            save_every: self.save_every,
            sample_every: self.sample_every,
            sample_prompts: self.sample_prompts.clone(),
            max_images: self.max_images,
            max_sequence_length: self.max_sequence_length,
            recompute: !self.no_recompute,
            full: self.full,
            save_dtype: self.save_dtype.unwrap_or(StoreDtype::F32),
            lr_schedule: self.schedule.schedule(),
            train_text_encoders: self.train_text_encoders,
        }
    }
}

/// Logs stages and saves, and prints one progress line per step on stderr (rewritten in place
/// on a terminal).
fn progress_printer() -> impl FnMut(Event) {
    let terminal = std::io::stderr().is_terminal();
    move |e| match e {
        Event::Stage(s) => log::info!("{s}"),
        Event::Warning(w) => log::warn!("{w}"),
        Event::Saved(p) => log::info!("saved {}", p.display()),
        Event::Sample(p) => log::info!("sample {}", p.display()),
        Event::Boundary { .. } => {}
        Event::Step { step, steps, loss, mean, its, eta_s, skipped } => {
            let note = if skipped { "  (skipped: gradients not finite)" } else { "" };
            let line =
                format!("step {step}/{steps}  loss {loss:.4}  mean {mean:.4}  {its:.2} it/s  ETA {eta_s:.0}s{note}");
            if terminal {
                eprint!("\r{line}   ");
                if step == steps {
                    eprintln!();
                }
                let _ = std::io::stderr().flush();
            } else {
                eprintln!("{line}");
            }
        }
    }
}

/// Runs the training with a progress line per step on stderr.
pub fn run(args: &TrainArgs, files: ModelFiles, device: &Device, dtype: burn::tensor::DType) -> Result<()> {
    let job = Job {
        files,
        images: args.images.clone(),
        out: args.out.clone(),
        resume: args.resume.clone(),
        init: args.init_config()?,
        dtype,
        stop_after: None,
    };
    run::train(&job, &args.settings(), device, progress_printer())?;
    println!("{}", args.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct TrainVaeArgs {
    /// Folder of training images (png, jpg, webp; captions ignored).
    #[arg(long)]
    pub images: PathBuf,
    /// The diffusers vae/ folder to write; `<name>_train/` beside it gets loss.csv and checkpoints.
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this VAE (file or folder) instead of random weights.
    #[arg(long, conflicts_with = "vae_config")]
    pub vae: Option<PathBuf>,
    /// Random weights sized by this diffusers AutoencoderKL config.json (block_out_channels,
    /// layers_per_block, latent_channels, norm_num_groups, in/out channels).
    #[arg(long)]
    pub vae_config: Option<PathBuf>,
    /// Images never trained on; their reconstruction PSNR is reported (and kept in holdout.json).
    #[arg(long)]
    pub holdout: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Side of the square training crops (a multiple of 8).
    #[arg(long, default_value_t = 64)]
    pub resolution: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Learning-rate warmup and decay.
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    /// Weight of the KL term (per latent value) against the L1 term (per pixel).
    #[arg(long, default_value_t = 1e-4)]
    pub kl_weight: f64,
    /// Train only the decoder of --vae: the encoder, and so the latent space with its shift and
    /// scale, stay as they are, so a transformer trained on this VAE's latents keeps working
    /// (how Stability's ft-MSE VAEs were made).
    #[arg(long)]
    pub decoder_only: bool,
    /// Fine-tune encoder and decoder of --vae while holding the encoder's latents near its own:
    /// WEIGHT × their mean squared drift (in the scaled units a transformer sees) joins the loss,
    /// and the shift and scale stay, so a transformer trained on this VAE keeps working while the
    /// encoder helps the reconstruction too (the drift on --holdout is reported). 0: a plain
    /// fine-tune of the whole VAE, its shift and scale measured again.
    #[arg(long, value_name = "WEIGHT", conflicts_with = "decoder_only")]
    pub keep_latents: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint every N steps; 0: never.
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Continue from a checkpoint folder (`<name>_train/checkpoints/step_N`).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 10_000)]
    pub max_images: usize,
    #[arg(long, value_enum, default_value = "f32")]
    pub save_dtype: StoreDtype,
    /// auto or cpu (VAE training runs in f32).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// A model configuration file read by `parse` (errors name the file).
fn read_config<T>(path: &std::path::Path, parse: fn(&str) -> Result<T>) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&text).with_context(|| path.display().to_string())
}

/// Runs `atelier train-vae` with a progress line per step on stderr.
pub fn run_vae(args: &TrainVaeArgs, device: &Device) -> Result<()> {
    use crate::train::vae::{VaeInit, VaeJob, VaeSettings, train_vae};
    let init = match (&args.vae, &args.vae_config) {
        (Some(path), None) => VaeInit::From(path.clone()),
        (None, Some(path)) => VaeInit::Random(read_config(path, crate::engine::vae::VaeConfig::from_diffusers_json)?),
        _ => bail!("give --vae (a VAE to fine-tune) or --vae-config (sizes of a new one)"),
    };
    let job = VaeJob {
        images: args.images.clone(),
        out: args.out.clone(),
        init,
        resume: args.resume.clone(),
        holdout: args.holdout.clone(),
        stop_after: None,
    };
    let settings = VaeSettings {
        steps: args.steps,
        batch: args.batch,
        resolution: args.resolution,
        adamw: AdamWConfig { lr: args.lr, ..AdamWConfig::default() },
        kl_weight: args.kl_weight,
        decoder_only: args.decoder_only,
        keep_latents: args.keep_latents.unwrap_or(0.0),
        seed: args.seed,
        save_every: args.save_every,
        max_images: args.max_images,
        save_dtype: args.save_dtype,
        lr_schedule: args.schedule.schedule(),
    };
    let mut printer = progress_printer();
    let trained = train_vae(&job, &settings, device, |e| {
        printer(e);
        run::Control::Continue
    })?;
    log::info!("latent shift {:.4}, scale {:.4}", trained.shift_factor, trained.scaling_factor);
    if let Some(psnr) = trained.holdout_psnr {
        log::info!("hold-out reconstruction PSNR {psnr:.2} dB");
    }
    if let Some(drift) = trained.latent_drift {
        log::info!("hold-out latent drift from the init's: {drift:.4} (rms, scaled units)");
    }
    println!("{}", args.out.display());
    Ok(())
}
