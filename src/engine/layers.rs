//! Building blocks shared by the models: uploading checkpoint tensors, PyTorch-layout linear
//! layers, and the activations and norms the reference implementations use.

use anyhow::{Result, bail};
use burn::module::{Module, Param};
use burn::tensor::activation::sigmoid;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::engine::packed::{PackedHost, Packing, Weight};
use crate::engine::weights::HostTensor;

/// Puts a host tensor on `device` in the compute `dtype`.
pub fn upload<const D: usize>(t: HostTensor, name: &str, device: &Device, dtype: DType) -> Result<Tensor<D>> {
    if t.shape.len() != D {
        bail!("{name}: expected {D} dims, found shape {:?}", t.shape);
    }
    let t = Tensor::<D>::from_data(TensorData::new(t.data, t.shape), device);
    Ok(if dtype == DType::F32 { t } else { t.cast(dtype) })
}

/// Rows of an embedding table [vocab, dim] for token ids [B][L] → [B, L, dim]; ids outside
/// the table are an error naming `what`, never an out-of-bounds read.
pub fn embed(table: &Tensor<2>, ids: &[Vec<u32>], what: &str) -> Result<Tensor<3>> {
    let [vocab, dim] = table.dims();
    let (batch, len) = (ids.len(), ids.first().map_or(0, |r| r.len()));
    if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside {what}'s vocabulary of {vocab}");
    }
    let flat: Vec<i32> = ids.iter().flatten().map(|&t| t as i32).collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(flat, [batch * len]), &table.device());
    Ok(table.clone().select(0, index).reshape([batch, len, dim]))
}

/// An embedding table [count, dim] (`*.weight`).
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    /// Rows for token ids [B][L] → [B, L, dim]; see [`embed`].
    pub fn forward(&self, ids: &[Vec<u32>], what: &str) -> Result<Tensor<3>> {
        embed(&self.weight.val(), ids, what)
    }
}

/// LayerNorm with affine parameters over the last dim, statistics in f32 (see [`layer_norm`]).
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        layer_norm(x, self.eps, Some((&self.weight.val(), &self.bias.val())))
    }
}

/// A 2-D convolution in PyTorch's layout (weight [out, in, k, k], bias [out]), same stride on
/// both axes, `pad_before`/`pad_after` on both spatial axes.
#[derive(Module, Debug)]
pub struct Conv2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
    pub stride: usize,
    pub pad_before: usize,
    pub pad_after: usize,
    /// 3×3 products on AMX tiles in bf16 (`--dtype bf16` on a CPU with AMX; weights stay f32).
    #[module(skip)]
    pub bf16_tiles: bool,
}

impl Conv2d {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let options = ConvOptions {
            stride: [self.stride; 2],
            padding: [(self.pad_before, self.pad_after); 2],
            dilation: [1; 2],
            groups: 1,
        };
        crate::engine::profile::span("conv2d", || {
            let (weight, bias) = (self.weight.val(), self.bias.val());
            if self.is_3x3_same()
                && let Some(y) = crate::engine::cpu::conv3x3(&x, &weight, Some(&bias), self.bf16_tiles)
            {
                return y;
            }
            conv2d(x, weight, Some(bias), options)
        })
    }

    /// `self(silu(norm(x)))`, as the VAE's blocks apply them. On the CPU the convolution
    /// normalises its input as it reads it, so no normalised copy of `x` is ever whole.
    pub fn forward_normed(&self, x: Tensor<4>, norm: &GroupNorm) -> Tensor<4> {
        let input = |x: &Tensor<4>| {
            let affine =
                crate::engine::cpu::group_affine(x, norm.groups, GroupNorm::EPS, &norm.weight.val(), &norm.bias.val())?;
            Some(crate::engine::cpu::ConvInput { affine: Some(affine), silu: true, upsample: false })
        };
        match self.fused(&x, "group_norm + silu + conv2d", input) {
            Some(y) => y,
            None => self.forward(norm.forward_silu(x)),
        }
    }

    /// `self` on `x` doubled by nearest neighbours (the VAE's upsamplers); on the CPU without
    /// the doubled copy.
    pub fn forward_upsampled(&self, x: Tensor<4>) -> Tensor<4> {
        let input = |_: &Tensor<4>| Some(crate::engine::cpu::ConvInput { upsample: true, ..Default::default() });
        if let Some(y) = self.fused(&x, "upsample + conv2d", input) {
            return y;
        }
        let [b, c, h, w] = x.dims();
        let doubled = crate::engine::profile::span("upsample", || {
            x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]).reshape([b, c, 2 * h, 2 * w])
        });
        self.forward(doubled)
    }

    /// The CPU's 3×3 convolution with `input` applied as it reads `x`; None where it does not run.
    fn fused(
        &self,
        x: &Tensor<4>,
        label: &'static str,
        input: impl FnOnce(&Tensor<4>) -> Option<crate::engine::cpu::ConvInput>,
    ) -> Option<Tensor<4>> {
        if !self.is_3x3_same() {
            return None;
        }
        crate::engine::profile::span(label, || {
            let (weight, bias) = (self.weight.val(), self.bias.val());
            crate::engine::cpu::conv3x3_with(x, &weight, Some(&bias), self.bf16_tiles, &input(x)?)
        })
    }

    /// Stride 1, padding 1, a 3×3 kernel: what the CPU's Winograd convolution covers.
    fn is_3x3_same(&self) -> bool {
        (self.stride, self.pad_before, self.pad_after) == (1, 1, 1) && self.weight.dims()[2..] == [3, 3]
    }
}

