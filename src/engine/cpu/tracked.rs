//! The fused kernels under autodiff, for LoRA training on the CPU backend: each op runs its
//! forward as inference does (one fused pass) and registers one hand-written backward, where
//! burn's path would record a chain of element-wise ops (GELU: seven), each keeping its inputs
//! and each run again backwards. The frozen base weights are constants here: only the
//! activation's gradient is computed. Every op answers `None` unless its activation is an f32
//! tensor of the CPU backend under autodiff and its weights are plain (untracked) f32 tensors;
//! full training, whose weights are leaves, keeps burn's path.

use burn::tensor::{DType, Tensor};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn_backend::BackendTypes;
use burn_flex::{Flex, FlexTensor};

type Tracked = Autodiff<Flex, NoCheckpointing>;
type TrackedTensor = <Tracked as BackendTypes>::FloatTensorPrimitive;

/// The autodiff tensor behind `x`, when `x` is an f32 tensor of the CPU backend under autodiff.
fn tracked_f32<const D: usize>(x: &Tensor<D>) -> Option<TrackedTensor> {
    if x.dtype() != DType::F32 {
        return None;
    }
    x.clone().try_into_primitive::<Tracked>().ok()
}

/// The operands of an op that takes several activations, as autodiff tensors, when they are
/// f32 tensors of the CPU backend and at least one is under autodiff: plain ones (a constant
/// such as the first block's input, whose embedders are not trained) become untracked leaves.
fn tracked_operands<const D: usize, const N: usize>(xs: [&Tensor<D>; N]) -> Option<[TrackedTensor; N]> {
    if !xs.iter().any(|x| x.is_autodiff()) {
        return None;
    }
    let mut out = Vec::with_capacity(N);
    for x in xs {
        let x = if x.is_autodiff() { x.clone() } else { x.clone().autodiff() };
        out.push(tracked_f32(&x)?);
    }
    out.try_into().ok()
}

fn into_tensor<const D: usize>(t: TrackedTensor) -> Tensor<D> {
    Tensor::from_primitive::<Tracked>(t)
}

/// Registers a one-input op: `output` computed from `input`, whose gradient `backward` gives
/// from the output's (with `state`, kept only when the input is tracked).
fn unary_op<const D: usize, Op>(op: Op, input: &TrackedTensor, state: Op::State, output: FlexTensor) -> Tensor<D>
where
    Op: Backward<Flex, 1>,
{
    into_tensor(match op.prepare::<NoCheckpointing>([input.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    })
}

/// GELU (tanh approximation) under autodiff; the input is kept for the backward.
pub fn gelu_tanh<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    #[derive(Debug)]
    struct GeluTanh;
    impl Backward<Flex, 1> for GeluTanh {
        type State = FlexTensor;
        fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let input = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |grad| super::gelu::backward(&input, grad));
        }
    }
    let t = tracked_f32(x)?;
    let input = t.primitive().clone();
    let out = super::gelu::forward(input.clone())?;
    Some(unary_op(GeluTanh, &t, input, out))
}

/// x·W + b under autodiff with W [K, N] and b constants (a frozen base Linear): the forward is
/// the inference kernel (bias fused, views read in place), the backward one product
/// grad·Wᵀ reading W in place; W and b get no gradient.
pub fn linear<const D: usize>(x: &Tensor<D>, weight: &Tensor<2>, bias: Option<&Tensor<1>>) -> Option<Tensor<D>> {
    #[derive(Debug)]
    struct FrozenLinear;
    impl Backward<Flex, 1> for FrozenLinear {
        type State = FlexTensor;
        fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let weight = ops.state;
            unary::<Flex, _>(ops.parents, ops.node, grads, |grad| super::linear::input_grad(grad, &weight));
        }
    }
    let t = tracked_f32(x)?;
    let weight = super::contiguous(super::flex_f32(weight)?);
    let bias = match bias {
        Some(b) => Some(super::flex_f32(b)?),
        None => None,
    };
    let (out, _) = super::linear::forward(t.primitive().clone(), &weight, bias)?;
    Some(unary_op(FrozenLinear, &t, weight, out))
}

