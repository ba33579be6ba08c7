//! The T5 v1.1 encoder (FLUX's `text_encoder_2`, `t5xxl_*.safetensors`): RMS-normed
//! pre-norm blocks, attention without 1/√d scaling plus a relative position bias computed once
//! (block 0's table, shared by every block), gated-GELU(tanh) feed-forward. Runs in f32: T5 in
//! f16 overflows. Files: transformers' names (safetensors, also under a ComfyUI prefix) or
//! llama.cpp's (GGUF, whose quantized matrices stay packed: `engine::packed`).

use std::borrow::Cow;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use burn::module::{Module, Param};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use serde::Deserialize;

use crate::engine::gguf::{self, t5_names};
use crate::engine::layers::{Embedding, Linear, gelu_tanh};
use crate::engine::loader::{self, Init, Loader, NamedParam, Prefixed, Walk};
use crate::engine::weights::{WeightSet, component_config};

#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub vocab: usize,
    pub d_model: usize,
    pub heads: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub layers: usize,
    pub buckets: usize,
    pub max_distance: usize,
    pub eps: f64,
}

/// Fields of a transformers `config.json` that weights cannot tell.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct T5Hint {
    pub relative_attention_max_distance: Option<usize>,
    pub layer_norm_epsilon: Option<f64>,
}

/// T5's LayerNorm: RMS only, no mean, no bias.
#[derive(Module, Debug)]
pub struct T5LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl T5LayerNorm {
    fn load(l: &Loader, c: &T5Config) -> Result<Self> {
        Ok(T5LayerNorm { weight: l.param("weight", [c.d_model], Init::Ones)?, eps: c.eps })
    }

    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let rrms = (x.clone().square().mean_dim(2) + self.eps).sqrt().recip();
        x * rrms * self.weight.val().unsqueeze::<3>()
    }
}

/// `SelfAttention`: projections without bias; block 0 alone holds the relative position
/// bias table [buckets, heads] every block uses.
#[derive(Module, Debug)]
pub struct T5Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub relative_attention_bias: Option<Embedding>,
}

impl T5Attention {
    fn load(l: &Loader, c: &T5Config, first: bool) -> Result<Self> {
        let inner = c.heads * c.d_kv;
        Ok(T5Attention {
            q: l.linear("q", c.d_model, inner, false)?,
            k: l.linear("k", c.d_model, inner, false)?,
            v: l.linear("v", c.d_model, inner, false)?,
            o: l.linear("o", inner, c.d_model, false)?,
            relative_attention_bias: if first {
                Some(l.embedding("relative_attention_bias", c.buckets, c.heads)?)
            } else {
                None
            },
        })
    }
}

/// `layer.0`: pre-norm self-attention.
#[derive(Module, Debug)]
pub struct T5LayerSelfAttention {
    /// `SelfAttention`
    pub self_attention: T5Attention,
    pub layer_norm: T5LayerNorm,
}

/// `DenseReluDense` of T5 v1.1: gated GELU(tanh).
#[derive(Module, Debug)]
pub struct T5DenseGatedAct {
    pub wi_0: Linear,
    pub wi_1: Linear,
    pub wo: Linear,
}

/// `layer.1`: pre-norm feed-forward.
#[derive(Module, Debug)]
pub struct T5LayerFf {
    /// `DenseReluDense`
    pub dense_relu_dense: T5DenseGatedAct,
    pub layer_norm: T5LayerNorm,
}

/// `encoder.block.{i}`.
#[derive(Module, Debug)]
pub struct T5Block {
    /// `layer.0`
    pub layer_0: T5LayerSelfAttention,
    /// `layer.1`
    pub layer_1: T5LayerFf,
}

