//! The `atelier` binary as a user runs it: `generate` end to end on the tiny diffusers model
//! (from a folder without `weights/`, so the built-in tokenizers are used), and clear errors
//! with a non-zero exit for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn atelier(cwd: &Path, args: &[&str]) -> Output {
    // At info level the stages are logged: the tests see whether the compute started.
    Command::new(env!("CARGO_BIN_EXE_atelier"))
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .args(args)
        .output()
        .expect("runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The A1111 `parameters` text of a PNG (tEXt or iTXt), read as A1111 / Forge read it.
fn parameters(png: &[u8]) -> String {
    atelier::engine::pngfile::read_parameters(png).unwrap().expect("a parameters chunk")
}

#[test]
fn generate_writes_the_diffusers_image_with_its_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("pipeline/dev/diffusers");
    let out = dir.path().join("fox.png");
    let o = atelier(
        dir.path(),
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red fox in the snow, studio photo",
            "--seed",
            "42",
            "--steps",
            "3",
            "--width",
            "80",
            "--height",
            "48",
            "--guidance",
            "3.5",
            "--max-sequence-length",
            "32",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "generate failed: {}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let params = parameters(&bytes);
    assert!(params.starts_with("a red fox in the snow, studio photo\n"), "{params}");
    for part in ["Steps: 3", "Seed: 42", "Size: 80x48", "Model: diffusers", "Distilled CFG Scale: 3.5"] {
        assert!(params.contains(part), "{part} missing from {params:?}");
    }
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    let golden = safetensors_image(&fixture("pipeline/dev/golden.safetensors"));
    let worst = img.as_raw().iter().zip(&golden).map(|(a, b)| (*a as f32 - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 2.0, "PNG differs from diffusers by {worst}/255");
}

fn safetensors_image(path: &Path) -> Vec<f32> {
    atelier::engine::weights::WeightSet::open(path).unwrap().read("image_u8").unwrap().data
}

#[test]
fn a_batch_uses_consecutive_seeds_and_odd_sizes_are_rounded_down() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("pipeline/schnell/diffusers");
    let out = dir.path().join("b.png");
    let o = atelier(
        dir.path(),
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "--seed",
            "7",
            "--steps",
            "1",
            "--width",
            "100",
            "--height",
            "50",
            "--max-sequence-length",
            "8",
            "--device",
            "cpu",
            "--batch",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("width 100 is not a multiple of 16; using 96"), "{}", stderr(&o));
    for (i, seed) in [(0, 7), (1, 8)] {
        let bytes = std::fs::read(dir.path().join(format!("b-{i}.png"))).unwrap();
        let params = parameters(&bytes);
        assert!(params.contains(&format!("Seed: {seed}")) && params.contains("Size: 96x48"), "{params}");
    }
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("pipeline/schnell/diffusers");
    let m = model.to_str().unwrap();
    let cut = dir.path().join("cut.safetensors");
    let full = std::fs::read(fixture("pipeline/single/flux_schnell_bfl.safetensors")).unwrap();
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let single = |n: &str| fixture(&format!("pipeline/single/{n}")).to_str().unwrap().to_string();
    // Single files for every component, `transformer` as the transformer.
    let singles = |transformer: String| -> Vec<String> {
        let mut args = vec!["--transformer".to_string(), transformer];
        for (flag, file) in [("--vae", "ae"), ("--clip", "clip_l"), ("--t5", "t5xxl")] {
            args.extend([flag.to_string(), single(&format!("{file}.safetensors"))]);
        }
        args.extend(["--prompt", "x", "--steps", "1", "--device", "cpu"].map(String::from));
        args
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--model".into(), m.into(), "--prompt".into(), " ".into()], "--prompt is empty"),
        (vec!["--model".into(), m.into(), "--prompt".into(), "x".into(), "--width".into(), "8".into()], "at least 16"),
        (
            vec!["--model".into(), m.into(), "--prompt".into(), "x".into(), "--width".into(), "4096".into()],
            "above the configured maximum",
        ),
        (
            vec!["--model".into(), m.into(), "--prompt".into(), "x".into(), "--steps".into(), "0".into()],
            "--steps must be between",
        ),
        (
            vec!["--model".into(), m.into(), "--prompt".into(), "x".into(), "--steps".into(), "100000".into()],
            "--steps must be between",
        ),
        (
            vec!["--model".into(), "/no/such/model".into(), "--prompt".into(), "x".into()],
            "not a folder and not a model id",
        ),
        (
            vec!["--model".into(), m.into(), "--prompt".into(), "x".into(), "--device".into(), "tpu".into()],
            "unknown device",
        ),
        (singles(cut.to_str().unwrap().into()), "truncated"),
        (singles(single("ae.safetensors")), "unrecognized transformer layout"),
        (
            vec!["--transformer".into(), single("flux_schnell_bfl.safetensors"), "--prompt".into(), "x".into()],
            "--vae is needed",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["generate".to_string()];
        args.extend(extra.clone());
        args.extend(["--out".to_string(), dir.path().join("x.png").to_str().unwrap().to_string()]);
        let o = atelier(dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} should fail");
        assert!(err.contains(expected), "{extra:?}: expected {expected:?} in {err}");
        assert!(!err.contains("panicked"), "{extra:?} panicked: {err}");
    }
    assert!(!dir.path().join("x.png").exists(), "no image is written on an error");
}

fn demo(kind: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/demo").join(kind).to_str().unwrap().to_string()
}

/// The tiny random pipelines the LoRA and golden fixtures were made for (the demo models are
/// wider since they were trained).
fn pipeline_fixture(kind: &str) -> String {
    fixture(&format!("pipeline/{kind}/diffusers")).to_str().unwrap().to_string()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Whether the run got as far as the compute: the first stage is logged before any of it.
fn computed(o: &Output) -> bool {
    stderr(o).contains("encoding the prompt") || stderr(o).contains("step 1/")
}

/// `atelier generate` of one step at 32×32 on the CPU, with `extra` arguments after those.
fn generate_small(cwd: &Path, model: &str, prompt: &str, out: &Path, extra: &[&str]) -> Output {
    let small = ["--steps", "1", "--width", "32", "--height", "32", "--device", "cpu"];
    let mut args = vec!["generate", "--model", model, "--prompt", prompt, "--out", out.to_str().unwrap()];
    args.extend(small);
    args.extend(extra);
    atelier(cwd, &args)
}

#[test]
fn prompts_outside_latin1_generate_and_read_back_identical() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = [
        "一只在雪地里的红狐狸，电影感",
        "雪の中の赤いキツネ、写真",
        "a fox 🦊 in the snow ❄️",
        "“Quoted” — and ‘single’… plus café",
    ];
    for (i, prompt) in prompts.iter().enumerate() {
        let out = dir.path().join(format!("p{i}.png"));
        let o =
            generate_small(dir.path(), &demo("schnell"), prompt, &out, &["--seed", "5", "--max-sequence-length", "16"]);
        assert!(o.status.success(), "{prompt}: {}", stderr(&o));
        let hash = atelier::engine::filehash::model_hash(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("weights/demo/schnell/transformer/diffusion_pytorch_model.safetensors"),
        )
        .unwrap();
        let expected =
            format!("{prompt}\nSteps: 1, Sampler: Euler, Seed: 5, Size: 32x32, Model hash: {hash}, Model: schnell");
        assert_eq!(parameters(&std::fs::read(&out).unwrap()), expected);
    }
    assert_eq!(files_in(dir.path()), ["p0.png", "p1.png", "p2.png", "p3.png"], "only the images, no temporary files");
}

#[test]
fn an_output_that_cannot_be_written_fails_before_the_compute_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder/out.png");
    let folder = dir.path().join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    // (A batch writes <stem>-<i>.png beside --out, so a folder there is only a problem alone.)
    for (out, expected, batch) in
        [(&missing, "does not exist", "1"), (&missing, "does not exist", "2"), (&folder, "is a folder", "1")]
    {
        let o = generate_small(dir.path(), &demo("dev"), "a fox", out, &["--batch", batch]);
        assert_eq!(o.status.code(), Some(1), "{out:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{out:?}: expected {expected:?} in {}", stderr(&o));
        assert!(!computed(&o), "{out:?}: it computed first: {}", stderr(&o));
    }
    assert_eq!(files_in(dir.path()), ["a-folder"]);
    assert!(files_in(&folder).is_empty());
}

#[test]
fn sequence_length_and_guidance_out_of_bounds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let cases = [
        ("--max-sequence-length", "100000000"),
        ("--max-sequence-length", "513"),
        ("--max-sequence-length", "0"),
        // One token would hold `</s>` alone, no word of the prompt.
        ("--max-sequence-length", "1"),
        ("--guidance", "NaN"),
        ("--guidance", "inf"),
        ("--guidance", "-1"),
        ("--guidance", "30.5"),
    ];
    for kind in ["schnell", "dev"] {
        for (flag, value) in cases {
            let o = generate_small(dir.path(), &demo(kind), "a fox", &out, &[&format!("{flag}={value}")]);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{kind} {flag} {value}: {err}");
            assert!(err.contains(flag) && err.contains("must be"), "{kind} {flag} {value}: {err}");
            assert!(!computed(&o) && !err.contains("panicked"), "{kind} {flag} {value}: {err}");
        }
    }
    // The bounds themselves are fine.
    let o =
        generate_small(dir.path(), &demo("dev"), "a fox", &out, &["--max-sequence-length", "2", "--guidance", "30"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(parameters(&std::fs::read(&out).unwrap()).ends_with("Distilled CFG Scale: 30"));
}

/// A copy of a demo model folder whose `component` file is removed (None) or replaced.
fn broken_demo(dir: &Path, name: &str, component: &str, replacement: Option<&str>) -> PathBuf {
    let src = PathBuf::from(demo("schnell"));
    let copy = dir.join(name);
    for sub in ["", "transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"] {
        std::fs::create_dir_all(copy.join(sub)).unwrap();
        for entry in std::fs::read_dir(src.join(sub)).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), copy.join(sub).join(entry.file_name())).unwrap();
            }
        }
    }
    let target = std::fs::read_dir(copy.join(component))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    std::fs::remove_file(&target).unwrap();
    if let Some(other) = replacement {
        std::fs::copy(src.join(other), &target).unwrap();
    }
    copy
}

