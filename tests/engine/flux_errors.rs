//! Bad checkpoints give clear errors that name the problem, never a panic.

use std::collections::HashMap;
use std::path::Path;

use atelier::engine::flux::{self, DiffusersConfig, FluxConfig, FluxInput, TransformerWeights};
use atelier::engine::weights::{WeightSet, write_safetensors_f32};
use burn::tensor::{DType, Device};
use safetensors::tensor::{Dtype, TensorView};

use crate::common::{Golden, fixture, relative_error};

fn hint() -> DiffusersConfig {
    flux::read_diffusers_config(&fixture("flux/schnell/diffusers/transformer/config.json")).unwrap().unwrap()
}

fn load_err(path: &Path) -> String {
    match flux::load_transformer(path, &Device::flex(), DType::F32, Some(&hint())) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// Rewrites the schnell BFL fixture with `edit` applied to its tensor list.
fn rewrite(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Vec<usize>)>)) -> std::path::PathBuf {
    let src = WeightSet::open(&fixture("flux/schnell/bfl.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> =
        src.keys().map(|k| (k.to_string(), src.shape(k).unwrap().to_vec())).collect();
    edit(&mut tensors);
    let out = dir.join(name);
    write_safetensors_f32(&out, &tensors, &[], |name, shape| {
        if src.contains(name) { src.read(name).unwrap().data } else { vec![0.5; shape.iter().product()] }
    })
    .unwrap();
    out
}

#[test]
fn truncated_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("flux/schnell/bfl.safetensors")).unwrap();
    let path = dir.path().join("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let msg = load_err(&path);
    assert!(msg.contains("truncated") && msg.contains("cut.safetensors"), "{msg}");
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert!(load_err(&path).contains("not a valid safetensors file"));
}

#[test]
fn missing_and_unknown_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = rewrite(dir.path(), "edited.safetensors", |t| {
        t.retain(|(k, _)| k != "double_blocks.1.txt_mlp.2.bias");
        t.push(("double_blocks.0.img_attn.extra.weight".into(), vec![2, 2]));
    });
    let msg = load_err(&path);
    assert!(msg.contains("missing double_blocks.1.txt_mlp.2.bias"), "{msg}");
    assert!(msg.contains("unknown keys double_blocks.0.img_attn.extra.weight"), "{msg}");
}

#[test]
fn unknown_layout_and_missing_paths_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    write_safetensors_f32(&path, &[("encoder.layer.0.weight".into(), vec![2])], &[], |_, _| vec![1.0, 2.0]).unwrap();
    assert!(load_err(&path).contains("unrecognized transformer layout"));
    assert!(load_err(&dir.path().join("nope.safetensors")).contains("does not exist"));
    assert!(load_err(dir.path()).contains("other.safetensors") || load_err(dir.path()).contains("layout"));
    let empty = tempfile::tempdir().unwrap();
    assert!(load_err(empty.path()).contains("no .safetensors file"));
}

#[test]
fn bf16_and_f16_checkpoints_convert_on_load() {
    // The same weights stored in half precision load (converted to f32) and stay close
    // to the f32 golden: only the rounding of the weights differs.
    let src = WeightSet::open(&fixture("flux/schnell/bfl.safetensors")).unwrap();
    let golden = Golden::open("flux/schnell/golden.safetensors");
    let dir = tempfile::tempdir().unwrap();
    for dtype in [Dtype::BF16, Dtype::F16] {
        let mut bytes: HashMap<String, (Vec<usize>, Vec<u8>)> = HashMap::new();
        for k in src.keys() {
            let t = src.read(k).unwrap();
            let b: Vec<u8> = t
                .data
                .iter()
                .flat_map(|v| match dtype {
                    Dtype::BF16 => half::bf16::from_f32(*v).to_le_bytes(),
                    _ => half::f16::from_f32(*v).to_le_bytes(),
                })
                .collect();
            bytes.insert(k.to_string(), (t.shape, b));
        }
        let views: Vec<(String, TensorView)> =
            bytes.iter().map(|(k, (s, b))| (k.clone(), TensorView::new(dtype, s.clone(), b).unwrap())).collect();
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        safetensors::serialize_to_file(views, None, &path).unwrap();

        let device = Device::flex();
        let weights = TransformerWeights::open(&path).unwrap();
        let config = FluxConfig::infer(&weights, Some(&hint())).unwrap();
        let model = flux::Flux::load(&weights, config, &device, DType::F32).unwrap();
        let rope = model.rope(7, 3, 5, &device);
        let out = model
            .forward(FluxInput {
                img: golden.tensor("img", &device),
                txt: golden.tensor("txt", &device),
                y: golden.tensor("y", &device),
                timesteps: &golden.vec("timesteps"),
                guidance: None,
                rope: &rope,
            })
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let err = relative_error(&out, &golden.vec("out"));
        eprintln!("{dtype:?} checkpoint: relative error {err:.2e}");
        let bound = if dtype == Dtype::BF16 { 5e-2 } else { 5e-3 };
        assert!(err < bound, "{dtype:?}: relative error {err}");
        assert!(err > 0.0, "{dtype:?}: rounding should change something");
    }
}
