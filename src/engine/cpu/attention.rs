//! Scaled dot-product attention, parallel over (batch, head, block of query rows): each task
//! computes its rows' full score matrix with one matrix product, a vectorized softmax, and a
//! second product straight into the merged-heads output [B, L, H·D]. burn's CPU path tiles
//! over keys with a scalar `exp` and leaves the heads to be merged by a copy.

use burn::tensor::{Shape, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::math::{exp, simd_dispatch};
use super::{SharedMut, Strided, matmul};

/// Query rows per block of the backward (see [`backward`]).
const BACKWARD_ROWS: usize = 256;

/// Bytes of probabilities (every head of one call) up to which attention under autodiff keeps
/// them from its forward for the backward, instead of the backward recomputing them (one
/// product and a softmax of five): a medium block at 512² holds 6 heads × 1152² = 32 MiB; FLUX
/// at 1024² (24 heads × 4608², 2 GiB) recomputes.
pub(super) const KEEP_PROBABILITIES: usize = 64 << 20;

/// Query rows per task: the task's scores (rows × keys) stay in the core's L2 cache for the
/// sequence lengths FLUX uses (4096 keys: 1 MiB).
const ROWS: usize = 64;

/// Strides (in elements) of a [B, H, L, D] view.
#[derive(Clone, Copy)]
struct Strides([isize; 4]);

fn strides(t: &FlexTensor) -> Strides {
    let s = t.layout().strides();
    Strides([s[0], s[1], s[2], s[3]])
}

/// softmax(q·kᵀ/√D)·v for q, k, v of [B, H, L, D] (any strides); returns [B, L_q, H·D].
/// `bf16`: both products on AMX tiles with their operands rounded to bf16 (as torch's bf16
/// attention), scores and softmax in f32, where the CPU has AMX and the shapes are whole tiles
/// (`--dtype bf16` on the CPU: the model's Linears are tiles too).
pub fn attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, bf16: bool) -> Option<Tensor<3>> {
    let (q, k, v) = (super::flex_f32(q)?, super::flex_f32(k)?, super::flex_f32(v)?);
    forward(&q, &k, &v, bf16).map(super::into_tensor)
}

