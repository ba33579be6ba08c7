//! GGUF and fp8 checkpoints against `tests/reference/make_gguf_goldens.py`: dequantization bit
//! for bit equal to the `gguf` package's and torch's, clear errors for bad files, and the tiny
//! schnell pipeline generating with a GGUF / scaled-fp8 transformer.

use std::path::{Path, PathBuf};

use atelier::engine::gguf::{GgmlType, GgufFile};
use atelier::engine::pipeline::{self, GenerateRequest, ModelFiles};
use atelier::engine::weights::WeightSet;
use burn::tensor::{DType, Device};

use crate::common::{Golden, fixture};

/// Equal bit for bit (NaNs: both NaN).
fn assert_bits(name: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{name}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{name}[{i}]: {a:e} vs {b:e}");
    }
}

#[test]
fn every_block_type_dequantizes_as_the_gguf_package() {
    let file = GgufFile::open(&fixture("gguf/blocks.gguf")).unwrap();
    let golden = Golden::open("gguf/blocks_golden.safetensors");
    let names: Vec<String> = golden.0.keys().map(String::from).collect();
    assert_eq!(names.len(), 13, "{names:?}");
    assert_eq!(file.architecture(), Some("flux"));
    for name in names {
        let t = file.read(&name).unwrap();
        assert_eq!(Some(t.shape.as_slice()), golden.0.shape(&name), "{name}: shape");
        assert_bits(&name, &t.data, &golden.vec(&name));
    }
    let types: Vec<&str> = file.bytes_per_type().iter().map(|(t, _, _)| t.name()).collect();
    assert_eq!(types.len(), 13, "{types:?}");
}

#[test]
fn fp8_and_scaled_fp8_dequantize_as_torch() {
    let set = WeightSet::open(&fixture("fp8/fp8.safetensors")).unwrap();
    let golden = Golden::open("fp8/fp8_golden.safetensors");
    // The marker and the scales are not model tensors.
    let keys: Vec<&str> = set.keys().collect();
    assert_eq!(keys, ["plain.e4m3.weight", "plain.e5m2.weight", "x.weight", "y.bias", "y.weight"]);
    for name in keys {
        assert_bits(name, &set.read(name).unwrap().data, &golden.vec(name));
    }
}

