//! Prompt → image end to end against diffusers' `FluxPipeline` (tiny random components, real
//! tokenizers, 80×48, 3 steps, seed 42).

use std::path::PathBuf;

use atelier::engine::pipeline::{self, GenerateRequest, ModelFiles};
use burn::tensor::Device;

use crate::common::{Golden, fixture};

fn check(kind: &str) {
    let golden = Golden::open(&format!("pipeline/{kind}/golden.safetensors"));
    let settings: serde_json::Value = serde_json::from_str(golden.0.metadata("settings").unwrap()).unwrap();
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tokenizers");
    let files = ModelFiles::from_diffusers(&fixture(&format!("pipeline/{kind}/diffusers")), Some(&shipped)).unwrap();
    let req = GenerateRequest {
        prompt: settings["prompt"].as_str().unwrap().into(),
        seed: 42,
        steps: Some(3),
        width: 80,
        height: 48,
        guidance: Some(3.5),
        max_sequence_length: Some(32),
        batch: 1,
        ..Default::default()
    };
    let mut steps_seen = 0;
    let out = pipeline::generate(&files, &req, &Device::flex(), |p| {
        if let pipeline::Progress::Step { .. } = p {
            steps_seen += 1;
        }
    })
    .unwrap();
    assert_eq!(steps_seen, 3);
    assert_eq!(out.is_dev, kind == "dev");
    let img = &out.images[0];
    assert_eq!((img.width(), img.height()), (80, 48));
    let expected = golden.vec("image_u8");
    let mut worst = 0i32;
    for (ours, theirs) in img.as_raw().iter().zip(&expected) {
        worst = worst.max((*ours as i32 - *theirs as i32).abs());
    }
    eprintln!("{kind}: worst pixel difference {worst}/255");
    assert!(worst <= 2, "{kind}: a pixel differs by {worst}/255");
}

#[test]
fn schnell_image_equals_diffusers() {
    check("schnell");
}

#[test]
fn dev_image_equals_diffusers() {
    check("dev");
}

#[test]
fn bad_requests_are_refused() {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tokenizers");
    // None: the tokenizers built into the binary.
    let files = ModelFiles::from_diffusers(&fixture("pipeline/schnell/diffusers"), None).unwrap();
    let req = GenerateRequest {
        prompt: "  ".into(),
        seed: 1,
        steps: Some(1),
        width: 64,
        height: 64,
        guidance: None,
        max_sequence_length: Some(8),
        batch: 1,
        ..Default::default()
    };
    let err = pipeline::generate(&files, &req, &Device::flex(), |_| {}).err().unwrap();
    assert!(err.to_string().contains("prompt is empty"));
    let tiny = GenerateRequest { prompt: "x".into(), width: 8, ..req.clone() };
    assert!(
        pipeline::generate(&files, &tiny, &Device::flex(), |_| {}).err().unwrap().to_string().contains("at least 16")
    );
    assert!(ModelFiles::from_diffusers(&fixture("flux/schnell"), Some(&shipped)).is_err());
}

#[test]
fn resident_components_are_reused_and_give_the_same_image() {
    let files = ModelFiles::from_diffusers(&fixture("pipeline/schnell/diffusers"), None).unwrap();
    let req = GenerateRequest {
        prompt: "a fox".into(),
        seed: 3,
        steps: Some(2),
        width: 32,
        height: 32,
        guidance: None,
        max_sequence_length: Some(8),
        batch: 1,
        ..Default::default()
    };
    let device = Device::flex();
    let staged = pipeline::generate(&files, &req, &device, |_| {}).unwrap();
    let mut resident = pipeline::Resident::new(true);
    let mut stages = Vec::new();
    for _ in 0..2 {
        let out = pipeline::generate_with(&files, &req, &device, &mut resident, |p| {
            if let pipeline::Progress::Stage(s) = p {
                stages.push(s)
            }
        })
        .unwrap();
        assert_eq!(out.images[0], staged.images[0]);
    }
    assert_eq!(stages.len(), 6, "each run reports its three stages");
}

/// The dev pipeline with transformer and VAE in f16 and in bf16 on the CPU, against the f32
/// golden image. Tolerances from the formats: bf16 keeps 8 significant bits (relative rounding
/// 2^-9 ≈ 0.2% per value), f16 11 (≈ 0.024%); one 8-bit level is 0.4% of the range, so f16
/// should stay within a level or two and bf16 within a few. Measured on this fixture: f16
/// 57.4 dB, worst pixel 1/255; bf16 48.3 dB, worst 5/255. The bounds leave ~7 dB of margin.
#[test]
fn half_precision_images_stay_close_to_the_f32_golden() {
    use burn::tensor::DType;
    let golden = Golden::open("pipeline/dev/golden.safetensors");
    let settings: serde_json::Value = serde_json::from_str(golden.0.metadata("settings").unwrap()).unwrap();
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tokenizers");
    let files = ModelFiles::from_diffusers(&fixture("pipeline/dev/diffusers"), Some(&shipped)).unwrap();
    let req = GenerateRequest {
        prompt: settings["prompt"].as_str().unwrap().into(),
        seed: 42,
        steps: Some(3),
        width: 80,
        height: 48,
        guidance: Some(3.5),
        max_sequence_length: Some(32),
        batch: 1,
        ..Default::default()
    };
    let expected = golden.vec("image_u8");
    for (dtype, floor, worst_allowed) in [(DType::F16, 50.0, 2.0), (DType::BF16, 42.0, 8.0)] {
        let mut resident = pipeline::Resident::placed(pipeline::Placement::staged(dtype));
        let out = pipeline::generate_with(&files, &req, &Device::flex(), &mut resident, |_| {}).unwrap();
        let img = out.images[0].as_raw();
        let mse =
            img.iter().zip(&expected).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>() / img.len() as f64;
        let psnr = 10.0 * (255.0f64.powi(2) / mse.max(1e-12)).log10();
        let worst = img.iter().zip(&expected).map(|(a, b)| (*a as f32 - b).abs()).fold(0f32, f32::max);
        eprintln!("dev in {dtype:?}: PSNR {psnr:.1} dB against f32, worst pixel {worst}/255");
        assert!(psnr >= floor, "{dtype:?}: PSNR {psnr:.1} dB < {floor}");
        assert!(worst <= worst_allowed, "{dtype:?}: a pixel differs by {worst}/255");
    }
}