/// x·W + b + (x·D)·U under autodiff: a frozen Linear (W [K, N], b constants) with one LoRA side
/// path whose D [K, r] and U [r, N] are leaves, as one op: the forward adds h·U (h = x·D) into
/// the base product's output; the backward gives x, D and U their gradients by six products
/// that read every operand in place. burn's path records five ops (two of them matmuls whose
/// backward copies transposed operands) and an add over the whole output.
pub fn lora_linear<const D: usize>(
    x: &Tensor<D>,
    (weight, bias): (&Tensor<2>, Option<&Tensor<1>>),
    (down, up): (&Tensor<2>, &Tensor<2>),
) -> Option<Tensor<D>> {
    /// x as the forward read it, h = x·D, W, D, U.
    #[derive(Debug, Clone)]
    struct Saved {
        x: FlexTensor,
        h: FlexTensor,
        weight: FlexTensor,
        down: FlexTensor,
        up: FlexTensor,
    }
    #[derive(Debug)]
    struct LoraLinear;
    impl Backward<Flex, 3> for LoraLinear {
        type State = Saved;
        fn backward(self, ops: Ops<Saved, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let Saved { x, h, weight, down, up } = ops.state;
            let [px, pd, pu] = ops.parents;
            let grad = super::contiguous(grads.consume::<Flex>(&ops.node));
            // The input's gradient only when it is wanted (not for the first block's input).
            let mut grad_x = px.as_ref().map(|_| super::linear::input_grad(grad.clone(), &weight));
            let (grad_down, grad_up) = super::linear::side_path_grads(&grad, &x, &h, (&down, &up), grad_x.as_mut());
            if let (Some(node), Some(g)) = (px, grad_x) {
                grads.register::<Flex>(node.id, g);
            }
            for (parent, g) in [(pd, grad_down), (pu, grad_up)] {
                if let Some(node) = parent {
                    grads.register::<Flex>(node.id, g);
                }
            }
        }
    }
    // A plain input (the first block's) is an untracked leaf: the factors still need it.
    let t = tracked_f32(&if x.is_autodiff() { x.clone() } else { x.clone().autodiff() })?;
    let (down_t, up_t) = (tracked_f32(down)?, tracked_f32(up)?);
    let weight = super::contiguous(super::flex_f32(weight)?);
    let bias = match bias {
        Some(b) => Some(super::flex_f32(b)?),
        None => None,
    };
    let (down_f, up_f) = (super::contiguous(down_t.primitive().clone()), super::contiguous(up_t.primitive().clone()));
    let (mut out, read) = super::linear::forward(t.primitive().clone(), &weight, bias)?;
    let h = super::linear::add_side_path(&read, &down_f, &up_f, &mut out)?;
    let saved = Saved { x: read, h, weight, down: down_f, up: up_f };
    let nodes = [t.node(), down_t.node(), up_t.node()];
    Some(into_tensor(match LoraLinear.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(saved, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }))
}

/// Scaled dot-product attention under autodiff for q, k, v [B, H, L, D] (any of them leaves or
/// results of tracked ops), merged to [B, Lq, H·D]: the inference kernel's f32 forward, and a
/// backward that recomputes the probabilities per head (see `attention::backward`). burn's
/// path records eleven ops, the score matrix kept by several of them, and copies the output
/// to merge the heads.
pub fn attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Option<Tensor<3>> {
    #[derive(Debug)]
    struct Attention;
    impl Backward<Flex, 3> for Attention {
        type State = [FlexTensor; 3];
        fn backward(self, ops: Ops<[FlexTensor; 3], 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [q, k, v] = ops.state;
            let grad = grads.consume::<Flex>(&ops.node);
            let d = super::attention::backward(&q, &k, &v, grad);
            for (parent, g) in ops.parents.into_iter().zip(d) {
                if let Some(node) = parent {
                    grads.register::<Flex>(node.id, g);
                }
            }
        }
    }
    let [qt, kt, vt] = tracked_operands([q, k, v])?;
    let operands = [qt.primitive().clone(), kt.primitive().clone(), vt.primitive().clone()];
    let [qf, kf, vf] = &operands;
    let out = super::attention::forward(qf, kf, vf, false)?;
    let nodes = [qt.node(), kt.node(), vt.node()];
    Some(into_tensor(match Attention.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(operands, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }))
}

