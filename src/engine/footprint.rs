//! Device bytes of a model's components, read off their headers (no tensor data): what the
//! memory plan (`engine::memory`) weighs a job with. Each model's own walk, run in plan mode,
//! lists the tensors it will upload; a tensor the file keeps packed (GGUF quant blocks, fp8)
//! counts its packed bytes, any other its elements × the dtype it is uploaded in.

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::DType;

use crate::engine::clip::ClipText;
use crate::engine::flux::{self, Flux};
use crate::engine::loader::{Entry, Loader, Walk};
use crate::engine::memory::ModelSizes;
use crate::engine::t5::T5Encoder;
use crate::engine::vae::{self, Vae};

/// The tensors `build` reads, by name and shape.
fn entries(build: impl FnOnce(&Loader) -> Result<()>) -> Result<Vec<Entry>> {
    let walk = Walk::plan();
    build(&walk.root())?;
    Ok(walk.entries())
}

/// A packed weight in use, in dense f32 matrices of its size: on the host path the rows, their
/// transpose and the upload; on the device path (`dequant_device`) the block bytes as ints,
/// the quants as ints and as floats, and the scaled values.
const DEQUANT_COPIES: u64 = 4;

/// Device bytes of one tensor: its packed size where the file packs a Linear's weight, else
/// its values in `elem` bytes each.
fn bytes(e: &Entry, elem: usize, packed: &dyn Fn(&str) -> Option<u64>) -> u64 {
    e.packable.then(|| packed(&e.name)).flatten().unwrap_or_else(|| (e.shape.iter().product::<usize>() * elem) as u64)
}

/// The block a transformer tensor belongs to: its index among the double blocks then the
/// single blocks; None for the non-block layers.
fn block_of(name: &str, depth: usize) -> Option<usize> {
    let index = |rest: &str| rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
    if let Some(rest) = name.strip_prefix("double_blocks.") {
        index(rest)
    } else {
        name.strip_prefix("single_blocks.").and_then(index).map(|i| depth + i)
    }
}

/// A transformer's device bytes: its non-block layers, each block (doubles then singles), and
/// what dequantizing its packed weights per layer holds at once (`ModelSizes::dequant_bytes`).
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerSizes {
    pub stem: u64,
    pub blocks: Vec<u64>,
    pub dequant_bytes: u64,
    pub config: flux::FluxConfig,
}

pub fn transformer_sizes(path: &Path, dtype: DType) -> Result<TransformerSizes> {
    let (weights, config) = flux::open_checked(path, None)?;
    sizes_of(config, dtype, &|e| weights.packed_len(&e.name))
}

/// What a FLUX transformer of `config` would take on the device if its file held the types
/// `atelier quantize --type target` writes (None: a bf16/f16 file, dense in `dtype`), and
/// that file's tensor bytes: a projection for sizes no test can load (FLUX.1-dev's).
pub fn projected_transformer_sizes(
    config: flux::FluxConfig,
    dtype: DType,
    target: Option<crate::engine::gguf::GgmlType>,
) -> Result<(TransformerSizes, u64)> {
    use crate::engine::gguf::writer::TensorPlan;
    let plan = |e: &Entry, target| TensorPlan {
        name: e.name.clone(),
        shape: e.shape.clone(),
        ty: crate::engine::to_gguf::type_for(&e.name, &e.shape, target),
    };
    let cfg = config.clone();
    let mut file = 0u64;
    for e in &entries(|l| Flux::build(l, cfg).map(drop))? {
        file += match target {
            Some(t) => plan(e, t).bytes()? as u64,
            None => 2 * e.shape.iter().product::<usize>() as u64,
        };
    }
    let packed = |e: &Entry| -> Option<u64> {
        let t = plan(e, target?);
        crate::engine::gguf::GgmlType::QUANTIZED.contains(&t.ty).then(|| t.bytes().ok().map(|b| b as u64)).flatten()
    };
    Ok((sizes_of(config, dtype, &packed)?, file))
}