impl T5Block {
    /// `encoder.block.{i}` (`first`: block 0, which holds the position-bias table).
    pub fn load(l: &Loader, c: &T5Config, first: bool) -> Result<Self> {
        let (a, f) = (l.pp("layer").pp(0), l.pp("layer").pp(1));
        let ff = f.pp("DenseReluDense");
        Ok(T5Block {
            layer_0: T5LayerSelfAttention {
                self_attention: T5Attention::load(&a.pp("SelfAttention"), c, first)?,
                layer_norm: T5LayerNorm::load(&a.pp("layer_norm"), c)?,
            },
            layer_1: T5LayerFf {
                dense_relu_dense: T5DenseGatedAct {
                    wi_0: ff.linear("wi_0", c.d_model, c.d_ff, false)?,
                    wi_1: ff.linear("wi_1", c.d_model, c.d_ff, false)?,
                    wo: ff.linear("wo", c.d_ff, c.d_model, false)?,
                },
                layer_norm: T5LayerNorm::load(&f.pp("layer_norm"), c)?,
            },
        })
    }
}

/// `encoder`: the blocks and the final norm.
#[derive(Module, Debug)]
pub struct T5Stack {
    pub block: Vec<T5Block>,
    pub final_layer_norm: T5LayerNorm,
}

/// The encoder; field names are the segments of the transformers checkpoint's keys.
#[derive(Module, Debug)]
pub struct T5Encoder {
    /// `shared` (or, in files without it, `encoder.embed_tokens`).
    pub shared: Embedding,
    pub encoder: T5Stack,
    #[module(skip)]
    pub config: T5Config,
}

const RELATIVE_BIAS: &str = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";

