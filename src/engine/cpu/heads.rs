//! From fused q/k/v projections to attention heads in one pass: each token's query and key
//! heads are RMS-normalized, scaled and rotated (RoPE), and q, k and v are written head-major
//! [B, H, L, D] at the token's place in the joint sequence. burn's path takes a copy per
//! split, several passes per norm and rotation, and one more copy to join the streams.

use burn::tensor::{Shape, Tensor};
use rayon::prelude::*;

use super::SharedMut;
use super::math::simd_dispatch;

/// One stream's projections and its query/key norm scales.
pub struct HeadStream<'a> {
    /// [B, L, ≥ 3·H·D]: q, k and v (each H heads of D) in its first 3·H·D columns.
    pub qkv: &'a Tensor<3>,
    pub q_scale: &'a Tensor<1>,
    pub k_scale: &'a Tensor<1>,
}

/// q, k and v [B, H, ΣL, D] for `streams` joined in order along the sequence, q and k
/// normalized (`eps`) and rotated by the RoPE tables `cos`/`sin` [1, 1, ΣL, D] (see
/// `flux::rope::Rope`).
pub fn joint_heads(
    streams: &[HeadStream],
    heads: usize,
    eps: f32,
    cos: &Tensor<4>,
    sin: &Tensor<4>,
) -> Option<[Tensor<4>; 3]> {
    let (cos, sin) = (super::contiguous(super::flex_f32(cos)?), super::contiguous(super::flex_f32(sin)?));
    let [_, _, total, d] = cos.layout().shape().dims::<4>();
    // Pairs rotate together: an odd head size has no RoPE (burn's path refuses it too).
    if sin.layout().shape() != cos.layout().shape() || !d.is_multiple_of(2) {
        return None;
    }
    let first = streams.first()?;
    let batch = first.qkv.dims()[0];
    let hd = heads * d;
    let mut sources = Vec::with_capacity(streams.len());
    for s in streams {
        let [b, l, w] = s.qkv.dims();
        if b != batch || w < 3 * hd || s.q_scale.dims() != [d] || s.k_scale.dims() != [d] {
            return None;
        }
        let mut x = super::flex_f32(s.qkv)?;
        let st = x.layout().strides();
        if st[2] != 1 || st[0] < 0 || st[1] < 0 {
            x = super::contiguous(x);
        }
        let qs = super::contiguous(super::flex_f32(s.q_scale)?);
        let ks = super::contiguous(super::flex_f32(s.k_scale)?);
        sources.push((x, l, qs, ks));
    }
    if sources.iter().map(|s| s.1).sum::<usize>() != total {
        return None;
    }
    let shape = Shape::new([batch, heads, total, d]);
    let mut outs = [0, 1, 2].map(|_| super::zeros(shape.clone()));
    let [q_ptr, k_ptr, v_ptr] = outs.each_mut().map(|o| SharedMut(o.storage_mut::<f32>().as_mut_ptr()));
    let (cos_d, sin_d): (&[f32], &[f32]) = (cos.storage(), sin.storage());
    let mut at = 0;
    for (x, len, qs, ks) in &sources {
        let (q_scale, k_scale): (&[f32], &[f32]) = (qs.storage(), ks.storage());
        let st = x.layout().strides();
        let (s0, s1, off) = (st[0] as usize, st[1] as usize, x.layout().start_offset());
        let data: &[f32] = x.storage();
        (0..batch * len).into_par_iter().for_each(|task| {
            let (b, l) = (task / len, task % len);
            let row = &data[off + b * s0 + l * s1..][..3 * hd];
            let pos = at + l;
            let (c, s) = (&cos_d[pos * d..][..d], &sin_d[pos * d..][..d]);
            for h in 0..heads {
                let dst = ((b * heads + h) * total + pos) * d;
                // SAFETY: (b, h, pos) rows of the outputs belong to this task alone, and
                // `dst + d` stays inside [B, H, ΣL, D].
                let (q, k, v) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(q_ptr.at(dst), d),
                        std::slice::from_raw_parts_mut(k_ptr.at(dst), d),
                        std::slice::from_raw_parts_mut(v_ptr.at(dst), d),
                    )
                };
                norm_rope(&row[h * d..][..d], q_scale, c, s, eps, q);
                norm_rope(&row[hd + h * d..][..d], k_scale, c, s, eps, k);
                v.copy_from_slice(&row[2 * hd + h * d..][..d]);
            }
        });
        at += len;
    }
    Some(outs.map(super::into_tensor))
}