/// Whether [`forward`] and [`backward`] take these f32 operands: q [B, H, Lq, D], k and v
/// [B, H, Lk, D] with Lk > 0, no negative strides (flips are not expected here).
pub(super) fn supported(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> bool {
    let [b, h, _, d] = super::dims4(q);
    let [kb, kh, lk, kd] = super::dims4(k);
    [kb, kh, kd] == [b, h, d]
        && super::dims4(v) == [b, h, lk, d]
        && lk > 0
        && [q, k, v].iter().all(|t| t.layout().strides().iter().all(|&s| s >= 0))
}

/// [`attention`] of flex tensors.
pub(super) fn forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, bf16: bool) -> Option<FlexTensor> {
    if !supported(q, k, v) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if bf16 && super::amx::available() {
        let (d, lk) = (super::dims4(q)[3], super::dims4(k)[2]);
        if super::amx::fits(lk, d) && q.layout().strides()[3] == 1 {
            return Some(tiled(q, k, v));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bf16;
    Some(forward_f32(q, k, v, None))
}

/// [`forward`] in f32 that also returns the probabilities P [B, H, Lq, Lk] for [`backward`].
pub(super) fn forward_keeping(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> Option<(FlexTensor, FlexTensor)> {
    if !supported(q, k, v) {
        return None;
    }
    let [b, h, lq, _] = super::dims4(q);
    let lk = super::dims4(k)[2];
    let mut out = None;
    // SAFETY: the forward writes every row of every (batch, head)'s probabilities.
    let p = unsafe { super::written(b * h * lq * lk, |p| out = Some(forward_f32(q, k, v, Some(SharedMut(p))))) };
    Some((out?, super::from_vec(p, Shape::new([b, h, lq, lk]))))
}

/// The f32 attention of supported operands; with `keep`, the normalised probabilities are
/// also written there ([B, H, Lq, Lk] contiguous).
fn forward_f32(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, keep: Option<SharedMut>) -> FlexTensor {
    let [b, h, lq, d] = super::dims4(q);
    let lk = super::dims4(k)[2];
    let mut out = super::zeros(Shape::new([b, lq, h * d]));
    let dst = SharedMut(out.storage_mut::<f32>().as_mut_ptr());
    let (qs, ks, vs) = (strides(q), strides(k), strides(v));
    let (qo, ko, vo) = (q.layout().start_offset(), k.layout().start_offset(), v.layout().start_offset());
    let (qd, kd, vd): (&[f32], &[f32], &[f32]) = (q.storage(), k.storage(), v.storage());
    let scale = 1.0 / (d as f32).sqrt();
    let blocks = lq.div_ceil(ROWS);
    (0..b * h * blocks).into_par_iter().for_each_init(Vec::new, |scores: &mut Vec<f32>, task| {
        let (bh, block) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / h, bh % h);
        let row0 = block * ROWS;
        let rows = ROWS.min(lq - row0);
        scores.resize(rows * lk, 0.0);
        let at = |o: usize, s: Strides, row: usize| {
            o as isize + bi as isize * s.0[0] + hi as isize * s.0[1] + row as isize * s.0[2]
        };
        // SAFETY: the offsets address elements of each tensor's own storage (its layout's
        // start, strides and shape); the output rows (bi, row0..row0+rows, hi·D..hi·D+D)
        // belong to this task alone.
        unsafe {
            // scores[rows, lk] = scale · q[rows, D] · k[lk, D]ᵀ
            matmul(
                rows,
                lk,
                d,
                Strided { ptr: scores.as_mut_ptr(), row: lk as isize, col: 1 },
                false,
                Strided { ptr: qd.as_ptr().offset(at(qo, qs, row0)), row: qs.0[2], col: qs.0[3] },
                Strided { ptr: kd.as_ptr().offset(at(ko, ks, 0)), row: ks.0[3], col: ks.0[2] },
                scale,
                false,
            );
        }
        let mut sums = softmax_rows(scores, lk);
        if let Some(keep) = keep {
            // Normalised before the product, and kept (rows of this task's (b, h) only).
            for (r, (row, sum)) in scores.chunks_mut(lk).zip(sums.iter_mut()).enumerate() {
                let inv = 1.0 / *sum;
                row.iter_mut().for_each(|x| *x *= inv);
                *sum = 1.0;
                // SAFETY: row (bh, row0 + r) of the [B·H, Lq, Lk] probabilities is this task's.
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), keep.at((bh * lq + row0 + r) * lk), lk) };
            }
        }
        let out_row = |row: usize| (bi * lq + row) * h * d + hi * d;
        unsafe {
            // out[rows, D] = p[rows, lk] · v[lk, D], unnormalized
            matmul(
                rows,
                d,
                lk,
                Strided { ptr: dst.at(out_row(row0)), row: (h * d) as isize, col: 1 },
                false,
                Strided { ptr: scores.as_ptr(), row: lk as isize, col: 1 },
                Strided { ptr: vd.as_ptr().offset(at(vo, vs, 0)), row: vs.0[2], col: vs.0[3] },
                1.0,
                false,
            );
            for (r, sum) in sums.into_iter().enumerate() {
                let row = std::slice::from_raw_parts_mut(dst.at(out_row(row0 + r)), d);
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
            }
        }
    });
    out
}

