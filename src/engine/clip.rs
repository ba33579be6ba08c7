//! CLIP-L's text model (FLUX's `text_encoder`, `clip_l.safetensors`): token + position
//! embeddings, pre-LayerNorm causal transformer with quick-GELU, final LayerNorm. FLUX uses
//! only the pooled output: the final state at the first end-of-text token.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use burn::nn::Linear;
use burn::tensor::activation::sigmoid;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Tensor};
use serde::Deserialize;

use crate::engine::layers::{self, gelu_tanh};
use crate::engine::weights::{WeightSet, component_config};

#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub positions: usize,
    pub eps: f64,
    pub quick_gelu: bool,
}

/// Fields of a transformers `config.json` that weights cannot tell.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClipHint {
    pub num_attention_heads: Option<usize>,
    pub layer_norm_eps: Option<f64>,
    pub hidden_act: Option<String>,
}

struct ClipLayer {
    ln1: (Tensor<1>, Tensor<1>),
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: (Tensor<1>, Tensor<1>),
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipText {
    pub config: ClipConfig,
    token_embedding: Tensor<2>,
    position_embedding: Tensor<2>,
    layers: Vec<ClipLayer>,
    final_ln: (Tensor<1>, Tensor<1>),
}

/// What the encoder returns for a batch.
pub struct ClipOutput {
    /// Final-LayerNorm states [B, L, hidden].
    pub last_hidden: Tensor<3>,
    /// The state at each row's first end-of-text token [B, hidden].
    pub pooled: Tensor<2>,
}

/// Where a CLIP checkpoint's tensors are and the configuration they make, from its header.
struct ClipKeys {
    /// In front of every key (`text_model.` and any outer prefix, or none in transformers 5).
    prefix: String,
    config: ClipConfig,
}

/// The weight and bias tensors of each layer, under `encoder.layers.{i}.`.
const LAYER_PARTS: [&str; 8] = ["layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj",
    "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"];

impl ClipKeys {
    fn read(set: &WeightSet, hint: &ClipHint) -> Result<Self> {
        let prefix = set.prefix_of("embeddings.position_embedding.weight", "CLIP text")?;
        let key = |n: &str| format!("{prefix}{n}");
        let dims = |n: &str| set.shape(&key(n)).map(|s| s.to_vec()).ok_or_else(|| anyhow!("CLIP checkpoint has no {n}"));
        let tok = dims("embeddings.token_embedding.weight")?;
        let pos = dims("embeddings.position_embedding.weight")?;
        let layers = (0..).take_while(|i| set.contains(&key(&format!("encoder.layers.{i}.layer_norm1.weight")))).count();
        let hidden = tok[1];
        // CLIP-L: 12 heads of 64; other sizes need their config.json.
        let heads = hint.num_attention_heads.unwrap_or(hidden / 64);
        if heads == 0 || hidden % heads != 0 {
            bail!("cannot split CLIP width {hidden} into {heads} heads; give its config.json");
        }
        let quick_gelu = match hint.hidden_act.as_deref() {
            None | Some("quick_gelu") => true,
            Some("gelu_new") | Some("gelu_pytorch_tanh") => false,
            Some(other) => bail!("CLIP activation {other:?} is not supported"),
        };
        let config = ClipConfig { vocab: tok[0], hidden, heads, layers, positions: pos[0], eps: hint.layer_norm_eps.unwrap_or(1e-5), quick_gelu };
        Ok(ClipKeys { prefix, config })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Every tensor the encoder reads must be there, and every key must be ours.
    fn check(&self, set: &WeightSet) -> Result<()> {
        let mut expected: Vec<String> = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
            "final_layer_norm.weight", "final_layer_norm.bias"].iter().map(|n| self.key(n)).collect();
        for i in 0..self.config.layers {
            for part in LAYER_PARTS {
                expected.push(self.key(&format!("encoder.layers.{i}.{part}.weight")));
                expected.push(self.key(&format!("encoder.layers.{i}.{part}.bias")));
            }
        }
        // transformers keeps position ids as a buffer in some files; the projection of
        // CLIPTextModelWithProjection is not used by FLUX.
        set.check_keys("CLIP", &self.prefix, &expected, |k| k.ends_with("position_ids") || k.ends_with("text_projection.weight"))
    }
}

impl ClipText {
    /// `clip_l.safetensors` (keys under `text_model.`, any outer prefix) or a transformers
    /// `text_encoder/` folder (transformers 5 writes the keys without `text_model.`).
    pub fn load(path: &Path, device: &Device, hint: Option<&ClipHint>) -> Result<Self> {
        let (set, keys) = Self::open_checked(path, hint)?;
        crate::engine::weights::low_peak_load(|| Self::from_weights(&set, keys, device))
            .with_context(|| format!("loading the CLIP text encoder {}", path.display()))
    }