/// AdaLN's (1 + scale)·LayerNorm(x) + shift under autodiff (x [B, L, H], shift and scale
/// [B, 1, H], any of them tracked), with its backward in one pass per token and one reduction
/// for the modulation (`modulated_norm`).
pub fn modulated_layer_norm(x: &Tensor<3>, shift: &Tensor<3>, scale: &Tensor<3>, eps: f32) -> Option<Tensor<3>> {
    #[derive(Debug)]
    struct ModulatedLayerNorm;
    impl Backward<Flex, 3> for ModulatedLayerNorm {
        type State = super::modulated_norm::ModulatedNorm;
        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<Flex>(&ops.node);
            for (parent, g) in ops.parents.into_iter().zip(ops.state.backward(grad)) {
                if let Some(node) = parent {
                    grads.register::<Flex>(node.id, g);
                }
            }
        }
    }
    let [xt, shift_t, scale_t] = tracked_operands([x, shift, scale])?;
    let parts = [&xt, &shift_t, &scale_t].map(|t| t.primitive().clone());
    let [xf, shift_f, scale_f] = parts;
    let norm = super::modulated_norm::ModulatedNorm::of(xf, shift_f, scale_f, eps)?;
    let out = norm.forward();
    let nodes = [xt.node(), shift_t.node(), scale_t.node()];
    Some(into_tensor(match ModulatedLayerNorm.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(norm, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }))
}

/// x + gate·y under autodiff (x, y [B, L, H], gate [B, 1, H]; see `gated`): the residual
/// update of every block, its backward one pass and one reduction over the tokens.
pub fn gated_add(x: &Tensor<3>, gate: &Tensor<3>, y: &Tensor<3>) -> Option<Tensor<3>> {
    #[derive(Debug)]
    struct GatedAdd;
    impl Backward<Flex, 3> for GatedAdd {
        type State = super::gated::Gated;
        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<Flex>(&ops.node);
            for (parent, g) in ops.parents.into_iter().zip(ops.state.backward(grad)) {
                if let Some(node) = parent {
                    grads.register::<Flex>(node.id, g);
                }
            }
        }
    }
    let [xt, gate_t, yt] = tracked_operands([x, gate, y])?;
    let [xf, gf, yf] = [&xt, &gate_t, &yt].map(|t| t.primitive().clone());
    let gated = super::gated::Gated::of(xf, gf, yf)?;
    let out = gated.forward();
    let nodes = [xt.node(), gate_t.node(), yt.node()];
    Some(into_tensor(match GatedAdd.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(gated, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }))
}

/// A block's joint attention under autodiff, from its streams' fused q/k/v projections to the
/// merged output [B, ΣL, H·D]: the heads (split, q/k RMS norm with frozen scales, RoPE, joined
/// along the sequence; `heads::joint_heads`) and attention as one op, whose backward runs
/// attention's and then the heads' (rotation and norm transposed, v copied) by hand. burn's
/// path records about thirty ops per stream, among them narrows whose backward each allocates
/// a zeroed projection-sized gradient.
pub fn joint_attention(
    streams: &[super::HeadStream],
    heads: usize,
    eps: f32,
    rope: (&Tensor<4>, &Tensor<4>),
) -> Option<Tensor<3>> {
    match streams.len() {
        1 => joint_attention_of::<1>(streams, heads, eps, rope),
        2 => joint_attention_of::<2>(streams, heads, eps, rope),
        _ => None,
    }
}

