//! The FLUX transformer against diffusers' `FluxTransformer2DModel` on tiny random models,
//! from every checkpoint layout.

use atelier::engine::flux::{self, DiffusersConfig, Flux, FluxInput, Layout, Rope, TransformerWeights};
use atelier::engine::packed::Packing;
use burn::tensor::{DType, Device};

use crate::common::{Golden, fixture, relative_error, wgpu_device};

const LAYOUTS: [(&str, Layout); 4] = [
    ("bfl.safetensors", Layout::Bfl),
    ("comfy.safetensors", Layout::ComfyUi),
    ("diffusers/transformer", Layout::Diffusers),
    ("diffusers_sharded/transformer", Layout::Diffusers),
];

/// The RoPE axes are not visible in weights; BFL files take them from the diffusers config.
fn axes_hint(model: &str) -> DiffusersConfig {
    flux::read_diffusers_config(&fixture(&format!("flux/{model}/diffusers/transformer/config.json"))).unwrap().unwrap()
}

fn load(model: &str, layout_path: &str, device: &Device) -> Flux {
    let path = fixture(&format!("flux/{model}/{layout_path}"));
    flux::load_transformer(&path, device, DType::F32, Some(&axes_hint(model)))
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", path.display()))
}

fn run(model: &Flux, golden: &Golden, device: &Device) -> Vec<f32> {
    let mut ids = golden.ids("txt_ids");
    ids.extend(golden.ids("img_ids"));
    let rope = Rope::new(&ids, &model.config.axes_dim, model.config.theta, device);
    let guidance = golden.has("guidance").then(|| golden.vec("guidance"));
    let out = model
        .forward(FluxInput {
            img: golden.tensor("img", device),
            txt: golden.tensor("txt", device),
            y: golden.tensor("y", device),
            timesteps: &golden.vec("timesteps"),
            guidance: guidance.as_deref(),
            rope: &rope,
        })
        .expect("forward");
    assert_eq!(out.dims(), [2, 15, 16]);
    out.into_data().try_to_vec::<f32>().unwrap()
}

fn check_all_layouts(model: &str) {
    let device = Device::flex();
    let golden = Golden::open(&format!("flux/{model}/golden.safetensors"));
    let expected = golden.vec("out");
    let mut first: Option<Vec<f32>> = None;
    for (path, layout) in LAYOUTS {
        let weights = TransformerWeights::open(&fixture(&format!("flux/{model}/{path}"))).unwrap();
        assert_eq!(weights.layout(), layout, "{model}/{path} detected as {:?}", weights.layout());
        let out = run(&load(model, path, &device), &golden, &device);
        let err = relative_error(&out, &expected);
        eprintln!("{model} {path}: relative error {err:.2e}");
        assert!(err <= 1e-4, "{model} {path}: relative error {err:.3e} > 1e-4");
        match &first {
            None => first = Some(out),
            Some(f) => assert_eq!(f, &out, "{model}: {path} differs from {}", LAYOUTS[0].0),
        }
    }
}

#[test]
fn schnell_matches_diffusers_in_every_layout() {
    check_all_layouts("schnell");
}

#[test]
fn dev_matches_diffusers_in_every_layout() {
    check_all_layouts("dev");
}

#[test]
fn inferred_config_matches_the_diffusers_config() {
    let device = Device::flex();
    let dev = load("dev", "diffusers/transformer", &device);
    let c = &dev.config;
    assert_eq!((c.hidden_size, c.num_heads, c.depth, c.depth_single_blocks), (32, 4, 2, 3));
    assert_eq!((c.in_channels, c.out_channels, c.context_in_dim, c.vec_in_dim), (16, 16, 32, 24));
    assert!(c.guidance_embed);
    assert_eq!(c.axes_dim, vec![2, 2, 4]);
    let schnell = load("schnell", "bfl.safetensors", &device);
    assert!(!schnell.config.guidance_embed);
    assert_eq!((schnell.config.num_heads, schnell.config.depth_single_blocks), (2, 2));
}

#[test]
fn dev_without_guidance_is_an_error() {
    let device = Device::flex();
    let model = load("dev", "bfl.safetensors", &device);
    let golden = Golden::open("flux/dev/golden.safetensors");
    let rope = model.rope(7, 3, 5, &device);
    let err = model
        .forward(FluxInput {
            img: golden.tensor("img", &device),
            txt: golden.tensor("txt", &device),
            y: golden.tensor("y", &device),
            timesteps: &golden.vec("timesteps"),
            guidance: None,
            rope: &rope,
        })
        .unwrap_err();
    assert!(err.to_string().contains("guidance"), "{err}");
}

