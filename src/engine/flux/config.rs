//! FLUX transformer hyper-parameters: named presets and inference from checkpoint shapes.

use anyhow::{Result, bail};
use serde::Deserialize;

use super::layout::TransformerWeights;

#[derive(Debug, Clone, PartialEq)]
pub struct FluxConfig {
    /// Packed latent channels in (16 latent channels × 2×2 patch = 64).
    pub in_channels: usize,
    pub out_channels: usize,
    /// CLIP pooled size (768).
    pub vec_in_dim: usize,
    /// T5 hidden size (4096).
    pub context_in_dim: usize,
    pub hidden_size: usize,
    pub mlp_hidden_dim: usize,
    pub num_heads: usize,
    /// Double-stream blocks.
    pub depth: usize,
    /// Single-stream blocks.
    pub depth_single_blocks: usize,
    /// RoPE dimensions per id axis; they sum to the head dim.
    pub axes_dim: Vec<usize>,
    pub theta: f64,
    pub qkv_bias: bool,
    /// FLUX.1-dev distils classifier-free guidance into an embedding; schnell has none.
    pub guidance_embed: bool,
}

impl FluxConfig {
    /// A FLUX small enough for unit tests: hidden 16 in two heads, one double and two single
    /// blocks.
    #[cfg(test)]
    pub fn tiny() -> FluxConfig {
        FluxConfig {
            in_channels: 8,
            out_channels: 8,
            vec_in_dim: 6,
            context_in_dim: 10,
            hidden_size: 16,
            mlp_hidden_dim: 32,
            num_heads: 2,
            depth: 1,
            depth_single_blocks: 2,
            axes_dim: vec![2, 2, 4],
            ..FluxConfig::dev()
        }
    }

