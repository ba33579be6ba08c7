//! AutoencoderKL as FLUX uses it (BFL's `flux/modules/autoencoder.py`): a convolutional encoder
//! to 16 latent channels at 1/8 resolution and the matching decoder, GroupNorm + SiLU
//! ResNet blocks, one single-head attention block in the middle, no quant convs.
//! Field names are the segments of `ae.safetensors` keys; [`Vae::build`] is the one walk that
//! loads, checks or randomizes the tree (see `engine::loader`).

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Tensor};

use crate::engine::layers::{Conv2d, GroupNorm};
use crate::engine::loader::{self, Loader, NamedParam, TensorSource};
use crate::engine::profile;

use super::layout::VaeWeights;

#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Base width (`ch`); level i has `ch * ch_mult[i]` channels.
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub z_channels: usize,
    pub groups: usize,
    /// Latents the transformer sees are `(mean - shift) * scale`.
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl VaeConfig {
    /// FLUX.1's `ae.safetensors` (BFL `flux/util.py`, `AutoEncoderParams`).
    pub fn flux() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 16,
            groups: 32,
            scaling_factor: 0.3611,
            shift_factor: 0.1159,
        }
    }

    /// Sizes from the tensors; GroupNorm groups and the latent scaling come from `hint`
    /// (a diffusers `config.json`) or FLUX's defaults.
    pub fn infer(w: &VaeWeights, hint: Option<&VaeHint>) -> Result<Self> {
        let dims = |n: &str| w.shape(n).ok_or_else(|| anyhow::anyhow!("VAE checkpoint has no {n}"));
        let conv_in = dims("encoder.conv_in.weight")?;
        let ch = conv_in[0];
        let levels = w.levels();
        if levels == 0 {
            bail!("VAE checkpoint has no resolution levels");
        }
        let ch_mult = (0..levels)
            .map(|i| Ok(dims(&format!("encoder.down.{i}.block.0.conv1.weight"))?[0] / ch))
            .collect::<Result<Vec<_>>>()?;
        let num_res_blocks =
            (0..).take_while(|j| w.contains(&format!("encoder.down.0.block.{j}.conv1.weight"))).count();
        let defaults = VaeConfig::flux();
        let hint = hint.cloned().unwrap_or_default();
        let config = VaeConfig {
            in_channels: conv_in[1],
            out_channels: dims("decoder.conv_out.weight")?[0],
            ch,
            ch_mult,
            num_res_blocks,
            z_channels: dims("decoder.conv_in.weight")?[1],
            groups: hint.norm_num_groups.unwrap_or(defaults.groups),
            scaling_factor: hint.scaling_factor.unwrap_or(defaults.scaling_factor),
            shift_factor: hint.shift_factor.unwrap_or(defaults.shift_factor),
        };
        for m in &config.ch_mult {
            if (ch * m) % config.groups != 0 {
                bail!("VAE width {} is not divisible into {} GroupNorm groups", ch * m, config.groups);
            }
        }
        Ok(config)
    }
}

/// A complete diffusers `vae/config.json` (`AutoencoderKL`): what a VAE is built from when
/// there are no weights yet, and what a trained one is written with.
#[derive(Debug, Clone, serde::Deserialize)]
struct DiffusersVaeConfig {
    in_channels: usize,
    out_channels: usize,
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    latent_channels: usize,
    norm_num_groups: usize,
    scaling_factor: Option<f64>,
    shift_factor: Option<f64>,
}

