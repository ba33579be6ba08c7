//! GroupNorm (and the SiLU that follows it in every VAE block) in two parallel passes: the
//! statistics per (batch, group), then one write of the normalized, scaled and activated
//! values. burn's path makes about eight passes and a scalar `exp` for the SiLU.

use burn::tensor::Tensor;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::math::{exp, simd_dispatch};

/// GroupNorm over `x` [B, C, H, W] with `groups`, `eps`, affine `weight`/`bias` [C], then
/// SiLU when `silu`.
pub fn group_norm(
    x: &Tensor<4>,
    groups: usize,
    eps: f32,
    weight: &Tensor<1>,
    bias: &Tensor<1>,
    silu: bool,
) -> Option<Tensor<4>> {
    let (x, affine) = read_with_affine(x, groups, eps, weight, bias)?;
    let [batch, c, h, wd] = super::dims4(&x);
    let plane = h * wd;
    let src: &[f32] = x.storage();
    let src = &src[..batch * c * plane];
    let mut out = super::zeros(x.layout().shape().clone());
    let dst: &mut [f32] = out.storage_mut();
    dst.par_chunks_mut(plane.max(1)).zip(src.par_chunks(plane.max(1))).zip(&affine).for_each(|((d, s), &(a, k))| {
        affine_silu(s, d, a, k, silu);
    });
    Some(super::into_tensor(out))
}

/// GroupNorm of `x` as one affine map per (image, channel), y = x·a + k: what a convolution
/// that normalises its input as it reads it needs (`conv3x3_with`). None where
/// [`group_norm`] would not run.
pub fn group_affine(
    x: &Tensor<4>,
    groups: usize,
    eps: f32,
    weight: &Tensor<1>,
    bias: &Tensor<1>,
) -> Option<Vec<(f32, f32)>> {
    read_with_affine(x, groups, eps, weight, bias).map(|(_, affine)| affine)
}

/// `x` as the contiguous flex tensor both passes read, and its [`group_affine`].
fn read_with_affine(
    x: &Tensor<4>,
    groups: usize,
    eps: f32,
    weight: &Tensor<1>,
    bias: &Tensor<1>,
) -> Option<(FlexTensor, Vec<(f32, f32)>)> {
    let x = super::contiguous(super::flex_f32(x)?);
    let (w, b) = (super::contiguous(super::flex_f32(weight)?), super::contiguous(super::flex_f32(bias)?));
    let [batch, c, h, wd] = super::dims4(&x);
    if groups == 0 || !c.is_multiple_of(groups) || w.layout().num_elements() != c || b.layout().num_elements() != c {
        return None;
    }
    let src: &[f32] = x.storage();
    let affine = affine_of(&src[..batch * c * h * wd], (batch, c, h * wd), groups, eps, w.storage(), b.storage());
    Some((x, affine))
}

/// Per (image, channel) `(a, k)` with a = w/σ and k = b − mean·w/σ of the channel's group.
fn affine_of(
    src: &[f32],
    (batch, c, plane): (usize, usize, usize),
    groups: usize,
    eps: f32,
    w: &[f32],
    b: &[f32],
) -> Vec<(f32, f32)> {
    let group_len = c / groups * plane;
    // Mean and 1/σ per (batch, group): deviations from the group's first value (against
    // cancellation), summed in f32 lanes per block and the blocks in f64.
    let stats: Vec<(f32, f32)> = src
        .par_chunks(group_len.max(1))
        .map(|g| {
            let pivot = g[0];
            let (mut sum, mut squares) = (0f64, 0f64);
            for block in g.chunks(4096) {
                let (s, q) = deviation_sums(block, pivot);
                sum += s as f64;
                squares += q as f64;
            }
            let n = g.len() as f64;
            let mean = sum / n;
            let var = (squares / n - mean * mean).max(0.0);
            ((pivot as f64 + mean) as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
        })
        .collect();
    (0..batch * c)
        .map(|i| {
            let (bi, ch) = (i / c, i % c);
            let (mean, inv) = stats[bi * groups + ch / (c / groups)];
            let a = inv * w[ch];
            (a, b[ch] - mean * a)
        })
        .collect()
}

/// Σ(x − pivot) and Σ(x − pivot)² of `block`.
fn deviation_sums(block: &[f32], pivot: f32) -> (f32, f32) {
    let (mut sum, mut squares) = (0.0, 0.0);
    lane_sums(block, pivot, &mut sum, &mut squares);
    (sum, squares)
}

simd_dispatch! {
    fn lane_sums(block: &[f32], pivot: f32, sum: &mut f32, squares: &mut f32) {
        // Sixteen lanes of partial sums, so that the loop vectorizes.
        let (mut s, mut q) = ([0f32; 16], [0f32; 16]);
        for chunk in block.chunks(16) {
            for ((&x, s), q) in chunk.iter().zip(s.iter_mut()).zip(q.iter_mut()) {
                let d = x - pivot;
                *s += d;
                *q += d * d;
            }
        }
        *sum = s.iter().sum();
        *squares = q.iter().sum();
    }
}

simd_dispatch! {
    /// y = x·a + k, then SiLU when `silu`, from `src` into `dst`: [`group_norm`]'s write pass,
    /// also what the convolution that normalises its input as it reads it applies.
    pub(super) fn affine_silu(src: &[f32], dst: &mut [f32], a: f32, k: f32, silu: bool) {
        if silu {
            for (d, &x) in dst.iter_mut().zip(src) {
                let y = x * a + k;
                *d = y / (1.0 + exp(-y));
            }
        } else {
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = x * a + k;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::tensor::Tensor;
    use burn::tensor::activation::silu;

    use crate::engine::layers::GroupNorm;

    use super::super::test_util::{max_diff, random};

    /// `layers::GroupNorm`'s own burn path.
    fn reference(x: Tensor<4>, groups: usize, w: &Tensor<1>, b: &Tensor<1>) -> Tensor<4> {
        let norm = GroupNorm { weight: Param::from_tensor(w.clone()), bias: Param::from_tensor(b.clone()), groups };
        norm.forward_burn(x)
    }

    #[test]
    fn matches_burns_group_norm_with_and_without_silu() {
        let x = random([2, 12, 5, 7]) * 3.0 + 1.5;
        let (w, b) = (random([12]), random([12]));
        let want = reference(x.clone(), 4, &w, &b);
        assert!(max_diff(super::group_norm(&x, 4, 1e-6, &w, &b, false).unwrap(), want.clone()) < 1e-5);
        assert!(max_diff(super::group_norm(&x, 4, 1e-6, &w, &b, true).unwrap(), silu(want)) < 1e-5);
    }
}
