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
                None => bail!(
                    "cannot tell the RoPE axes for head dim {head_dim}; give a config.json with axes_dims_rope"
                ),
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

    /// Every tensor name (BFL layout) this configuration's module tree holds.
    pub fn parameter_names(&self) -> Vec<String> {
        self.parameters().into_iter().map(|(name, _)| name).collect()
    }

    /// Every tensor (BFL name, PyTorch shape) this configuration's module tree holds.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let (h, mlp, hd) = (self.hidden_size, self.mlp_hidden_dim, self.head_dim());
        let mut out = Vec::new();
        let linear = |out: &mut Vec<(String, Vec<usize>)>, path: &str, o: usize, i: usize, bias: bool| {
            out.push((format!("{path}.weight"), vec![o, i]));
            if bias {
                out.push((format!("{path}.bias"), vec![o]));
            }
        };
        linear(&mut out, "img_in", h, self.in_channels, true);
        linear(&mut out, "txt_in", h, self.context_in_dim, true);
        for (emb, inp) in [("time_in", 256), ("vector_in", self.vec_in_dim)]
            .into_iter()
            .chain(self.guidance_embed.then_some(("guidance_in", 256)))
        {
            linear(&mut out, &format!("{emb}.in_layer"), h, inp, true);
            linear(&mut out, &format!("{emb}.out_layer"), h, h, true);
        }
        for i in 0..self.depth {
            for stream in ["img", "txt"] {
                let p = format!("double_blocks.{i}.{stream}");
                linear(&mut out, &format!("{p}_mod.lin"), 6 * h, h, true);
                linear(&mut out, &format!("{p}_attn.qkv"), 3 * h, h, self.qkv_bias);
                out.push((format!("{p}_attn.norm.query_norm.scale"), vec![hd]));
                out.push((format!("{p}_attn.norm.key_norm.scale"), vec![hd]));
                linear(&mut out, &format!("{p}_attn.proj"), h, h, true);
                linear(&mut out, &format!("{p}_mlp.0"), mlp, h, true);
                linear(&mut out, &format!("{p}_mlp.2"), h, mlp, true);
            }
        }
        for i in 0..self.depth_single_blocks {
            let p = format!("single_blocks.{i}");
            linear(&mut out, &format!("{p}.linear1"), 3 * h + mlp, h, true);
            linear(&mut out, &format!("{p}.linear2"), h, h + mlp, true);
            out.push((format!("{p}.norm.query_norm.scale"), vec![hd]));
            out.push((format!("{p}.norm.key_norm.scale"), vec![hd]));
            linear(&mut out, &format!("{p}.modulation.lin"), 3 * h, h, true);
        }
        linear(&mut out, "final_layer.adaLN_modulation.1", 2 * h, h, true);
        linear(&mut out, "final_layer.linear", self.out_channels, h, true);
        out
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
