//! A FLUX transformer checkpoint (any layout atelier reads) → a city96-layout GGUF file:
//! what `atelier quantize` writes and `atelier bench --quant` measures; and a T5 encoder → a
//! GGUF with llama.cpp's T5 names (city96's encoder files) at the end.
//!
//! city96's files (ComfyUI-GGUF `tools/convert.py` + its llama.cpp patch): architecture `flux`,
//! BFL key names without `model.diffusion_model.`, PyTorch shapes with ggml's dims reversed,
//! tensors sorted by name; 1-D tensors and tensors of at most 1024 values in F32; the
//! in-layers (`img_in`, `time_in/vector_in/guidance_in.in_layer`) and `final_layer.linear` in
//! F16; everything else in the target type (F16 where its rows are not whole blocks).
//! `general.quantization_version` 2 and `general.file_type` as llama.cpp numbers them.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::engine::flux::{self, DiffusersConfig, Flux};
use crate::engine::gguf::quant::GgmlType;
use crate::engine::gguf::quantize::quantize;
use crate::engine::gguf::t5_vocab::T5Vocab;
use crate::engine::gguf::writer::{self, MetaValue, TensorPlan};
use crate::engine::gguf::{self, GgufFile, t5_names};
use crate::engine::host_tensor::HostTensor;
use crate::engine::loader::Walk;
use crate::engine::t5::T5Encoder;
use crate::engine::tokenize::T5_TOKENIZER_JSON;

/// Tensors city96 keeps at 16 bits whatever the target (`KEEP_F16` of the reference script).
const KEEP_F16: [&str; 5] =
    ["img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear."];
/// city96's `QUANTIZATION_THRESHOLD`: smaller tensors stay F32.
const SMALL: usize = 1024;

/// The target types `atelier quantize` offers, with llama.cpp's `general.file_type`.
pub fn parse_target(name: &str) -> Result<(GgmlType, u32)> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "q8_0" => (GgmlType::Q8_0, 7),
        "q5_0" => (GgmlType::Q5_0, 8),
        "q4_0" => (GgmlType::Q4_0, 2),
        // LLAMA_FTYPE_MOSTLY_Q4_K_S: Q4_K everywhere the rules allow.
        "q4_k" => (GgmlType::Q4K, 14),
        "f16" => (GgmlType::F16, 1),
        "bf16" => (GgmlType::BF16, 32),
        other => bail!("unknown type {other:?}: expected q8_0, q5_0, q4_0, q4_k, f16 or bf16"),
    })
}

/// The type one tensor gets in a file of type `target`.
pub fn type_for(name: &str, shape: &[usize], target: GgmlType) -> GgmlType {
    let numel: usize = shape.iter().product();
    if shape.len() <= 1 || numel <= SMALL {
        return GgmlType::F32;
    }
    let sixteen = if target == GgmlType::BF16 { GgmlType::BF16 } else { GgmlType::F16 };
    let row = shape[shape.len() - 1];
    if KEEP_F16.iter().any(|p| name.starts_with(p)) || !row.is_multiple_of(target.block().0) {
        return sixteen;
    }
    target
}

/// What a conversion wrote: bytes and tensor count per type.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub file_bytes: u64,
    pub per_type: Vec<(GgmlType, usize, u64)>,
    /// A T5's tokenizer: what went into the file, or why none did.
    pub tokenizer: Option<String>,
}

/// Converts the transformer at `input` to `output` in type `target` (see [`parse_target`]),
/// one tensor in memory at a time. `hint` gives the RoPE axes where the file cannot (a model
/// whose head dim is not FLUX's 128, given as a single file).
pub fn convert_transformer(
    input: &Path,
    output: &Path,
    target: &str,
    hint: Option<&DiffusersConfig>,
) -> Result<Written> {
    let (ty, file_type) = parse_target(target)?;
    let (weights, config) = flux::open_checked(input, hint)?;
    let walk = Walk::plan();
    Flux::build(&walk.root(), config.clone())?;
    let mut plans: Vec<TensorPlan> = walk
        .entries()
        .into_iter()
        .map(|e| TensorPlan { ty: type_for(&e.name, &e.shape, ty), name: e.name, shape: e.shape })
        .collect();
    plans.sort_by(|a, b| a.name.cmp(&b.name));
    let mut metadata = vec![
        ("general.architecture", MetaValue::Str("flux".into())),
        ("general.quantization_version", MetaValue::U32(2)),
        ("general.file_type", MetaValue::U32(file_type)),
    ];
    // FLUX's RoPE split is read off head dim 128; other widths (test models) need the key
    // atelier reads (city96's files, all head dim 128, do not carry it).
    if config.axes_dim != [16, 56, 56] {
        metadata.push(("axes_dims_rope", MetaValue::Str(serde_json::to_string(&config.axes_dim)?)));
    }
    write_file(output, &metadata, &plans, |name| weights.read(name))
}