fn joint_attention_of<const N: usize>(
    streams: &[super::HeadStream],
    heads: usize,
    eps: f32,
    rope: (&Tensor<4>, &Tensor<4>),
) -> Option<Tensor<3>> {
    #[derive(Debug)]
    struct JointAttention;
    impl<const N: usize> Backward<Flex, N> for JointAttention {
        /// The heads' operands and q, k, v.
        type State = (super::heads::Joint, [FlexTensor; 3]);
        fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (joint, [q, k, v]) = ops.state;
            let grad = grads.consume::<Flex>(&ops.node);
            let qkv_grads = super::attention::backward(&q, &k, &v, grad);
            for (parent, g) in ops.parents.into_iter().zip(joint.backward(&qkv_grads)) {
                if let Some(node) = parent {
                    grads.register::<Flex>(node.id, g);
                }
            }
        }
    }
    let qkv: [&Tensor<3>; N] = streams.iter().map(|s| s.qkv).collect::<Vec<_>>().try_into().ok()?;
    let tracked = tracked_operands(qkv)?;
    let joint =
        super::heads::Joint::of(tracked.iter().map(|t| t.primitive().clone()).collect(), streams, heads, eps, rope)?;
    let [q, k, v] = joint.forward();
    if !super::attention::supported(&q, &k, &v) {
        return None;
    }
    let out = super::attention::forward(&q, &k, &v, false)?;
    let nodes: [_; N] = tracked.iter().map(|t| t.node()).collect::<Vec<_>>().try_into().ok()?;
    Some(into_tensor(match JointAttention.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((joint, [q, k, v]), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }))
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn::tensor::module::linear as burn_linear;

    use super::super::test_util::{max_diff, random};

    /// The output of `f` on a fresh leaf copy of `x`, and the gradient of Σ out·`seed` there.
    fn output_and_grad<const D: usize, const E: usize>(
        x: &Tensor<D>,
        seed: &Tensor<E>,
        f: impl Fn(Tensor<D>) -> Tensor<E>,
    ) -> (Tensor<E>, Tensor<D>) {
        let leaf = x.clone().autodiff().require_grad();
        let out = f(leaf.clone());
        let grads = (out.clone() * seed.clone().autodiff()).sum().backward();
        (out.inner(), leaf.grad(&grads).unwrap())
    }

    #[test]
    fn gelu_matches_burns_path_and_its_gradient() {
        let x = random([2, 33, 70]) * 4.0;
        let seed = random([2, 33, 50]);
        // A narrow view (the MLP half of a fused projection) read in place.
        let (out, grad) = output_and_grad(&x, &seed, |x| super::gelu_tanh(&x.narrow(2, 10, 50)).unwrap());
        let (want, want_grad) =
            output_and_grad(&x, &seed, |x| crate::engine::layers::gelu_tanh_burn(x.narrow(2, 10, 50)));
        assert!(max_diff(out, want) < 2e-6);
        assert!(max_diff(grad, want_grad) < 1e-5);
        // Off autodiff, or in f16, the op stands aside.
        assert!(super::gelu_tanh(&x).is_none());
        assert!(super::gelu_tanh(&x.autodiff().cast(burn::tensor::DType::F16)).is_none());
    }

    #[test]
    fn frozen_linear_matches_burns_path_and_its_input_gradient() {
        let (w, b) = (random([24, 10]), random([10]));
        let seed = random([2, 7, 10]);
        let x = random([2, 7, 24]);
        let (out, grad) = output_and_grad(&x, &seed, |x| super::linear(&x, &w, Some(&b)).unwrap());
        let (want, want_grad) = output_and_grad(&x, &seed, |x| burn_linear(x, w.clone(), Some(b.clone())));
        assert!(max_diff(out, want) < 1e-5);
        assert!(max_diff(grad, want_grad) < 1e-5);
        // Past input_grad's column-major threshold: the gradient written row-major.
        let many = random([1, 600, 24]);
        let seed600 = random([1, 600, 10]);
        let (_, grad) = output_and_grad(&many, &seed600, |x| super::linear(&x, &w, Some(&b)).unwrap());
        let (_, want_grad) = output_and_grad(&many, &seed600, |x| burn_linear(x, w.clone(), Some(b.clone())));
        assert!(max_diff(grad, want_grad) < 1e-5);
        // A view of a wider tensor, no bias: the gradient lands in the view's columns only.
        let wide = random([2, 7, 40]);
        let (out, grad) = output_and_grad(&wide, &seed, |x| super::linear(&x.narrow(2, 16, 24), &w, None).unwrap());
        let (want, want_grad) = output_and_grad(&wide, &seed, |x| burn_linear(x.narrow(2, 16, 24), w.clone(), None));
        assert!(max_diff(out, want) < 1e-5);
        assert!(max_diff(grad, want_grad) < 1e-5);
        // With a LoRA side path whose factors are leaves: every gradient as burn's path gives it.
        let (down, up) = (random([24, 3]), random([3, 10]));
        let leaves = |t: &Tensor<2>| t.clone().autodiff().require_grad();
        let run = |fused: bool| {
            let (x, d, u) = (wide.clone().autodiff().require_grad(), leaves(&down), leaves(&up));
            let view = x.clone().narrow(2, 16, 24);
            let out = if fused {
                super::lora_linear(&view, (&w, Some(&b)), (&d, &u)).unwrap()
            } else {
                burn_linear(view.clone(), w.clone(), Some(b.clone()))
                    + view.matmul(d.clone().unsqueeze()).matmul(u.clone().unsqueeze())
            };
            let grads = (out.clone() * seed.clone().autodiff()).sum().backward();
            (out.inner(), x.grad(&grads).unwrap(), d.grad(&grads).unwrap(), u.grad(&grads).unwrap())
        };
        let (fused, plain) = (run(true), run(false));
        assert!(max_diff(fused.0, plain.0) < 1e-4);
        assert!(max_diff(fused.1, plain.1) < 1e-4);
        assert!(max_diff(fused.2, plain.2) < 1e-4);
        assert!(max_diff(fused.3, plain.3) < 1e-4);
        // A weight that is itself a leaf (full training) keeps burn's path.
        let x = x.autodiff().require_grad();
        assert!(super::linear(&x, &w.clone().autodiff().require_grad(), None).is_none());
    }
}

