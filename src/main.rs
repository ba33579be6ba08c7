//! The `atelier` command line.

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use atelier::bench::{self, BenchSpec};
use atelier::cli::{BenchArgs, Cli, Command, GenerateArgs};
use atelier::config::{Config, ModelEntry};
use atelier::engine::device::{self, DeviceChoice};
use atelier::engine::flux::{self, FluxConfig};
use atelier::ledger::SystemClock;
use atelier::models;

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,wgpu_core=warn,wgpu_hal=warn,naga=warn,cubecl=warn"),
    )
    .init();
    atelier::engine::cpu::tune_allocator();
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
        Command::Bench(args) => run_bench(args, &config),
        Command::Inspect { path } => inspect(&path),
        Command::Quantize { input, output, ty } => quantize(&input, &output, &ty),
        Command::Generate(args) => run_generate(args, &config, &data_dir),
        Command::Train(args) => run_train(*args, &config),
        Command::TrainVae(args) => {
            let device = device::select(args.device.parse::<DeviceChoice>()?)?;
            log::info!("training on {}", device.description);
            atelier::cli::train::run_vae(&args, &device.device)
        }
        Command::Serve(args) => {
            let extra_models = args.models.iter().map(|m| models::parse_cli_model(m)).collect::<Result<Vec<_>>>()?;
            atelier::server::serve(atelier::server::ServeOptions {
                config,
                data_dir,
                listen: args.listen,
                extra_models,
                device: args.device,
                dtype: args.dtype,
            })
        }
        Command::Ledger(cmd) => {
            let out = atelier::cli::admin::run(
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

fn run_bench(a: BenchArgs, config: &Config) -> Result<()> {
    // Options that the chosen mode would ignore are refused, not silently dropped.
    let model_only = [("--width", a.width.is_some()), ("--height", a.height.is_some())];
    if a.model.is_none()
        && let Some((flag, _)) = model_only.iter().find(|(_, set)| *set)
    {
        anyhow::bail!("{flag} sizes the --model bench; the transformer bench is sized by --img-tokens");
    }
    let transformer_only = [
        ("--checkpoint", a.checkpoint.is_some()),
        ("--quant", a.quant.is_some()),
        ("--random-loras", a.random_loras > 0),
        ("--train", a.train),
        ("--memory-budget", a.memory_budget.is_some()),
    ];
    if a.model.is_some() {
        if let Some((flag, _)) =
            transformer_only.iter().chain(&[("--vae", a.vae), ("--profile", a.profile)]).find(|(_, set)| *set)
        {
            anyhow::bail!("{flag} is for the random-weights bench; --model times a whole generation");
        }
        return bench_model(&a, config);
    }
    if a.vae
        && let Some((flag, _)) = transformer_only.iter().find(|(_, set)| *set)
    {
        anyhow::bail!("{flag} is for the transformer bench; --vae times a random FLUX.1 VAE");
    }
    if a.hidden == 0 || a.head_dim == 0 || !a.hidden.is_multiple_of(a.head_dim) || !a.head_dim.is_multiple_of(8) {
        anyhow::bail!("--hidden must be a positive multiple of --head-dim, and --head-dim a multiple of 8");
    }
    if a.txt_tokens == 0 {
        anyhow::bail!("--txt-tokens must be at least 1 (FLUX always sees the prompt's tokens)");
    }
    if a.lora_rank == 0 {
        anyhow::bail!("--lora-rank must be at least 1");
    }
    let first = a.head_dim / 8;
    let rest = (a.head_dim - first) / 2;
    let axes_dim = if (a.head_dim - first).is_multiple_of(4) {
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
    let device = device::select(a.device.parse::<DeviceChoice>()?)?;
    let spec = BenchSpec {
        checkpoint: a.checkpoint,
        config,
        img_tokens: a.img_tokens,
        txt_tokens: a.txt_tokens,
        batch: a.batch,
        steps: a.steps.unwrap_or(3),
        dtype: atelier::engine::device::compute_dtype(
            a.dtype.parse::<atelier::config::Dtype>().map_err(anyhow::Error::msg)?.burn(),
            &device,
        )
        .0,
        random_loras: a.random_loras,
        lora_rank: a.lora_rank,
        quant: a.quant,
        train: a.train.then_some(bench::TrainBench { recompute: !a.no_recompute }),
        profile: a.profile,
        memory_budget: match a.memory_budget.as_deref().map(str::parse) {
            None => None,
            Some(Ok(atelier::engine::memory::MemoryBudget::Bytes(b))) => Some(b),
            Some(Ok(atelier::engine::memory::MemoryBudget::Auto)) => {
                atelier::engine::memory::resolve(
                    atelier::engine::memory::MemoryBudget::Auto,
                    device.is_gpu,
                    device.memory_bytes,
                )
                .0
            }
            Some(Err(e)) => anyhow::bail!("--memory-budget: {e}"),
        },
    };
    if a.vae {
        let report = bench::run_vae(&spec, &device)?;
        match a.json {
            true => println!("{}", serde_json::to_string_pretty(&report.json(&spec))?),
            false => report.print(&spec),
        }
        return Ok(());
    }
    let report = bench::run(&spec, &device)?;
    match a.json {
        true => println!("{}", serde_json::to_string_pretty(&report.json(&spec))?),
        false => report.print(&spec),
    }
    Ok(())
}

/// `atelier bench --model`: one generation of a real pipeline, timed by stage.
fn bench_model(a: &BenchArgs, config: &Config) -> Result<()> {
    let args = atelier::cli::ModelArgs { model: a.model.clone(), ..Default::default() };
    let (files, name) = resolve_model(config, &args)?;
    let device = device::select(a.device.parse::<DeviceChoice>()?)?;
    let requested = a.dtype.parse::<atelier::config::Dtype>().map_err(anyhow::Error::msg)?;
    let spec = bench::pipeline::PipelineSpec {
        files,
        name,
        request: atelier::engine::pipeline::GenerateRequest {
            prompt: a.prompt.clone(),
            steps: a.steps,
            width: a.width.unwrap_or(512),
            height: a.height.unwrap_or(512),
            ..Default::default()
        },
        dtype: device::compute_dtype(requested.burn(), &device).0,
    };
    let report = bench::pipeline::run_pipeline(&spec, &device)?;
    match a.json {
        true => println!("{}", serde_json::to_string_pretty(&report.json(&spec))?),
        false => report.print(&spec, &device),
    }
    Ok(())
}

fn run_generate(a: GenerateArgs, config: &Config, data_dir: &std::path::Path) -> Result<()> {
    use atelier::engine::pipeline::{self, GenerateRequest, Progress};
    use atelier::engine::pngfile::{PendingPng, PngText};
    use std::io::{IsTerminal, Write};

    // The command line's limits: sides from 16 pixels, rounded down to a multiple of 16.
    let mut spec = atelier::spec::JobSpec {
        model: a.files.model.clone().unwrap_or_default(),
        prompt: a.prompt.clone(),
        width: u32::try_from(a.width).unwrap_or(u32::MAX),
        height: u32::try_from(a.height).unwrap_or(u32::MAX),
        steps: a.steps.map(|s| u32::try_from(s).unwrap_or(u32::MAX)),
        seed: Some(a.seed),
        guidance: a.guidance.map(f64::from),
        batch: u32::try_from(a.batch).unwrap_or(u32::MAX),
        loras: Vec::new(),
    };
    // `<lora:name:w>` tags name LoRAs of the studio library ([engine] loras_dir); the encoders
    // never see them. `--lora FILE[:W]` files come first.
    spec.take_prompt_tags()?;
    let mut loras = a.loras.iter().map(|s| atelier::engine::lora::LoraChoice::parse(s)).collect::<Result<Vec<_>>>()?;
    let library = atelier::loras::Library::new(config.engine.loras_dir(), data_dir);
    // The server's hash cache, when this machine runs one: a 24 GB model is hashed once.
    if data_dir.is_dir() {
        atelier::engine::filehash::set_cache_file(data_dir.join("file-hashes.json"));
    }
    for tag in &spec.loras {
        let path = library.studio_file(&tag.name).ok_or_else(|| {
            anyhow::anyhow!(
                "the prompt's <lora:{}> names no LoRA in {} (a file {}.safetensors there, or use --lora FILE)",
                tag.name,
                library.studio_dir().display(),
                tag.name
            )
        })?;
        loras.push(atelier::engine::lora::LoraChoice { path, weight: tag.weight });
    }
    let checked = spec.validate(&atelier::spec::Limits::cli(&config.limits))?;
    for w in &checked.warnings {
        log::warn!("{w}");
    }
    let (width, height) = (checked.width as usize, checked.height as usize);
    let (files, model_name) = resolve_model(config, &a.files)?;
    let device_choice = a.device.parse::<DeviceChoice>()?;
    let req = GenerateRequest {
        prompt: spec.prompt.clone(),
        seed: a.seed,
        steps: a.steps,
        width,
        height,
        guidance: a.guidance,
        max_sequence_length: a.max_sequence_length,
        batch: a.batch,
        loras,
        ..Default::default()
    };
    // Whatever would stop the images from being written is checked before the device starts:
    // the settings, every component's header, each image's PNG text and its output path.
    let prepared = pipeline::prepare(&files, &req)?;
    let outputs = prepared
        .seeds(&req)
        .into_iter()
        .enumerate()
        .map(|(i, seed)| {
            let path = if a.batch == 1 {
                a.out.clone()
            } else {
                let stem = a.out.file_stem().map_or("image".into(), |s| s.to_string_lossy().into_owned());
                a.out.with_file_name(format!("{stem}-{i}.png"))
            };
            let text = PngText::parameters(&prepared.parameters(&spec.prompt, seed, &model_name))?;
            PendingPng::check(&path)?;
            Ok((path, text))
        })
        .collect::<Result<Vec<_>>>()?;
    let device = device::select(device_choice)?;
    let terminal = std::io::stderr().is_terminal();
    let requested = match &a.dtype {
        Some(d) => d.parse::<atelier::config::Dtype>().map_err(anyhow::Error::msg)?,
        None => config.engine.dtype,
    };
    let (dtype, why) = device::compute_dtype(requested.burn(), &device);
    log::info!("compute dtype {why}");
    let (memory_budget, budget_source) =
        atelier::engine::memory::resolve(config.engine.memory_budget, device.is_gpu, device.memory_bytes);
    log::info!("memory budget {budget_source}");
    let mut resident = pipeline::Resident::placed(pipeline::Placement {
        keep_resident: a.keep_resident,
        dtype,
        memory_budget,
        stream_blocks: false,
    });
    let out = pipeline::generate_prepared(&files, &req, &prepared, &device.device, &mut resident, |p| match p {
        Progress::Stage(s) => log::info!("{s}"),
        Progress::Preview { .. } => {}
        Progress::Step { image, step, steps, seconds } => {
            let rate = step as f64 / seconds.max(1e-9);
            let eta = (steps - step) as f64 / rate;
            let line = format!("image {}/{}  step {step}/{steps}  {rate:.2} it/s  ETA {eta:.0}s", image + 1, a.batch);
            if terminal {
                eprint!("\r{line}   ");
                if step == steps {
                    eprintln!();
                }
                let _ = std::io::stderr().flush();
            } else if step == steps {
                eprintln!("{line}");
            }
        }
    })?;
    for w in &out.warnings {
        log::warn!("{w}");
    }
    for (img, (path, text)) in out.images.iter().zip(outputs) {
        // Written beside the destination and renamed: an error leaves no partial file.
        PendingPng::create(&path, false)?.write(img, &text)?;
        println!("{}", path.display());
    }
    Ok(())
}

fn quantize(input: &std::path::Path, output: &std::path::Path, ty: &str) -> Result<()> {
    // (Also refuses an output that cannot be written: a folder, a device.)
    atelier::engine::outfile::refuse_overwriting_input(output, input)?;
    use atelier::engine::to_gguf;
    let written = match transformer_or_t5(input)? {
        Checkpoint::Transformer(..) => to_gguf::convert_transformer(input, output, ty, None)?,
        Checkpoint::T5(_) => to_gguf::convert_t5(input, output, ty)?,
    };
    println!("{}: {} bytes", output.display(), written.file_bytes);
    for (ty, count, bytes) in written.per_type {
        println!("  {:<5} {count:>5} tensors {bytes:>14} bytes", ty.name());
    }
    if let Some(t) = written.tokenizer {
        println!("  tokenizer: {t}");
    }
    Ok(())
}

/// The model files of `--model` (a config id or a diffusers folder) and/or single component
/// files (which replace that component of `--model`), and the model's name.
fn resolve_model(
    config: &Config,
    args: &atelier::cli::ModelArgs,
) -> Result<(atelier::engine::pipeline::ModelFiles, String)> {
    let atelier::cli::ModelArgs { model, transformer, vae, clip, t5 } = args.clone();
    let model = model.as_deref();
    use atelier::engine::pipeline::ModelFiles;
    // A tokenizers folder under weights_dir overrides the built-in copies.
    let tokenizers = models::tokenizers_dir(config);
    let (mut files, model_name) = match (model, transformer.clone()) {
        (Some(m), _) => match config.models.get(m) {
            Some(entry) => (models::resolve_files(m, entry, tokenizers.as_deref())?, m.to_string()),
            None if std::path::Path::new(m).is_dir() => {
                let name =
                    std::path::Path::new(m).file_name().map_or(m.to_string(), |n| n.to_string_lossy().into_owned());
                (ModelFiles::from_diffusers(std::path::Path::new(m), tokenizers.as_deref())?, name)
            }
            None => anyhow::bail!(
                "--model {m}: not a folder and not a model id in the config (known: {})",
                config.models.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        },
        (None, Some(t)) => {
            let name = t.file_stem().map_or("flux".into(), |n| n.to_string_lossy().into_owned());
            for (flag, given) in [("vae", &vae), ("clip", &clip), ("t5", &t5)] {
                if given.is_none() {
                    anyhow::bail!("with single files, --{flag} is needed too");
                }
            }
            let entry = ModelEntry {
                transformer: Some(t),
                vae: vae.clone(),
                clip: clip.clone(),
                t5: t5.clone(),
                ..Default::default()
            };
            (models::resolve_files(&name, &entry, tokenizers.as_deref())?, name)
        }
        (None, None) => {
            anyhow::bail!("give either --model or --transformer (with --vae, --clip, --t5)")
        }
    };
    if model.is_some() {
        // Single files beside --model replace that component (e.g. a GGUF or fp8 transformer).
        for (given, slot) in [
            (&transformer, &mut files.transformer),
            (&vae, &mut files.vae),
            (&clip, &mut files.clip),
            (&t5, &mut files.t5),
        ] {
            if let Some(path) = given {
                *slot = path.clone();
            }
        }
    }
    Ok((files, model_name))
}

fn run_train(a: atelier::cli::TrainArgs, config: &Config) -> Result<()> {
    a.init_config()?; // option combinations first, before any file is read
    let mut model_args = a.files.clone();
    if a.init == atelier::cli::train::Init::Random && model_args.model.is_none() && model_args.transformer.is_none() {
        // The run draws the transformer from --transformer-config; the other components are the files given.
        model_args.transformer = Some("(random init)".into());
    }
    let (files, _) = resolve_model(config, &model_args)?;
    let device = device::select(a.device.parse::<DeviceChoice>()?)?;
    let dtype = match a.dtype.parse::<atelier::config::Dtype>().map_err(anyhow::Error::msg)?.burn() {
        Some(d) => d,
        // bf16 keeps f32's range (no overflow clamp or loss scaling needed) where the GPU
        // computes in it; else f32 (the CPU backend is fastest in f32); f16 only when asked.
        // Full training keeps f32 weights (its optimizer updates them in place).
        None if device.is_gpu && !a.full && device.device.supports_dtype(burn::tensor::DType::BF16) => {
            burn::tensor::DType::BF16
        }
        None => burn::tensor::DType::F32,
    };
    log::info!("training on {}", device.description);
    atelier::cli::train::run(&a, files, &device.device, dtype)
}

fn inspect(path: &std::path::Path) -> Result<()> {
    if atelier::engine::gguf::is_gguf(path) {
        let file = atelier::engine::gguf::GgufFile::open(path)?;
        println!(
            "GGUF v{}: architecture {}, {} tensors, {} bytes",
            file.version(),
            file.architecture().unwrap_or("(none)"),
            file.tensors().len(),
            file.len()
        );
        for (ty, count, bytes) in file.bytes_per_type() {
            println!("  {:<5} {count:>5} tensors {bytes:>14} bytes", ty.name());
        }
        match atelier::engine::gguf::t5_vocab::T5Vocab::from_gguf(file.metadata()) {
            Ok(Some(v)) => println!("tokenizer: T5 (llama.cpp's tokenizer.ggml.*), {} tokens", v.tokens.len()),
            Ok(None) => {}
            Err(e) => println!("tokenizer: unreadable ({e:#})"),
        }
    }
    match transformer_or_t5(path)? {
        Checkpoint::Transformer(weights, config) => {
            println!("layout: {:?}", weights.layout());
            println!("{config:#?}");
        }
        Checkpoint::T5(config) => println!("T5 encoder: {config:#?}"),
    }
    Ok(())
}

/// What `inspect` and `quantize` take, checked against its header.
enum Checkpoint {
    Transformer(flux::TransformerWeights, flux::FluxConfig),
    T5(atelier::engine::t5::T5Config),
}

/// A FLUX transformer, else a T5 encoder; neither: an error with both reasons.
fn transformer_or_t5(path: &std::path::Path) -> Result<Checkpoint> {
    let as_flux = match flux::open_checked(path, None) {
        Ok((weights, config)) => return Ok(Checkpoint::Transformer(weights, config)),
        Err(e) => e,
    };
    match atelier::engine::t5::T5Encoder::check(path, None) {
        Ok(config) => Ok(Checkpoint::T5(config)),
        Err(as_t5) => {
            anyhow::bail!("{} is neither a FLUX transformer ({as_flux:#}) nor a T5 encoder ({as_t5:#})", path.display())
        }
    }
}