/// The key prefix (`text_encoders.t5xxl.transformer.` in an all-in-one file) and the
/// configuration, read off the header.
fn infer_config(set: &WeightSet, hint: &T5Hint) -> Result<(String, T5Config)> {
    let prefix = set.prefix_of("encoder.final_layer_norm.weight", "T5 encoder")?;
    let key = |n: &str| format!("{prefix}{n}");
    let dims = |n: &str| set.shape(&key(n)).map(|s| s.to_vec()).ok_or_else(|| anyhow!("T5 checkpoint has no {n}"));
    let shared = if set.contains(&key("shared.weight")) { "shared.weight" } else { "encoder.embed_tokens.weight" };
    let embedding = dims(shared)?;
    let bias = dims(RELATIVE_BIAS)?;
    // Checked, not indexed blindly: a start-up check of a wrong file must not panic.
    if bias.len() != 2 || bias[1] == 0 || embedding.len() != 2 {
        bail!("T5 checkpoint has an embedding of shape {embedding:?} and a position bias of shape {bias:?}");
    }
    // Checked, as above: a GGUF header may give a tensor no dims at all.
    let rows = |n: &str| {
        dims(n).and_then(|d| if d.len() == 2 { Ok(d[0]) } else { Err(anyhow!("{n} has shape {d:?}, not a matrix")) })
    };
    let inner = rows("encoder.block.0.layer.0.SelfAttention.q.weight")?;
    let config = T5Config {
        vocab: embedding[0],
        d_model: embedding[1],
        heads: bias[1],
        d_kv: inner / bias[1],
        d_ff: rows("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
            .context("only gated-GELU T5 (v1.1) is supported")?,
        layers: (0..)
            .take_while(|i| set.contains(&key(&format!("encoder.block.{i}.layer.0.layer_norm.weight"))))
            .count(),
        buckets: bias[0],
        max_distance: hint.relative_attention_max_distance.unwrap_or(128),
        eps: hint.layer_norm_epsilon.unwrap_or(1e-6),
    };
    Ok((prefix, config))
}

/// A tied copy a T5 file may hold beside the encoder's own tensors, and the decoder of a
/// whole-T5 GGUF file.
fn t5_ignored(key: &str) -> bool {
    key.ends_with("encoder.embed_tokens.weight") || t5_names::is_decoder(key)
}

/// The checkpoint's tensors under transformers' names: a GGUF file (llama.cpp's T5 names,
/// city96's encoder files) renamed after its architecture is checked; other files as they are.
fn open_weights(path: &Path) -> Result<WeightSet> {
    let set = WeightSet::open(path)?;
    let Some(file) = set.gguf_files().next() else { return Ok(set) };
    match file.architecture() {
        Some(a) if t5_names::ARCHITECTURES.contains(&a) => set.renamed(t5_names::from_llama),
        // stable-diffusion.cpp's conversions carry no architecture and keep the checkpoint's
        // own names; llama.cpp's names without the key are renamed all the same.
        None if set.keys().any(|k| t5_names::from_llama(k).is_some()) => set.renamed(t5_names::from_llama),
        None => Ok(set),
        Some(a) => bail!(
            "{} is a GGUF file of architecture {a:?}, not a T5 encoder (general.architecture = t5encoder or t5)",
            path.display()
        ),
    }
}

/// A GGUF T5's metadata: `{arch}.*` values by their key's tail.
fn gguf_value(set: &WeightSet, tail: &str) -> Option<gguf::Value> {
    let file = set.gguf_files().next()?;
    file.metadata().get(&format!("{}.{tail}", file.architecture()?)).cloned()
}

/// What a GGUF T5 says of itself where no `config.json` can (llama.cpp's conversion writes
/// both epsilons, the same value; the maximum distance is fixed at 128 there).
fn gguf_hint(set: &WeightSet) -> Option<T5Hint> {
    set.gguf_files().next()?;
    let eps = ["attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"]
        .iter()
        .find_map(|k| gguf_value(set, k).and_then(|v| v.as_float()))
        // Stored as f32: its shortest decimal (1e-6, not 9.99999997e-7), as transformers has it.
        .and_then(|e| (e as f32).to_string().parse().ok());
    Some(T5Hint { relative_attention_max_distance: None, layer_norm_epsilon: eps })
}

/// A GGUF T5 whose metadata disagrees with its tensors is broken (a hand-edited or cut file):
/// an error naming every difference.
fn check_gguf_metadata(set: &WeightSet, c: &T5Config) -> Result<()> {
    let expected = [
        ("embedding_length", c.d_model),
        ("feed_forward_length", c.d_ff),
        ("block_count", c.layers),
        ("attention.head_count", c.heads),
        ("attention.key_length", c.d_kv),
        ("attention.value_length", c.d_kv),
        ("attention.relative_buckets_count", c.buckets),
    ];
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(key, found)| {
            let said = gguf_value(set, key)?.as_int()?;
            (said != *found as i128).then(|| format!("{key} = {said} (the tensors say {found})"))
        })
        .collect();
    if !wrong.is_empty() {
        bail!("the GGUF metadata disagrees with its tensors: {}", wrong.join(", "));
    }
    Ok(())
}

impl T5Encoder {
    /// The module tree of `config`, walked once: from a checkpoint, as a check, or random.
    pub fn build(l: &Loader, config: T5Config) -> Result<Self> {
        let c = &config;
        let shared = Self::embedding_name(|n| l.has(n));
        let e = l.pp("encoder");
        Ok(T5Encoder {
            shared: l.embedding(shared, c.vocab, c.d_model)?,
            encoder: T5Stack {
                block: (0..c.layers).map(|i| T5Block::load(&e.pp("block").pp(i), c, i == 0)).collect::<Result<_>>()?,
                final_layer_norm: T5LayerNorm::load(&e.pp("final_layer_norm"), c)?,
            },
            config,
        })
    }

