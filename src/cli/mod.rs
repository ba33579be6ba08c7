//! The `atelier` command line: the clap definitions of every command, and the admin commands
//! (users, plans, prices, API keys) in [`admin`]. The binary (`src/main.rs`) parses [`Cli`] and
//! runs what it names.

pub mod admin;
pub mod train;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use admin::LedgerCommand;
pub use train::TrainArgs;

#[derive(Parser)]
#[command(name = "atelier", version, about = "Self-hosted FLUX.1 generation with metering")]
pub struct Cli {
    /// Configuration file (defaults to the built-in config.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Data directory (database `atelier.db`, images); overrides the config.
    #[arg(long, global = true)]
    pub data: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Time one FLUX transformer step and the peak memory of loading it.
    Bench(BenchArgs),
    /// Text to image: prompt → PNG (with A1111 `parameters` metadata).
    Generate(GenerateArgs),
    /// Show what a transformer or T5 checkpoint is: its layout and inferred configuration.
    Inspect {
        /// A BFL / ComfyUI .safetensors or .gguf file, or a diffusers transformer folder; or a
        /// T5 encoder (safetensors, folder, GGUF) (a GGUF file's block types and bytes per
        /// type are listed first).
        path: PathBuf,
    },
    /// Write a FLUX transformer (any layout atelier reads: BFL / ComfyUI / diffusers
    /// safetensors, fp8, GGUF) as a city96-layout GGUF, or a T5 encoder as a GGUF with
    /// llama.cpp's T5 names (city96's encoder files): what ComfyUI-GGUF and
    /// stable-diffusion.cpp load.
    Quantize {
        input: PathBuf,
        output: PathBuf,
        /// q8_0, q5_0, q4_0, f16 or bf16 (also q4_k: plain rounding, not llama.cpp's search).
        #[arg(long = "type")]
        ty: String,
    },
    /// Train a FLUX LoRA on a folder of images (kohya or diffusers/PEFT file out), or with
    /// --full every weight of the transformer.
    Train(Box<TrainArgs>),
    /// Train a VAE (AutoencoderKL of the FLUX architecture) on a folder of images; writes a
    /// diffusers vae/ folder with the latent shift and scale measured on the data.
    TrainVae(Box<train::TrainVaeArgs>),
    /// Run the server: browser UI, HTTP API and OpenAI-compatible API, with the job queue.
    Serve(ServeArgs),
    /// Users, plans and prices: `user add|set-plan|grant|cancel|show|api-key`, `plan list`, `price`.
    #[command(flatten)]
    Ledger(LedgerCommand),
}

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (default: server.listen, loopback only). For the LAN: 0.0.0.0:8188.
    #[arg(long)]
    pub listen: Option<String>,
    /// Serve a model: <id>=<diffusers folder or all-in-one .safetensors> (repeatable).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// auto, cpu, wgpu or vulkan (default: engine.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Compute dtype of transformer and VAE: auto, f32, f16 or bf16 (default: engine.dtype).
    #[arg(long)]
    pub dtype: Option<String>,
}

/// Which model a command runs: `--model` and/or single component files (`generate`, `train`).
#[derive(Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// A diffusers pipeline folder, or a model id from config.toml.
    #[arg(long)]
    pub model: Option<String>,
    /// Single files instead of --model (BFL / ComfyUI layouts, `.gguf`, fp8), or beside it to
    /// replace that component of the model.
    #[arg(long)]
    pub transformer: Option<PathBuf>,
    #[arg(long)]
    pub vae: Option<PathBuf>,
    #[arg(long)]
    pub clip: Option<PathBuf>,
    #[arg(long)]
    pub t5: Option<PathBuf>,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub files: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Seed of the first image; image i of a batch uses seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Default: 4 for schnell, 28 for dev.
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Distilled guidance (dev models); default 3.5.
    #[arg(long)]
    pub guidance: Option<f32>,
    /// T5 tokens; default: what the transformer was trained with where its file records it,
    /// else 256 for schnell and 512 for dev.
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// A LoRA to apply, FILE[:WEIGHT] (weight default 1.0, negative allowed); repeatable. Any
    /// FLUX LoRA format (kohya, ComfyUI, diffusers/PEFT, ai-toolkit, OneTrainer, XLabs).
    /// `<lora:name:w>` tags in the prompt name LoRAs of the studio library ([engine] loras_dir).
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<String>,
    /// auto, cpu, wgpu or vulkan.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype of transformer and VAE: auto, f32, f16 or bf16 (default: engine.dtype).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Keep every component loaded for the whole run instead of loading each in its stage
    /// (faster when memory allows; peak memory becomes the sum of the components).
    #[arg(long)]
    pub keep_resident: bool,
    /// Output PNG; a batch writes <stem>-<i>.png.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Device: auto, cpu, wgpu or vulkan.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute dtype: auto (f32 on the CPU, see engine.dtype), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Benchmark this checkpoint instead of a random one.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Time a real pipeline instead (a diffusers folder or a model id from config.toml): one
    /// generation by stage (prompt encoding, transformer load and sampling, decoding) with the
    /// peak RSS of each, every step, and a VAE encode of the image.
    #[arg(long)]
    pub model: Option<String>,
    /// With --model: the prompt, and the image size (default 512x512).
    #[arg(long, default_value = "a red apple on a wooden table")]
    pub prompt: String,
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long, default_value_t = 768)]
    pub hidden: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    #[arg(long, default_value_t = 4)]
    pub double_blocks: usize,
    #[arg(long, default_value_t = 8)]
    pub single_blocks: usize,
    #[arg(long, default_value_t = 1024)]
    pub img_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub txt_tokens: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed steps (after one warm-up step; default 3). With --model: the sampling steps
    /// (default: the model's, 4 for schnell and 28 for dev).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Give the model a guidance embedding (FLUX.1-dev style).
    #[arg(long)]
    pub guidance: bool,
    /// Apply this many random LoRAs (every Linear, unmerged side path) before timing.
    #[arg(long, default_value_t = 0)]
    pub random_loras: usize,
    /// Rank of the random LoRAs, and of the trained LoRA with --train.
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// Quantize the checkpoint to a city96-layout GGUF first and bench that (kept packed in
    /// memory): q8_0, q5_0, q4_0, q4_k, f16 or bf16.
    #[arg(long)]
    pub quant: Option<String>,
    /// Time LoRA training steps (forward, backward, AdamW) instead of forwards.
    #[arg(long)]
    pub train: bool,
    /// With --train: one autodiff graph over the whole model instead of block recompute.
    #[arg(long)]
    pub no_recompute: bool,
    /// Plan the transformer against this much device memory (bytes or e.g. 800MiB): resident
    /// when it fits, else streamed block by block; reports the plan beside the peak RSS.
    #[arg(long)]
    pub memory_budget: Option<String>,
    /// Print where the timed steps spend their time, by operation (wall clock on the CPU
    /// backend; a GPU backend only queues work, so its figures there mean little). With
    /// --train the forward's operations (untracked and under autodiff alike), burn's backward
    /// passes and the optimizer.
    #[arg(long)]
    pub profile: bool,
    /// Time FLUX.1's VAE instead (its real architecture, random weights): a decode of the
    /// latents of the image the tokens describe (1024 tokens: 512x512) and an encode of that
    /// image, --steps runs each after a warm-up.
    #[arg(long)]
    pub vae: bool,
    /// Print the figures as one JSON object (seconds and bytes) instead of lines.
    #[arg(long)]
    pub json: bool,
}
