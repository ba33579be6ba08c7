//! CLIP-L's text model (FLUX's `text_encoder`, `clip_l.safetensors`): token + position
//! embeddings, pre-LayerNorm causal transformer with quick-GELU, final LayerNorm. FLUX uses
//! only the pooled output: the final state at the first end-of-text token.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use burn::tensor::activation::sigmoid;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Tensor};
use serde::Deserialize;

use crate::engine::layers::{Embedding, LayerNorm, Linear, gelu_tanh};
use crate::engine::loader::{self, Loader, NamedParam, Prefixed, Walk};
use crate::engine::weights::{WeightSet, component_config};

#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab: usize,
    pub hidden: usize,
    /// The MLP's inner width (3072 for CLIP-L).
    pub intermediate: usize,
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

/// `self_attn`: the four projections, with bias.
#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
}

/// `mlp`: fc1 → quick-GELU → fc2.
#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

/// `encoder.layers.{i}`.
#[derive(Module, Debug)]
pub struct ClipLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: ClipMlp,
}

impl ClipLayer {
    fn load(l: &Loader, c: &ClipConfig) -> Result<Self> {
        let (h, a) = (c.hidden, l.pp("self_attn"));
        Ok(ClipLayer {
            layer_norm1: l.layer_norm("layer_norm1", h, c.eps)?,
            self_attn: ClipAttention {
                q_proj: a.linear("q_proj", h, h, true)?,
                k_proj: a.linear("k_proj", h, h, true)?,
                v_proj: a.linear("v_proj", h, h, true)?,
                out_proj: a.linear("out_proj", h, h, true)?,
            },
            layer_norm2: l.layer_norm("layer_norm2", h, c.eps)?,
            mlp: ClipMlp {
                fc1: l.pp("mlp").linear("fc1", h, c.intermediate, true)?,
                fc2: l.pp("mlp").linear("fc2", c.intermediate, h, true)?,
            },
        })
    }
}

/// `embeddings`: token and position tables.
#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

/// `encoder`.
#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipLayer>,
}

/// The text model; field names are the segments of the transformers checkpoint's keys (under
/// `text_model.`, or whatever prefix the file has).
#[derive(Module, Debug)]
pub struct ClipText {
    pub embeddings: ClipEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
    #[module(skip)]
    pub config: ClipConfig,
}

/// Where a row of ids is pooled: transformers pools at argmax(ids), the first occurrence of the
/// largest id, which is the first end-of-text (49407) for every tokenizer output.
pub fn pooled_position(ids: &[u32]) -> usize {
    let max = ids.iter().copied().max().unwrap_or(0);
    ids.iter().position(|&t| t == max).unwrap_or(0)
}

/// What the encoder returns for a batch.
pub struct ClipOutput {
    /// Final-LayerNorm states [B, L, hidden].
    pub last_hidden: Tensor<3>,
    /// The state at each row's first end-of-text token [B, hidden].
    pub pooled: Tensor<2>,
}

/// The key prefix (`text_model.` and any outer prefix, or none in transformers 5) and the
/// configuration, read off the header.
fn infer_config(set: &WeightSet, hint: &ClipHint) -> Result<(String, ClipConfig)> {
    let prefix = set.prefix_of("embeddings.position_embedding.weight", "CLIP text")?;
    let key = |n: &str| format!("{prefix}{n}");
    let dims = |n: &str| set.shape(&key(n)).map(|s| s.to_vec()).ok_or_else(|| anyhow!("CLIP checkpoint has no {n}"));
    let tok = dims("embeddings.token_embedding.weight")?;
    let pos = dims("embeddings.position_embedding.weight")?;
    if tok.len() != 2 || pos.len() != 2 {
        bail!("CLIP checkpoint has embeddings of shapes {tok:?} and {pos:?}");
    }
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
    let intermediate = set.shape(&key("encoder.layers.0.mlp.fc1.weight")).map_or(4 * hidden, |s| s[0]);
    let eps = hint.layer_norm_eps.unwrap_or(1e-5);
    Ok((prefix, ClipConfig { vocab: tok[0], hidden, intermediate, heads, layers, positions: pos[0], eps, quick_gelu }))
}

/// transformers keeps position ids as a buffer in some files; the projection of
/// CLIPTextModelWithProjection is not used by FLUX.
fn clip_ignored(key: &str) -> bool {
    key.ends_with("position_ids") || key.ends_with("text_projection.weight")
}