#[cfg(test)]
mod attention_tests {
    use burn::tensor::Tensor;
    use burn::tensor::module::attention as burn_attention;

    use super::super::test_util::{max_diff, random};

    #[test]
    fn attention_matches_burns_path_and_its_gradients_on_strided_views() {
        // One block of query rows in the backward, and three (600 > 2 · 256).
        attention_case(37, 29);
        attention_case(600, 45);
    }

    fn attention_case(lq: usize, lk: usize) {
        // q, k, v as the model makes them: heads split from [B, L, H, D] by a swap (strided).
        let (b, h, d) = (2, 3, 16);
        let q = random([b, lq, h, d]);
        let (k, v) = (random([b, lk, h, d]), random([b, lk, h, d]));
        let seed = random([b, lq, h * d]);
        let run = |fused: bool| {
            let leaf = |t: &Tensor<4>| t.clone().autodiff().require_grad();
            let (ql, kl, vl) = (leaf(&q), leaf(&k), leaf(&v));
            let (qv, kv, vv) = (ql.clone().swap_dims(1, 2), kl.clone().swap_dims(1, 2), vl.clone().swap_dims(1, 2));
            let out = if fused {
                super::attention(&qv, &kv, &vv).unwrap()
            } else {
                burn_attention(qv, kv, vv, None, None, Default::default()).swap_dims(1, 2).reshape([b, lq, h * d])
            };
            let grads = (out.clone() * seed.clone().autodiff()).sum().backward();
            (out.inner(), ql.grad(&grads).unwrap(), kl.grad(&grads).unwrap(), vl.grad(&grads).unwrap())
        };
        let (fused, plain) = (run(true), run(false));
        assert!(max_diff(fused.0, plain.0) < 1e-5);
        assert!(max_diff(fused.1, plain.1) < 1e-4);
        assert!(max_diff(fused.2, plain.2) < 1e-4);
        assert!(max_diff(fused.3, plain.3) < 1e-4);
        // Plain tensors are the inference kernel's.
        assert!(super::attention(&q, &k, &v).is_none());
    }
}

#[cfg(test)]
mod joint_attention_tests {
    use burn::tensor::Tensor;
    use burn::tensor::module::attention as burn_attention;

    use super::super::HeadStream;
    use super::super::test_util::{max_diff, random};
    use crate::engine::flux::model::rms_norm;
    use crate::engine::flux::rope::{Rope, image_ids, text_ids};

