//! AdaLN's modulated LayerNorm, (1 + scale)·LayerNorm(x) + shift, in one pass per token (and
//! its backward in one more), where burn's path makes about eight passes forward and as many
//! backward, two of them reductions over the tokens for the modulation's gradients.

use burn::tensor::Tensor;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::math::simd_dispatch;
use super::tracked::Kernel3;

/// (1 + scale)·LayerNorm(x) + shift over the last dim of `x` [B, L, H] (no affine, `eps`),
/// with `shift` and `scale` [B, 1, H].
pub fn modulated_layer_norm(x: &Tensor<3>, shift: &Tensor<3>, scale: &Tensor<3>, eps: f32) -> Option<Tensor<3>> {
    let m = ModulatedNorm::of(super::flex_f32(x)?, super::flex_f32(shift)?, super::flex_f32(scale)?, eps)?;
    Some(super::into_tensor(m.forward()))
}

/// The operands of [`modulated_layer_norm`], contiguous and checked.
#[derive(Debug, Clone)]
pub(super) struct ModulatedNorm {
    x: FlexTensor,
    shift: FlexTensor,
    scale: FlexTensor,
    /// (batch, tokens, width)
    dims: [usize; 3],
    eps: f32,
}

impl ModulatedNorm {
    pub fn of(x: FlexTensor, shift: FlexTensor, scale: FlexTensor, eps: f32) -> Option<Self> {
        let [b, l, h] = x.layout().shape().dims::<3>();
        let modulation = [b, 1, h];
        if shift.layout().shape().dims::<3>() != modulation
            || scale.layout().shape().dims::<3>() != modulation
            || h == 0
        {
            return None;
        }
        let [x, shift, scale] = [x, shift, scale].map(super::contiguous);
        Some(ModulatedNorm { x, shift, scale, dims: [b, l, h], eps })
    }

    /// A zeroed [B, L, H] tensor and `f(token, x row, shift, scale, its row)` for every token,
    /// in parallel.
    fn per_token(&self, f: impl Fn(usize, &[f32], &[f32], &[f32], &mut [f32]) + Sync) -> FlexTensor {
        let [b, l, h] = self.dims;
        let mut out = super::zeros(self.x.layout().shape().clone());
        let (x, shift, scale) = (self.x.storage::<f32>(), self.shift.storage::<f32>(), self.scale.storage::<f32>());
        out.storage_mut::<f32>()[..b * l * h].par_chunks_mut(h).enumerate().for_each(|(r, row)| {
            let bi = r / l;
            f(r, &x[r * h..][..h], &shift[bi * h..][..h], &scale[bi * h..][..h], row)
        });
        out
    }
}

impl Kernel3 for ModulatedNorm {
    fn forward(&self) -> FlexTensor {
        let eps = self.eps;
        self.per_token(|_, x, shift, scale, y| {
            let (mean, inv) = stats(x, eps);
            modulate_row(x, (shift, scale), (mean, inv), y);
        })
    }

    /// The gradients at x, shift and scale given `grad` [B, L, H] at the output: with
    /// n = LayerNorm(x) and dn = (1 + scale)·g, dx = (dn − mean(dn) − n·mean(dn·n))/σ;
    /// dshift = Σ_tokens g and dscale = Σ_tokens g·n per batch item.
    fn backward(&self, grad: FlexTensor) -> [FlexTensor; 3] {
        let [b, l, h] = self.dims;
        let grad = super::contiguous(grad);
        let g = &grad.storage::<f32>()[..b * l * h];
        let eps = self.eps;
        let dx = self.per_token(|r, x, _, scale, dx| {
            let (mean, inv) = stats(x, eps);
            norm_grad_row(x, scale, (mean, inv), &g[r * h..][..h], dx);
        });
        // Σ g and Σ g·n over each batch item's tokens.
        let x: &[f32] = self.x.storage();
        let sums = super::token_sums((b, l), 2 * h, |r, acc| {
            let xr = &x[r * h..][..h];
            let (ds, dc) = acc.split_at_mut(h);
            modulation_grad_row(xr, stats(xr, eps), &g[r * h..][..h], ds, dc);
        });
        let part = |k: usize| {
            let v: Vec<f32> = sums.chunks(2 * h).flat_map(|s| s[k * h..][..h].to_vec()).collect();
            let mut t = super::zeros(self.shift.layout().shape().clone());
            t.storage_mut::<f32>()[..b * h].copy_from_slice(&v);
            t
        };
        [dx, part(0), part(1)]
    }
}

