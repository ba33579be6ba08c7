//! From fused q/k/v projections to attention heads in one pass: each token's query and key
//! heads are RMS-normalized, scaled and rotated (RoPE), and q, k and v are written head-major
//! [B, H, L, D] at the token's place in the joint sequence. burn's path takes a copy per
//! split, several passes per norm and rotation, and one more copy to join the streams.

use burn::tensor::{Shape, Tensor};
use burn_flex::FlexTensor;
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
    let mut plain = Vec::with_capacity(streams.len());
    for s in streams {
        plain.push(super::flex_f32(s.qkv)?);
    }
    let joint = Joint::of(plain, streams, heads, eps, (cos, sin))?;
    Some(joint.forward().map(super::into_tensor))
}

/// The operands of [`joint_heads`] as flex tensors, checked.
#[derive(Debug, Clone)]
pub(super) struct Joint {
    /// Per stream: its projections (rows of ≥ 3·H·D at unit column stride), its length, and
    /// its q and k norm scales (contiguous).
    pub sources: Vec<(FlexTensor, usize, FlexTensor, FlexTensor)>,
    pub cos: FlexTensor,
    pub sin: FlexTensor,
    pub batch: usize,
    pub heads: usize,
    pub eps: f32,
}

impl Joint {
    /// `qkv` are the streams' projections as flex tensors (the scales are read from `streams`).
    pub fn of(
        qkv: Vec<FlexTensor>,
        streams: &[HeadStream],
        heads: usize,
        eps: f32,
        (cos, sin): (&Tensor<4>, &Tensor<4>),
    ) -> Option<Self> {
        let (cos, sin) = (super::contiguous(super::flex_f32(cos)?), super::contiguous(super::flex_f32(sin)?));
        let [_, _, total, d] = cos.layout().shape().dims::<4>();
        // Pairs rotate together: an odd head size has no RoPE (burn's path refuses it too).
        if sin.layout().shape() != cos.layout().shape() || !d.is_multiple_of(2) {
            return None;
        }
        let batch = streams.first()?.qkv.dims()[0];
        let hd = heads * d;
        let mut sources = Vec::with_capacity(streams.len());
        for (s, mut x) in streams.iter().zip(qkv) {
            let [b, l, w] = s.qkv.dims();
            if b != batch || w < 3 * hd || s.q_scale.dims() != [d] || s.k_scale.dims() != [d] {
                return None;
            }
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
        Some(Joint { sources, cos, sin, batch, heads, eps })
    }

    /// (total length, head size).
    fn dims(&self) -> (usize, usize) {
        let [_, _, total, d] = self.cos.layout().shape().dims::<4>();
        (total, d)
    }

    /// Calls `f(stream, (batch, index in the stream), the token's row of projections, offset
    /// of its (batch, head 0, position) row in a [B, H, ΣL, D] tensor, cos, sin)` for every
    /// token of every stream, in parallel.
    #[allow(clippy::type_complexity)]
    fn for_each_token(&self, f: impl Fn(usize, (usize, usize), &[f32], usize, &[f32], &[f32]) + Sync) {
        let (total, d) = self.dims();
        let (cos, sin): (&[f32], &[f32]) = (self.cos.storage(), self.sin.storage());
        let mut at = 0;
        for (i, (x, len, _, _)) in self.sources.iter().enumerate() {
            let st = x.layout().strides();
            let (s0, s1, off) = (st[0] as usize, st[1] as usize, x.layout().start_offset());
            let data: &[f32] = x.storage();
            (0..self.batch * len).into_par_iter().for_each(|task| {
                let (b, l) = (task / len, task % len);
                let row = &data[off + b * s0 + l * s1..][..3 * self.heads * d];
                let pos = at + l;
                f(i, (b, l), row, (b * self.heads * total + pos) * d, &cos[pos * d..][..d], &sin[pos * d..][..d]);
            });
            at += len;
        }
    }

    /// q, k and v [B, H, ΣL, D] (see [`joint_heads`]).
    pub fn forward(&self) -> [FlexTensor; 3] {
        let (total, d) = self.dims();
        let (heads, hd, eps) = (self.heads, self.heads * d, self.eps);
        let mut outs = [0, 1, 2].map(|_| super::zeros(Shape::new([self.batch, heads, total, d])));
        let [q_ptr, k_ptr, v_ptr] = outs.each_mut().map(|o| SharedMut(o.storage_mut::<f32>().as_mut_ptr()));
        self.for_each_token(|i, _, row, dst, c, s| {
            let (q_scale, k_scale): (&[f32], &[f32]) = (self.sources[i].2.storage(), self.sources[i].3.storage());
            for h in 0..heads {
                let dst = dst + h * total * d;
                // SAFETY: (b, h, pos) rows of the outputs belong to this token alone, and
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
        outs
    }

    /// The gradient at each stream's projections (contiguous, of the stream's own shape, zero
    /// past its first 3·H·D columns) given `grads` at q, k and v (contiguous [B, H, ΣL, D]).
    pub fn backward(&self, grads: &[FlexTensor; 3]) -> Vec<FlexTensor> {
        let (total, d) = self.dims();
        let (heads, hd, eps) = (self.heads, self.heads * d, self.eps);
        let mut outs: Vec<FlexTensor> =
            self.sources.iter().map(|(x, ..)| super::zeros(x.layout().shape().clone())).collect();
        let ptrs: Vec<SharedMut> = outs.iter_mut().map(|o| SharedMut(o.storage_mut::<f32>().as_mut_ptr())).collect();
        let [gq, gk, gv] = grads.each_ref().map(|g| g.storage::<f32>());
        self.for_each_token(|i, (b, l), row, src, c, s| {
            let (q_scale, k_scale): (&[f32], &[f32]) = (self.sources[i].2.storage(), self.sources[i].3.storage());
            let (len, w) = (self.sources[i].1, self.sources[i].0.layout().shape().dims::<3>()[2]);
            // SAFETY: row (b, l) of this stream's gradient is this token's alone.
            let out = unsafe { std::slice::from_raw_parts_mut(ptrs[i].at((b * len + l) * w), 3 * hd) };
            for h in 0..heads {
                let g = src + h * total * d;
                norm_rope_grad(&row[h * d..][..d], q_scale, c, s, eps, &gq[g..][..d], &mut out[h * d..][..d]);
                norm_rope_grad(&row[hd + h * d..][..d], k_scale, c, s, eps, &gk[g..][..d], &mut out[hd + h * d..][..d]);
                out[2 * hd + h * d..][..d].copy_from_slice(&gv[g..][..d]);
            }
        });
        outs
    }
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

simd_dispatch! {
    /// The gradient at `x` of [`norm_rope`] given `grad` at its output: the rotation's
    /// transpose, then the RMS norm's: with u = scale ⊙ g and r = 1/√(mean x² + eps),
    /// dx = r·u − r³·x·(u·x)/D.
    fn norm_rope_grad(x: &[f32], scale: &[f32], cos: &[f32], sin: &[f32], eps: f32, grad: &[f32], out: &mut [f32]) {
        let n = x.len() as f32;
        let mean_square = x.iter().map(|v| v * v).sum::<f32>() / n;
        let inv = 1.0 / (mean_square + eps).sqrt();
        let mut dot = 0.0;
        for (j, o) in (0..x.len()).step_by(2).zip(out.chunks_exact_mut(2)) {
            let (g0, g1) = (grad[j], grad[j + 1]);
            let u0 = (g0 * cos[j] + g1 * sin[j + 1]) * scale[j];
            let u1 = (g0 * sin[j] + g1 * cos[j + 1]) * scale[j + 1];
            dot += u0 * x[j] + u1 * x[j + 1];
            o[0] = u0;
            o[1] = u1;
        }
        let k = inv * inv * inv * dot / n;
        for (o, &x) in out.iter_mut().zip(x) {
            *o = inv * *o - k * x;
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