    /// The configuration of a checkpoint, read off its header (no tensor data), after checking
    /// that it holds exactly the tensors this encoder reads.
    pub fn check(path: &Path, hint: Option<&ClipHint>) -> Result<ClipConfig> {
        Ok(Self::open_checked(path, hint)?.1.config)
    }

    fn open_checked(path: &Path, hint: Option<&ClipHint>) -> Result<(WeightSet, ClipKeys)> {
        let open = || -> Result<_> {
            let set = WeightSet::open(path)?;
            let keys = ClipKeys::read(&set, &component_config(path, hint)?.unwrap_or_default())?;
            keys.check(&set)?;
            Ok((set, keys))
        };
        open().with_context(|| format!("reading the CLIP text encoder {}", path.display()))
    }

    fn from_weights(set: &WeightSet, keys: ClipKeys, device: &Device) -> Result<Self> {
        let dt = DType::F32;
        let vec1 = |n: &str| -> Result<Tensor<1>> { layers::upload(set.read(&keys.key(n))?, n, device, dt) };
        let norm = |n: &str| -> Result<(Tensor<1>, Tensor<1>)> { Ok((vec1(&format!("{n}.weight"))?, vec1(&format!("{n}.bias"))?)) };
        let linear = |n: &str| -> Result<Linear> {
            layers::linear(set.read(&keys.key(&format!("{n}.weight")))?, Some(set.read(&keys.key(&format!("{n}.bias")))?), n, device, dt)
        };
        let mut ls = Vec::new();
        for i in 0..keys.config.layers {
            let b = |n: &str| format!("encoder.layers.{i}.{n}");
            ls.push(ClipLayer {
                ln1: norm(&b("layer_norm1"))?,
                q: linear(&b("self_attn.q_proj"))?,
                k: linear(&b("self_attn.k_proj"))?,
                v: linear(&b("self_attn.v_proj"))?,
                out: linear(&b("self_attn.out_proj"))?,
                ln2: norm(&b("layer_norm2"))?,
                fc1: linear(&b("mlp.fc1"))?,
                fc2: linear(&b("mlp.fc2"))?,
            });
        }
        Ok(ClipText {
            token_embedding: layers::upload(set.read(&keys.key("embeddings.token_embedding.weight"))?, "token_embedding", device, dt)?,
            position_embedding: layers::upload(set.read(&keys.key("embeddings.position_embedding.weight"))?, "position_embedding", device, dt)?,
            layers: ls,
            final_ln: norm("final_layer_norm")?,
            config: keys.config,
        })
    }

    /// Token ids [B][L] → final states and pooled output.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<ClipOutput> {
        let c = &self.config;
        let batch = ids.len();
        let len = ids.first().map_or(0, |r| r.len());
        if batch == 0 || len == 0 || len > c.positions || ids.iter().any(|r| r.len() != len) {
            bail!("CLIP needs a non-empty batch of equal-length rows of at most {} tokens", c.positions);
        }
        let tokens = layers::embed(&self.token_embedding, ids, "CLIP")?;
        let positions = self.position_embedding.clone().narrow(0, 0, len).unsqueeze::<3>();
        let mut x = tokens + positions;
        let head_dim = c.hidden / c.heads;
        let causal = AttentionModuleOptions { is_causal: true, ..Default::default() };
        for l in &self.layers {
            let h = layers::layer_norm(x.clone(), c.eps, Some((&l.ln1.0, &l.ln1.1)));
            let heads = |t: Tensor<3>| t.reshape([batch, len, c.heads, head_dim]).swap_dims(1, 2);
            let a = attention(heads(l.q.forward(h.clone())), heads(l.k.forward(h.clone())), heads(l.v.forward(h)), None, None, causal);
            x = x + l.out.forward(a.swap_dims(1, 2).reshape([batch, len, c.hidden]));
            let h = layers::layer_norm(x.clone(), c.eps, Some((&l.ln2.0, &l.ln2.1)));
            let h = l.fc1.forward(h);
            let h = if c.quick_gelu { h.clone() * sigmoid(h * 1.702) } else { gelu_tanh(h) };
            x = x.clone() + l.fc2.forward(h);
        }
        let last_hidden = layers::layer_norm(x, c.eps, Some((&self.final_ln.0, &self.final_ln.1)));
        // transformers pools at argmax(ids): the first occurrence of the largest id, which is
        // the first end-of-text (49407) for every tokenizer output.
        let rows: Vec<Tensor<2>> = ids
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let max = row.iter().copied().max().unwrap_or(0);
                let at = row.iter().position(|&t| t == max).unwrap_or(0);
                last_hidden.clone().narrow(0, b, 1).narrow(1, at, 1).reshape([1, c.hidden])
            })
            .collect();
        Ok(ClipOutput { pooled: Tensor::cat(rows, 0), last_hidden })
    }
}