/// The gradients of [`forward`] (f32) at q, k and v given `grad` at its merged output
/// [B, Lq, H·D]: per (batch, head) the probabilities P, `kept` by [`forward_keeping`] or else
/// recomputed (one product and a softmax, as flash attention's backward does), then
/// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP)), dQ = s·dS·K, dK = s·dSᵀ·Q, every
/// operand read in place at its strides. The gradients come back contiguous [B, H, L, D].
pub(super) fn backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    kept: Option<&FlexTensor>,
    grad: FlexTensor,
) -> [FlexTensor; 3] {
    let [b, h, lq, d] = super::dims4(q);
    let lk = super::dims4(k)[2];
    let grad = super::contiguous(grad);
    let mut dq = super::zeros(Shape::new([b, h, lq, d]));
    let mut dk = super::zeros(Shape::new([b, h, lk, d]));
    let mut dv = super::zeros(Shape::new([b, h, lk, d]));
    let (dq_at, dk_at, dv_at) = (
        SharedMut(dq.storage_mut::<f32>().as_mut_ptr()),
        SharedMut(dk.storage_mut::<f32>().as_mut_ptr()),
        SharedMut(dv.storage_mut::<f32>().as_mut_ptr()),
    );
    let (qs, ks, vs) = (strides(q), strides(k), strides(v));
    let (qo, ko, vo) = (q.layout().start_offset(), k.layout().start_offset(), v.layout().start_offset());
    let (qd, kd, vd): (&[f32], &[f32], &[f32]) = (q.storage(), k.storage(), v.storage());
    let gd: &[f32] = grad.storage();
    let kept: Option<&[f32]> = kept.map(|p| p.storage());
    let scale = 1.0 / (d as f32).sqrt();
    let buffers = || (Vec::new(), Vec::new());
    (0..b * h).into_par_iter().for_each_init(buffers, |(p, dp): &mut (Vec<f32>, Vec<f32>), bh| {
        let (bi, hi) = (bh / h, bh % h);
        let at = |o: usize, s: Strides| o as isize + bi as isize * s.0[0] + hi as isize * s.0[1];
        // Blocks of query rows keep the two score-sized buffers at BACKWARD_ROWS × lk (4096
        // keys: 8 MiB per thread) instead of lq × lk; dK and dV accumulate over the blocks.
        for row0 in (0..lq).step_by(BACKWARD_ROWS) {
            let rows = BACKWARD_ROWS.min(lq - row0);
            if kept.is_none() {
                p.resize(rows * lk, 0.0);
            }
            dp.resize(rows * lk, 0.0);
            // SAFETY: q, k, v are read at their layouts' offsets and strides; the gradient
            // `grad` is the contiguous [B, Lq, H·D] (this head's dO: rows at stride H·D from
            // hi·D); p and dp hold rows × lk; the (bi, hi) slices of dq, dk, dv (contiguous)
            // are this task's.
            unsafe {
                let (qp, kp, vp) = (
                    qd.as_ptr().offset(at(qo, qs) + row0 as isize * qs.0[2]),
                    kd.as_ptr().offset(at(ko, ks)),
                    vd.as_ptr().offset(at(vo, vs)),
                );
                let q_rows = Strided { ptr: qp, row: qs.0[2], col: qs.0[3] };
                let k_rows = Strided { ptr: kp, row: ks.0[2], col: ks.0[3] };
                let d_out =
                    Strided { ptr: gd.as_ptr().add((bi * lq + row0) * h * d + hi * d), row: (h * d) as isize, col: 1 };
                let own = |at: SharedMut, l: usize, first: usize| Strided {
                    ptr: at.at((bh * l + first) * d),
                    row: d as isize,
                    col: 1,
                };
                let accumulate = row0 > 0;
                // P for these rows: kept, or softmax(s·Q·Kᵀ) again
                let p: &[f32] = match kept {
                    Some(kept) => &kept[(bh * lq + row0) * lk..][..rows * lk],
                    None => {
                        let transposed_k = Strided { ptr: kp, row: ks.0[3], col: ks.0[2] };
                        let p_out = Strided { ptr: p.as_mut_ptr(), row: lk as isize, col: 1 };
                        matmul(rows, lk, d, p_out, false, q_rows, transposed_k, scale, false);
                        let sums = softmax_rows(p, lk);
                        for (row, sum) in p.chunks_mut(lk).zip(sums) {
                            let inv = 1.0 / sum;
                            row.iter_mut().for_each(|x| *x *= inv);
                        }
                        p
                    }
                };
                let p_cols = Strided { ptr: p.as_ptr(), row: 1, col: lk as isize };
                // dV += Pᵀ·dO
                matmul(lk, d, rows, own(dv_at, lk, 0), accumulate, p_cols, d_out, 1.0, false);
                // dP = dO·Vᵀ, then dS in place
                let transposed_v = Strided { ptr: vp, row: vs.0[3], col: vs.0[2] };
                let dp_out = Strided { ptr: dp.as_mut_ptr(), row: lk as isize, col: 1 };
                matmul(rows, lk, d, dp_out, false, d_out, transposed_v, 1.0, false);
                for (ds, p) in dp.chunks_mut(lk).zip(p.chunks(lk)) {
                    softmax_grad_row(p, ds);
                }
                let ds_rows = Strided { ptr: dp.as_ptr(), row: lk as isize, col: 1 };
                let ds_cols = Strided { ptr: dp.as_ptr(), row: 1, col: lk as isize };
                // dQ = s·dS·K for these rows, dK += s·dSᵀ·Q
                matmul(rows, d, lk, own(dq_at, lq, row0), false, ds_rows, k_rows, scale, false);
                matmul(lk, d, rows, own(dk_at, lk, 0), accumulate, ds_cols, q_rows, scale, false);
            }
        }
    });
    [dq, dk, dv]
}