#[test]
fn wgpu_matches_diffusers() {
    let Some(device) = wgpu_device() else { return };
    for model in ["schnell", "dev"] {
        let golden = Golden::open(&format!("flux/{model}/golden.safetensors"));
        let out = run(&load(model, "bfl.safetensors", &device), &golden, &device);
        let err = relative_error(&out, &golden.vec("out"));
        eprintln!("{model} on wgpu: relative error {err:.2e}");
        assert!(err <= 1e-3, "{model} on wgpu: relative error {err:.3e} > 1e-3");
    }
}

#[test]
fn half_precision_compute_stays_close() {
    // f16 and bf16 weights and activations on the CPU backend; QK-norm, RoPE and the norms
    // run in f32 inside, as the reference does. On a CPU with AMX, bf16 is bf16 Linear
    // weights in tiles with f32 activations (`engine::cpu::amx`; the fixture's widths are
    // multiples of 32, so most Linears take the tile product).
    let device = Device::flex();
    let golden = Golden::open("flux/dev/golden.safetensors");
    for (dtype, bound) in [(DType::F16, 1e-2), (DType::BF16, 5e-2)] {
        let path = fixture("flux/dev/bfl.safetensors");
        let mut model = flux::load_transformer(&path, &device, dtype, Some(&axes_hint("dev"))).unwrap();
        let tiled = atelier::engine::cpu::bf16_tiles(&device, dtype);
        let activations = atelier::engine::cpu::activation_dtype(&device, dtype);
        let linears = model.linears_mut();
        let tiles = linears.iter().filter(|(_, l)| l.weight.packing() == Some(Packing::Bf16Tiles)).count();
        assert!(
            if tiled { tiles * 10 >= linears.len() * 8 } else { tiles == 0 },
            "{tiles} of {} Linears in tiles",
            linears.len()
        );
        drop(linears);
        let rope = model.rope(7, 3, 5, &device);
        let out = model
            .forward(FluxInput {
                img: golden.tensor::<3>("img", &device).cast(activations),
                txt: golden.tensor::<3>("txt", &device).cast(activations),
                y: golden.tensor::<2>("y", &device).cast(activations),
                timesteps: &golden.vec("timesteps"),
                guidance: Some(&golden.vec("guidance")),
                rope: &rope,
            })
            .unwrap();
        assert_eq!(out.dtype(), activations);
        let out = out.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap();
        let err = relative_error(&out, &golden.vec("out"));
        let how = if tiled { " (AMX tiles, f32 activations)" } else { "" };
        eprintln!("dev in {dtype:?}{how}: relative error {err:.2e}");
        assert!(err <= bound, "{dtype:?}: relative error {err:.3e} > {bound}");
    }
}

/// f16 on wgpu (lavapipe in CI: WGSL with `shader-f16`) against the f32 golden, with the CPU's
/// f16 bound: f16's 11-bit mantissa gives ~5e-4 per rounding, and the error of a few blocks of
/// products and norms stays an order of magnitude under 1e-2 (the CPU's f16 run: ~3e-3).
#[test]
fn wgpu_f16_stays_close() {
    let Some(device) = wgpu_device() else { return };
    let golden = Golden::open("flux/dev/golden.safetensors");
    let path = fixture("flux/dev/bfl.safetensors");
    let model = flux::load_transformer(&path, &device, DType::F16, Some(&axes_hint("dev"))).unwrap();
    let rope = model.rope(7, 3, 5, &device);
    let out = model
        .forward(FluxInput {
            img: golden.tensor::<3>("img", &device).cast(DType::F16),
            txt: golden.tensor::<3>("txt", &device).cast(DType::F16),
            y: golden.tensor::<2>("y", &device).cast(DType::F16),
            timesteps: &golden.vec("timesteps"),
            guidance: Some(&golden.vec("guidance")),
            rope: &rope,
        })
        .unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let out = out.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap();
    let err = relative_error(&out, &golden.vec("out"));
    eprintln!("dev in F16 on wgpu: relative error {err:.2e}");
    assert!(err <= 1e-2, "relative error {err:.3e} > 1e-2");
}
