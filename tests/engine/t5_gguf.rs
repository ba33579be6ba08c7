//! GGUF T5 encoders (llama.cpp's names, city96's encoder files): a file mixing every ggml block
//! type against transformers on the weights the `gguf` package dequantizes from it
//! (`make_t5_gguf_goldens.py`), its matrices kept packed; `atelier quantize` of a T5 against
//! the `gguf` package's writer; broken files as clear errors.

use std::path::Path;

use atelier::engine::gguf::quantize::quantize;
use atelier::engine::gguf::writer::{self, MetaValue, TensorPlan};
use atelier::engine::gguf::{GgufFile, dequantize, t5_names};
use atelier::engine::packed::Weight;
use atelier::engine::streaming::StreamedT5;
use atelier::engine::t5::T5Encoder;
use burn::tensor::Device;

use crate::common::{Golden, fixture, relative_error};

/// The golden's two rows of 12 token ids.
fn ids(golden: &Golden) -> Vec<Vec<u32>> {
    golden.vec("ids").chunks(12).map(|r| r.iter().map(|&v| v as u32).collect()).collect()
}

fn run(t5: &T5Encoder, golden: &Golden, device: &Device) -> Vec<f32> {
    t5.forward(&ids(golden), device).unwrap().into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn a_gguf_t5_of_every_block_type_stays_packed_and_matches_transformers() {
    let device = Device::flex();
    let golden = Golden::open("gguf/t5_mixed_golden.safetensors");
    let path = fixture("gguf/t5_mixed.gguf");
    let t5 = T5Encoder::load(&path, &device, None).unwrap_or_else(|e| panic!("{e:#}"));
    let c = &t5.config;
    assert_eq!((c.d_model, c.heads, c.d_kv, c.d_ff, c.layers, c.vocab, c.buckets), (256, 4, 32, 256, 2, 300, 32));
    assert_eq!(c.eps, 1e-6, "the epsilon comes from the metadata");
    // Quantized matrices stay packed; the F32 / F16 / BF16 ones are plain parameters.
    let b0 = &t5.encoder.block[0];
    for w in [&b0.layer_0.self_attention.q.weight, &b0.layer_1.dense_relu_dense.wi_0.weight] {
        assert!(matches!(w, Weight::Packed(_)), "a quantized matrix was expanded");
    }
    assert!(matches!(t5.encoder.block[1].layer_1.dense_relu_dense.wo.weight, Weight::Dense(_)));
    let err = relative_error(&run(&t5, &golden, &device), &golden.vec("last_hidden_state"));
    eprintln!("GGUF T5 (13 block types) vs transformers: relative error {err:.2e}");
    assert!(err <= 1e-5, "{err:.3e}");
}

/// The fixture's tensors rewritten with `edit` changing the metadata or the names.
fn rewrite(
    dir: &Path,
    name: &str,
    arch: &str,
    edit: impl Fn(&str, MetaValue) -> Option<MetaValue>,
) -> std::path::PathBuf {
    let src = GgufFile::open(&fixture("gguf/t5_mixed.gguf")).unwrap();
    let mut names: Vec<&String> = src.tensors().keys().collect();
    names.sort();
    let plans: Vec<TensorPlan> = names
        .iter()
        .map(|n| TensorPlan { name: n.to_string(), shape: src.tensors()[*n].shape.clone(), ty: src.tensors()[*n].ty })
        .collect();
    let mut meta = vec![("general.architecture", MetaValue::Str(arch.into()))];
    for (key, value) in
        [("t5encoder.block_count", MetaValue::U32(2)), ("t5encoder.embedding_length", MetaValue::U32(256))]
    {
        if let Some(v) = edit(key, value) {
            meta.push((key, v));
        }
    }
    let out = dir.join(name);
    writer::write(&out, &meta, &plans, |i| Ok(src.raw(&plans[i].name).unwrap().to_vec())).unwrap();
    out
}

#[test]
fn broken_gguf_t5_files_are_clear_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &Path| format!("{:#}", T5Encoder::check(p, None).unwrap_err());
    // The fixture itself, rewritten as it is, loads.
    let same = rewrite(dir.path(), "same.gguf", "t5encoder", |_, v| Some(v));
    T5Encoder::check(&same, None).unwrap();
    let llama = rewrite(dir.path(), "llama.gguf", "llama", |_, v| Some(v));
    let e = err(&llama);
    assert!(e.contains("llama.gguf") && e.contains("architecture \"llama\"") && e.contains("not a T5"), "{e}");
    let lying = rewrite(dir.path(), "lying.gguf", "t5encoder", |k, v| {
        Some(if k.ends_with("block_count") { MetaValue::U32(24) } else { v })
    });
    let e = err(&lying);
    assert!(e.contains("lying.gguf") && e.contains("block_count = 24 (the tensors say 2)"), "{e}");
    // Cut short: the header promises more bytes than the file has.
    let bytes = std::fs::read(fixture("gguf/t5_mixed.gguf")).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&cut);
    assert!(e.contains("cut.gguf"), "{e}");
    // A FLUX GGUF given as the T5.
    let e = err(&fixture("gguf/flux_schnell_q8_0.gguf"));
    assert!(e.contains("flux_schnell_q8_0.gguf") && e.contains("architecture \"flux\""), "{e}");
}