/// A minimal GGUF v3 writer: (name, ggml dims, ggml type, bytes) per tensor.
fn write_gguf(path: &Path, arch: &str, tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend(1u64.to_le_bytes());
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    string(&mut out, arch);
    let mut offset = 0u64;
    for (name, dims, ty, bytes) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (bytes.len() as u64).div_ceil(32) * 32;
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for (_, _, _, bytes) in tensors {
        out.extend(bytes);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn bad_gguf_files_are_clear_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = |name: &str, arch: &str, tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]| {
        let path = dir.path().join(name);
        write_gguf(&path, arch, tensors);
        let msg = format!("{:#}", atelier::engine::flux::open_checked(&path, None).err().unwrap());
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        msg
    };
    let q8 = vec![0u8; 34 * 2];
    // Another architecture where a FLUX transformer is expected.
    let msg = err("llama.gguf", "llama", &[("img_in.weight", vec![32, 2], 8, q8.clone())]);
    assert!(msg.contains("architecture \"llama\", not a FLUX transformer"), "{msg}");
    // An unknown / unsupported block type.
    let msg = err("iq.gguf", "flux", &[("img_in.weight", vec![256, 1], 16, vec![0; 66])]);
    assert!(msg.contains("block type 16") && msg.contains("not supported"), "{msg}");
    let msg = err("t99.gguf", "flux", &[("img_in.weight", vec![32, 2], 99, q8.clone())]);
    assert!(msg.contains("block type 99"), "{msg}");
    // Dims that are not whole blocks along the rows.
    let msg = err("rows.gguf", "flux", &[("img_in.weight", vec![16, 4], 8, q8.clone())]);
    assert!(msg.contains("not whole Q8_0 blocks"), "{msg}");
    // Sizes that disagree with the offsets: the first tensor claims more data than it has.
    let msg = err(
        "overlap.gguf",
        "flux",
        &[("a.weight", vec![32, 4], 8, q8.clone()), ("b.weight", vec![32, 2], 8, q8.clone())],
    );
    assert!(msg.contains("overlap"), "{msg}");
    // A truncated file: the data stops short, then the header itself is cut.
    let good = fixture("gguf/flux_schnell_q8_0.gguf");
    let bytes = std::fs::read(&good).unwrap();
    for (name, keep, says) in [("cut.gguf", bytes.len() - 100, "truncated"), ("head.gguf", 200, "cut short")] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes[..keep]).unwrap();
        let msg = format!("{:#}", atelier::engine::flux::open_checked(&path, None).err().unwrap());
        assert!(msg.contains(path.to_str().unwrap()) && msg.contains(says), "{msg}");
    }
    // Tensor infos whose shapes disagree with the model the other tensors describe: txt_in's
    // dims swapped (same size, so only the walk can tell).
    let mut patched = bytes.clone();
    let name = b"txt_in.weight";
    let at = patched.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    assert_eq!(&patched[at..at + 4], &2u32.to_le_bytes());
    let (d0, d1) = (at + 4, at + 12);
    let first: [u8; 8] = patched[d0..d0 + 8].try_into().unwrap();
    patched.copy_within(d1..d1 + 8, d0);
    patched[d1..d1 + 8].copy_from_slice(&first);
    let path = dir.path().join("swapped.gguf");
    std::fs::write(&path, &patched).unwrap();
    let msg = format!("{:#}", atelier::engine::flux::open_checked(&path, None).err().unwrap());
    assert!(msg.contains(path.to_str().unwrap()) && msg.contains("txt_in.weight has shape [8, 32]"), "{msg}");
    let path = dir.path().join("not.gguf");
    std::fs::write(&path, b"PK\x03\x04 a zip file").unwrap();
    let msg = format!("{:#}", GgufFile::open(&path).err().unwrap());
    assert!(msg.contains("not a GGUF file") && msg.contains("not.gguf"), "{msg}");
}

fn generate(transformer: PathBuf) -> Vec<u8> {
    generate_with_loras(transformer, Vec::new())
}