    /// The token table's module name: `shared`, or in files without it `encoder.embed_tokens`
    /// (`has` asks for a key, without the file's prefix).
    pub fn embedding_name(has: impl Fn(&str) -> bool) -> &'static str {
        if has("shared.weight") { "shared" } else { "encoder.embed_tokens" }
    }

    /// What stays loaded while the blocks stream (`engine::streaming::StreamedT5`): the
    /// embedding and the final norm, no blocks; and block 0's position-bias table.
    pub fn build_stem(l: &Loader, config: T5Config) -> Result<(Self, Embedding)> {
        let c = &config;
        let shared = Self::embedding_name(|n| l.has(n));
        let table =
            l.pp("encoder.block.0.layer.0.SelfAttention").embedding("relative_attention_bias", c.buckets, c.heads)?;
        let stem = T5Encoder {
            shared: l.embedding(shared, c.vocab, c.d_model)?,
            encoder: T5Stack {
                block: Vec::new(),
                final_layer_norm: T5LayerNorm::load(&l.pp("encoder.final_layer_norm"), c)?,
            },
            config,
        };
        Ok((stem, table))
    }

    /// A `t5xxl_*.safetensors` file or a transformers `text_encoder_2/` folder.
    pub fn load(path: &Path, device: &Device, hint: Option<&T5Hint>) -> Result<Self> {
        let (set, prefix, config) = Self::open_checked(path, hint)?;
        let source = Prefixed { set: &set, prefix, ignored: t5_ignored };
        let walk = Walk::load(&source, device, DType::F32);
        crate::engine::weights::low_peak_load(|| Self::build(&walk.root(), config))
            .with_context(|| format!("loading the T5 encoder {}", path.display()))
    }

    /// [`T5Encoder::load`] in f32 with every parameter and the name it was read under (without
    /// the file's key prefix): what training the encoder updates and writes back.
    pub fn load_named(path: &Path, device: &Device) -> Result<(Self, Vec<NamedParam>, usize)> {
        let (set, prefix, config) = Self::open_checked(path, None)?;
        if set.gguf_files().next().is_some() {
            // Its quantized matrices stay packed, outside the parameters training updates.
            bail!(
                "{} is a GGUF T5: training the text encoders needs full-precision weights (a .safetensors file or folder)",
                path.display()
            );
        }
        let source = Prefixed { set: &set, prefix, ignored: t5_ignored };
        loader::load_named(&source, device, DType::F32, ("T5 checkpoint", "the T5 v1.1 encoder"), |l| {
            Self::build(l, config.clone())
        })
        .with_context(|| format!("loading the T5 encoder {}", path.display()))
    }

    /// The configuration of a checkpoint, read off its header (no tensor data), after checking
    /// that it holds exactly the tensors this encoder reads.
    pub fn check(path: &Path, hint: Option<&T5Hint>) -> Result<T5Config> {
        Ok(Self::open_checked(path, hint)?.2)
    }

    /// The checkpoint, the key prefix of this component in it, and its configuration.
    pub fn open_checked(path: &Path, hint: Option<&T5Hint>) -> Result<(WeightSet, String, T5Config)> {
        let read = || {
            let set = open_weights(path)?;
            let infer = |set: &WeightSet| {
                let hint = component_config(path, hint)?.or_else(|| gguf_hint(set)).unwrap_or_default();
                let (prefix, config) = infer_config(set, &hint)?;
                check_gguf_metadata(set, &config)?;
                Ok((prefix, config))
            };
            loader::check_prefixed(set, ("T5 checkpoint", "the T5 v1.1 encoder"), t5_ignored, infer, Self::build)
        };
        read().with_context(|| format!("reading the T5 encoder {}", path.display()))
    }

    /// Token ids [B][L] → last hidden state [B, L, d_model]. No attention mask: FLUX attends
    /// over the padding, as the reference pipeline does.
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor<3>> {
        let table = self.encoder.block.first().and_then(|b| b.layer_0.self_attention.relative_attention_bias.as_ref());
        let table = table.ok_or_else(|| anyhow!("T5 has no blocks"))?;
        self.forward_blocks(ids, device, table, |i| Ok(Cow::Borrowed(&self.encoder.block[i])))
    }

    /// [`T5Encoder::forward`] over blocks `block(i)` gives (its own, or built one at a time
    /// from the file: `engine::streaming::StreamedT5`), with block 0's position-bias `table`.
    pub fn forward_blocks<'a>(
        &self,
        ids: &[Vec<u32>],
        device: &Device,
        table: &Embedding,
        block: impl Fn(usize) -> Result<Cow<'a, T5Block>>,
    ) -> Result<Tensor<3>> {
        let batch = ids.len();
        let len = ids.first().map_or(0, |r| r.len());
        if batch == 0 || len == 0 || ids.iter().any(|r| r.len() != len) {
            bail!("T5 needs a non-empty batch of equal-length token rows");
        }
        let c = &self.config;
        let mut x = self.shared.forward(ids, "T5")?;
        let bias = self.position_bias(table, len, device).expand([batch, c.heads, len, len]);
        for i in 0..c.layers {
            x = block(i)?.forward(x, bias.clone(), c);
        }
        Ok(self.encoder.final_layer_norm.forward(x))
    }

    /// The relative-position bias [1, heads, len, len]: rows of block 0's table picked by each
    /// (query, key) pair's bucket (a select, so the table trains when the encoder does).
    fn position_bias(&self, table: &Embedding, len: usize, device: &Device) -> Tensor<4> {
        let (heads, buckets) = (self.config.heads, self.config.buckets);
        let table = table.weight.val().cast(DType::F32);
        let mut index = Vec::with_capacity(len * len);
        for q in 0..len {
            for k in 0..len {
                index.push(relative_bucket(k as i64 - q as i64, buckets, self.config.max_distance) as i32);
            }
        }
        let index = Tensor::<1, Int>::from_data(TensorData::new(index, [len * len]), device);
        // [len·len, heads] → [heads, len, len]
        table.select(0, index).reshape([len, len, heads]).permute([2, 0, 1]).unsqueeze::<4>()
    }
}