/// GroupNorm with affine parameters, eps 1e-6, statistics in f32.
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub groups: usize,
}

impl GroupNorm {
    /// FLUX's VAE's epsilon (diffusers' `GroupNorm(eps=1e-6)`).
    pub const EPS: f32 = 1e-6;

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_then(x, false)
    }

    /// GroupNorm then SiLU, as every VAE block applies them.
    pub fn forward_silu(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_then(x, true)
    }

    fn forward_then(&self, x: Tensor<4>, silu: bool) -> Tensor<4> {
        crate::engine::profile::span(if silu { "group_norm + silu" } else { "group_norm" }, || {
            let (w, b) = (self.weight.val(), self.bias.val());
            if let Some(y) = crate::engine::cpu::group_norm(&x, self.groups, Self::EPS, &w, &b, silu) {
                return y;
            }
            let y = self.forward_burn(x);
            if silu { burn::tensor::activation::silu(y) } else { y }
        })
    }

    /// [`GroupNorm::forward`] in burn's operations: every backend, and the reference
    /// `engine::cpu::group_norm` is tested against.
    pub(crate) fn forward_burn(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let dtype = x.dtype();
        let g = x.cast(DType::F32).reshape([b, self.groups, (c / self.groups) * h * w]);
        let (var, mean) = g.clone().var_mean_bias(2);
        let normed = ((g - mean) / (var + Self::EPS).sqrt()).reshape([b, c, h, w]).cast(dtype);
        normed * self.weight.val().reshape([1, c, 1, 1]) + self.bias.val().reshape([1, c, 1, 1])
    }
}

/// A change to a [`Linear`] applied beside its weight (the base is never modified, so the
/// adapters can be swapped per job, on a quantized base too, and trained with the base frozen):
/// `y += (x·down)·up (+ bias)`. A LoRA has `down` = Aᵀ [in, r] and `up` = m·s·Bᵀ [r, out] (the
/// user's weight and the file's scale folded in); a full delta (`.diff`) has `down` = ΔWᵀ
/// [in, out] and no `up`; `bias` is a bias delta (`.diff_b`).
#[derive(Module, Debug)]
pub struct Adapter {
    pub down: Param<Tensor<2>>,
    pub up: Option<Param<Tensor<2>>>,
    pub bias: Option<Param<Tensor<1>>>,
}

/// A linear layer, weight stored [in, out] (the transpose of PyTorch's) or packed as the file
/// stored it (GGUF blocks, fp8: see `engine::packed`, dequantized per forward), with optional
/// side-path [`Adapter`]s (LoRA): `y = x·W + b + Σ adapter(x)`.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Param<Tensor<1>>>,
    pub adapters: Vec<Adapter>,
}

impl Linear {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::engine::profile::span("linear", || self.forward_unprofiled(x))
    }

    fn forward_unprofiled<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(Param::val);
        let tiled = match &self.weight {
            Weight::Packed(p) if p.packing == Packing::Bf16Tiles => {
                crate::engine::cpu::tiled_linear(&x, &p.words, (p.inputs, p.outputs), bias.as_ref())
            }
            _ => None,
        };
        // LoRA training on the CPU: the frozen base and its one side path as one op.
        if tiled.is_none()
            && let [Adapter { down, up: Some(up), bias: None }] = &self.adapters[..]
            && (x.is_autodiff() || down.val().is_autodiff())
            && let Some(y) = crate::engine::cpu::tracked::lora_linear(
                &x,
                (&self.weight.val(), bias.as_ref()),
                (&down.val(), &up.val()),
            )
        {
            return y;
        }
        // A packed weight's dense matrix lives only for this product.
        let base = tiled.unwrap_or_else(|| product(&x, self.weight.val(), bias));
        self.adapters.iter().fold(base, |y, a| {
            let h = product(&x, a.down.val(), None);
            let h = match &a.up {
                Some(up) => product(&h, up.val(), None),
                None => h,
            };
            let h = match &a.bias {
                Some(b) => h + b.val().unsqueeze::<D>(),
                None => h,
            };
            y + h
        })
    }

    /// (inputs, outputs).
    pub fn dims(&self) -> (usize, usize) {
        let [i, o] = self.weight.dims();
        (i, o)
    }
}