fn schnell_files() -> ModelFiles {
    ModelFiles::from_diffusers(
        &fixture("pipeline/schnell/diffusers"),
        Some(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tokenizers")),
    )
    .unwrap()
}

fn generate_with_loras(transformer: PathBuf, loras: Vec<atelier::engine::lora::LoraChoice>) -> Vec<u8> {
    generate_files(ModelFiles { transformer, ..schnell_files() }, loras)
}

fn generate_files(files: ModelFiles, loras: Vec<atelier::engine::lora::LoraChoice>) -> Vec<u8> {
    let req = GenerateRequest {
        prompt: "a red fox in the snow, studio photo".into(),
        seed: 42,
        steps: Some(3),
        width: 80,
        height: 48,
        max_sequence_length: Some(32),
        batch: 1,
        loras,
        ..Default::default()
    };
    let out = pipeline::generate(&files, &req, &Device::flex(), |_| {}).unwrap();
    out.images[0].as_raw().clone()
}

fn psnr(a: &[u8], b: &[f32]) -> f64 {
    let mse = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

#[test]
fn a_gguf_transformer_generates_the_image_of_its_dequantized_copy() {
    let reference = Golden::open("pipeline/schnell/golden.safetensors").vec("image_u8");
    for (quant, floor) in [("q8_0", 30.0), ("q4_0", 18.0)] {
        let gguf = generate(fixture(&format!("gguf/flux_schnell_{quant}.gguf")));
        let copy = generate(fixture(&format!("gguf/flux_schnell_{quant}_f32.safetensors")));
        let worst = gguf.iter().zip(&copy).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        let db = psnr(&gguf, &reference);
        eprintln!("{quant}: worst pixel vs its F32 copy {worst}/255; PSNR vs the unquantized image {db:.1} dB");
        assert!(worst <= 1, "{quant}: {worst}/255");
        assert!(db > floor, "{quant}: PSNR {db:.1} dB");
    }
}

#[test]
fn a_gguf_t5_generates_the_image_of_its_source() {
    // The pipeline's own T5 folder written as GGUF (llama.cpp names) and given as --t5.
    let dir = tempfile::tempdir().unwrap();
    let files = schnell_files();
    let reference = generate_files(schnell_files(), Vec::new());
    for (ty, most) in [("f16", 1), ("q8_0", 2)] {
        let t5 = dir.path().join(format!("t5_{ty}.gguf"));
        atelier::engine::to_gguf::convert_t5(&files.t5, &t5, ty).unwrap();
        let sizes = atelier::engine::footprint::model_sizes(
            &files.transformer,
            &t5,
            &files.clip,
            &files.vae,
            burn::tensor::DType::F32,
        )
        .unwrap();
        // The embedding is read as f32 whatever the file holds; packed matrices (Q8_0: those
        // whose rows of 32 are whole blocks, [8, 32]) count four dense f32 copies in use.
        assert!(sizes.t5_stem >= 32128 * 8 * 4, "{sizes:?}");
        assert_eq!(sizes.t5_dequant_bytes, if ty == "q8_0" { 4 * 8 * 32 * 4 } else { 0 }, "{ty}");
        let img = generate_files(ModelFiles { t5, ..schnell_files() }, Vec::new());
        let worst = img.iter().zip(&reference).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        eprintln!("T5 as GGUF {ty}: worst pixel {worst}/255 vs the safetensors T5; planned T5 bytes {}", sizes.t5);
        assert!(worst <= most, "{ty}: {worst}/255");
    }
}

#[test]
fn a_scaled_fp8_transformer_generates() {
    let reference = Golden::open("pipeline/schnell/golden.safetensors").vec("image_u8");
    let img = generate(fixture("fp8/flux_schnell_scaled_fp8.safetensors"));
    let db = psnr(&img, &reference);
    eprintln!("scaled fp8 e4m3fn: PSNR vs the unquantized image {db:.1} dB");
    assert!(db > 18.0, "PSNR {db:.1} dB");
}

/// Offsets of the f16 scale fields in each block type (ggml-common.h), as in the reference
/// script's `F16_FIELDS`.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        _ => &[],
    }
}

/// Random but valid blocks of `ty` for `numel` values whose largest magnitude is about
/// `bound`: random bytes, every f16 scale field set to one value (values are linear in
/// those fields, so one trial decode tells which value gives `bound`).
fn random_blocks(ty: GgmlType, numel: usize, bound: f32, state: &mut u64) -> Vec<u8> {
    let (per_block, block_bytes) = ty.block();
    let mut bytes: Vec<u8> = (0..numel / per_block * block_bytes)
        .map(|_| {
            *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (*state >> 56) as u8
        })
        .collect();
    let set = |bytes: &mut Vec<u8>, scale: f32| {
        for block in bytes.chunks_exact_mut(block_bytes) {
            for &at in f16_fields(ty) {
                block[at..at + 2].copy_from_slice(&half::f16::from_f32(scale).to_le_bytes());
            }
        }
    };
    set(&mut bytes, 1.0);
    let peak = atelier::engine::gguf::dequantize(ty, &bytes).unwrap().iter().fold(0f32, |m, v| m.max(v.abs()));
    set(&mut bytes, bound / peak);
    bytes
}