/// The type one T5 tensor gets in a file of type `target` (llama.cpp's rules: norms and the
/// position bias stay F32, `llama-quantize` never quantizes `attn_rel_b`; F16 where rows are
/// not whole blocks).
pub fn t5_type_for(llama_name: &str, shape: &[usize], target: GgmlType) -> GgmlType {
    if shape.len() <= 1 || llama_name.contains(".attn_rel_b.") {
        return GgmlType::F32;
    }
    let sixteen = if target == GgmlType::BF16 { GgmlType::BF16 } else { GgmlType::F16 };
    if !shape[shape.len() - 1].is_multiple_of(target.block().0) {
        return sixteen;
    }
    target
}

/// Converts the T5 encoder at `input` (safetensors in any prefix, a transformers folder, or a
/// GGUF T5) to a GGUF file with llama.cpp's names and metadata (architecture `t5encoder`, as
/// city96's `t5-v1_1-xxl-encoder-*.gguf`), tensors sorted by name.
pub fn convert_t5(input: &Path, output: &Path, target: &str) -> Result<Written> {
    let (ty, file_type) = parse_target(target)?;
    let (weights, prefix, c) = T5Encoder::open_checked(input, None)?;
    if c.max_distance != 128 {
        bail!("llama.cpp's T5 has a relative-attention maximum distance of 128, not {}", c.max_distance);
    }
    let walk = Walk::plan();
    T5Encoder::build(&walk.root(), c.clone())?;
    let mut plans: Vec<TensorPlan> = Vec::new();
    for e in walk.entries() {
        let name = t5_names::to_llama(&e.name).with_context(|| format!("{} has no llama.cpp name", e.name))?;
        plans.push(TensorPlan { ty: t5_type_for(&name, &e.shape, ty), name, shape: e.shape });
    }
    plans.sort_by(|a, b| a.name.cmp(&b.name));
    let arch = "t5encoder";
    let count = |v: usize| MetaValue::U32(v as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let metadata = [
        ("general.architecture".to_string(), MetaValue::Str(arch.into())),
        ("general.quantization_version".into(), MetaValue::U32(2)),
        ("general.file_type".into(), MetaValue::U32(file_type)),
        (key("context_length"), count(512)),
        (key("embedding_length"), count(c.d_model)),
        (key("feed_forward_length"), count(c.d_ff)),
        (key("block_count"), count(c.layers)),
        (key("attention.head_count"), count(c.heads)),
        (key("attention.key_length"), count(c.d_kv)),
        (key("attention.value_length"), count(c.d_kv)),
        (key("attention.layer_norm_epsilon"), MetaValue::F32(c.eps as f32)),
        (key("attention.layer_norm_rms_epsilon"), MetaValue::F32(c.eps as f32)),
        (key("attention.relative_buckets_count"), count(c.buckets)),
    ];
    let (vocab, tokenizer) = t5_tokenizer(input, c.vocab)?;
    let metadata: Vec<(String, MetaValue)> =
        metadata.into_iter().chain(vocab.iter().flat_map(T5Vocab::metadata)).collect();
    let metadata: Vec<(&str, MetaValue)> = metadata.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let mut written = write_file(output, &metadata, &plans, |name| {
        let own = t5_names::from_llama(name).with_context(|| format!("{name} is not a T5 encoder tensor"))?;
        // The walk names the table `shared`; the file may hold it as `encoder.embed_tokens`.
        let own = match own.as_str() {
            "shared.weight" => {
                format!("{}.weight", T5Encoder::embedding_name(|n| weights.contains(&format!("{prefix}{n}"))))
            }
            _ => own,
        };
        weights.read(&format!("{prefix}{own}"))
    })?;
    written.tokenizer = Some(tokenizer);
    Ok(written)
}

/// The tokenizer a T5 GGUF carries, and where it came from: the input GGUF's own; else a
/// `tokenizer.json` in the input's folder (a transformers folder) or in its pipeline's
/// `tokenizer_2/` (diffusers); else FLUX's T5 v1.1 tokenizer built into atelier. None (and
/// why) when the model's vocabulary cannot hold it.
fn t5_tokenizer(input: &Path, n_vocab: usize) -> Result<(Option<T5Vocab>, String)> {
    let own = match gguf::is_gguf(input) {
        true => T5Vocab::from_gguf(GgufFile::open(input)?.metadata())
            .with_context(|| format!("the tokenizer in {}", input.display()))?,
        false => None,
    };
    if let Some(v) = own {
        let from = format!("{} tokens, from {}", v.tokens.len(), input.display());
        return Ok((Some(v), from));
    }
    let dir = if input.is_dir() { Some(input) } else { input.parent() };
    let beside = dir.into_iter().flat_map(|d| [d.join("tokenizer.json"), d.join("../tokenizer_2/tokenizer.json")]);
    let (bytes, from) = match beside.into_iter().find(|p| p.is_file()) {
        Some(p) => (std::fs::read(&p)?, p.display().to_string()),
        None => (T5_TOKENIZER_JSON.to_vec(), "atelier's built-in T5 v1.1 tokenizer".to_string()),
    };
    match T5Vocab::from_tokenizer_json(&bytes, n_vocab) {
        Ok(v) => Ok((Some(v), format!("{n_vocab} tokens, from {from}"))),
        Err(e) => Ok((None, format!("none written ({from}: {e})"))),
    }
}

/// Writes `plans` (each tensor's values from `read`, by its name in the file) and counts what
/// went where.
fn write_file(
    output: &Path,
    metadata: &[(&str, MetaValue)],
    plans: &[TensorPlan],
    read: impl Fn(&str) -> Result<HostTensor>,
) -> Result<Written> {
    writer::write(output, metadata, plans, |i| {
        let plan = &plans[i];
        let t = read(&plan.name)?;
        quantize(plan.ty, &t.data).with_context(|| format!("quantizing {}", plan.name))
    })
    .with_context(|| format!("writing {}", output.display()))?;
    let mut per_type: Vec<(GgmlType, usize, u64)> = Vec::new();
    for p in plans {
        let bytes = p.bytes()? as u64;
        match per_type.iter_mut().find(|(t, _, _)| *t == p.ty) {
            Some(e) => {
                e.1 += 1;
                e.2 += bytes;
            }
            None => per_type.push((p.ty, 1, bytes)),
        }
    }
    per_type.sort();
    Ok(Written { file_bytes: std::fs::metadata(output)?.len(), per_type, tokenizer: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_follow_city96s_rules() {
        let q = GgmlType::Q4K;
        assert_eq!(type_for("double_blocks.0.img_attn.norm.key_norm.scale", &[128], q), GgmlType::F32);
        assert_eq!(type_for("a.weight", &[32, 32], q), GgmlType::F32);
        assert_eq!(type_for("img_in.weight", &[3072, 64], q), GgmlType::F16);
        assert_eq!(type_for("final_layer.linear.weight", &[64, 3072], GgmlType::BF16), GgmlType::BF16);
        assert_eq!(type_for("txt_in.weight", &[3072, 4096], q), GgmlType::Q4K);
        assert_eq!(type_for("x.weight", &[3072, 4000], q), GgmlType::F16);
        assert_eq!(type_for("x.weight", &[3072, 4000], GgmlType::Q8_0), GgmlType::Q8_0);
        assert_eq!(parse_target("Q8_0").unwrap(), (GgmlType::Q8_0, 7));
        assert!(parse_target("q3_k").is_err());
    }
}
