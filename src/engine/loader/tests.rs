//! The walk against every model: loads equal random builds, checks report what the walk read,
//! and each model is a Module holding exactly the tensors its walk reads.
use super::*;
use crate::engine::flux::{Flux, FluxConfig, TransformerWeights};

fn values<const D: usize>(p: &Param<Tensor<D>>) -> Vec<f32> {
    p.val().into_data().try_to_vec::<f32>().unwrap()
}

fn weight_values(w: &crate::engine::packed::Weight) -> Vec<f32> {
    w.val().into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn a_random_walk_is_the_checkpoint_its_plan_writes() {
    let config = FluxConfig::tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.safetensors");
    crate::engine::flux::write_random_checkpoint(&config, &path, 7).unwrap();
    let device = Device::flex();
    let weights = TransformerWeights::open(&path).unwrap();
    let loaded = Flux::load(&weights, config.clone(), &device, DType::F32).unwrap();
    let walk = Walk::random(&device, DType::F32, 7);
    let random = Flux::build(&walk.root(), config).unwrap();
    assert_eq!(walk.entries().len(), weights.weight_set().keys().count());
    assert_eq!(weight_values(&loaded.img_in.weight), weight_values(&random.img_in.weight));
    let (a, b) = (&loaded.single_blocks[1], &random.single_blocks[1]);
    assert_eq!(weight_values(&a.linear2.weight), weight_values(&b.linear2.weight));
    assert_eq!(values(a.linear2.bias.as_ref().unwrap()), values(b.linear2.bias.as_ref().unwrap()));
    assert_eq!(values(&a.norm.key_norm), vec![1.0; 8]);
}

#[test]
fn a_check_walk_names_missing_misshapen_and_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.safetensors");
    let walk = Walk::plan();
    Flux::build(&walk.root(), FluxConfig::tiny()).unwrap();
    let mut entries = walk.entries();
    entries.retain(|e| e.name != "txt_in.bias");
    entries.iter_mut().find(|e| e.name == "img_in.bias").unwrap().shape = vec![3];
    entries.push(Entry { name: "img_in.extra".into(), shape: vec![1], init: Init::Zeros, packable: false });
    write_random(&path, &entries, &[], 1).unwrap();
    let weights = TransformerWeights::open(&path).unwrap();
    let msg = check(&weights, "test checkpoint", "the FLUX layout", |l| Flux::build(l, FluxConfig::tiny()))
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("test checkpoint does not match the FLUX layout:"), "{msg}");
    assert!(msg.contains("missing txt_in.bias"), "{msg}");
    assert!(msg.contains("img_in.bias has shape [3], not [16]"), "{msg}");
    assert!(msg.contains("unknown keys img_in.extra"), "{msg}");
}

/// Every model is a burn Module whose parameters are exactly the tensors its walk reads.
#[test]
fn every_model_holds_exactly_what_its_walk_reads() {
    use crate::engine::clip::{ClipConfig, ClipText};
    use crate::engine::t5::{T5Config, T5Encoder};
    use crate::engine::vae::{Vae, VaeConfig};
    use burn::module::Module;

    fn count<M: Module>(build: impl Fn(&Loader) -> Result<M>) -> (usize, usize) {
        let walk = Walk::random(&Device::flex(), DType::F32, 3);
        let model = build(&walk.root()).unwrap();
        let read = walk.entries().iter().map(|e| e.shape.iter().product::<usize>()).sum();
        (model.num_params(), read)
    }
    let t5 = T5Config {
        vocab: 20,
        d_model: 8,
        heads: 2,
        d_kv: 4,
        d_ff: 12,
        layers: 2,
        buckets: 8,
        max_distance: 16,
        eps: 1e-6,
    };
    let clip = ClipConfig {
        vocab: 20,
        hidden: 8,
        intermediate: 16,
        heads: 2,
        layers: 2,
        positions: 6,
        eps: 1e-5,
        quick_gelu: true,
    };
    let vae =
        VaeConfig { ch: 8, ch_mult: vec![1, 2], num_res_blocks: 1, z_channels: 4, groups: 4, ..VaeConfig::flux() };
    for (name, (params, read)) in [
        ("flux", count(|l| Flux::build(l, FluxConfig::tiny()))),
        ("t5", count(|l| T5Encoder::build(l, t5.clone()))),
        ("clip", count(|l| ClipText::build(l, clip.clone()))),
        ("vae", count(|l| Vae::build(l, vae.clone()))),
    ] {
        assert!(params > 0 && params == read, "{name}: {params} parameters, {read} values read");
    }
}