/// x·w (+ b): the CPU kernel where it applies (`engine::cpu::linear`; under autodiff with a
/// frozen `w`, `engine::cpu::tracked::linear`), else burn's.
fn product<const D: usize>(x: &Tensor<D>, w: Tensor<2>, b: Option<Tensor<1>>) -> Tensor<D> {
    use crate::engine::cpu;
    cpu::linear(x, &w, b.as_ref())
        .or_else(|| cpu::tracked::linear(x, &w, b.as_ref()))
        .unwrap_or_else(|| burn::tensor::module::linear(x.clone(), w, b))
}

/// A linear layer whose weight stays packed ([`PackedHost`] [out, in]), computing in `dtype`.
pub fn packed_linear(
    weight: PackedHost,
    bias: Option<HostTensor>,
    name: &str,
    device: &Device,
    dtype: DType,
) -> Result<Linear> {
    let bias = match bias {
        Some(b) => Some(Param::from_tensor(upload::<1>(b, name, device, dtype)?)),
        None => None,
    };
    Ok(Linear { weight: Weight::Packed(weight.upload(device, dtype)), bias, adapters: Vec::new() })
}

/// A linear layer from PyTorch's [out, in] weight. burn's `Linear` multiplies by [in, out];
/// transposing once here keeps every forward a contiguous matmul (measurably faster on the
/// CPU backend than a strided view, see `examples/cpu_ops.rs`). The stored copy is freed
/// before the upload.
pub fn linear(
    weight: HostTensor,
    bias: Option<HostTensor>,
    name: &str,
    device: &Device,
    dtype: DType,
) -> Result<Linear> {
    let [out, inp] = weight.shape[..] else {
        bail!("{name}.weight: expected a matrix, found shape {:?}", weight.shape);
    };
    let t = transpose(&weight.data, out, inp);
    drop(weight);
    let weight = upload::<2>(HostTensor { shape: vec![inp, out], data: t }, name, device, dtype)?;
    let bias = match bias {
        Some(b) => Some(Param::from_tensor(upload::<1>(b, name, device, dtype)?)),
        None => None,
    };
    Ok(Linear { weight: Weight::Dense(Param::from_tensor(weight)), bias, adapters: Vec::new() })
}

/// Row-major [rows, cols] → [cols, rows] (`engine::cpu::transpose_into`).
pub fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    crate::engine::cpu::transpose_into(src, rows, cols, &mut dst);
    dst
}

/// GELU with the tanh approximation, written as x·σ(2z) with z = √(2/π)(x + 0.044715x³):
/// the same function (½(1 + tanh z) = σ(2z)), but sigmoid is several times cheaper than tanh
/// on the CPU backend, and this runs over the widest activations of every block.
/// On the CPU backend in f32 this is one fused pass (`engine::cpu`), under autodiff too.
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    use crate::engine::cpu;
    cpu::gelu_tanh(&x).or_else(|| cpu::tracked::gelu_tanh(&x)).unwrap_or_else(|| gelu_tanh_burn(x))
}

/// [`gelu_tanh`] in burn's operations: every backend, autodiff included.
pub(crate) fn gelu_tanh_burn<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let c = 2.0 * (2.0 / std::f64::consts::PI).sqrt();
    let z = x.clone() * (x.clone() * x.clone() * (0.044715 * c) + c);
    x * sigmoid(z)
}

/// LayerNorm over the last dim, statistics in f32, optional affine.
pub fn layer_norm(x: Tensor<3>, eps: f64, affine: Option<(&Tensor<1>, &Tensor<1>)>) -> Tensor<3> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let (var, mean) = x.clone().var_mean_bias(2);
    let y = ((x - mean) / (var + eps).sqrt()).cast(dtype);
    match affine {
        Some((w, b)) => y * w.clone().unsqueeze::<3>() + b.clone().unsqueeze::<3>(),
        None => y,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_tiles_cover_ragged_edges() {
        let src: Vec<f32> = (0..35 * 70).map(|i| i as f32).collect();
        let t = super::transpose(&src, 35, 70);
        for r in 0..35 {
            for c in 0..70 {
                assert_eq!(t[c * 35 + r], src[r * 70 + c]);
            }
        }
    }
}