simd_dispatch! {
    /// dS = P ⊙ (dP − Σ P ⊙ dP) over one row, in place of dP.
    fn softmax_grad_row(p: &[f32], dp: &mut [f32]) {
        let mut acc = [0f32; 16];
        for (p, dp) in p.chunks(16).zip(dp.chunks(16)) {
            for ((p, dp), a) in p.iter().zip(dp).zip(acc.iter_mut()) {
                *a += p * dp;
            }
        }
        let dot: f32 = acc.iter().sum();
        for (p, dp) in p.iter().zip(dp.iter_mut()) {
            *dp = p * (*dp - dot);
        }
    }
}

/// [`attention`] on AMX tiles: per (batch, head) the keys and values in the tile layout, then
/// per block of query rows scores = q·kᵀ (bf16 products, f32 sums), the f32 softmax, and
/// p·v (p rounded to bf16) straight into the merged heads.
#[cfg(target_arch = "x86_64")]
fn tiled(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> FlexTensor {
    use super::amx;
    let [b, h, lq, d] = super::dims4(q);
    let lk = super::dims4(k)[2];
    let (qs, ks, vs) = (strides(q), strides(k), strides(v));
    let (qo, ko, vo) = (q.layout().start_offset(), k.layout().start_offset(), v.layout().start_offset());
    let (qd, kd, vd): (&[f32], &[f32], &[f32]) = (q.storage(), k.storage(), v.storage());
    let at = |o: usize, s: Strides, (bi, hi, row, col): (usize, usize, usize, usize)| {
        (o as isize + bi as isize * s.0[0] + hi as isize * s.0[1] + row as isize * s.0[2] + col as isize * s.0[3])
            as usize
    };
    // keys: output n = key, input = channel; values: output = channel, input = key.
    let operands: Vec<(Vec<u16>, Vec<u16>)> = (0..b * h)
        .into_par_iter()
        .map(|bh| {
            let (bi, hi) = (bh / h, bh % h);
            let keys = amx::tiles_of(lk, d, |n, c| kd[at(ko, ks, (bi, hi, n, c))]);
            let values = amx::tiles_of(d, lk, |c, n| vd[at(vo, vs, (bi, hi, n, c))]);
            (keys, values)
        })
        .collect();
    let mut out = super::zeros(Shape::new([b, lq, h * d]));
    let dst = SharedMut(out.storage_mut::<f32>().as_mut_ptr());
    let scale = 1.0 / (d as f32).sqrt();
    let blocks = lq.div_ceil(ROWS);
    (0..b * h * blocks).into_par_iter().for_each_init(Vec::new, |scores: &mut Vec<f32>, task| {
        let (bh, block) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / h, bh % h);
        let (keys, values) = &operands[bh];
        let row0 = block * ROWS;
        let rows = ROWS.min(lq - row0);
        scores.resize(rows * lk, 0.0);
        let q_rows = &qd[at(qo, qs, (bi, hi, row0, 0))..];
        // SAFETY: q rows are `d` contiguous values at the row stride (checked by the caller);
        // `scores` holds rows × lk; the output rows (bi, row0.., hi·D..hi·D+D) are this task's.
        unsafe { amx::product_rows(q_rows, (rows, d, qs.0[2] as usize), keys, lk, (scores.as_mut_ptr(), lk)) };
        scores.iter_mut().for_each(|x| *x *= scale);
        let sums = softmax_rows(scores, lk);
        let out_row = |row: usize| (bi * lq + row) * h * d + hi * d;
        unsafe {
            amx::product_rows(scores, (rows, lk, lk), values, d, (dst.at(out_row(row0)), h * d));
            for (r, sum) in sums.into_iter().enumerate() {
                let row = std::slice::from_raw_parts_mut(dst.at(out_row(row0 + r)), d);
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
            }
        }
    });
    out
}

/// Each row of `scores` (rows of `len`) becomes exp(x − max); returns the rows' sums.
fn softmax_rows(scores: &mut [f32], len: usize) -> Vec<f32> {
    scores.chunks_mut(len).map(softmax_row).collect()
}

