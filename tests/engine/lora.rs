//! LoRA at inference against `tests/reference/make_lora_goldens.py`: images with LoRAs of
//! several formats (kohya, diffusers/PEFT, ComfyUI, XLabs; one alone at 0.8, two together)
//! within 2/255 of diffusers, and clear errors for files that are no FLUX LoRA.

use std::path::{Path, PathBuf};

use atelier::engine::lora::{Lora, LoraChoice};
use atelier::engine::pipeline::{self, GenerateRequest, ModelFiles};
use atelier::engine::weights::write_safetensors_f32;
use burn::tensor::Device;

use crate::common::fixture;

fn request(kind: &str, loras: Vec<LoraChoice>) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red fox in the snow, studio photo".into(),
        seed: 42,
        steps: Some(3),
        width: 80,
        height: 48,
        guidance: (kind == "dev").then_some(3.5),
        max_sequence_length: Some(32),
        batch: 1,
        loras,
        ..Default::default()
    }
}

fn check_case(case: &str) {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("lora/cases.json")).unwrap()).unwrap();
    let c = &cases[case];
    let kind = c["kind"].as_str().unwrap();
    let loras = c["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| LoraChoice {
            path: fixture(&format!("lora/{}", l[0].as_str().unwrap())),
            weight: l[1].as_f64().unwrap() as f32,
        })
        .collect();
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tokenizers");
    let files = ModelFiles::from_diffusers(&fixture(&format!("pipeline/{kind}/diffusers")), Some(&shipped)).unwrap();
    let out = pipeline::generate(&files, &request(kind, loras), &Device::flex(), |_| {}).unwrap();
    let expected = image::open(fixture(&format!("lora/{case}.png"))).unwrap().to_rgb8();
    let worst =
        out.images[0].as_raw().iter().zip(expected.as_raw()).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    eprintln!("{case}: worst pixel difference {worst}/255; warnings {:?}", out.warnings);
    assert!(worst <= 2, "{case}: a pixel differs by {worst}/255");
}

#[test]
fn schnell_kohya_lora_at_0_8_equals_diffusers() {
    check_case("schnell_kohya");
}

#[test]
fn schnell_peft_lora_with_metadata_alpha_equals_diffusers() {
    check_case("schnell_peft");
}

#[test]
fn dev_kohya_lora_equals_diffusers() {
    check_case("dev_kohya");
}

#[test]
fn dev_peft_and_kohya_together_equal_diffusers() {
    check_case("dev_peft_kohya");
}

#[test]
fn dev_comfy_and_xlabs_together_equal_diffusers() {
    check_case("dev_comfy_xlabs");
}

#[test]
fn the_kohya_file_says_its_t5_part_is_skipped() {
    let lora = Lora::open(&fixture("lora/dev/kohya.safetensors")).unwrap();
    assert_eq!(lora.format, "kohya");
    assert!(lora.notes.iter().any(|n| n.contains("T5")), "{:?}", lora.notes);
    assert_eq!(lora.hash.len(), 12);
}

fn write(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let t: Vec<(String, Vec<usize>)> = tensors.iter().map(|(k, s)| (k.to_string(), s.clone())).collect();
    write_safetensors_f32(path, &t, &[], |_, s| vec![0.01; s.iter().product()]).unwrap();
}

fn open_err(path: &Path) -> String {
    format!("{:#}", Lora::open(path).unwrap_err())
}

