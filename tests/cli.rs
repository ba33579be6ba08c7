//! The `atelier` binary as a user runs it: `generate` end to end on the tiny diffusers model
//! (from a folder without `weights/`, so the built-in tokenizers are used), and clear errors
//! with a non-zero exit for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn atelier(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atelier")).current_dir(cwd).args(args).output().expect("runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The A1111 `parameters` tEXt chunk of a PNG.
fn parameters(png: &[u8]) -> String {
    let mut i = 8;
    while i + 8 <= png.len() {
        let n = u32::from_be_bytes(png[i..i + 4].try_into().unwrap()) as usize;
        if &png[i + 4..i + 8] == b"tEXt" {
            let body = &png[i + 8..i + 8 + n];
            let (key, value) = body.split_at(body.iter().position(|&b| b == 0).unwrap());
            if key == b"parameters" {
                return String::from_utf8_lossy(&value[1..]).into_owned();
            }
        }
        i += 12 + n;
    }
    panic!("no parameters chunk");
}

#[test]
fn generate_writes_the_diffusers_image_with_its_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("pipeline/dev/diffusers");
    let out = dir.path().join("fox.png");
    let o = atelier(dir.path(), &[
        "generate", "--model", model.to_str().unwrap(), "--prompt", "a red fox in the snow, studio photo",
        "--seed", "42", "--steps", "3", "--width", "80", "--height", "48", "--guidance", "3.5",
        "--max-sequence-length", "32", "--device", "cpu", "--out", out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "generate failed: {}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let params = parameters(&bytes);
    assert!(params.starts_with("a red fox in the snow, studio photo\n"), "{params}");
    for part in ["Steps: 3", "Seed: 42", "Size: 80x48", "Model: diffusers", "Guidance: 3.5"] {
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
    let o = atelier(dir.path(), &[
        "generate", "--model", model.to_str().unwrap(), "--prompt", "hi", "--seed", "7", "--steps", "1",
        "--width", "100", "--height", "50", "--max-sequence-length", "8", "--device", "cpu", "--batch", "2",
        "--out", out.to_str().unwrap(),
    ]);
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
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--model".into(), m.into(), "--prompt".into(), " ".into()], "--prompt is empty"),
        (vec!["--model".into(), m.into(), "--prompt".into(), "x".into(), "--width".into(), "8".into()], "at least 16"),
        (vec!["--model".into(), m.into(), "--prompt".into(), "x".into(), "--width".into(), "4096".into()], "above the configured maximum"),
        (vec!["--model".into(), m.into(), "--prompt".into(), "x".into(), "--steps".into(), "0".into()], "--steps must be between"),
        (vec!["--model".into(), m.into(), "--prompt".into(), "x".into(), "--steps".into(), "100000".into()], "--steps must be between"),
        (vec!["--model".into(), "/no/such/model".into(), "--prompt".into(), "x".into()], "not a folder and not a model id"),
        (vec!["--model".into(), m.into(), "--prompt".into(), "x".into(), "--device".into(), "tpu".into()], "unknown device"),
        (
            vec!["--transformer".into(), cut.to_str().unwrap().into(), "--vae".into(), single("ae.safetensors"),
                 "--clip".into(), single("clip_l.safetensors"), "--t5".into(), single("t5xxl.safetensors"),
                 "--prompt".into(), "x".into(), "--steps".into(), "1".into(), "--device".into(), "cpu".into()],
            "truncated",
        ),
        (
            vec!["--transformer".into(), single("ae.safetensors"), "--vae".into(), single("ae.safetensors"),
                 "--clip".into(), single("clip_l.safetensors"), "--t5".into(), single("t5xxl.safetensors"),
                 "--prompt".into(), "x".into(), "--steps".into(), "1".into(), "--device".into(), "cpu".into()],
            "unrecognized transformer layout",
        ),
        (vec!["--transformer".into(), single("flux_schnell_bfl.safetensors"), "--prompt".into(), "x".into()], "--vae is needed"),
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