/// A FLUX of hidden 256 (rows of whole K-quant blocks) with the schnell pipeline's text and
/// latent sizes, its Linears spread over every block type atelier reads.
fn mixed_gguf(dir: &Path) -> (PathBuf, PathBuf, Vec<GgmlType>) {
    use atelier::engine::flux::{Flux, FluxConfig};
    use atelier::engine::gguf::writer::{self, MetaValue, TensorPlan};
    let config = FluxConfig {
        in_channels: 64,
        out_channels: 64,
        vec_in_dim: 4,
        context_in_dim: 8,
        hidden_size: 256,
        mlp_hidden_dim: 512,
        num_heads: 16,
        depth: 1,
        depth_single_blocks: 1,
        axes_dim: vec![4, 6, 6],
        theta: 10_000.0,
        qkv_bias: true,
        guidance_embed: false,
    };
    let walk = atelier::engine::loader::Walk::plan();
    Flux::build(&walk.root(), config).unwrap();
    let cycle: Vec<GgmlType> = GgmlType::QUANTIZED.into_iter().chain([GgmlType::F16, GgmlType::BF16]).collect();
    let mut next = 0;
    let mut plans = Vec::new();
    for e in walk.entries() {
        let ty = if e.shape.len() == 1 {
            GgmlType::F32
        } else if e.shape[1] % 256 != 0 {
            GgmlType::F16
        } else {
            next += 1;
            cycle[(next - 1) % cycle.len()]
        };
        plans.push(TensorPlan { name: e.name, shape: e.shape, ty });
    }
    let mut state = 14u64;
    let data: Vec<Vec<u8>> = plans
        .iter()
        .map(|p| {
            let numel: usize = p.shape.iter().product();
            let bound = if p.shape.len() == 1 { 1.0 } else { 1.0 / (p.shape[1] as f32).sqrt() };
            match p.ty {
                GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                    let values: Vec<f32> = random_blocks(GgmlType::Q8_0, numel.div_ceil(32) * 32, bound, &mut state)
                        .chunks(34)
                        .flat_map(|b| atelier::engine::gguf::dequantize(GgmlType::Q8_0, b).unwrap())
                        .take(numel)
                        .map(|v| if p.name.ends_with("scale") { 1.0 + v } else { v })
                        .collect();
                    atelier::engine::gguf::quantize::quantize(p.ty, &values).unwrap()
                }
                ty => random_blocks(ty, numel, bound, &mut state),
            }
        })
        .collect();
    let gguf = dir.join("mixed.gguf");
    let meta = [
        ("general.architecture", MetaValue::Str("flux".into())),
        ("axes_dims_rope", MetaValue::Str("[4, 6, 6]".into())),
    ];
    writer::write(&gguf, &meta, &plans, |i| Ok(data[i].clone())).unwrap();
    // The F32 copy: every tensor dequantized (bit-equal to the `gguf` package, see above).
    let copy = dir.join("mixed_f32.safetensors");
    let shapes: Vec<(String, Vec<usize>)> = plans.iter().map(|p| (p.name.clone(), p.shape.clone())).collect();
    let mut i = 0;
    atelier::engine::weights::write_safetensors_f32(&copy, &shapes, &[("axes_dims_rope", "[4, 6, 6]")], |_, _| {
        i += 1;
        atelier::engine::gguf::dequantize(plans[i - 1].ty, &data[i - 1]).unwrap()
    })
    .unwrap();
    (gguf, copy, plans.iter().map(|p| p.ty).collect())
}