/// [`transformer_sizes`] of `config`, `packed` giving the packed bytes of a tensor the file
/// keeps packed.
fn sizes_of(
    config: flux::FluxConfig,
    dtype: DType,
    packed_len: &dyn Fn(&Entry) -> Option<u64>,
) -> Result<TransformerSizes> {
    let d = dtype.size();
    let cfg = config.clone();
    let mut stem = 0;
    let mut blocks = vec![0u64; config.depth + config.depth_single_blocks];
    let (mut largest_linear, mut packed) = (0, false);
    for e in &entries(|l| Flux::build(l, cfg).map(drop))? {
        let b = bytes(e, d, &|_| packed_len(e));
        packed |= e.packable && packed_len(e).is_some();
        match block_of(&e.name, config.depth) {
            Some(i) => blocks[i] += b,
            None => stem += b,
        }
        // In f32 whatever the compute dtype: the dequantization's intermediates are 32-bit.
        if e.packable {
            largest_linear = largest_linear.max((e.shape[0] * e.shape[1] * 4) as u64);
        }
    }
    // Dense weights are used in place; packed ones are dequantized per use (see ModelSizes).
    let dequant_bytes = if packed { DEQUANT_COPIES * largest_linear } else { 0 };
    Ok(TransformerSizes { stem, blocks, dequant_bytes, config })
}