impl ClipText {
    /// Every Linear with its path under `text_model.` (`encoder.layers.0.self_attn.q_proj`):
    /// what LoRAs target (see `engine::lora`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.encoder.layers.iter_mut().enumerate() {
            let p = format!("encoder.layers.{i}");
            let a = &mut l.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.out_proj"), &mut a.out_proj));
            out.push((format!("{p}.mlp.fc1"), &mut l.mlp.fc1));
            out.push((format!("{p}.mlp.fc2"), &mut l.mlp.fc2));
        }
        out
    }

    /// The module tree of `config`, walked once: from a checkpoint, as a check, or random.
    pub fn build(l: &Loader, config: ClipConfig) -> Result<Self> {
        let c = &config;
        let e = l.pp("embeddings");
        Ok(ClipText {
            embeddings: ClipEmbeddings {
                token_embedding: e.embedding("token_embedding", c.vocab, c.hidden)?,
                position_embedding: e.embedding("position_embedding", c.positions, c.hidden)?,
            },
            encoder: ClipEncoder {
                layers: (0..c.layers)
                    .map(|i| ClipLayer::load(&l.pp("encoder").pp("layers").pp(i), c))
                    .collect::<Result<_>>()?,
            },
            final_layer_norm: l.layer_norm("final_layer_norm", c.hidden, c.eps)?,
            config,
        })
    }

    /// `clip_l.safetensors` (keys under `text_model.`, any outer prefix) or a transformers
    /// `text_encoder/` folder (transformers 5 writes the keys without `text_model.`).
    pub fn load(path: &Path, device: &Device, hint: Option<&ClipHint>) -> Result<Self> {
        let (set, prefix, config) = Self::open_checked(path, hint)?;
        let source = Prefixed { set: &set, prefix, ignored: clip_ignored };
        let walk = Walk::load(&source, device, DType::F32);
        crate::engine::weights::low_peak_load(|| Self::build(&walk.root(), config))
            .with_context(|| format!("loading the CLIP text encoder {}", path.display()))
    }

    /// [`ClipText::load`] with every parameter and the name it was read under (without the
    /// file's key prefix): what training the encoder updates and writes back.
    pub fn load_named(path: &Path, device: &Device) -> Result<(Self, Vec<NamedParam>, usize)> {
        let (set, prefix, config) = Self::open_checked(path, None)?;
        let source = Prefixed { set: &set, prefix, ignored: clip_ignored };
        loader::load_named(&source, device, DType::F32, ("CLIP checkpoint", "the CLIP text encoder"), |l| {
            Self::build(l, config.clone())
        })
        .with_context(|| format!("loading the CLIP text encoder {}", path.display()))
    }

    /// The configuration of a checkpoint, read off its header (no tensor data), after checking
    /// that it holds exactly the tensors this encoder reads.
    pub fn check(path: &Path, hint: Option<&ClipHint>) -> Result<ClipConfig> {
        Ok(Self::open_checked(path, hint)?.2)
    }

    /// The checkpoint, the key prefix of this component in it, and its configuration.
    pub fn open_checked(path: &Path, hint: Option<&ClipHint>) -> Result<(WeightSet, String, ClipConfig)> {
        let infer = |set: &WeightSet| infer_config(set, &component_config(path, hint)?.unwrap_or_default());
        loader::open_prefixed(path, ("CLIP checkpoint", "the CLIP text encoder"), clip_ignored, infer, Self::build)
            .with_context(|| format!("reading the CLIP text encoder {}", path.display()))
    }

    /// Token ids [B][L] → final states and pooled output.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<ClipOutput> {
        let c = &self.config;
        let batch = ids.len();
        let len = ids.first().map_or(0, |r| r.len());
        if batch == 0 || len == 0 || len > c.positions || ids.iter().any(|r| r.len() != len) {
            bail!("CLIP needs a non-empty batch of equal-length rows of at most {} tokens", c.positions);
        }
        let tokens = self.embeddings.token_embedding.forward(ids, "CLIP")?;
        let positions = self.embeddings.position_embedding.weight.val().narrow(0, 0, len).unsqueeze::<3>();
        let mut x = tokens + positions;
        let head_dim = c.hidden / c.heads;
        let causal = AttentionModuleOptions { is_causal: true, ..Default::default() };
        for l in &self.encoder.layers {
            let (a, mlp) = (&l.self_attn, &l.mlp);
            let h = l.layer_norm1.forward(x.clone());
            let heads = |t: Tensor<3>| t.reshape([batch, len, c.heads, head_dim]).swap_dims(1, 2);
            let o = attention(
                heads(a.q_proj.forward(h.clone())),
                heads(a.k_proj.forward(h.clone())),
                heads(a.v_proj.forward(h)),
                None,
                None,
                causal,
            );
            x = x + a.out_proj.forward(o.swap_dims(1, 2).reshape([batch, len, c.hidden]));
            let h = mlp.fc1.forward(l.layer_norm2.forward(x.clone()));
            let h = if c.quick_gelu { h.clone() * sigmoid(h * 1.702) } else { gelu_tanh(h) };
            x = x.clone() + mlp.fc2.forward(h);
        }
        let last_hidden = self.final_layer_norm.forward(x);
        let rows: Vec<Tensor<2>> = ids
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let at = pooled_position(row);
                last_hidden.clone().narrow(0, b, 1).narrow(1, at, 1).reshape([1, c.hidden])
            })
            .collect();
        Ok(ClipOutput { pooled: Tensor::cat(rows, 0), last_hidden })
    }
}