#[test]
fn a_gguf_of_every_block_type_stays_packed_and_generates_its_f32_copys_image() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, copy, types) = mixed_gguf(dir.path());
    for ty in [GgmlType::Q8_0, GgmlType::Q2K, GgmlType::Q6K, GgmlType::BF16] {
        assert!(types.contains(&ty), "{ty:?} missing from {types:?}");
    }
    // Every quantized Linear stays in its blocks; F16/BF16/F32 ones are dense as before.
    let mut model = atelier::engine::flux::load_transformer(&gguf, &Device::flex(), DType::F32, None).unwrap();
    let mut packed: Vec<&str> =
        model.linears_mut().iter().filter_map(|(_, l)| l.weight.packing()).map(|p| p.name()).collect();
    packed.sort();
    packed.dedup();
    assert_eq!(packed, ["Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]);
    drop(model);
    let a = generate(gguf);
    let b = generate(copy);
    let worst = a.iter().zip(&b).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap();
    let spread = a.iter().max().unwrap() - a.iter().min().unwrap();
    eprintln!("every block type: worst pixel vs the F32 copy {worst}/255 (image spread {spread})");
    assert!(worst <= 1, "{worst}/255");
    assert!(spread > 16, "a flat image would prove nothing");
}

/// Issue 14's quality figure: a hidden-256 transformer (rows of whole K-quant blocks) quantized
/// by `atelier quantize` to each type users pick, against its F32 image.
#[test]
fn quantized_transformers_stay_close_to_their_f32_image() {
    let dir = tempfile::tempdir().unwrap();
    let (_, f32_copy, _) = mixed_gguf(dir.path());
    let reference: Vec<f32> = generate(f32_copy.clone()).into_iter().map(f32::from).collect();
    for (ty, floor) in [("q8_0", 55.0), ("q5_0", 45.0), ("q4_k", 35.0), ("q4_0", 30.0)] {
        let out = dir.path().join(format!("{ty}.gguf"));
        let written = atelier::engine::to_gguf::convert_transformer(&f32_copy, &out, ty, None).unwrap();
        let target = written.per_type.iter().find(|(t, _, _)| t.name().eq_ignore_ascii_case(ty)).map_or(0, |e| e.1);
        let db = psnr(&generate(out), &reference);
        eprintln!("{ty}: {target} tensors of the type; PSNR vs the F32 image {db:.1} dB");
        assert!(target >= 6, "{ty}: only {target} tensors quantized");
        assert!(db > floor, "{ty}: PSNR {db:.1} dB");
    }
}

#[test]
fn atelier_quantize_writes_the_bytes_of_the_gguf_packages_writer() {
    let dir = tempfile::tempdir().unwrap();
    // The same transformer in BFL and diffusers layouts: both convert to city96's file.
    let inputs =
        [fixture("pipeline/single/flux_schnell_bfl.safetensors"), fixture("pipeline/schnell/diffusers/transformer")];
    // The single file's RoPE split (head dim 16) comes from the folder's config.json.
    let hint = atelier::engine::flux::read_diffusers_config(&inputs[1].join("config.json")).unwrap();
    for ty in ["q8_0", "q5_0", "q4_0", "f16", "bf16"] {
        let theirs = std::fs::read(fixture(&format!("quantize/flux_schnell_{ty}.gguf"))).unwrap();
        for input in &inputs {
            let out = dir.path().join(format!("{ty}.gguf"));
            let written = atelier::engine::to_gguf::convert_transformer(input, &out, ty, hint.as_ref()).unwrap();
            let ours = std::fs::read(&out).unwrap();
            assert_eq!(written.file_bytes, ours.len() as u64);
            if let Some(at) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
                panic!("{ty} from {}: first difference at byte {at} of {}", input.display(), theirs.len());
            }
            assert_eq!(ours.len(), theirs.len(), "{ty}");
        }
    }
    // What the package reads back from the file is what atelier computes with.
    let golden = Golden::open("quantize/flux_schnell_q5_0_f32.safetensors");
    let file = GgufFile::open(&dir.path().join("q5_0.gguf")).unwrap();
    assert_eq!(file.tensors().len(), golden.0.keys().count());
    for name in golden.0.keys() {
        assert_bits(name, &file.read(name).unwrap().data, &golden.vec(name));
    }
}

#[test]
fn a_lora_on_a_packed_base_gives_the_image_of_the_lora_on_its_f32_copy() {
    let lora =
        || vec![atelier::engine::lora::LoraChoice { path: fixture("lora/schnell/kohya.safetensors"), weight: 0.8 }];
    let packed = generate_with_loras(fixture("gguf/flux_schnell_q4_0.gguf"), lora());
    let copy = generate_with_loras(fixture("gguf/flux_schnell_q4_0_f32.safetensors"), lora());
    let plain = generate(fixture("gguf/flux_schnell_q4_0.gguf"));
    let worst = packed.iter().zip(&copy).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    let moved = packed.iter().zip(&plain).filter(|(a, b)| a != b).count();
    eprintln!("LoRA on Q4_0: worst pixel vs the F32 copy {worst}/255; {moved} values changed by the LoRA");
    assert!(worst <= 1, "{worst}/255");
    assert!(moved > packed.len() / 10, "the LoRA must change the image");
}