impl VaeConfig {
    /// The configuration a diffusers `config.json` describes (block widths must be multiples of
    /// the first, as FLUX's `ch · ch_mult` are).
    pub fn from_diffusers_json(text: &str) -> Result<Self> {
        let c: DiffusersVaeConfig =
            serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not a complete AutoencoderKL config.json: {e}"))?;
        let ch = c.block_out_channels.first().copied().unwrap_or(0);
        if ch == 0 || c.latent_channels == 0 || c.layers_per_block == 0 || c.norm_num_groups == 0 {
            bail!("an AutoencoderKL config needs non-zero widths, latent channels, layers and groups");
        }
        if let Some(w) = c.block_out_channels.iter().find(|w| *w % ch != 0 || *w % c.norm_num_groups != 0) {
            bail!(
                "block width {w} is not a multiple of the first width {ch} and of norm_num_groups {}",
                c.norm_num_groups
            );
        }
        let defaults = VaeConfig::flux();
        Ok(VaeConfig {
            in_channels: c.in_channels,
            out_channels: c.out_channels,
            ch,
            ch_mult: c.block_out_channels.iter().map(|w| w / ch).collect(),
            num_res_blocks: c.layers_per_block,
            z_channels: c.latent_channels,
            groups: c.norm_num_groups,
            scaling_factor: c.scaling_factor.unwrap_or(defaults.scaling_factor),
            shift_factor: c.shift_factor.unwrap_or(defaults.shift_factor),
        })
    }

    /// This configuration as a diffusers `vae/config.json` (what `AutoencoderKL.from_pretrained`
    /// and atelier read).
    pub fn diffusers_json(&self) -> serde_json::Value {
        let levels = self.ch_mult.len();
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": self.ch_mult.iter().map(|m| m * self.ch).collect::<Vec<_>>(),
            "down_block_types": vec!["DownEncoderBlock2D"; levels],
            "up_block_types": vec!["UpDecoderBlock2D"; levels],
            "force_upcast": true,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.z_channels,
            "layers_per_block": self.num_res_blocks,
            "mid_block_add_attention": true,
            "norm_num_groups": self.groups,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "use_quant_conv": false,
            "use_post_quant_conv": false,
        })
    }
}

/// The fields of a diffusers `vae/config.json` that weights cannot tell.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct VaeHint {
    pub norm_num_groups: Option<usize>,
    pub scaling_factor: Option<f64>,
    pub shift_factor: Option<f64>,
}

/// A ResNet block: GroupNorm, SiLU, 3×3 conv, twice, with a 1×1 conv on the shortcut when
/// the width changes.
#[derive(Module, Debug)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(l: &Loader, inputs: usize, outputs: usize, groups: usize) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: l.group_norm("norm1", inputs, groups)?,
            conv1: l.conv2d("conv1", inputs, outputs, 3, 1, (1, 1))?,
            norm2: l.group_norm("norm2", outputs, groups)?,
            conv2: l.conv2d("conv2", outputs, outputs, 3, 1, (1, 1))?,
            nin_shortcut: if inputs != outputs {
                Some(l.conv2d("nin_shortcut", inputs, outputs, 1, 1, (0, 0))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv1.forward_normed(x.clone(), &self.norm1);
        let h = self.conv2.forward_normed(h, &self.norm2);
        let x = match &self.nin_shortcut {
            Some(s) => s.forward(x),
            None => x,
        };
        profile::span("residual", || x + h)
    }
}

/// Single-head self-attention over all pixels, with 1×1 conv projections.
#[derive(Module, Debug)]
pub struct AttnBlock {
    pub norm: GroupNorm,
    pub q: Conv2d,
    pub k: Conv2d,
    pub v: Conv2d,
    pub proj_out: Conv2d,
}

