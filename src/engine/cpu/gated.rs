//! The gated residual update of every FLUX block, x + gate·y with one gate per channel, in one
//! pass (burn's path: a broadcast product, then a sum, each a pass over the tokens; backward a
//! product and a reduction over the tokens for the gate).

use burn::tensor::Tensor;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::math::simd_dispatch;
use super::tracked::Kernel3;

/// x + gate·y for x and y [B, L, H] and gate [B, 1, H].
pub fn gated_add(x: &Tensor<3>, gate: &Tensor<3>, y: &Tensor<3>) -> Option<Tensor<3>> {
    let g = Gated::of(super::flex_f32(x)?, super::flex_f32(gate)?, super::flex_f32(y)?)?;
    Some(super::into_tensor(g.forward()))
}

/// The operands of [`gated_add`], contiguous and checked.
#[derive(Debug, Clone)]
pub(super) struct Gated {
    x: FlexTensor,
    gate: FlexTensor,
    y: FlexTensor,
    /// (batch, tokens, width)
    dims: [usize; 3],
}

impl Gated {
    pub fn of(x: FlexTensor, gate: FlexTensor, y: FlexTensor) -> Option<Self> {
        let [b, l, h] = x.layout().shape().dims::<3>();
        if y.layout().shape().dims::<3>() != [b, l, h] || gate.layout().shape().dims::<3>() != [b, 1, h] || h == 0 {
            return None;
        }
        let [x, gate, y] = [x, gate, y].map(super::contiguous);
        Some(Gated { x, gate, y, dims: [b, l, h] })
    }
}

impl Kernel3 for Gated {
    /// x + gate·y.
    fn forward(&self) -> FlexTensor {
        let [b, l, h] = self.dims;
        let mut out = super::zeros(self.x.layout().shape().clone());
        let (x, gate, y) = (self.x.storage::<f32>(), self.gate.storage::<f32>(), self.y.storage::<f32>());
        out.storage_mut::<f32>()[..b * l * h].par_chunks_mut(h).enumerate().for_each(|(r, o)| {
            let bi = r / l;
            fma_row(&x[r * h..][..h], &gate[bi * h..][..h], &y[r * h..][..h], o);
        });
        out
    }

    /// The gradients at x (the output's), gate (Σ over the tokens of g·y) and y (gate·g).
    fn backward(&self, grad: FlexTensor) -> [FlexTensor; 3] {
        let [b, l, h] = self.dims;
        let grad = super::contiguous(grad);
        let (g, gate, y) = (grad.storage::<f32>(), self.gate.storage::<f32>(), self.y.storage::<f32>());
        let mut dy = super::zeros(self.y.layout().shape().clone());
        dy.storage_mut::<f32>()[..b * l * h].par_chunks_mut(h).enumerate().for_each(|(r, o)| {
            let bi = r / l;
            scale_row(&g[r * h..][..h], &gate[bi * h..][..h], o);
        });
        let mut dgate = super::zeros(self.gate.layout().shape().clone());
        let sums = super::token_sums((b, l), h, |r, acc| fma_into(&g[r * h..][..h], &y[r * h..][..h], acc));
        dgate.storage_mut::<f32>()[..b * h].copy_from_slice(&sums);
        [grad, dgate, dy]
    }
}

simd_dispatch! {
    fn fma_row(x: &[f32], gate: &[f32], y: &[f32], out: &mut [f32]) {
        for (((o, x), g), y) in out.iter_mut().zip(x).zip(gate).zip(y) {
            *o = x + g * y;
        }
    }
}

simd_dispatch! {
    fn scale_row(g: &[f32], gate: &[f32], out: &mut [f32]) {
        for ((o, g), s) in out.iter_mut().zip(g).zip(gate) {
            *o = g * s;
        }
    }
}

simd_dispatch! {
    fn fma_into(a: &[f32], b: &[f32], acc: &mut [f32]) {
        for ((acc, a), b) in acc.iter_mut().zip(a).zip(b) {
            *acc += a * b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, random};

    #[test]
    fn matches_burns_broadcast_product_and_sum() {
        let (x, y, gate) = (random([2, 37, 40]), random([2, 37, 40]), random([2, 1, 40]));
        let want = x.clone() + gate.clone() * y.clone();
        assert!(max_diff(super::gated_add(&x, &gate, &y).unwrap(), want) < 1e-6);
    }
}