#[test]
fn every_packing_dequantizes_on_the_device_as_the_gguf_package_and_torch_do() {
    // The reference files' random blocks (random f16 scales of both signs) and fp8 weights
    // (plain, one scale, a scale per row), expanded by tensor ops over the packed words: bit
    // for bit on the CPU backend and on wgpu (lavapipe in CI).
    use atelier::engine::dequant_device::supports;
    use atelier::engine::packed::{PackedHost, Packing};
    let file = GgufFile::open(&fixture("gguf/blocks.gguf")).unwrap();
    let blocks = Golden::open("gguf/blocks_golden.safetensors");
    let fp8 = WeightSet::open(&fixture("fp8/fp8.safetensors")).unwrap();
    let fp8_golden = Golden::open("fp8/fp8_golden.safetensors");
    let mut weights: Vec<(String, PackedHost, Vec<f32>)> = Vec::new();
    let mut names: Vec<String> = blocks.0.keys().map(String::from).collect();
    names.sort();
    for name in names {
        // F32, F16 and BF16 are read as floats, never packed.
        let Some((ty, shape, bytes)) = file.quantized(&name).unwrap() else { continue };
        weights.push((
            name.clone(),
            PackedHost::new(Packing::Gguf(ty), &shape, bytes, vec![]).unwrap(),
            blocks.vec(&name),
        ));
    }
    for name in ["plain.e4m3.weight", "plain.e5m2.weight", "x.weight", "y.weight"] {
        let packed = fp8.packed(name).unwrap().expect("an fp8 weight");
        weights.push((name.to_string(), packed, fp8_golden.vec(name)));
    }
    let names: Vec<&str> = weights.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(weights.len(), 14, "10 ggml block types and 4 fp8 weights: {names:?}");
    let mut devices = vec![("cpu", Device::flex())];
    devices.extend(crate::common::wgpu_device().map(|d| ("wgpu", d)));
    for (label, device) in devices {
        for (name, host, theirs) in &weights {
            assert!(supports(host.packing));
            let weight = host.clone().upload(&device, DType::F32);
            let ours = weight.device_rows().into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(ours.len(), theirs.len());
            for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
                assert!(a.to_bits() == b.to_bits() || a.is_nan() && b.is_nan(), "{label} {name} value {i}: {a} vs {b}");
            }
            // Through a Linear on the GPU (the path every packed layer takes there; two types
            // and f32 only: lavapipe compiles each new kernel for minutes): what the same layer
            // on the CPU computes.
            let linear_checked = matches!(host.packing, Packing::Gguf(GgmlType::Q8_0 | GgmlType::Q4K));
            for dtype in [DType::F32].into_iter().filter(|_| label == "wgpu" && linear_checked) {
                let inputs = host.inputs;
                let x: Vec<f32> = (0..2 * inputs).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
                let y = |device: &Device| {
                    let linear =
                        atelier::engine::layers::packed_linear(host.clone(), None, name, device, dtype).unwrap();
                    let x = burn::tensor::Tensor::<2>::from_data(
                        burn::tensor::TensorData::new(x.clone(), [2, inputs]),
                        device,
                    );
                    linear.forward(x.cast(dtype)).cast(DType::F32).into_data().try_to_vec::<f32>().unwrap()
                };
                let err = crate::common::relative_error(&y(&device), &y(&Device::flex()));
                eprintln!("{label} {name} {dtype:?} Linear vs the CPU's: relative error {err:.1e}");
                assert!(err <= 1e-5, "{label} {name} {dtype:?} Linear: {err:.2e}");
            }
        }
        eprintln!("{label}: {} packed weights dequantized on the device as the references do", weights.len());
    }
}