#[test]
fn bad_lora_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Truncated: a good file cut short.
    let good = std::fs::read(fixture("lora/dev/kohya.safetensors")).unwrap();
    std::fs::write(d.join("cut.safetensors"), &good[..good.len() / 2]).unwrap();
    let e = open_err(&d.join("cut.safetensors"));
    assert!(e.contains("not a valid safetensors file"), "{e}");

    std::fs::write(d.join("notes.safetensors"), b"this is a text file, not tensors").unwrap();
    let e = open_err(&d.join("notes.safetensors"));
    assert!(e.contains("not a valid safetensors file"), "{e}");

    // SDXL-like keys.
    write(
        &d.join("sdxl.safetensors"),
        &[
            ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight", vec![4, 640]),
            ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight", vec![640, 4]),
            ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", vec![4, 768]),
            ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", vec![768, 4]),
        ],
    );
    let e = open_err(&d.join("sdxl.safetensors"));
    assert!(e.contains("no key matches a FLUX transformer") && e.contains("SDXL"), "{e}");

    // LoKr.
    write(
        &d.join("lokr.safetensors"),
        &[
            ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", vec![4, 4]),
            ("lora_unet_double_blocks_0_img_attn_qkv.lokr_w2", vec![24, 8]),
        ],
    );
    let e = open_err(&d.join("lokr.safetensors"));
    assert!(e.contains("LoKr") && e.contains("not supported"), "{e}");

    // A LoRA for another FLUX size (hidden 3072 on a model of hidden 32): refused at load.
    write(
        &d.join("big.safetensors"),
        &[
            ("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight", vec![4, 3072]),
            ("lora_unet_double_blocks_0_img_attn_proj.lora_up.weight", vec![3072, 4]),
        ],
    );
    let files = ModelFiles::from_diffusers(&fixture("pipeline/schnell/diffusers"), None).unwrap();
    let req = request("schnell", vec![LoraChoice { path: d.join("big.safetensors"), weight: 1.0 }]);
    let e = format!("{:#}", pipeline::generate(&files, &req, &Device::flex(), |_| {}).err().unwrap());
    assert!(e.contains("different model size") && e.contains("double_blocks.0.img_attn.proj"), "{e}");

    // Keys of a bigger FLUX (block 30 of a 2-block model): nothing matches this transformer.
    write(
        &d.join("deep.safetensors"),
        &[
            ("lora_unet_single_blocks_30_linear2.lora_down.weight", vec![4, 160]),
            ("lora_unet_single_blocks_30_linear2.lora_up.weight", vec![32, 4]),
        ],
    );
    let req = request("schnell", vec![LoraChoice { path: d.join("deep.safetensors"), weight: 1.0 }]);
    let e = format!("{:#}", pipeline::generate(&files, &req, &Device::flex(), |_| {}).err().unwrap());
    assert!(e.contains("none of its keys match this model's transformer"), "{e}");

    // A missing file is named.
    let req = request("schnell", vec![LoraChoice { path: d.join("nope.safetensors"), weight: 1.0 }]);
    let e = format!("{:#}", pipeline::prepare(&files, &req).unwrap_err());
    assert!(e.contains("nope.safetensors"), "{e}");
}

#[test]
fn a_partial_match_is_a_warning_listing_the_unmatched_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.safetensors");
    write(
        &path,
        &[
            ("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight", vec![2, 32]),
            ("lora_unet_double_blocks_0_img_attn_proj.lora_up.weight", vec![32, 2]),
            ("lora_unet_double_blocks_9_img_attn_proj.lora_down.weight", vec![2, 32]),
            ("lora_unet_double_blocks_9_img_attn_proj.lora_up.weight", vec![32, 2]),
            ("lora_unet_something_else.lora_down.weight", vec![2, 32]),
            ("lora_unet_something_else.lora_up.weight", vec![32, 2]),
        ],
    );
    let files = ModelFiles::from_diffusers(&fixture("pipeline/schnell/diffusers"), None).unwrap();
    let req = GenerateRequest { steps: Some(1), ..request("schnell", vec![LoraChoice { path, weight: 0.5 }]) };
    let out = pipeline::generate(&files, &req, &Device::flex(), |_| {}).unwrap();
    let w = out.warnings.join("\n");
    assert!(
        w.contains("match nothing")
            && w.contains("double_blocks_9_img_attn_proj")
            && w.contains("lora_unet_something_else"),
        "{w}"
    );
}
