//! The T5 v1.1 encoder (FLUX's `text_encoder_2`, `t5xxl_*.safetensors`): RMS-normed
//! pre-norm blocks, attention without 1/√d scaling plus a relative position bias computed once
//! (block 0's table, shared by every block), gated-GELU(tanh) feed-forward. Runs in f32: T5 in
//! f16 overflows.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use burn::nn::Linear;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Tensor, TensorData};
use serde::Deserialize;

use crate::engine::layers::{self, gelu_tanh};
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

pub struct T5Encoder {
    pub config: T5Config,
    shared: Tensor<2>,
    blocks: Vec<T5Block>,
    final_layer_norm: Tensor<1>,
    /// Block 0's relative attention bias table [buckets, heads], kept on the host.
    relative_bias: Vec<f32>,
}

struct T5Block {
    attn_norm: Tensor<1>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: Tensor<1>,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

/// Where a T5 checkpoint's tensors are and the configuration they make, from its header.
struct T5Keys {
    /// In front of every key (`text_encoders.t5xxl.transformer.` in an all-in-one file).
    prefix: String,
    /// The token embedding's name: `shared.weight`, or `encoder.embed_tokens.weight` alone.
    shared: &'static str,
    config: T5Config,
}

/// The tensors of each block, under `encoder.block.{i}.layer.`.
const BLOCK_PARTS: [&str; 9] = ["0.layer_norm", "0.SelfAttention.q", "0.SelfAttention.k", "0.SelfAttention.v",
    "0.SelfAttention.o", "1.layer_norm", "1.DenseReluDense.wi_0", "1.DenseReluDense.wi_1", "1.DenseReluDense.wo"];
const RELATIVE_BIAS: &str = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";

impl T5Keys {
    fn read(set: &WeightSet, hint: &T5Hint) -> Result<Self> {
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
        let inner = dims("encoder.block.0.layer.0.SelfAttention.q.weight")?[0];
        let config = T5Config {
            vocab: embedding[0],
            d_model: embedding[1],
            heads: bias[1],
            d_kv: inner / bias[1],
            d_ff: dims("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
                .context("only gated-GELU T5 (v1.1) is supported")?[0],
            layers: (0..).take_while(|i| set.contains(&key(&format!("encoder.block.{i}.layer.0.layer_norm.weight")))).count(),
            buckets: bias[0],
            max_distance: hint.relative_attention_max_distance.unwrap_or(128),
            eps: hint.layer_norm_epsilon.unwrap_or(1e-6),
        };
        Ok(T5Keys { prefix, shared, config })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Every tensor the encoder reads must be there, and every key must be ours: anything
    /// else means a different model.
    fn check(&self, set: &WeightSet) -> Result<()> {
        let mut expected = vec![self.key(self.shared), self.key("encoder.final_layer_norm.weight"), self.key(RELATIVE_BIAS)];
        for i in 0..self.config.layers {
            expected.extend(BLOCK_PARTS.iter().map(|n| self.key(&format!("encoder.block.{i}.layer.{n}.weight"))));
        }
        set.check_keys("T5", &self.prefix, &expected, |k| k.ends_with("encoder.embed_tokens.weight"))
    }
}

impl T5Encoder {
    /// A `t5xxl_*.safetensors` file or a transformers `text_encoder_2/` folder.
    pub fn load(path: &Path, device: &Device, hint: Option<&T5Hint>) -> Result<Self> {
        let (set, keys) = Self::open_checked(path, hint)?;
        crate::engine::weights::low_peak_load(|| Self::from_weights(&set, keys, device))
            .with_context(|| format!("loading the T5 encoder {}", path.display()))
    }

    /// The configuration of a checkpoint, read off its header (no tensor data), after checking
    /// that it holds exactly the tensors this encoder reads.
    pub fn check(path: &Path, hint: Option<&T5Hint>) -> Result<T5Config> {
        Ok(Self::open_checked(path, hint)?.1.config)
    }

    fn open_checked(path: &Path, hint: Option<&T5Hint>) -> Result<(WeightSet, T5Keys)> {
        let open = || -> Result<_> {
            let set = WeightSet::open(path)?;
            let keys = T5Keys::read(&set, &component_config(path, hint)?.unwrap_or_default())?;
            keys.check(&set)?;
            Ok((set, keys))
        };
        open().with_context(|| format!("reading the T5 encoder {}", path.display()))
    }

    fn from_weights(set: &WeightSet, keys: T5Keys, device: &Device) -> Result<Self> {
        let dt = DType::F32;
        let tensor = |n: &str| -> Result<Tensor<1>> { layers::upload(set.read(&keys.key(n))?, n, device, dt) };
        let linear = |n: &str| -> Result<Linear> { layers::linear(set.read(&keys.key(&format!("{n}.weight")))?, None, n, device, dt) };
        let mut blocks = Vec::new();
        for i in 0..keys.config.layers {
            let b = format!("encoder.block.{i}.layer");
            blocks.push(T5Block {
                attn_norm: tensor(&format!("{b}.0.layer_norm.weight"))?,
                q: linear(&format!("{b}.0.SelfAttention.q"))?,
                k: linear(&format!("{b}.0.SelfAttention.k"))?,
                v: linear(&format!("{b}.0.SelfAttention.v"))?,
                o: linear(&format!("{b}.0.SelfAttention.o"))?,
                ff_norm: tensor(&format!("{b}.1.layer_norm.weight"))?,
                wi_0: linear(&format!("{b}.1.DenseReluDense.wi_0"))?,
                wi_1: linear(&format!("{b}.1.DenseReluDense.wi_1"))?,
                wo: linear(&format!("{b}.1.DenseReluDense.wo"))?,
            });
        }
        Ok(T5Encoder {
            shared: layers::upload(set.read(&keys.key(keys.shared))?, keys.shared, device, dt)?,
            final_layer_norm: tensor("encoder.final_layer_norm.weight")?,
            relative_bias: set.read(&keys.key(RELATIVE_BIAS))?.data,
            blocks,
            config: keys.config,
        })
    }

    /// Token ids [B][L] → last hidden state [B, L, d_model]. No attention mask: FLUX attends
    /// over the padding, as the reference pipeline does.
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor<3>> {
        let batch = ids.len();
        let len = ids.first().map_or(0, |r| r.len());
        if batch == 0 || len == 0 || ids.iter().any(|r| r.len() != len) {
            bail!("T5 needs a non-empty batch of equal-length token rows");
        }
        let c = &self.config;
        let mut x = layers::embed(&self.shared, ids, "T5")?;
        let bias = self.position_bias(len, device).expand([batch, c.heads, len, len]);
        let options = AttentionModuleOptions { scale: Some(1.0), ..Default::default() };
        for b in &self.blocks {
            let h = rms_norm(x.clone(), &b.attn_norm, c.eps);
            let heads = |t: Tensor<3>| t.reshape([batch, len, c.heads, c.d_kv]).swap_dims(1, 2);
            let a = attention(heads(b.q.forward(h.clone())), heads(b.k.forward(h.clone())), heads(b.v.forward(h)), None, Some(bias.clone()), options);
            x = x + b.o.forward(a.swap_dims(1, 2).reshape([batch, len, c.heads * c.d_kv]));
            let h = rms_norm(x.clone(), &b.ff_norm, c.eps);
            x = x.clone() + b.wo.forward(gelu_tanh(b.wi_0.forward(h.clone())) * b.wi_1.forward(h));
        }
        Ok(rms_norm(x, &self.final_layer_norm, c.eps))
    }

    /// Bidirectional relative position bias [1, heads, L, L] from block 0's table.
    fn position_bias(&self, len: usize, device: &Device) -> Tensor<4> {
        let (heads, buckets) = (self.config.heads, self.config.buckets);
        let mut out = vec![0f32; heads * len * len];
        for q in 0..len {
            for k in 0..len {
                let bucket = relative_bucket(k as i64 - q as i64, buckets, self.config.max_distance);
                for h in 0..heads {
                    out[(h * len + q) * len + k] = self.relative_bias[bucket * heads + h];
                }
            }
        }
        Tensor::from_data(TensorData::new(out, [1, heads, len, len]), device)
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

/// T5's LayerNorm: RMS only, no mean, no bias.
fn rms_norm(x: Tensor<3>, weight: &Tensor<1>, eps: f64) -> Tensor<3> {
    let rrms = (x.clone().square().mean_dim(2) + eps).sqrt().recip();
    x * rrms * weight.clone().unsqueeze::<3>()
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