simd_dispatch! {
    fn norm_rope(x: &[f32], scale: &[f32], cos: &[f32], sin: &[f32], eps: f32, out: &mut [f32]) {
        let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let inv = 1.0 / (mean_square + eps).sqrt();
        for (i, o) in out.chunks_exact_mut(2).enumerate() {
            let j = 2 * i;
            let (x0, x1) = (x[j] * inv * scale[j], x[j + 1] * inv * scale[j + 1]);
            // sin holds (−sinθ, +sinθ) per pair: (x0·cos − x1·sin, x1·cos + x0·sin).
            o[0] = x0 * cos[j] + x1 * sin[j];
            o[1] = x1 * cos[j + 1] + x0 * sin[j + 1];
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use super::super::test_util::{max_diff, random};
    use crate::engine::flux::model::rms_norm;
    use crate::engine::flux::rope::{Rope, image_ids, text_ids};

    /// burn's path for one stream at `at` of the joint sequence: `flux::model`'s own split and
    /// q/k RMSNorm, then RoPE.
    fn reference(
        qkv: &Tensor<3>,
        heads: usize,
        qs: &Tensor<1>,
        ks: &Tensor<1>,
        rope: &Rope,
        at: usize,
    ) -> [Tensor<4>; 3] {
        let [b, l, _] = qkv.dims();
        let hd = heads * qs.dims()[0];
        let head = |i: usize| qkv.clone().narrow(2, i * hd, hd).reshape([b, l, heads, hd / heads]).swap_dims(1, 2);
        let part = |t: &Tensor<4>| t.clone().narrow(2, at, l);
        let rope_part = Rope { cos: part(&rope.cos), sin: part(&rope.sin) };
        [rope_part.apply(rms_norm(head(0), qs)), rope_part.apply(rms_norm(head(1), ks)), head(2)]
    }

    #[test]
    fn joins_two_streams_like_burns_split_norm_rope_and_cat() {
        let (heads, d) = (2, 16);
        let txt = random([2, 5, 3 * heads * d]);
        // The single blocks' case: q/k/v are the first columns of a wider projection.
        let img = random([2, 12, 3 * heads * d + 40]).narrow(2, 0, 3 * heads * d + 10);
        let (tq, tk) = (random([d]), random([d]));
        let (iq, ik) = (random([d]), random([d]));
        let mut ids = text_ids(5);
        ids.extend(image_ids(3, 4));
        let rope = Rope::new(&ids, &[4, 6, 6], 10_000.0, &burn::tensor::Device::flex());
        let streams = [
            super::HeadStream { qkv: &txt, q_scale: &tq, k_scale: &tk },
            super::HeadStream { qkv: &img, q_scale: &iq, k_scale: &ik },
        ];
        let ours = super::joint_heads(&streams, heads, 1e-6, &rope.cos, &rope.sin).unwrap();
        let t = reference(&txt, heads, &tq, &tk, &rope, 0);
        let i = reference(&img, heads, &iq, &ik, &rope, 5);
        for (n, (ours, (t, i))) in ours.into_iter().zip(t.into_iter().zip(i)).enumerate() {
            let want = Tensor::cat(vec![t, i], 2);
            let diff = max_diff(ours, want);
            assert!(diff < 1e-5, "part {n}: {diff}");
        }
    }
}