/// The sizes of the components at these paths, with the transformer and VAE in `dtype` (the
/// text encoders run in f32).
pub fn model_sizes(transformer: &Path, t5: &Path, clip: &Path, vae_path: &Path, dtype: DType) -> Result<ModelSizes> {
    let d = dtype.size();
    let flux = transformer_sizes(transformer, dtype)?;
    let (set, prefix, t5_config) = T5Encoder::open_checked(t5, None)?;
    let c = t5_config.clone();
    // Per block (`encoder.block.{i}.`) and outside the blocks; f32, packed where the file is.
    let (mut t5_stem, mut t5_blocks) = (0, vec![0u64; t5_config.layers]);
    let (mut t5_largest_linear, mut t5_packed) = (0, false);
    for e in &entries(|l| T5Encoder::build(l, c).map(drop))? {
        let packed = set.packed_len(&format!("{prefix}{}", e.name)).filter(|_| e.packable);
        let b = bytes(e, 4, &|_| packed);
        let block = e.name.strip_prefix("encoder.block.").and_then(|r| r.split('.').next()?.parse::<usize>().ok());
        match block {
            Some(i) => t5_blocks[i] += b,
            None => t5_stem += b,
        }
        if packed.is_some() {
            t5_packed = true;
        }
        if e.packable {
            t5_largest_linear = t5_largest_linear.max((e.shape.iter().product::<usize>() * 4) as u64);
        }
    }
    // Block 0's table is also loaded with the stem while the blocks stream.
    let t5_table = (t5_config.buckets * t5_config.heads * 4) as u64;
    let (set, prefix, clip_config) = ClipText::open_checked(clip, None)?;
    let clip_bytes = entries(|l| ClipText::build(l, clip_config).map(drop))?
        .iter()
        .map(|e| bytes(e, 4, &|n| set.packed_len(&format!("{prefix}{n}"))))
        .sum();
    let (_, vae_config) =
        vae::open_checked(vae_path, None).with_context(|| format!("the VAE {}", vae_path.display()))?;
    // The decoder's level i runs at 1/2^i of the image with ch·mult[i] channels; its maps
    // are upsampled into the level above before that level's first convolution.
    let vae_channels = (0..vae_config.ch_mult.len())
        .map(|i| (vae_config.ch * vae_config.ch_mult[i]) >> (2 * i.saturating_sub(1)))
        .max()
        .unwrap_or(vae_config.ch);
    let vae_bytes = entries(|l| Vae::build(l, vae_config).map(drop))?.iter().map(|e| bytes(e, d, &|_| None)).sum();

    Ok(ModelSizes {
        t5: t5_stem + t5_blocks.iter().sum::<u64>(),
        t5_stem: t5_stem + t5_table,
        t5_block: t5_blocks.iter().copied().max().unwrap_or(0),
        // As for the transformer.
        t5_dequant_bytes: if t5_packed { DEQUANT_COPIES * t5_largest_linear } else { 0 },
        clip: clip_bytes,
        vae: vae_bytes,
        transformer_stem: flux.stem,
        transformer_blocks: flux.blocks,
        dequant_bytes: flux.dequant_bytes,
        hidden: flux.config.hidden_size,
        heads: flux.config.num_heads,
        mlp: flux.config.mlp_hidden_dim,
        t5_heads: t5_config.heads,
        t5_d_ff: t5_config.d_ff,
        vae_channels,
        dtype_bytes: d,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14's projection: FLUX.1-dev at 1024² (4096 image + 512 text tokens) per mode, from
    /// the file `atelier quantize` would write and the plan's own accounting. The transformer's
    /// device bytes stay within 1.15× its file (measured on the medium config: 0.98–1.06×), and
    /// the stage's peak is those bytes plus the activations.
    /// `cargo test --release --lib flux_dev_projection -- --nocapture` prints the table.
    #[test]
    fn flux_dev_projection_fits_its_file_plus_activations() {
        use crate::engine::gguf::GgmlType;
        use crate::engine::memory::{JobSize, ModelSizes, transformer_activations};
        let job = JobSize { width: 1024, height: 1024, batch: 1, text_tokens: 512 };
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let modes = [
            ("bf16", DType::BF16, None),
            ("Q8_0", DType::F16, Some(GgmlType::Q8_0)),
            ("Q5_0", DType::F16, Some(GgmlType::Q5_0)),
            ("Q4_K", DType::F16, Some(GgmlType::Q4K)),
            ("Q4_0", DType::F16, Some(GgmlType::Q4_0)),
        ];
        for (name, dtype, target) in modes {
            let (t, file) = projected_transformer_sizes(flux::FluxConfig::dev(), dtype, target).unwrap();
            let sizes = ModelSizes::of_transformer(t, dtype.size());
            let (weights, acts) = (sizes.transformer(), transformer_activations(&sizes, &job));
            eprintln!(
                "FLUX.1-dev {name}: file {:.2} GiB, on the device {:.2} GiB ({:.3}× the file), activations at \
                 1024² {:.2} GiB (dequantization {:.2}), stage peak {:.2} GiB",
                gib(file),
                gib(weights),
                weights as f64 / file as f64,
                gib(acts),
                gib(sizes.dequant_bytes),
                gib(weights + acts)
            );
            assert!(weights as f64 <= 1.15 * file as f64, "{name}");
            if target.is_none() {
                // 11.9 B parameters in two bytes each, as the released file.
                assert!((23.5e9..24.0e9).contains(&(file as f64)), "{file}");
            }
        }
    }

    #[test]
    fn blocks_are_told_by_name() {
        assert_eq!(block_of("double_blocks.3.img_attn.qkv.weight", 19), Some(3));
        assert_eq!(block_of("single_blocks.0.linear1.weight", 19), Some(19));
        assert_eq!(block_of("img_in.weight", 19), None);
        assert_eq!(block_of("final_layer.linear.bias", 19), None);
    }

    #[test]
    fn the_demo_model_counts_what_its_files_hold() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/demo/schnell");
        let s = model_sizes(
            &dir.join("transformer"),
            &dir.join("text_encoder_2"),
            &dir.join("text_encoder"),
            &dir.join("vae"),
            DType::F32,
        )
        .unwrap();
        // Plain float files: the device holds every element the file holds, in f32 here
        // (keys a model ignores, such as unused heads, are not loaded).
        let elements = |p: &str| {
            let set = crate::engine::weights::WeightSet::open(&dir.join(p)).unwrap();
            let keys: Vec<String> = set.keys().map(String::from).collect();
            keys.iter().map(|k| set.shape(k).unwrap().iter().product::<usize>() as u64).sum::<u64>()
        };
        for (got, path) in
            [(s.transformer(), "transformer"), (s.t5, "text_encoder_2"), (s.clip, "text_encoder"), (s.vae, "vae")]
        {
            let f = elements(path) * 4;
            assert!(got <= f && got * 100 >= f * 90, "{path}: {got} of {f}");
        }
        assert_eq!(s.transformer_blocks.len(), s.transformer_blocks.iter().filter(|&&b| b > 0).count());
        let half = model_sizes(
            &dir.join("transformer"),
            &dir.join("text_encoder_2"),
            &dir.join("text_encoder"),
            &dir.join("vae"),
            DType::F16,
        )
        .unwrap();
        assert_eq!(half.transformer() * 2, s.transformer());
        assert_eq!(half.t5, s.t5, "T5 stays f32");
    }
}
