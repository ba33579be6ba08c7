//! AutoencoderKL as FLUX uses it (BFL's `flux/modules/autoencoder.py`): a convolutional encoder
//! to 16 latent channels at 1/8 resolution and the matching decoder, GroupNorm + SiLU
//! ResNet blocks, one single-head attention block in the middle, no quant convs.

use anyhow::{Result, bail};
use burn::tensor::activation::silu;
use burn::tensor::module::{attention, conv2d};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions};
use burn::tensor::{DType, Device, Tensor};

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

    /// Every tensor name (BFL layout) of this configuration.
    pub fn parameter_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        let conv = |n: &mut Vec<String>, p: &str| {
            n.push(format!("{p}.weight"));
            n.push(format!("{p}.bias"));
        };
        let resnet = |n: &mut Vec<String>, p: &str, shortcut: bool| {
            for part in ["norm1", "conv1", "norm2", "conv2"] {
                conv(n, &format!("{p}.{part}"));
            }
            if shortcut {
                conv(n, &format!("{p}.nin_shortcut"));
            }
        };
        let mid = |n: &mut Vec<String>, side: &str, c: usize| {
            resnet(n, &format!("{side}.mid.block_1"), false);
            for part in ["norm", "q", "k", "v", "proj_out"] {
                conv(n, &format!("{side}.mid.attn_1.{part}"));
            }
            resnet(n, &format!("{side}.mid.block_2"), false);
            let _ = c;
        };
        let levels = self.ch_mult.len();
        conv(&mut names, "encoder.conv_in");
        let mut c = self.ch;
        for (i, m) in self.ch_mult.iter().enumerate() {
            for j in 0..self.num_res_blocks {
                resnet(&mut names, &format!("encoder.down.{i}.block.{j}"), c != self.ch * m);
                c = self.ch * m;
            }
            if i + 1 != levels {
                conv(&mut names, &format!("encoder.down.{i}.downsample.conv"));
            }
        }
        mid(&mut names, "encoder", c);
        conv(&mut names, "encoder.norm_out");
        conv(&mut names, "encoder.conv_out");

        conv(&mut names, "decoder.conv_in");
        mid(&mut names, "decoder", c);
        for i in (0..levels).rev() {
            for j in 0..=self.num_res_blocks {
                let out = self.ch * self.ch_mult[i];
                resnet(&mut names, &format!("decoder.up.{i}.block.{j}"), c != out);
                c = out;
            }
            if i != 0 {
                conv(&mut names, &format!("decoder.up.{i}.upsample.conv"));
            }
        }
        conv(&mut names, "decoder.norm_out");
        conv(&mut names, "decoder.conv_out");
        names
    }
}

/// The fields of a diffusers `vae/config.json` that weights cannot tell.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct VaeHint {
    pub norm_num_groups: Option<usize>,
    pub scaling_factor: Option<f64>,
    pub shift_factor: Option<f64>,
}

struct Loader<'a> {
    w: &'a VaeWeights,
    device: &'a Device,
    dtype: DType,
}

impl Loader<'_> {
    fn tensor<const D: usize>(&self, name: &str) -> Result<Tensor<D>> {
        crate::engine::layers::upload(self.w.read(name)?, name, self.device, self.dtype)
    }

    fn conv(&self, p: &str, stride: usize, padding: (usize, usize)) -> Result<Conv> {
        Ok(Conv {
            weight: self.tensor(&format!("{p}.weight"))?,
            bias: self.tensor(&format!("{p}.bias"))?,
            stride,
            padding,
        })
    }

    fn norm(&self, p: &str, groups: usize) -> Result<GroupNorm> {
        Ok(GroupNorm { weight: self.tensor(&format!("{p}.weight"))?, bias: self.tensor(&format!("{p}.bias"))?, groups })
    }
}

struct Conv {
    weight: Tensor<4>,
    bias: Tensor<1>,
    stride: usize,
    /// (before, after) on both spatial axes.
    padding: (usize, usize),
}

impl Conv {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let options = ConvOptions {
            stride: [self.stride; 2],
            padding: [self.padding; 2],
            dilation: [1; 2],
            groups: 1,
        };
        conv2d(x, self.weight.clone(), Some(self.bias.clone()), options)
    }
}

/// GroupNorm with affine parameters, eps 1e-6, statistics in f32.
struct GroupNorm {
    weight: Tensor<1>,
    bias: Tensor<1>,
    groups: usize,
}

impl GroupNorm {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let dtype = x.dtype();
        let g = x.cast(DType::F32).reshape([b, self.groups, (c / self.groups) * h * w]);
        let (var, mean) = g.clone().var_mean_bias(2);
        let normed = ((g - mean) / (var + 1e-6).sqrt()).reshape([b, c, h, w]).cast(dtype);
        normed * self.weight.clone().reshape([1, c, 1, 1]) + self.bias.clone().reshape([1, c, 1, 1])
    }
}

struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    norm2: GroupNorm,
    conv2: Conv,
    nin_shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn load(l: &Loader, p: &str, groups: usize) -> Result<Self> {
        let shortcut = format!("{p}.nin_shortcut");
        Ok(ResnetBlock {
            norm1: l.norm(&format!("{p}.norm1"), groups)?,
            conv1: l.conv(&format!("{p}.conv1"), 1, (1, 1))?,
            norm2: l.norm(&format!("{p}.norm2"), groups)?,
            conv2: l.conv(&format!("{p}.conv2"), 1, (1, 1))?,
            nin_shortcut: if l.w.contains(&format!("{shortcut}.weight")) {
                Some(l.conv(&shortcut, 1, (0, 0))?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let x = match &self.nin_shortcut {
            Some(s) => s.forward(x),
            None => x,
        };
        x + h
    }
}

/// Single-head self-attention over all pixels, with 1×1 conv projections.
struct AttnBlock {
    norm: GroupNorm,
    q: Conv,
    k: Conv,
    v: Conv,
    proj_out: Conv,
}

impl AttnBlock {
    fn load(l: &Loader, p: &str, groups: usize) -> Result<Self> {
        let c = |n: &str| l.conv(&format!("{p}.{n}"), 1, (0, 0));
        Ok(AttnBlock { norm: l.norm(&format!("{p}.norm"), groups)?, q: c("q")?, k: c("k")?, v: c("v")?, proj_out: c("proj_out")? })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let n = self.norm.forward(x.clone());
        // [B, C, H, W] → [B, 1, HW, C]. The flatten forces a contiguous copy: burn 0.22's wgpu
        // attention kernel returns wrong values when the last dim is strided (a transposed view).
        let seq = |t: Tensor<4>| t.reshape([b, c, h * w]).swap_dims(1, 2).reshape([b * h * w * c]).reshape([b, 1, h * w, c]);
        let out = attention(
            seq(self.q.forward(n.clone())),
            seq(self.k.forward(n.clone())),
            seq(self.v.forward(n)),
            None,
            None,
            AttentionModuleOptions::default(),
        );
        let out = out.reshape([b, h * w, c]).swap_dims(1, 2).reshape([b, c, h, w]);
        x + self.proj_out.forward(out)
    }
}

struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn load(l: &Loader, p: &str, groups: usize) -> Result<Self> {
        Ok(Mid {
            block_1: ResnetBlock::load(l, &format!("{p}.block_1"), groups)?,
            attn_1: AttnBlock::load(l, &format!("{p}.attn_1"), groups)?,
            block_2: ResnetBlock::load(l, &format!("{p}.block_2"), groups)?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.block_2.forward(self.attn_1.forward(self.block_1.forward(x)))
    }
}

/// One resolution level: ResNet blocks, then a resampling conv (absent at the last level).
struct Level {
    blocks: Vec<ResnetBlock>,
    resample: Option<Conv>,
}

pub struct Encoder {
    conv_in: Conv,
    down: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv,
}

pub struct Decoder {
    conv_in: Conv,
    mid: Mid,
    /// Indexed by resolution level as in BFL (`up.0` is the full-resolution level); run from
    /// the last level to the first.
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

pub struct Vae {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
}

impl Vae {
    pub fn load(w: &VaeWeights, config: VaeConfig, device: &Device, dtype: DType) -> Result<Self> {
        w.check_complete(&config.parameter_names())?;
        let l = Loader { w, device, dtype };
        let g = config.groups;
        let levels = config.ch_mult.len();
        let level = |side: &str, kind: &str, i: usize, blocks: usize, resample: bool| -> Result<Level> {
            Ok(Level {
                blocks: (0..blocks)
                    .map(|j| ResnetBlock::load(&l, &format!("{side}.{kind}.{i}.block.{j}"), g))
                    .collect::<Result<_>>()?,
                resample: if !resample {
                    None
                } else if kind == "down" {
                    // BFL pads right/bottom by one, then a stride-2 3×3 conv.
                    Some(l.conv(&format!("{side}.down.{i}.downsample.conv"), 2, (0, 1))?)
                } else {
                    Some(l.conv(&format!("{side}.up.{i}.upsample.conv"), 1, (1, 1))?)
                },
            })
        };
        let encoder = Encoder {
            conv_in: l.conv("encoder.conv_in", 1, (1, 1))?,
            down: (0..levels)
                .map(|i| level("encoder", "down", i, config.num_res_blocks, i + 1 != levels))
                .collect::<Result<_>>()?,
            mid: Mid::load(&l, "encoder.mid", g)?,
            norm_out: l.norm("encoder.norm_out", g)?,
            conv_out: l.conv("encoder.conv_out", 1, (1, 1))?,
        };
        let decoder = Decoder {
            conv_in: l.conv("decoder.conv_in", 1, (1, 1))?,
            mid: Mid::load(&l, "decoder.mid", g)?,
            up: (0..levels)
                .map(|i| level("decoder", "up", i, config.num_res_blocks + 1, i != 0))
                .collect::<Result<_>>()?,
            norm_out: l.norm("decoder.norm_out", g)?,
            conv_out: l.conv("decoder.conv_out", 1, (1, 1))?,
        };
        Ok(Vae { config, encoder, decoder })
    }

    /// Image in [-1, 1], [B, 3, H, W] → posterior mean [B, z, H/8, W/8] (unscaled).
    pub fn encode_mean(&self, x: Tensor<4>) -> Tensor<4> {
        let e = &self.encoder;
        let mut h = e.conv_in.forward(x);
        for level in &e.down {
            for block in &level.blocks {
                h = block.forward(h);
            }
            if let Some(down) = &level.resample {
                h = down.forward(h);
            }
        }
        let h = e.conv_out.forward(silu(e.norm_out.forward(e.mid.forward(h))));
        h.narrow(1, 0, self.config.z_channels)
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
            for block in &level.blocks {
                h = block.forward(h);
            }
            if let Some(up) = &level.resample {
                let [b, c, hh, ww] = h.dims();
                // Nearest-neighbour ×2, then the 3×3 conv.
                let doubled = h.reshape([b, c, hh, 1, ww, 1]).expand([b, c, hh, 2, ww, 2]).reshape([b, c, 2 * hh, 2 * ww]);
                h = up.forward(doubled);
            }
        }
        d.conv_out.forward(silu(d.norm_out.forward(h)))
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
        let read = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().expect("f32 image");
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
