//! The FLUX autoencoder against diffusers' `AutoencoderKL` (tiny random, 4 levels like FLUX),
//! from BFL's `ae.safetensors` layout and from a diffusers `vae/` folder.

use atelier::engine::vae::{self, Vae, VaeLayout, VaeWeights};
use atelier::engine::weights::WeightSet;
use burn::tensor::{DType, Device};

use crate::common::{Golden, fixture, relative_error, wgpu_device};

fn load(path: &str, device: &Device) -> Vae {
    let hint = vae::read_hint(&fixture("pipeline/schnell/diffusers/vae/config.json")).unwrap();
    vae::load_vae(&fixture(path), device, DType::F32, hint.as_ref()).unwrap_or_else(|e| panic!("loading {path}: {e:#}"))
}

fn outputs(vae: &Vae, golden: &Golden, device: &Device) -> [Vec<f32>; 3] {
    let x = golden.tensor::<4>("vae_encode_input", device);
    let mean = vae.encode_mean(x.clone()).into_data().try_to_vec::<f32>().unwrap();
    let scaled = vae.encode(x).into_data().try_to_vec::<f32>().unwrap();
    let decoded = vae.decode_raw(golden.tensor("vae_decode_input", device)).into_data().try_to_vec::<f32>().unwrap();
    [mean, scaled, decoded]
}

#[test]
fn vae_matches_diffusers_in_both_layouts() {
    let device = Device::flex();
    let golden = Golden::open("pipeline/schnell/golden.safetensors");
    let mut first: Option<[Vec<f32>; 3]> = None;
    for (path, layout) in
        [("pipeline/single/ae.safetensors", VaeLayout::Bfl), ("pipeline/schnell/diffusers/vae", VaeLayout::Diffusers)]
    {
        let w = VaeWeights::new(WeightSet::open(&fixture(path)).unwrap()).unwrap();
        assert_eq!(w.layout(), layout);
        let vae = load(path, &device);
        assert_eq!(vae.config.ch_mult, vec![1, 1, 2, 2]);
        assert_eq!((vae.config.groups, vae.config.z_channels), (4, 16));
        let out = outputs(&vae, &golden, &device);
        for (got, key) in out.iter().zip(["vae_latent_mean", "vae_latent_scaled", "vae_decode_output"]) {
            let err = relative_error(got, &golden.vec(key));
            eprintln!("{path} {key}: relative error {err:.2e}");
            assert!(err <= 1e-4, "{path} {key}: relative error {err:.3e} > 1e-4");
        }
        match &first {
            None => first = Some(out),
            Some(f) => assert_eq!(f, &out, "{path} differs from the BFL layout"),
        }
    }
}

#[test]
fn vae_decode_on_wgpu() {
    let Some(device) = wgpu_device() else { return };
    let golden = Golden::open("pipeline/schnell/golden.safetensors");
    let vae = load("pipeline/single/ae.safetensors", &device);
    let out = vae.decode_raw(golden.tensor("vae_decode_input", &device)).into_data().try_to_vec::<f32>().unwrap();
    let err = relative_error(&out, &golden.vec("vae_decode_output"));
    eprintln!("VAE decode on wgpu: relative error {err:.2e}");
    assert!(err <= 1e-3, "wgpu VAE decode: relative error {err:.3e}");
}

#[test]
fn a_transformer_file_is_not_a_vae() {
    let err = vae::load_vae(&fixture("flux/schnell/bfl.safetensors"), &Device::flex(), DType::F32, None)
        .expect_err("a transformer must not load as a VAE");
    assert!(format!("{err:#}").contains("not a VAE"), "{err:#}");
}

#[test]
fn tiled_decode_is_exact_for_one_tile_and_close_for_many() {
    let device = Device::flex();
    let golden = Golden::open("pipeline/schnell/golden.safetensors");
    let vae = load("pipeline/single/ae.safetensors", &device);
    let scaled = |g: &Golden| {
        let z = g.tensor::<4>("vae_decode_input", &device);
        (z - vae.config.shift_factor) * vae.config.scaling_factor
    };
    let whole = vae.decode(scaled(&golden)).into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(vae.decode_tiled(scaled(&golden), 16, 4), whole, "a single tile must be the plain decode");
    // 6×10 latents in 4×4 tiles overlapping by 2: GroupNorm and attention see less context,
    // so the result is close, not equal (as with any tiled VAE decoder).
    let tiled = vae.decode_tiled(scaled(&golden), 4, 2);
    assert_eq!(tiled.len(), whole.len());
    let mean_abs = tiled.iter().zip(&whole).map(|(a, b)| (a - b).abs()).sum::<f32>() / whole.len() as f32;
    eprintln!("tiled decode: mean |difference| {mean_abs:.3} (image range about ±2.5)");
    assert!(tiled.iter().all(|v| v.is_finite()) && mean_abs < 0.5, "tiled decode drifted: {mean_abs}");
}