/// Mean and 1/σ of a row (two passes, f32), as LayerNorm takes them (biased variance).
fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let var = squared_deviations(x, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

simd_dispatch! {
    fn sum_into(x: &[f32], out: &mut f32) {
        let mut acc = [0f32; 16];
        for c in x.chunks(16) {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += v;
            }
        }
        *out = acc.iter().sum();
    }
}

simd_dispatch! {
    fn squared_deviations_into(x: &[f32], mean: f32, out: &mut f32) {
        let mut acc = [0f32; 16];
        for c in x.chunks(16) {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += (v - mean) * (v - mean);
            }
        }
        *out = acc.iter().sum();
    }
}

fn sum(x: &[f32]) -> f32 {
    let mut s = 0.0;
    sum_into(x, &mut s);
    s
}

fn squared_deviations(x: &[f32], mean: f32) -> f32 {
    let mut s = 0.0;
    squared_deviations_into(x, mean, &mut s);
    s
}

simd_dispatch! {
    fn modulate_row(x: &[f32], modulation: (&[f32], &[f32]), stats: (f32, f32), y: &mut [f32]) {
        let ((shift, scale), (mean, inv)) = (modulation, stats);
        for (((y, x), t), s) in y.iter_mut().zip(x).zip(shift).zip(scale) {
            *y = (x - mean) * inv * (1.0 + s) + t;
        }
    }
}

simd_dispatch! {
    /// dx of one token: dn = (1 + scale)·g, dx = (dn − mean(dn) − n·mean(dn·n))·inv.
    fn norm_grad_row(x: &[f32], scale: &[f32], stats: (f32, f32), g: &[f32], dx: &mut [f32]) {
        let (mean, inv) = stats;
        let n = x.len() as f32;
        let (mut acc_dn, mut acc_dnn) = ([0f32; 16], [0f32; 16]);
        for ((x, s), g) in x.chunks(16).zip(scale.chunks(16)).zip(g.chunks(16)) {
            for i in 0..x.len() {
                let dn = g[i] * (1.0 + s[i]);
                acc_dn[i] += dn;
                acc_dnn[i] += dn * (x[i] - mean) * inv;
            }
        }
        let (mean_dn, mean_dnn) = (acc_dn.iter().sum::<f32>() / n, acc_dnn.iter().sum::<f32>() / n);
        for (((dx, x), s), g) in dx.iter_mut().zip(x).zip(scale).zip(g) {
            let normed = (x - mean) * inv;
            *dx = (g * (1.0 + s) - mean_dn - normed * mean_dnn) * inv;
        }
    }
}

simd_dispatch! {
    /// Adds one token's g into `d_shift` and g·n into `d_scale`.
    fn modulation_grad_row(x: &[f32], stats: (f32, f32), g: &[f32], d_shift: &mut [f32], d_scale: &mut [f32]) {
        let (mean, inv) = stats;
        for (((ds, dc), x), g) in d_shift.iter_mut().zip(d_scale.iter_mut()).zip(x).zip(g) {
            *ds += g;
            *dc += g * (x - mean) * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, random};

    #[test]
    fn matches_burns_layer_norm_and_modulation() {
        let x = random([2, 37, 40]) * 3.0 + 1.5;
        let (shift, scale) = (random([2, 1, 40]), random([2, 1, 40]));
        let want = (scale.clone() + 1.0) * crate::engine::layers::layer_norm(x.clone(), 1e-6, None) + shift.clone();
        assert!(max_diff(super::modulated_layer_norm(&x, &shift, &scale, 1e-6).unwrap(), want) < 1e-5);
    }
}