fn softmax_row(row: &mut [f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    exp_shifted(row, max, &mut sum);
    sum
}

simd_dispatch! {
    fn exp_shifted(row: &mut [f32], max: f32, sum: &mut f32) {
        // Sixteen partial sums so the loop vectorizes (a single accumulator would be serial).
        let mut acc = [0f32; 16];
        for chunk in row.chunks_mut(16) {
            for (x, a) in chunk.iter_mut().zip(acc.iter_mut()) {
                *x = exp(*x - max);
                *a += *x;
            }
        }
        *sum = acc.iter().sum();
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::attention as burn_attention;

    use super::super::test_util::{max_diff, random};

    fn reference(
        q: burn::tensor::Tensor<4>,
        k: burn::tensor::Tensor<4>,
        v: burn::tensor::Tensor<4>,
    ) -> burn::tensor::Tensor<3> {
        let x = burn_attention(q, k, v, None, None, Default::default());
        let [b, h, l, d] = x.dims();
        x.swap_dims(1, 2).reshape([b, l, h * d])
    }

    #[test]
    fn kept_probabilities_give_the_recomputed_ones_gradients() {
        use burn_flex::FlexTensor;
        let flex = |t: &burn::tensor::Tensor<4>| super::super::flex_f32(t).unwrap();
        // 300 query rows: two blocks of the backward, the last ragged; 70 keys.
        let (q, k, v) = (flex(&random([2, 3, 300, 16])), flex(&random([2, 3, 70, 16])), flex(&random([2, 3, 70, 16])));
        let grad = super::super::flex_f32(&random::<3>([2, 300, 48])).unwrap();
        let diff = |a: &FlexTensor, b: &FlexTensor| {
            let (a, b): (&[f32], &[f32]) = (a.storage(), b.storage());
            a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
        };
        let plain = super::forward(&q, &k, &v, false).unwrap();
        let (out, p) = super::forward_keeping(&q, &k, &v).unwrap();
        assert!(diff(&plain, &out) < 1e-5, "{}", diff(&plain, &out));
        let recomputed = super::backward(&q, &k, &v, None, grad.clone());
        let kept = super::backward(&q, &k, &v, Some(&p), grad);
        for (a, b) in recomputed.iter().zip(&kept) {
            assert!(diff(a, b) < 1e-5, "{}", diff(a, b));
        }
    }

    #[test]
    fn matches_burns_attention_with_ragged_blocks() {
        // 150 query rows: two full blocks of 64 and a ragged one; 90 keys.
        let (q, k, v) = (random([2, 3, 150, 16]), random([2, 3, 90, 16]) * 2.0, random([2, 3, 90, 16]));
        let ours = super::attention(&q, &k, &v, false).unwrap();
        assert!(max_diff(ours, reference(q, k, v)) < 1e-5);
    }

    #[test]
    fn bf16_tiles_stay_within_bf16_rounding_of_burns_attention() {
        // Whole tiles (64 channels, 96 keys) with a ragged last query block (150 rows), read
        // as strided views; without AMX the f32 path answers and the bound holds all the more.
        let (q, k, v) = (random([1, 150, 2, 64]), random([1, 96, 2, 64]), random([1, 96, 2, 64]));
        let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2) * 0.5, v.swap_dims(1, 2));
        let ours = super::attention(&q, &k, &v, true).unwrap();
        let diff = max_diff(ours, reference(q, k, v));
        eprintln!("bf16 attention (AMX: {}): largest difference {diff:.1e}", super::super::amx::available());
        // Operands rounded to bf16 (relative 2^-9) in sums of 64 products of unit values.
        assert!(diff < 3e-2, "{diff}");
        if super::super::amx::available() {
            assert!(diff > 1e-5, "the tiles round to bf16: an f32-exact answer means they were not used");
        }
    }

    #[test]
    fn reads_strided_views_in_place() {
        // [B, L, H, D] storage viewed as [B, H, L, D], as heads split from a fused projection.
        let (q, k, v) = (random([1, 70, 2, 8]), random([1, 70, 2, 8]), random([1, 70, 2, 8]));
        let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
        let ours = super::attention(&q, &k, &v, false).unwrap();
        assert!(max_diff(ours, reference(q, k, v)) < 1e-5);
    }
}