    /// FLUX.1-dev, from BFL's `flux/util.py` (`configs["flux-dev"]`).
    pub fn dev() -> Self {
        FluxConfig {
            in_channels: 64,
            out_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_hidden_dim: 3072 * 4,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    /// FLUX.1-schnell: the same network without the guidance embedding.
    pub fn schnell() -> Self {
        FluxConfig { guidance_embed: false, ..Self::dev() }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Reads the sizes off the tensors themselves, so any depth or width loads.
    /// `axes_dim` cannot be seen in the weights: it comes from `hint` (a diffusers
    /// `config.json`), else from the file's metadata, else FLUX's own split for head dim 128.
    pub fn infer(weights: &TransformerWeights, hint: Option<&DiffusersConfig>) -> Result<Self> {
        let dims = |name: &str| -> Result<Vec<usize>> {
            weights.shape(name).ok_or_else(|| {
                anyhow::anyhow!("checkpoint has no {name}: not a FLUX transformer, or a layout we do not know")
            })
        };
        let img_in = dims("img_in.weight")?;
        let txt_in = dims("txt_in.weight")?;
        let vector_in = dims("vector_in.in_layer.weight")?;
        let head_dim = dims("double_blocks.0.img_attn.norm.query_norm.scale")
            .or_else(|_| dims("single_blocks.0.norm.query_norm.scale"))?[0];
        let final_linear = dims("final_layer.linear.weight")?;
        let hidden_size = img_in[0];
        if head_dim == 0 || hidden_size % head_dim != 0 {
            bail!("hidden size {hidden_size} is not a multiple of the head dim {head_dim}");
        }
        let depth = weights.count_blocks("double_blocks.");
        let depth_single_blocks = weights.count_blocks("single_blocks.");
        let mlp_hidden_dim = if depth > 0 {
            dims("double_blocks.0.img_mlp.0.weight")?[0]
        } else {
            dims("single_blocks.0.linear1.weight")?[0] - 3 * hidden_size
        };
        let axes_dim = match hint.and_then(|h| h.axes_dims_rope.clone()) {
            Some(axes) => axes,
            None => match weights.metadata("axes_dims_rope") {
                Some(text) => parse_axes(text)?,
                None if head_dim == 128 => vec![16, 56, 56],
                None => {
                    bail!("cannot tell the RoPE axes for head dim {head_dim}; give a config.json with axes_dims_rope")
                }
            },
        };
        if axes_dim.iter().sum::<usize>() != head_dim || axes_dim.iter().any(|a| a % 2 != 0) {
            bail!("RoPE axes {axes_dim:?} must be even and sum to the head dim {head_dim}");
        }
        Ok(FluxConfig {
            in_channels: img_in[1],
            out_channels: final_linear[0],
            vec_in_dim: vector_in[1],
            context_in_dim: txt_in[1],
            hidden_size,
            mlp_hidden_dim,
            num_heads: hidden_size / head_dim,
            depth,
            depth_single_blocks,
            axes_dim,
            theta: hint.and_then(|h| h.theta).unwrap_or(10_000.0),
            qkv_bias: weights.shape("double_blocks.0.img_attn.qkv.bias").is_some() || depth == 0,
            guidance_embed: weights.shape("guidance_in.in_layer.weight").is_some(),
        })
    }
}

/// A complete diffusers `transformer/config.json` (`FluxTransformer2DModel`): what a model
/// is built from when there are no weights yet (`atelier train --full --init random --transformer-config`).
#[derive(Debug, Clone, Deserialize)]
struct FullDiffusersConfig {
    in_channels: usize,
    out_channels: Option<usize>,
    num_layers: usize,
    num_single_layers: usize,
    attention_head_dim: usize,
    num_attention_heads: usize,
    joint_attention_dim: usize,
    pooled_projection_dim: usize,
    guidance_embeds: bool,
    axes_dims_rope: Vec<usize>,
    #[serde(default = "default_mlp_ratio")]
    mlp_ratio: f64,
}

fn default_mlp_ratio() -> f64 {
    4.0
}

impl FluxConfig {
    /// The configuration a diffusers `config.json` describes in full (every size given).
    pub fn from_diffusers_json(text: &str) -> Result<Self> {
        let c: FullDiffusersConfig = serde_json::from_str(text)
            .map_err(|e| anyhow::anyhow!("not a complete FLUX transformer config.json: {e}"))?;
        let head_dim = c.attention_head_dim;
        let hidden_size = head_dim * c.num_attention_heads;
        if hidden_size == 0 || c.in_channels == 0 || c.joint_attention_dim == 0 || c.pooled_projection_dim == 0 {
            bail!("a FLUX transformer config needs non-zero sizes");
        }
        if c.axes_dims_rope.iter().sum::<usize>() != head_dim || c.axes_dims_rope.iter().any(|a| a % 2 != 0) {
            bail!("axes_dims_rope {:?} must be even and sum to attention_head_dim {head_dim}", c.axes_dims_rope);
        }
        if c.num_layers + c.num_single_layers == 0 {
            bail!("a FLUX transformer config needs at least one block");
        }
        Ok(FluxConfig {
            in_channels: c.in_channels,
            out_channels: c.out_channels.unwrap_or(c.in_channels),
            vec_in_dim: c.pooled_projection_dim,
            context_in_dim: c.joint_attention_dim,
            hidden_size,
            mlp_hidden_dim: (hidden_size as f64 * c.mlp_ratio) as usize,
            num_heads: c.num_attention_heads,
            depth: c.num_layers,
            depth_single_blocks: c.num_single_layers,
            axes_dim: c.axes_dims_rope,
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: c.guidance_embeds,
        })
    }
}

fn parse_axes(text: &str) -> Result<Vec<usize>> {
    serde_json::from_str(text)
        .map_err(|e| anyhow::anyhow!("metadata axes_dims_rope {text:?} is not a list of sizes: {e}"))
}

/// The fields of a diffusers `transformer/config.json` that shapes cannot tell.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DiffusersConfig {
    pub axes_dims_rope: Option<Vec<usize>>,
    pub theta: Option<f64>,
    pub guidance_embeds: Option<bool>,
    pub num_layers: Option<usize>,
    pub num_single_layers: Option<usize>,
}