#[test]
fn a_model_with_a_missing_or_wrong_component_is_refused_before_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (broken_demo(dir.path(), "no-vae", "vae", None), "no .safetensors"),
        (broken_demo(dir.path(), "clip-as-vae", "vae", Some("text_encoder/model.safetensors")), "not a VAE"),
        (
            broken_demo(dir.path(), "clip-as-t5", "text_encoder_2", Some("text_encoder/model.safetensors")),
            "not a T5 encoder checkpoint",
        ),
        (
            broken_demo(dir.path(), "t5-as-clip", "text_encoder", Some("text_encoder_2/model.safetensors")),
            "not a CLIP text checkpoint",
        ),
    ];
    for (model, expected) in cases {
        let out = dir.path().join("x.png");
        let o = generate_small(dir.path(), model.to_str().unwrap(), "a fox", &out, &[]);
        assert_eq!(o.status.code(), Some(1), "{model:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{model:?}: expected {expected:?} in {}", stderr(&o));
        assert!(!computed(&o), "{model:?}: it computed first: {}", stderr(&o));
        assert!(!out.exists());
    }
}

/// `weights/demo/` (see weights/demo/README.md): the two trained demo pipelines fit the 10 MB the
/// repository gives them because dev-like stores nothing of schnell-like's twice: its VAE and
/// text encoders are links, and its transformer is a sharded folder whose first shard is a link
/// to schnell-like's file and whose second holds only an all-zero guidance embedding.
#[test]
fn the_demo_models_fit_ten_megabytes_and_share_everything_but_the_guidance_embedding() {
    fn bytes(root: &Path) -> u64 {
        let mut sum = 0;
        for e in std::fs::read_dir(root).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_symlink() {
                continue; // counted where it points
            }
            sum += if meta.is_dir() { bytes(&p) } else { meta.len() };
        }
        sum
    }
    let total = bytes(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/demo"));
    assert!(total <= 10_000_000, "weights/demo holds {total} bytes");
    let same = |link: &Path, target: &Path| {
        assert!(std::fs::symlink_metadata(link).unwrap().is_symlink(), "{} is not a link", link.display());
        assert_eq!(link.canonicalize().unwrap(), target.canonicalize().unwrap());
    };
    let (schnell, dev) = (PathBuf::from(demo("schnell")), PathBuf::from(demo("dev")));
    for part in ["vae", "text_encoder", "text_encoder_2"] {
        same(&dev.join(part), &schnell.join(part));
    }
    same(
        &dev.join("transformer/diffusion_pytorch_model-00001-of-00002.safetensors"),
        &schnell.join("transformer/diffusion_pytorch_model.safetensors"),
    );
    let guidance = std::fs::read(dev.join("transformer/diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    let guidance = safetensors::SafeTensors::deserialize(&guidance).unwrap();
    let mut names = guidance.names();
    names.sort();
    assert_eq!(
        names,
        [
            "guidance_in.in_layer.bias",
            "guidance_in.in_layer.weight",
            "guidance_in.out_layer.bias",
            "guidance_in.out_layer.weight"
        ]
    );
    assert!(guidance.tensors().iter().all(|(_, t)| t.data().iter().all(|&b| b == 0)), "a guidance weight is not zero");
    // Read through the index, the folder is a dev transformer; the folder a dev pipeline.
    let (kind, _) =
        atelier::models::check_files(&atelier::engine::pipeline::ModelFiles::from_diffusers(&dev, None).unwrap())
            .unwrap();
    assert_eq!(kind, atelier::config::FluxKind::Dev);
    let (kind, _) =
        atelier::models::check_files(&atelier::engine::pipeline::ModelFiles::from_diffusers(&schnell, None).unwrap())
            .unwrap();
    assert_eq!(kind, atelier::config::FluxKind::Schnell);
}

#[test]
fn a_gguf_transformer_beside_a_model_generates_and_inspect_lists_its_block_types() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = fixture("gguf/flux_schnell_q8_0.gguf");
    let o = atelier(dir.path(), &["inspect", gguf.to_str().unwrap()]);
    assert!(o.status.success(), "inspect failed: {}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(text.contains("GGUF v3: architecture flux, 80 tensors"), "{text}");
    for line in ["Q8_0 29 tensors", "F32 46 tensors", "F16 5 tensors", "layout: Bfl"] {
        assert!(text.contains(line), "{line:?} missing from {text}");
    }
    let out = dir.path().join("fox.png");
    let model = fixture("pipeline/schnell/diffusers");
    let o = atelier(
        dir.path(),
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--transformer",
            gguf.to_str().unwrap(),
            "--prompt",
            "a red fox in the snow, studio photo",
            "--seed",
            "42",
            "--steps",
            "3",
            "--width",
            "80",
            "--height",
            "48",
            "--max-sequence-length",
            "32",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "generate failed: {}", stderr(&o));
    let img = image::load_from_memory(&std::fs::read(&out).unwrap()).unwrap().to_rgb8();
    let golden = safetensors_image(&fixture("pipeline/schnell/golden.safetensors"));
    let worst = img.as_raw().iter().zip(&golden).map(|(a, b)| (*a as f32 - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 64.0, "a Q8_0 image far from the unquantized one: {worst}/255");
    // A llama GGUF given as the transformer is refused by name before any compute.
    let llama = dir.path().join("llama.gguf");
    let mut bytes = std::fs::read(&gguf).unwrap();
    let at = bytes.windows(4).position(|w| w == b"flux").unwrap();
    bytes.splice(at..at + 4, *b"lama");
    std::fs::write(&llama, bytes).unwrap();
    let o = atelier(
        dir.path(),
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--transformer",
            llama.to_str().unwrap(),
            "--prompt",
            "x",
            "--out",
            dir.path().join("no.png").to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("architecture \"lama\", not a FLUX transformer"), "{}", stderr(&o));
}

/// `--lora FILE[:WEIGHT]`, repeatable, on the demo model (the dev pipeline fixture): the image equals
/// diffusers' with the same LoRAs, and the PNG records them the A1111/Forge way.
#[test]
fn generate_applies_loras_and_records_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let lora = |n: &str, w: &str| format!("{}:{w}", fixture(&format!("lora/dev/{n}.safetensors")).to_str().unwrap());
    let (peft, kohya) = (lora("peft", "0.8"), lora("kohya", "-0.6"));
    let model = pipeline_fixture("dev");
    #[rustfmt::skip]
    let args = [
        "generate", "--model", &model,
        "--prompt", "a red fox in the snow, studio photo", "--seed", "42", "--steps", "3",
        "--width", "80", "--height", "48", "--guidance", "3.5", "--max-sequence-length", "32",
        "--device", "cpu", "--lora", &peft, "--lora", &kohya, "--out", out.to_str().unwrap(),
    ];
    let o = atelier(dir.path(), &args);
    assert!(o.status.success(), "generate failed: {}", stderr(&o));
    assert!(stderr(&o).contains("T5 text-encoder modules are skipped"), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let params = parameters(&bytes);
    assert!(params.starts_with("a red fox in the snow, studio photo <lora:peft:0.8> <lora:kohya:-0.6>\n"), "{params}");
    let hashes = params.split("Lora hashes: \"").nth(1).expect("Lora hashes").split('"').next().unwrap();
    let parts: Vec<&str> = hashes.split(", ").collect();
    assert_eq!(parts.len(), 2, "{hashes}");
    for (part, name) in parts.iter().zip(["peft", "kohya"]) {
        let (n, h) = part.split_once(": ").unwrap();
        assert!(n == name && h.len() == 12 && h.chars().all(|c| c.is_ascii_hexdigit()), "{part}");
    }
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    let golden = image::open(fixture("lora/dev_peft_kohya.png")).unwrap().to_rgb8();
    let worst = img.as_raw().iter().zip(golden.as_raw()).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert!(worst <= 2, "PNG differs from diffusers by {worst}/255");

    // A file that is no LoRA: a clear error before any compute.
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not tensors").unwrap();
    let mut args = args.to_vec();
    let bad_arg = format!("{}:0.5", bad.to_str().unwrap());
    let at = args.iter().position(|a| *a == kohya.as_str()).unwrap();
    args[at] = &bad_arg;
    let o = atelier(dir.path(), &args);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad.safetensors") && stderr(&o).contains("not a valid safetensors"), "{}", stderr(&o));
    assert!(!computed(&o), "{}", stderr(&o));
}

/// A Python with the `sd-parsers` package ($ATELIER_PYTHON, else python3); CI installs one.
fn python_with_sd_parsers() -> Option<String> {
    let py = std::env::var("ATELIER_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py).args(["-c", "import sd_parsers"]).output().is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

#[test]
fn a_third_party_parser_reads_back_prompt_loras_hashes_and_settings() {
    let Some(py) = python_with_sd_parsers() else {
        assert!(std::env::var_os("CI").is_none(), "CI must have Python with sd-parsers (see .ci/install-deps)");
        eprintln!("skipping: no python3 with sd-parsers (pip install sd-parsers)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A studio library holding `ink`, named by a prompt tag; a second LoRA by --lora.
    let loras = dir.path().join("loras");
    std::fs::create_dir(&loras).unwrap();
    std::fs::copy(fixture("lora/dev/kohya.safetensors"), loras.join("ink.safetensors")).unwrap();
    let shipped = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config.toml")).unwrap();
    let config = dir.path().join("config.toml");
    let line = format!("loras_dir = {:?}", loras.to_str().unwrap());
    std::fs::write(&config, shipped.replacen("# loras_dir = \"weights/loras\"", &line, 1)).unwrap();
    let out = dir.path().join("fox.png");
    let peft = fixture("lora/dev/peft.safetensors");
    let model = fixture("pipeline/dev/diffusers");
    let o = atelier(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a red fox <lora:ink:0.8> in the snow",
            "--lora",
            &format!("{}:-0.5", peft.display()),
            "--seed",
            "42",
            "--steps",
            "3",
            "--width",
            "80",
            "--height",
            "48",
            "--max-sequence-length",
            "32",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "generate failed: {}", stderr(&o));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/read_png_parameters.py");
    let r = Command::new(&py).arg(&script).arg(&out).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();

    let hash = |p: &Path| atelier::engine::lora::Lora::open(p).unwrap().hash;
    let transformer = model.join("transformer/diffusion_pytorch_model.safetensors");
    let model_hash = atelier::engine::filehash::model_hash(&transformer).unwrap();
    assert_eq!(got["generator"], "AUTOMATIC1111", "{got}");
    assert_eq!(got["prompt"], "a red fox in the snow <lora:peft:-0.5> <lora:ink:0.8>", "{got}");
    assert_eq!(got["sampler"], "Euler");
    assert_eq!((got["parameters"]["seed"].as_str(), got["parameters"]["steps"].as_str()), (Some("42"), Some("3")));
    assert_eq!((got["model"].as_str(), got["model_hash"].as_str()), (Some("diffusers"), Some(model_hash.as_str())));
    assert_eq!(got["metadata"]["Size"], "80x48");
    assert_eq!(got["metadata"]["Distilled CFG Scale"], "3.5");
    let lora_hashes = format!("peft: {}, ink: {}", hash(&peft), hash(&loras.join("ink.safetensors")));
    assert_eq!(got["lora_hashes"].as_str(), Some(lora_hashes.as_str()), "{got}");
}

#[test]
fn quantize_writes_the_city96_file_the_gguf_package_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox_q8_0.gguf");
    let model = fixture("pipeline/schnell/diffusers/transformer");
    let o = atelier(dir.path(), &["quantize", model.to_str().unwrap(), out.to_str().unwrap(), "--type", "q8_0"]);
    assert!(o.status.success(), "quantize failed: {}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(text.contains("Q8_0 23 tensors"), "{text}");
    assert!(std::fs::read(&out).unwrap() == std::fs::read(fixture("quantize/flux_schnell_q8_0.gguf")).unwrap());
    let o = atelier(dir.path(), &["quantize", model.to_str().unwrap(), out.to_str().unwrap(), "--type", "iq2_xs"]);
    assert!(!o.status.success() && stderr(&o).contains("expected q8_0, q5_0, q4_0"), "{}", stderr(&o));
}

#[test]
fn quantize_writes_a_t5_that_inspect_names_and_generate_takes_as_t5() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t5_q8_0.gguf");
    let src = fixture("gguf/t5_mixed.gguf");
    let o = atelier(dir.path(), &["quantize", src.to_str().unwrap(), out.to_str().unwrap(), "--type", "q8_0"]);
    assert!(o.status.success(), "quantize failed: {}", stderr(&o));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(fixture("quantize/t5_q8_0.gguf")).unwrap());
    let o = atelier(dir.path(), &["inspect", out.to_str().unwrap()]);
    assert!(o.status.success(), "inspect failed: {}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    for line in [
        "architecture t5encoder, 21 tensors",
        "Q8_0 15 tensors",
        "F32 6 tensors",
        "T5 encoder",
        "d_model: 256",
        "layers: 2",
    ] {
        assert!(text.contains(line), "{line:?} missing from {text}");
    }
    // The pipeline's own T5 as a GGUF, given with --t5 beside --model.
    let t5 = dir.path().join("tiny_t5.gguf");
    let folder = fixture("pipeline/schnell/diffusers/text_encoder_2");
    let o = atelier(dir.path(), &["quantize", folder.to_str().unwrap(), t5.to_str().unwrap(), "--type", "q8_0"]);
    assert!(o.status.success(), "quantize failed: {}", stderr(&o));
    // It carries its tokenizer (llama.cpp's keys), which inspect names.
    assert!(String::from_utf8_lossy(&o.stdout).contains("tokenizer: 32128 tokens, from"), "{o:?}");
    let o = atelier(dir.path(), &["inspect", t5.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("tokenizer: T5 (llama.cpp's tokenizer.ggml.*), 32128 tokens"), "{text}");
    let png = dir.path().join("fox.png");
    let model = fixture("pipeline/schnell/diffusers");
    let args = ["--prompt", "a red fox in the snow, studio photo", "--seed", "42", "--steps", "3", "--width", "80"];
    let args = [&args[..], &["--height", "48", "--max-sequence-length", "32", "--device", "cpu"]].concat();
    let mut run = vec!["generate", "--model", model.to_str().unwrap(), "--t5", t5.to_str().unwrap()];
    run.extend(args.iter().copied());
    run.extend(["--out", png.to_str().unwrap()]);
    let o = atelier(dir.path(), &run);
    assert!(o.status.success(), "generate failed: {}", stderr(&o));
    let img = image::load_from_memory(&std::fs::read(&png).unwrap()).unwrap().to_rgb8();
    let golden = safetensors_image(&fixture("pipeline/schnell/golden.safetensors"));
    let worst = img.as_raw().iter().zip(&golden).map(|(a, b)| (*a as f32 - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 2.0, "the image with a Q8_0 T5 is {worst}/255 from the golden");
    // Neither a transformer nor a T5: both reasons, no file written.
    let vae = fixture("pipeline/single/ae.safetensors");
    let bad = dir.path().join("vae.gguf");
    let o = atelier(dir.path(), &["quantize", vae.to_str().unwrap(), bad.to_str().unwrap(), "--type", "q8_0"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("neither a FLUX transformer") && e.contains("nor a T5 encoder"), "{e}");
    assert!(!bad.exists());
}

/// Four 32×32 images of one pattern, one with a caption.
fn training_images(dir: &Path) -> PathBuf {
    let d = dir.join("images");
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..4u32 {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            if (x + i) % 8 == y % 8 { image::Rgb([220, 20, 20]) } else { image::Rgb([250, 250, 250]) }
        });
        img.save(d.join(format!("{i}.png"))).unwrap();
    }
    std::fs::write(d.join("0.txt"), "[trigger] stripes").unwrap();
    d
}

#[test]
fn train_writes_a_lora_with_log_checkpoints_and_samples_that_generate_loads() {
    let dir = tempfile::tempdir().unwrap();
    let images = training_images(dir.path());
    let out = dir.path().join("stripes.safetensors");
    let model = demo("schnell");
    #[rustfmt::skip]
    let args = [
        "train", "--model", &model, "--images", images.to_str().unwrap(), "--trigger", "zqx",
        "--out", out.to_str().unwrap(), "--steps", "4", "--rank", "2", "--alpha", "2", "--resolution", "32",
        "--max-sequence-length", "32", "--save-every", "2", "--sample-every", "4",
        "--sample-prompt", "zqx stripes", "--device", "cpu", "--format", "peft",
    ];
    let o = atelier(dir.path(), &args);
    assert!(o.status.success(), "train failed: {}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("step 4/4") && err.contains("it/s") && err.contains("ETA"), "{err}");
    let run = dir.path().join("stripes_train");
    assert_eq!(files_in(&run), ["checkpoints", "loss.csv", "samples"]);
    assert_eq!(files_in(&run.join("checkpoints")), ["step_2"]);
    assert_eq!(files_in(&run.join("samples")), ["step_000004_0.png"]);
    assert_eq!(std::fs::read_to_string(run.join("loss.csv")).unwrap().lines().count(), 5);
    // The file loads in `generate`.
    let png = dir.path().join("s.png");
    let lora = out.to_str().unwrap().to_string();
    let o = generate_small(dir.path(), &model, "zqx stripes", &png, &["--lora", &lora]);
    assert!(o.status.success(), "generate with the trained LoRA failed: {}", stderr(&o));

    // Resuming on another model (the tiny fixture pipeline, narrower than the demo): refused
    // from the checkpoint's header, before any image is encoded.
    let other = pipeline_fixture("schnell");
    let step2 = run.join("checkpoints/step_2");
    let mut resumed = args.to_vec();
    resumed[2] = other.as_str();
    resumed.extend(["--resume", step2.to_str().unwrap()]);
    let o = atelier(dir.path(), &resumed);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("trained on another model") && !stderr(&o).contains("encoding"), "{}", stderr(&o));

    // A rank larger than the layers: a clear error, nothing computed.
    let mut bad = args.to_vec();
    let at = bad.iter().position(|a| *a == "--rank").unwrap();
    bad[at + 1] = "100000";
    let o = atelier(dir.path(), &bad);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--rank 100000") && !stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("encoding"), "{}", stderr(&o));
}

/// LoRA files `atelier train` wrote (tests/fixtures/train/roundtrip, see
/// tests/reference/make_roundtrip_goldens.py) give in `atelier generate` the image diffusers
/// makes with them: the PEFT file through `load_lora_weights`, the kohya file merged.
#[test]
fn trained_loras_generate_the_images_diffusers_makes_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = pipeline_fixture("dev");
    for format in ["peft", "kohya"] {
        let out = dir.path().join(format!("{format}.png"));
        let lora = fixture(&format!("train/roundtrip/{format}.safetensors")).to_str().unwrap().to_string();
        #[rustfmt::skip]
        let args = [
            "generate", "--model", &model, "--prompt", "zqx stripes", "--seed", "42", "--steps", "3",
            "--width", "80", "--height", "48", "--guidance", "3.5", "--max-sequence-length", "32",
            "--device", "cpu", "--lora", &lora, "--out", out.to_str().unwrap(),
        ];
        let o = atelier(dir.path(), &args);
        assert!(o.status.success(), "{format}: {}", stderr(&o));
        assert!(!stderr(&o).contains("ignored"), "{format}: {}", stderr(&o));
        let img = image::open(&out).unwrap().to_rgb8();
        let golden = image::open(fixture(&format!("train/roundtrip/{format}.png"))).unwrap().to_rgb8();
        let worst = img.as_raw().iter().zip(golden.as_raw()).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        assert!(worst <= 2, "{format}: differs from diffusers by {worst}/255");
    }
}

#[test]
fn bench_reports_json_with_a_profile_for_the_transformer_and_the_vae() {
    let dir = tempfile::tempdir().unwrap();
    let tiny =
        ["--device", "cpu", "--hidden", "64", "--head-dim", "32", "--double-blocks", "1", "--single-blocks", "1"];
    let json = |extra: &[&str]| -> serde_json::Value {
        let args: Vec<&str> = ["bench"].iter().chain(&tiny).chain(extra).copied().collect();
        let o = atelier(dir.path(), &args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).expect("one JSON object on stdout")
    };
    let ops = |profile: &serde_json::Value| -> Vec<String> {
        profile.as_array().unwrap().iter().map(|p| p["op"].as_str().unwrap().to_string()).collect()
    };

    let step = json(&["--img-tokens", "16", "--txt-tokens", "8", "--steps", "2", "--profile", "--json"]);
    assert_eq!(step["step"]["seconds"].as_array().unwrap().len(), 2);
    assert!(step["step"]["median_seconds"].as_f64().unwrap() > 0.0);
    let ops_step = ops(&step["step"]["profile"]);
    for op in ["linear", "attention", "gelu", "norm+modulate", "gated residual"] {
        assert!(ops_step.iter().any(|o| o == op), "{op} missing from {ops_step:?}");
    }
    // A training step's profile: the forward's ops (the fused autodiff ones among them), burn's
    // backward passes and the optimizer.
    let train = json(&["--img-tokens", "16", "--txt-tokens", "8", "--steps", "1", "--train", "--profile", "--json"]);
    let ops_train = ops(&train["step"]["profile"]);
    for op in ["linear", "heads+attention (autodiff)", "gelu", "backward", "optimizer"] {
        assert!(ops_train.iter().any(|o| o == op), "{op} missing from {ops_train:?}");
    }
    let rss = &step["rss_bytes"];
    assert!(rss["peak_during_load"].as_u64().unwrap() >= rss["after_load"].as_u64().unwrap());

    // Options the mode would ignore are refused with a message naming them.
    for (extra, flag) in [(&["--vae", "--quant", "q8_0"][..], "--quant"), (&["--vae", "--train"][..], "--train")] {
        let args: Vec<&str> = ["bench"].iter().chain(&tiny).chain(extra).copied().collect();
        let o = atelier(dir.path(), &args);
        assert!(!o.status.success() && stderr(&o).contains(flag), "{}", stderr(&o));
    }

    // 16 tokens: a 4×4 packed grid, an 8×8 latent, a 64×64 image.
    let vae = json(&["--vae", "--img-tokens", "16", "--steps", "1", "--profile", "--json"]);
    assert_eq!((vae["vae"]["width"].as_u64(), vae["vae"]["height"].as_u64()), (Some(64), Some(64)));
    for stage in ["decode", "encode"] {
        assert!(vae[stage]["median_seconds"].as_f64().unwrap() > 0.0);
        let ops_vae = ops(&vae[stage]["profile"]);
        assert!(
            ops_vae.iter().any(|o| o == "conv2d") && ops_vae.iter().any(|o| o == "group_norm + silu + conv2d"),
            "{ops_vae:?}"
        );
    }
}

/// `train --full --init random` and `train-vae` from the command line: each writes a model that
/// `generate` loads (the transformer beside the demo's other components; the VAE as its VAE),
/// and option combinations that would be ignored are refused before any work.
#[test]
fn full_and_vae_training_write_models_that_generate_loads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = training_images(d);
    std::fs::write(images.join("0.txt"), "red stripes").unwrap();
    for i in 1..4 {
        std::fs::write(images.join(format!("{i}.txt")), format!("stripes {i}")).unwrap();
    }
    let config = d.join("transformer.json");
    std::fs::write(
        &config,
        r#"{"in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
            "num_attention_heads": 2, "joint_attention_dim": 8, "pooled_projection_dim": 4,
            "guidance_embeds": false, "axes_dims_rope": [4, 6, 6]}"#,
    )
    .unwrap();
    let model = pipeline_fixture("schnell");
    let out = d.join("full.safetensors");
    let (img, cfg, o_s) = (images.to_str().unwrap(), config.to_str().unwrap(), out.to_str().unwrap());
    #[rustfmt::skip]
    let full = ["train", "--model", &model, "--images", img, "--full", "--init", "random",
        "--transformer-config", cfg, "--out", o_s, "--steps", "3", "--resolution", "32",
        "--max-sequence-length", "32", "--save-dtype", "f16", "--device", "cpu"];
    let o = atelier(d, &full);
    assert!(o.status.success(), "full training failed: {}", stderr(&o));
    assert!(stderr(&o).contains("training all"), "{}", stderr(&o));
    let png = d.join("full.png");
    let o = generate_small(d, &model, "red stripes", &png, &["--transformer", o_s]);
    assert!(o.status.success(), "generate with the trained transformer failed: {}", stderr(&o));

    let vae = d.join("vae");
    let vae_config = fixture("pipeline/schnell/diffusers/vae/config.json");
    #[rustfmt::skip]
    let args = ["train-vae", "--images", img, "--vae-config", vae_config.to_str().unwrap(),
        "--out", vae.to_str().unwrap(), "--steps", "2", "--batch", "2", "--resolution", "32", "--device", "cpu"];
    let o = atelier(d, &args);
    assert!(o.status.success(), "train-vae failed: {}", stderr(&o));
    assert_eq!(files_in(&vae), ["config.json", "diffusion_pytorch_model.safetensors"]);
    let o = generate_small(d, &model, "red stripes", &d.join("vae.png"), &["--vae", vae.to_str().unwrap()]);
    assert!(o.status.success(), "generate with the trained VAE failed: {}", stderr(&o));

    // Refused, with nothing computed: LoRA options with --full, a transformer to draw and
    // to load at once, a VAE trainer told neither where to start nor its sizes.
    let refused = |args: &[&str], says: &str| {
        let o = atelier(d, args);
        assert!(!o.status.success() && !computed(&o) && stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    };
    refused(&[&full[..], &["--rank", "8"]].concat(), "--rank is a LoRA option");
    refused(&[&full[..], &["--transformer", o_s]].concat(), "leave out --transformer");
    refused(&["train-vae", "--images", img, "--out", "x"], "give --vae");
    refused(&["train", "--model", &model, "--images", img, "--out", "x", "--save-dtype", "f16"], "--full runs");
}

/// `atelier bench --model` times a real pipeline by stage: the demo model at its 64², every
/// sampling step, the VAE encode; options of the random-weights bench are refused with it.
#[test]
fn bench_model_times_a_real_pipeline_by_stage() {
    let dir = tempfile::tempdir().unwrap();
    let o = atelier(
        dir.path(),
        &[
            "bench",
            "--model",
            &demo("dev"),
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "5",
            "--device",
            "cpu",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let stages: Vec<&str> = report["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(stages, ["encoding the prompt", "loading the transformer", "sampling", "decoding"]);
    assert_eq!(report["kind"], "dev");
    assert_eq!(report["step_seconds"].as_array().unwrap().len(), 5);
    for s in report["stages"].as_array().unwrap() {
        assert!(s["seconds"].as_f64().unwrap() > 0.0 && s["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{s}");
    }
    assert!(report["vae_encode"]["seconds"].as_f64().unwrap() > 0.0);
    for (flag, value) in [("--vae", None), ("--train", None), ("--quant", Some("q8_0"))] {
        let mut args = vec!["bench", "--model", "demo-dev", "--device", "cpu", flag];
        args.extend(value);
        let o = atelier(dir.path(), &args);
        assert!(!o.status.success() && stderr(&o).contains(flag), "{flag}: {}", stderr(&o));
    }
}

/// Outputs never replace what they must not: the model being read, a device or a link (written
/// through), a name of another format; a training's output is checked before any compute and a
/// refused run leaves no folder behind.
#[test]
fn outputs_never_replace_inputs_devices_or_links_and_refusals_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // quantize into the folder it reads: refused, the input untouched.
    let model = dir.path().join("transformer");
    std::fs::create_dir(&model).unwrap();
    let src = PathBuf::from(demo("schnell")).join("transformer");
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let weights = model.join("diffusion_pytorch_model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&weights, &link).unwrap();
    for out in [&weights, &link] {
        let o = atelier(dir.path(), &["quantize", model.to_str().unwrap(), out.to_str().unwrap(), "--type", "q8_0"]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert!(stderr(&o).contains("would overwrite the input"), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read(&weights).unwrap(), before, "the input is untouched");

    // generate: a device or another format is refused before the compute; a link is written
    // through and stays a link.
    let png = dir.path().join("real.png");
    std::fs::write(&png, b"old").unwrap();
    let png_link = dir.path().join("out.png");
    std::os::unix::fs::symlink(&png, &png_link).unwrap();
    for (out, expected) in [("/dev/null", "not a plain file"), ("x.jpg", "PNG")] {
        let o = generate_small(dir.path(), &demo("schnell"), "a fox", Path::new(out), &[]);
        assert_eq!(o.status.code(), Some(1), "{out}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected) && !computed(&o), "{out}: {}", stderr(&o));
    }
    let o = generate_small(dir.path(), &demo("schnell"), "a fox", &png_link, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::symlink_metadata(&png_link).unwrap().file_type().is_symlink());
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));

    // train: a bad --out, alpha, rank or sample prompt is refused before anything is made.
    let images = training_images(dir.path());
    let folder = dir.path().join("ds");
    std::fs::create_dir(&folder).unwrap();
    let m = demo("schnell");
    let base = ["train", "--model", &m, "--images", images.to_str().unwrap(), "--trigger", "zqx", "--steps", "1"];
    let cases: [(&[&str], &str); 5] = [
        (&["--out", folder.to_str().unwrap()], "is a folder"),
        (&["--out", "l.safetensors", "--alpha", "0"], "--alpha must be a positive number"),
        (&["--out", "l.safetensors", "--rank", "0"], "--rank 0 does not fit"),
        (&["--out", "l.safetensors", "--sample-every", "1", "--sample-prompt", " "], "must not be empty"),
        (&["--out", "/proc/x/l.safetensors"], "does not exist"),
    ];
    for (extra, expected) in cases {
        let mut args = base.to_vec();
        args.extend(extra);
        args.extend(["--device", "cpu"]);
        let o = atelier(dir.path(), &args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{extra:?}: expected {expected:?} in {}", stderr(&o));
        assert!(!stderr(&o).contains("encoding"), "{extra:?} computed: {}", stderr(&o));
    }
    assert!(
        !dir.path().join("ds_train").exists() && !dir.path().join("l_train").exists(),
        "{:?}",
        files_in(dir.path())
    );
}

/// A LoRA with NaN values or rank 0 is refused when read, naming the file, instead of a black
/// image (NaN) or a panic (rank 0); a weight after the colon that is not a number is named as such.
#[test]
fn damaged_loras_are_refused_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let good = fixture("lora/dev/kohya.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (name, info) =
        header.as_object().unwrap().iter().find(|(k, _)| k.ends_with("lora_down.weight")).expect("a down factor");
    let at = 8 + n + info["data_offsets"][0].as_u64().unwrap() as usize;
    let nan: &[u8] = match info["dtype"].as_str().unwrap() {
        "F32" => &[0, 0, 0xc0, 0x7f],
        "F16" => &[0, 0x7e],
        "BF16" => &[0xc0, 0x7f],
        d => panic!("{d}"),
    };
    let mut damaged = bytes.clone();
    damaged[at..at + nan.len()].copy_from_slice(nan);
    let nan_file = dir.path().join("nan.safetensors");
    std::fs::write(&nan_file, damaged).unwrap();
    let model = pipeline_fixture("dev");
    let out = dir.path().join("x.png");
    let typo = format!("{}:abc", good.to_str().unwrap());
    let nan_arg = nan_file.to_str().unwrap().to_string();
    for (lora, expected) in [(nan_arg.as_str(), "NaN or infinite"), (typo.as_str(), "is not a number")] {
        let o = generate_small(dir.path(), &model, "a fox", &out, &["--lora", lora]);
        assert_eq!(o.status.code(), Some(1), "{lora}: {}", stderr(&o));
        assert!(stderr(&o).contains(expected), "{lora}: expected {expected:?} in {}", stderr(&o));
        assert!(!computed(&o) && !stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    assert!(stderr(&generate_small(dir.path(), &model, "a fox", &out, &["--lora", &nan_arg])).contains(name));
    assert!(!out.exists());
}