impl T5Block {
    /// One pre-norm block: self-attention (no 1/√d scaling, the shared position `bias`
    /// [B, heads, L, L]) and the gated feed-forward, each added to the stream.
    fn forward(&self, x: Tensor<3>, bias: Tensor<4>, c: &T5Config) -> Tensor<3> {
        let [batch, len, _] = x.dims();
        let (sa, ff) = (&self.layer_0.self_attention, &self.layer_1.dense_relu_dense);
        let h = self.layer_0.layer_norm.forward(x.clone());
        let heads = |t: Tensor<3>| t.reshape([batch, len, c.heads, c.d_kv]).swap_dims(1, 2);
        let options = AttentionModuleOptions { scale: Some(1.0), ..Default::default() };
        let a = attention(
            heads(sa.q.forward(h.clone())),
            heads(sa.k.forward(h.clone())),
            heads(sa.v.forward(h)),
            None,
            Some(bias),
            options,
        );
        let x = x + sa.o.forward(a.swap_dims(1, 2).reshape([batch, len, c.heads * c.d_kv]));
        let h = self.layer_1.layer_norm.forward(x.clone());
        x.clone() + ff.wo.forward(gelu_tanh(ff.wi_0.forward(h.clone())) * ff.wi_1.forward(h))
    }
}

/// transformers' `T5Attention._relative_position_bucket` for an encoder (bidirectional):
/// half the buckets per direction, exact up to half of those, log-spaced beyond.
fn relative_bucket(relative: i64, buckets: usize, max_distance: usize) -> usize {
    let half = (buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        // Computed in f32 and truncated, as the reference does.
        let scaled = ((n as f32 / max_exact as f32).ln() / (max_distance as f32 / max_exact as f32).ln()
            * (half - max_exact) as f32) as i64;
        bucket += (max_exact + scaled).min(half - 1);
    }
    bucket as usize
}

#[cfg(test)]
mod tests {
    #[test]
    fn buckets_match_transformers() {
        // Values from transformers' _relative_position_bucket(bidirectional, 32, 128).
        let b = |r| super::relative_bucket(r, 32, 128);
        assert_eq!((b(0), b(1), b(-1), b(7), b(-8), b(8)), (0, 17, 1, 23, 8, 24));
        assert_eq!((b(200), b(-200)), (31, 15));
    }
}