#[test]
fn atelier_quantize_writes_a_t5_as_the_gguf_packages_writer_does() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t5.gguf");
    let written = atelier::engine::to_gguf::convert_t5(&fixture("gguf/t5_mixed.gguf"), &out, "q8_0").unwrap();
    let (ours, theirs) = (std::fs::read(&out).unwrap(), std::fs::read(fixture("quantize/t5_q8_0.gguf")).unwrap());
    assert_eq!(written.file_bytes, ours.len() as u64);
    if let Some(at) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!("first difference at byte {at} of {}", theirs.len());
    }
    assert_eq!(ours.len(), theirs.len());

    // A safetensors T5 (the tiny pipeline's t5xxl file, d_model 8): matrices whose rows are
    // whole Q8_0 blocks go Q8_0, the others F16, norms and the position bias F32; each reads
    // back as its source through that type.
    let src = fixture("pipeline/single/t5xxl.safetensors");
    let out = dir.path().join("tiny.gguf");
    atelier::engine::to_gguf::convert_t5(&src, &out, "q8_0").unwrap();
    let (theirs, prefix, config) = T5Encoder::open_checked(&src, None).unwrap();
    let (ours, _, back) = T5Encoder::open_checked(&out, None).unwrap();
    assert_eq!(back, config);
    let file = GgufFile::open(&out).unwrap();
    let mut types = std::collections::BTreeSet::new();
    for name in ours.keys() {
        let (a, b) = (ours.read(name).unwrap(), theirs.read(&format!("{prefix}{name}")).unwrap());
        assert_eq!(a.shape, b.shape, "{name}");
        let ty = file.tensors()[&t5_names::to_llama(name).unwrap()].ty;
        let want = dequantize(ty, &quantize(ty, &b.data).unwrap()).unwrap();
        assert_eq!(a.data, want, "{name} as {}", ty.name());
        types.insert(ty.name());
    }
    assert_eq!(types.into_iter().collect::<Vec<_>>(), ["F16", "F32", "Q8_0"]);
}

#[test]
fn a_streamed_t5_gives_the_resident_ones_output() {
    // Packed blocks (the mixed GGUF) and plain ones (the tiny safetensors T5), one at a time.
    let device = Device::flex();
    let golden = Golden::open("gguf/t5_mixed_golden.safetensors");
    for path in [fixture("gguf/t5_mixed.gguf"), fixture("pipeline/single/t5xxl.safetensors")] {
        let resident = T5Encoder::load(&path, &device, None).unwrap();
        let streamed = StreamedT5::load(&path, &device).unwrap();
        let a = run(&resident, &golden, &device);
        let b = streamed.forward(&ids(&golden), &device).unwrap().into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(a, b, "{}", path.display());
    }
}