    #[test]
    fn joint_attention_matches_burns_heads_and_attention_and_their_gradients() {
        let (heads, d) = (2, 16);
        let hd = heads * d;
        let txt = random([2, 5, 3 * hd]);
        // The single blocks' case: q/k/v are the first columns of a wider projection.
        let img = random([2, 12, 3 * hd + 40]);
        let scales = [random([d]), random([d]), random([d]), random([d])];
        let mut ids = text_ids(5);
        ids.extend(image_ids(3, 4));
        let rope = Rope::new(&ids, &[4, 6, 6], 10_000.0, &burn::tensor::Device::flex());
        let seed = random([2, 17, hd]);
        let run = |fused: bool| {
            let (t, i) = (txt.clone().autodiff().require_grad(), img.clone().autodiff().require_grad());
            let out = if fused {
                let streams = [
                    HeadStream { qkv: &t, q_scale: &scales[0], k_scale: &scales[1] },
                    HeadStream { qkv: &i, q_scale: &scales[2], k_scale: &scales[3] },
                ];
                super::joint_attention(&streams, heads, 1e-6, (&rope.cos, &rope.sin)).unwrap()
            } else {
                let split = |x: &Tensor<3>, n: usize| {
                    let [b, l, _] = x.dims();
                    x.clone().narrow(2, n * hd, hd).reshape([b, l, heads, d]).swap_dims(1, 2)
                };
                let q = Tensor::cat(vec![rms_norm(split(&t, 0), &scales[0]), rms_norm(split(&i, 0), &scales[2])], 2);
                let k = Tensor::cat(vec![rms_norm(split(&t, 1), &scales[1]), rms_norm(split(&i, 1), &scales[3])], 2);
                let v = Tensor::cat(vec![split(&t, 2), split(&i, 2)], 2);
                let x = burn_attention(rope.apply(q), rope.apply(k), v, None, None, Default::default());
                x.swap_dims(1, 2).reshape([2, 17, hd])
            };
            let grads = (out.clone() * seed.clone().autodiff()).sum().backward();
            (out.inner(), t.grad(&grads).unwrap(), i.grad(&grads).unwrap())
        };
        let (fused, plain) = (run(true), run(false));
        assert!(max_diff(fused.0, plain.0) < 1e-5);
        assert!(max_diff(fused.1, plain.1) < 1e-4);
        assert!(max_diff(fused.2, plain.2) < 1e-4);
    }
}

#[cfg(test)]
mod modulated_norm_tests {
    use super::super::test_util::{max_diff, random};

    #[test]
    fn modulated_layer_norm_matches_burns_path_and_its_gradients() {
        let x = random([2, 37, 40]) * 3.0 + 1.5;
        let (shift, scale) = (random([2, 1, 40]), random([2, 1, 40]));
        let seed = random([2, 37, 40]);
        let run = |fused: bool| {
            let leaf = |t: &burn::tensor::Tensor<3>| t.clone().autodiff().require_grad();
            let (x, t, s) = (leaf(&x), leaf(&shift), leaf(&scale));
            let out = if fused {
                super::modulated_layer_norm(&x, &t, &s, 1e-6).unwrap()
            } else {
                (s.clone() + 1.0) * crate::engine::layers::layer_norm(x.clone(), 1e-6, None) + t.clone()
            };
            let grads = (out.clone() * seed.clone().autodiff()).sum().backward();
            (out.inner(), x.grad(&grads).unwrap(), t.grad(&grads).unwrap(), s.grad(&grads).unwrap())
        };
        let (fused, plain) = (run(true), run(false));
        assert!(max_diff(fused.0, plain.0) < 1e-5);
        assert!(max_diff(fused.1, plain.1) < 1e-4);
        assert!(max_diff(fused.2, plain.2) < 1e-4);
        assert!(max_diff(fused.3, plain.3) < 1e-4);
    }
}

#[cfg(test)]
mod gated_tests {
    use super::super::test_util::{max_diff, random};

    #[test]
    fn gated_add_matches_burns_path_and_its_gradients() {
        let (x, y, gate) = (random([2, 37, 40]), random([2, 37, 40]), random([2, 1, 40]));
        let seed = random([2, 37, 40]);
        let run = |fused: bool| {
            let leaf = |t: &burn::tensor::Tensor<3>| t.clone().autodiff().require_grad();
            let (x, g, y) = (leaf(&x), leaf(&gate), leaf(&y));
            let out = if fused { super::gated_add(&x, &g, &y).unwrap() } else { x.clone() + g.clone() * y.clone() };
            let grads = (out.clone() * seed.clone().autodiff()).sum().backward();
            (out.inner(), x.grad(&grads).unwrap(), g.grad(&grads).unwrap(), y.grad(&grads).unwrap())
        };
        let (fused, plain) = (run(true), run(false));
        assert!(max_diff(fused.0, plain.0) < 1e-6);
        assert!(max_diff(fused.1, plain.1) < 1e-6);
        assert!(max_diff(fused.2, plain.2) < 1e-4);
        assert!(max_diff(fused.3, plain.3) < 1e-6);
    }
}
