//! The `atelier` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use atelier::bench::{self, BenchSpec};
use atelier::config::Config;
use atelier::engine::device::{self, DeviceChoice};
use atelier::engine::flux::{self, FluxConfig, TransformerWeights};
use atelier::engine::parse_dtype;
use atelier::ledger::{self, SystemClock};

#[derive(Parser)]
#[command(name = "atelier", version, about = "Self-hosted FLUX.1 generation with metering")]
struct Cli {
    /// Configuration file (defaults to the built-in config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory (database `atelier.db`, images); overrides the config.
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time one FLUX transformer step and the peak memory of loading it.
    Bench(BenchArgs),
    /// Show what a transformer checkpoint is: its layout and inferred configuration.
    Inspect {
        /// A BFL / ComfyUI .safetensors file or a diffusers transformer folder.
        path: PathBuf,
    },
    /// Users, plans and prices: `user add|set-plan|grant|cancel|show`, `plan list`, `price`.
    #[command(flatten)]
    Ledger(ledger::cli::LedgerCommand),
}

#[derive(Args)]
struct BenchArgs {
    /// Device: auto, cpu, wgpu or vulkan.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Compute dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Benchmark this checkpoint instead of a random one.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 768)]
    hidden: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 4)]
    double_blocks: usize,
    #[arg(long, default_value_t = 8)]
    single_blocks: usize,
    #[arg(long, default_value_t = 1024)]
    img_tokens: usize,
    #[arg(long, default_value_t = 128)]
    txt_tokens: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Give the model a guidance embedding (FLUX.1-dev style).
    #[arg(long)]
    guidance: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,wgpu_core=warn,wgpu_hal=warn,naga=warn,cubecl=warn"))
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    let data_dir = cli.data.clone().unwrap_or_else(|| config.server.data_dir.clone());
    match cli.command {
        Command::Bench(args) => run_bench(args),
        Command::Inspect { path } => inspect(&path),
        Command::Ledger(cmd) => {
            let out = ledger::cli::run(
                &data_dir,
                &cmd,
                std::sync::Arc::new(config.plans()?),
                std::sync::Arc::new(SystemClock),
                &mut std::io::stdin().lock(),
            )?;
            print!("{out}");
            if !out.is_empty() && !out.ends_with('\n') {
                println!();
            }
            Ok(())
        }
    }
}

fn run_bench(a: BenchArgs) -> Result<()> {
    if a.head_dim == 0 || a.hidden % a.head_dim != 0 || a.head_dim % 8 != 0 {
        anyhow::bail!("--hidden must be a multiple of --head-dim, and --head-dim a multiple of 8");
    }
    let first = a.head_dim / 8;
    let rest = (a.head_dim - first) / 2;
    let axes_dim = if (a.head_dim - first) % 4 == 0 {
        vec![first, rest, rest]
    } else {
        vec![a.head_dim / 2, a.head_dim / 4, a.head_dim / 4]
    };
    let config = FluxConfig {
        hidden_size: a.hidden,
        num_heads: a.hidden / a.head_dim,
        mlp_hidden_dim: a.hidden * 4,
        depth: a.double_blocks,
        depth_single_blocks: a.single_blocks,
        axes_dim,
        guidance_embed: a.guidance,
        ..FluxConfig::schnell()
    };
    let spec = BenchSpec {
        checkpoint: a.checkpoint,
        config,
        img_tokens: a.img_tokens,
        txt_tokens: a.txt_tokens,
        batch: a.batch,
        steps: a.steps,
        dtype: parse_dtype(&a.dtype)?,
    };
    let device = device::select(a.device.parse::<DeviceChoice>()?)?;
    let report = bench::run(&spec, &device)?;
    report.print(&spec);
    Ok(())
}

fn inspect(path: &std::path::Path) -> Result<()> {
    let weights = TransformerWeights::open(path)?;
    let hint = if path.is_dir() { flux::read_diffusers_config(&path.join("config.json"))? } else { None };
    let config = FluxConfig::infer(&weights, hint.as_ref())
        .with_context(|| format!("inferring the configuration of {}", path.display()))?;
    weights.check_complete(&config.parameter_names())?;
    println!("layout: {:?}", weights.layout());
    println!("{config:#?}");
    Ok(())
}
