//! A ComfyUI all-in-one checkpoint: transformer, VAE and both text encoders in one file under
//! their ComfyUI prefixes. Each component loads from that one file and matches diffusers.

use atelier::engine::clip::{ClipHint, ClipText};
use atelier::engine::flux;
use atelier::engine::t5::T5Encoder;
use atelier::engine::vae;
use atelier::engine::weights::{WeightSet, write_safetensors_f32};
use burn::tensor::{DType, Device};

use crate::common::{Golden, fixture, relative_error};

#[test]
fn every_component_loads_from_one_comfyui_file() {
    let parts = [
        ("pipeline/single/flux_schnell_bfl.safetensors", "model.diffusion_model."),
        ("pipeline/single/ae.safetensors", "first_stage_model."),
        ("pipeline/single/clip_l.safetensors", "text_encoders.clip_l.transformer."),
        ("pipeline/single/t5xxl.safetensors", "text_encoders.t5xxl.transformer."),
    ];
    let sets: Vec<(WeightSet, &str)> =
        parts.iter().map(|(p, prefix)| (WeightSet::open(&fixture(p)).unwrap(), *prefix)).collect();
    let mut tensors = Vec::new();
    for (set, prefix) in &sets {
        for k in set.keys() {
            tensors.push((format!("{prefix}{k}"), set.shape(k).unwrap().to_vec()));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux_all_in_one.safetensors");
    write_safetensors_f32(&path, &tensors, &[], |name, _| {
        let (set, prefix) = sets.iter().find(|(s, p)| name.strip_prefix(p).is_some_and(|k| s.contains(k))).unwrap();
        set.read(&name[prefix.len()..]).unwrap().data
    })
    .unwrap();

    let device = Device::flex();
    let golden = Golden::open("pipeline/schnell/golden.safetensors");
    let ids = |k: &str| vec![golden.vec(k).iter().map(|&v| v as u32).collect::<Vec<_>>()];

    let t5 = T5Encoder::load(&path, &device, None).unwrap();
    let out = t5.forward(&ids("t5_ids"), &device).unwrap().into_data().try_to_vec::<f32>().unwrap();
    assert!(relative_error(&out, &golden.vec("t5_out")) <= 1e-4);

    let hint: ClipHint = serde_json::from_str(
        &std::fs::read_to_string(fixture("pipeline/schnell/diffusers/text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    let clip = ClipText::load(&path, &device, Some(&hint)).unwrap();
    let pooled = clip.forward(&ids("clip_ids")).unwrap().pooled.into_data().try_to_vec::<f32>().unwrap();
    assert!(relative_error(&pooled, &golden.vec("clip_pooled")) <= 1e-4);

    let vae_hint = vae::read_hint(&fixture("pipeline/schnell/diffusers/vae/config.json")).unwrap();
    let ae = vae::load_vae(&path, &device, DType::F32, vae_hint.as_ref()).unwrap();
    let decoded = ae.decode_raw(golden.tensor("vae_decode_input", &device)).into_data().try_to_vec::<f32>().unwrap();
    assert!(relative_error(&decoded, &golden.vec("vae_decode_output")) <= 1e-4);

    let flux_hint =
        flux::read_diffusers_config(&fixture("pipeline/schnell/diffusers/transformer/config.json")).unwrap();
    let weights = flux::TransformerWeights::open(&path).unwrap();
    assert_eq!(weights.layout(), flux::Layout::ComfyUi);
    let model = flux::load_transformer(&path, &device, DType::F32, flux_hint.as_ref()).unwrap();
    assert_eq!((model.config.depth, model.config.depth_single_blocks), (2, 2));
}