#[test]
fn a_gguf_t5_without_an_architecture_and_with_its_checkpoint_names_loads() {
    // stable-diffusion.cpp's conversions: no general.architecture, the checkpoint's own keys.
    use atelier::engine::gguf::GgmlType;
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("pipeline/single/t5xxl.safetensors");
    let (set, prefix, _) = T5Encoder::open_checked(&src, None).unwrap();
    let mut names: Vec<String> = set.keys().map(String::from).collect();
    names.sort();
    let plans: Vec<TensorPlan> = names
        .iter()
        .map(|n| TensorPlan { name: n.clone(), shape: set.shape(n).unwrap().to_vec(), ty: GgmlType::F32 })
        .collect();
    let out = dir.path().join("sdcpp_t5.gguf");
    writer::write(&out, &[], &plans, |i| quantize(GgmlType::F32, &set.read(&plans[i].name)?.data)).unwrap();
    let device = Device::flex();
    let ids = vec![vec![37, 8, 1, 0, 5, 100, 32000, 1]];
    let forward = |p: &Path| {
        let t5 = T5Encoder::load(p, &device, None).unwrap_or_else(|e| panic!("{e:#}"));
        t5.forward(&ids, &device).unwrap().into_data().try_to_vec::<f32>().unwrap()
    };
    assert_eq!(forward(&out), forward(&src), "prefix {prefix:?}");
}

#[test]
fn a_t5_gguf_carries_its_tokenizer_as_llama_cpps_converter_writes_it() {
    use atelier::engine::gguf::t5_vocab::T5Vocab;
    use atelier::engine::to_gguf::convert_t5;
    use atelier::engine::tokenize::T5_TOKENIZER_JSON;
    use sha2::Digest;

    // The tokenizer keys alone, byte for byte what the `gguf` package writes for them in the
    // order of llama.cpp's converter (the golden is that file's hash: it is 1 MB).
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("quantize/t5_tokenizer.json")).unwrap()).unwrap();
    let vocab = T5Vocab::from_tokenizer_json(T5_TOKENIZER_JSON, 32128).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.gguf");
    let mut meta = vec![("general.architecture".to_string(), MetaValue::Str("t5encoder".into()))];
    meta.extend(vocab.metadata());
    let meta: Vec<(&str, MetaValue)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    writer::write(&keys, &meta, &[], |_| unreachable!()).unwrap();
    let bytes = std::fs::read(&keys).unwrap();
    assert_eq!(bytes.len() as u64, golden["bytes"].as_u64().unwrap());
    assert_eq!(format!("{:x}", sha2::Sha256::digest(&bytes)), golden["sha256"].as_str().unwrap());

    // `atelier quantize` of a T5 with T5's 32128 embeddings (the tiny pipeline's) carries the
    // built-in tokenizer; quantizing that GGUF again carries the file's own.
    let a = dir.path().join("a.gguf");
    let written = convert_t5(&fixture("pipeline/single/t5xxl.safetensors"), &a, "q8_0").unwrap();
    assert!(written.tokenizer.as_deref().unwrap().contains("built-in"), "{written:?}");
    assert_eq!(T5Vocab::from_gguf(GgufFile::open(&a).unwrap().metadata()).unwrap().as_ref(), Some(&vocab));
    let b = dir.path().join("b.gguf");
    let written = convert_t5(&a, &b, "f16").unwrap();
    assert!(written.tokenizer.as_deref().unwrap().contains("a.gguf"), "{written:?}");
    assert_eq!(T5Vocab::from_gguf(GgufFile::open(&b).unwrap().metadata()).unwrap(), Some(vocab));

    // A T5 whose 300 embeddings cannot hold T5's pieces gets none, and says why.
    let c = dir.path().join("c.gguf");
    let written = convert_t5(&fixture("gguf/t5_mixed.gguf"), &c, "q8_0").unwrap();
    let why = written.tokenizer.unwrap();
    assert!(why.starts_with("none written") && why.contains("300"), "{why}");
    assert!(!GgufFile::open(&c).unwrap().metadata().keys().any(|k| k.starts_with("tokenizer.")));
}
