//! GGUF and fp8 checkpoints against `tests/reference/make_gguf_goldens.py`: dequantization bit
//! for bit equal to the `gguf` package's and torch's, clear errors for bad files, and the tiny
//! schnell pipeline generating with a GGUF / scaled-fp8 transformer.

use std::path::{Path, PathBuf};

use atelier::engine::gguf::GgufFile;
use atelier::engine::pipeline::{self, GenerateRequest, ModelFiles};
use atelier::engine::weights::WeightSet;
use burn::tensor::Device;

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
    let mut files = ModelFiles::from_diffusers(
        &fixture("pipeline/schnell/diffusers"),
        Some(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tokenizers")),
    )
    .unwrap();
    files.transformer = transformer;
    let req = GenerateRequest {
        prompt: "a red fox in the snow, studio photo".into(),
        seed: 42,
        steps: Some(3),
        width: 80,
        height: 48,
        max_sequence_length: Some(32),
        batch: 1,
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
fn a_scaled_fp8_transformer_generates() {
    let reference = Golden::open("pipeline/schnell/golden.safetensors").vec("image_u8");
    let img = generate(fixture("fp8/flux_schnell_scaled_fp8.safetensors"));
    let db = psnr(&img, &reference);
    eprintln!("scaled fp8 e4m3fn: PSNR vs the unquantized image {db:.1} dB");
    assert!(db > 18.0, "PSNR {db:.1} dB");
}