impl AttnBlock {
    fn load(l: &Loader, c: usize, groups: usize) -> Result<Self> {
        let conv = |n: &str| l.conv2d(n, c, c, 1, 1, (0, 0));
        Ok(AttnBlock {
            norm: l.group_norm("norm", c, groups)?,
            q: conv("q")?,
            k: conv("k")?,
            v: conv("v")?,
            proj_out: conv("proj_out")?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let n = self.norm.forward(x.clone());
        // [B, C, H, W] → [B, 1, HW, C]. The flatten forces a contiguous copy: burn 0.22's wgpu
        // attention kernel returns wrong values when the last dim is strided (a transposed view).
        let seq =
            |t: Tensor<4>| t.reshape([b, c, h * w]).swap_dims(1, 2).reshape([b * h * w * c]).reshape([b, 1, h * w, c]);
        let (q, k, v) = (self.q.forward(n.clone()), self.k.forward(n.clone()), self.v.forward(n));
        let out = profile::span("attention", || {
            let (q, k, v) = (seq(q), seq(k), seq(v));
            // The CPU kernel (on AMX tiles in bf16 mode, as the convolutions) where it applies.
            let out = match crate::engine::cpu::attention(&q, &k, &v, self.q.bf16_tiles) {
                Some(merged) => merged,
                None => attention(q, k, v, None, None, AttentionModuleOptions::default()).reshape([b, h * w, c]),
            };
            out.swap_dims(1, 2).reshape([b, c, h, w])
        });
        x + self.proj_out.forward(out)
    }
}

/// The middle: ResNet, attention, ResNet at the lowest resolution.
#[derive(Module, Debug)]
pub struct Mid {
    pub block_1: ResnetBlock,
    pub attn_1: AttnBlock,
    pub block_2: ResnetBlock,
}

impl Mid {
    fn load(l: &Loader, c: usize, groups: usize) -> Result<Self> {
        Ok(Mid {
            block_1: ResnetBlock::load(&l.pp("block_1"), c, c, groups)?,
            attn_1: AttnBlock::load(&l.pp("attn_1"), c, groups)?,
            block_2: ResnetBlock::load(&l.pp("block_2"), c, c, groups)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.block_2.forward(self.attn_1.forward(self.block_1.forward(x)))
    }
}

/// A resampling conv (`downsample.conv` / `upsample.conv`).
#[derive(Module, Debug)]
pub struct Resample {
    pub conv: Conv2d,
}

/// One encoder level: ResNet blocks, then a stride-2 conv (absent at the last level).
#[derive(Module, Debug)]
pub struct Down {
    pub block: Vec<ResnetBlock>,
    pub downsample: Option<Resample>,
}

/// One decoder level: ResNet blocks, then ×2 upsampling and a conv (absent at level 0).
#[derive(Module, Debug)]
pub struct Up {
    pub block: Vec<ResnetBlock>,
    pub upsample: Option<Resample>,
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down: Vec<Down>,
    pub mid: Mid,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    fn load(l: &Loader, c: &VaeConfig) -> Result<Self> {
        let (g, levels) = (c.groups, c.ch_mult.len());
        let conv_in = l.conv2d("conv_in", c.in_channels, c.ch, 3, 1, (1, 1))?;
        let mut width = c.ch;
        let mut down = Vec::new();
        for (i, m) in c.ch_mult.iter().enumerate() {
            let level = l.pp("down").pp(i);
            let mut block = Vec::new();
            for j in 0..c.num_res_blocks {
                block.push(ResnetBlock::load(&level.pp("block").pp(j), width, c.ch * m, g)?);
                width = c.ch * m;
            }
            // BFL pads right/bottom by one, then a stride-2 3×3 conv.
            let downsample = if i + 1 != levels {
                Some(Resample { conv: level.pp("downsample").conv2d("conv", width, width, 3, 2, (0, 1))? })
            } else {
                None
            };
            down.push(Down { block, downsample });
        }
        Ok(Encoder {
            conv_in,
            down,
            mid: Mid::load(&l.pp("mid"), width, g)?,
            norm_out: l.group_norm("norm_out", width, g)?,
            conv_out: l.conv2d("conv_out", width, 2 * c.z_channels, 3, 1, (1, 1))?,
        })
    }
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid: Mid,
    /// Indexed by resolution level as in BFL (`up.0` is the full-resolution level); run from
    /// the last level to the first.
    pub up: Vec<Up>,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    fn load(l: &Loader, c: &VaeConfig) -> Result<Self> {
        let g = c.groups;
        let mut width = c.ch * c.ch_mult.last().copied().unwrap_or(1);
        let conv_in = l.conv2d("conv_in", c.z_channels, width, 3, 1, (1, 1))?;
        let mid = Mid::load(&l.pp("mid"), width, g)?;
        let mut up = Vec::new();
        for (i, m) in c.ch_mult.iter().enumerate().rev() {
            let level = l.pp("up").pp(i);
            let mut block = Vec::new();
            for j in 0..=c.num_res_blocks {
                block.push(ResnetBlock::load(&level.pp("block").pp(j), width, c.ch * m, g)?);
                width = c.ch * m;
            }
            let upsample = if i != 0 {
                Some(Resample { conv: level.pp("upsample").conv2d("conv", width, width, 3, 1, (1, 1))? })
            } else {
                None
            };
            up.push(Up { block, upsample });
        }
        up.reverse();
        Ok(Decoder {
            conv_in,
            mid,
            up,
            norm_out: l.group_norm("norm_out", width, g)?,
            conv_out: l.conv2d("conv_out", width, c.out_channels, 3, 1, (1, 1))?,
        })
    }
}

/// The autoencoder; field names are the segments of BFL's `ae.safetensors` keys.
#[derive(Module, Debug)]
pub struct Vae {
    pub encoder: Encoder,
    pub decoder: Decoder,
    #[module(skip)]
    pub config: VaeConfig,
}

impl Vae {
    /// The module tree of `config`, walked once: from a checkpoint, as a check, or random.
    pub fn build(l: &Loader, config: VaeConfig) -> Result<Self> {
        Ok(Vae {
            encoder: Encoder::load(&l.pp("encoder"), &config)?,
            decoder: Decoder::load(&l.pp("decoder"), &config)?,
            config,
        })
    }

    /// Checks the checkpoint against `config`'s module tree, then loads it.
    pub fn load(w: &VaeWeights, config: VaeConfig, device: &Device, dtype: DType) -> Result<Self> {
        loader::load(w, device, dtype, (&w.describe(), "the expected layout"), |l| Self::build(l, config.clone()))
    }

    /// [`Vae::load`], with its parameters by checkpoint name and the number of tensors read
    /// (VAE training).
    pub fn load_named(
        w: &VaeWeights,
        config: VaeConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<(Self, Vec<NamedParam>, usize)> {
        loader::load_named(w, device, dtype, (&w.describe(), "the expected layout"), |l| Self::build(l, config.clone()))
    }

    /// Random weights of `config` (U(±1/√fan_in), norm scales 1) drawn from `seed`, with the
    /// parameters by name: a VAE trained from scratch.
    pub fn random_named(config: VaeConfig, device: &Device, seed: u64) -> Result<(Self, Vec<NamedParam>, usize)> {
        let walk = loader::Walk::random(device, DType::F32, seed);
        let vae = Self::build(&walk.root(), config)?;
        Ok((vae, walk.named_params(), walk.entries().len()))
    }

    /// Image in [-1, 1], [B, 3, H, W] → posterior mean [B, z, H/8, W/8] (unscaled).
    pub fn encode_mean(&self, x: Tensor<4>) -> Tensor<4> {
        self.encode_moments(x).0
    }

    /// Image in [-1, 1] → the posterior's mean and log-variance, each [B, z, H/8, W/8]
    /// (log-variance clamped to [-30, 20], as diffusers' DiagonalGaussianDistribution does).
    pub fn encode_moments(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(x);
        for level in &e.down {
            for block in &level.block {
                h = block.forward(h);
            }
            if let Some(down) = &level.downsample {
                h = down.conv.forward(h);
            }
        }
        let h = e.conv_out.forward_normed(e.mid.forward(h), &e.norm_out);
        let z = self.config.z_channels;
        (h.clone().narrow(1, 0, z), h.narrow(1, z, z).clamp(-30.0, 20.0))
    }

    /// Image in [-1, 1] → the latents the transformer works on: (mean − shift) · scale.
    pub fn encode(&self, x: Tensor<4>) -> Tensor<4> {
        (self.encode_mean(x) - self.config.shift_factor) * self.config.scaling_factor
    }

    /// Unscaled latents [B, z, h, w] → image [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped).
    pub fn decode_raw(&self, z: Tensor<4>) -> Tensor<4> {
        let d = &self.decoder;
        let mut h = d.mid.forward(d.conv_in.forward(z));
        for level in d.up.iter().rev() {
            for block in &level.block {
                h = block.forward(h);
            }
            if let Some(up) = &level.upsample {
                // Nearest-neighbour ×2, then the 3×3 conv.
                h = up.conv.forward_upsampled(h);
            }
        }
        d.conv_out.forward_normed(h, &d.norm_out)
    }

    /// Transformer latents → image: undo the scaling and shift, then decode.
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        self.decode_raw(latents / self.config.scaling_factor + self.config.shift_factor)
    }

    /// [`Vae::decode`] in overlapping tiles of `tile` latent pixels, blended linearly across
    /// `overlap`, so a large image never needs the mid-block attention over all its pixels
    /// (at 2048² that matrix alone is 17 GB). Like every tiled decoder this is an
    /// approximation: GroupNorm and attention see one tile at a time. Small inputs (one tile)
    /// decode exactly as `decode`. Returns [1, 3, 8h, 8w] on the host as CHW f32.
    pub fn decode_tiled(&self, latents: Tensor<4>, tile: usize, overlap: usize) -> Vec<f32> {
        let [b, c, h, w] = latents.dims();
        assert!(b == 1 && tile > overlap, "one image, and tiles larger than their overlap");
        let read = |t: Tensor<4>| t.cast(DType::F32).into_data().try_to_vec::<f32>().expect("f32 image");
        if h <= tile && w <= tile {
            return read(self.decode(latents));
        }
        let (ph, pw) = (8 * h, 8 * w);
        let mut sum = vec![0f32; 3 * ph * pw];
        let mut weight = vec![0f32; ph * pw];
        let starts = |len: usize| -> Vec<usize> {
            let stride = tile - overlap;
            let mut v: Vec<usize> = (0..).map(|i| i * stride).take_while(|&s| s + tile < len).collect();
            v.push(len.saturating_sub(tile));
            v.dedup();
            v
        };
        let ramp = |p: usize, len: usize, at_start: bool, at_end: bool| -> f32 {
            let o = (8 * overlap).max(1) as f32;
            let mut r = 1f32;
            if !at_start {
                r = r.min((p as f32 + 0.5) / o);
            }
            if !at_end {
                r = r.min((len - p) as f32 / o);
            }
            r.max(1e-3)
        };
        for &y0 in &starts(h) {
            for &x0 in &starts(w) {
                let (th, tw) = (tile.min(h - y0), tile.min(w - x0));
                let part = latents.clone().narrow(2, y0, th).narrow(3, x0, tw);
                let pixels = read(self.decode(part));
                let (tph, tpw) = (8 * th, 8 * tw);
                for y in 0..tph {
                    let wy = ramp(y, tph, y0 == 0, y0 + th == h);
                    for x in 0..tpw {
                        let wt = wy * ramp(x, tpw, x0 == 0, x0 + tw == w);
                        let at = (8 * y0 + y) * pw + 8 * x0 + x;
                        weight[at] += wt;
                        for ch in 0..3 {
                            sum[ch * ph * pw + at] += wt * pixels[(ch * tph + y) * tpw + x];
                        }
                    }
                }
            }
        }
        let _ = c;
        for ch in 0..3 {
            for i in 0..ph * pw {
                sum[ch * ph * pw + i] /= weight[i];
            }
        }
        sum
    }
}
