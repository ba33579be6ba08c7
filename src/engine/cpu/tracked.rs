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
use burn_autodiff::ops::{Backward, Ops, OpsKind};
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

/// Registers an op of N inputs and returns its output: `output` computed from `inputs`, and
/// `state` kept for the backward when any input is tracked.
fn finish<const D: usize, const N: usize, Op>(
    op: Op,
    inputs: [&TrackedTensor; N],
    state: Op::State,
    output: FlexTensor,
) -> Tensor<D>
where
    Op: Backward<Flex, N>,
{
    into_tensor(match op.prepare::<NoCheckpointing>(inputs.map(|t| t.node())).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    })
}

/// An op's backward: `gradients(state, the output's gradient, which inputs want theirs)`
/// gives each input its gradient (`None` where not wanted), registered for the tracked ones.
fn give_gradients<S, const N: usize>(
    ops: Ops<S, N>,
    grads: &mut Gradients,
    gradients: impl FnOnce(S, FlexTensor, [bool; N]) -> Vec<Option<FlexTensor>>,
) {
    let grad = grads.consume::<Flex>(&ops.node);
    let values = gradients(ops.state, grad, ops.parents.each_ref().map(Option::is_some));
    for (parent, g) in ops.parents.into_iter().zip(values) {
        if let (Some(node), Some(g)) = (parent, g) {
            grads.register::<Flex>(node.id, g);
        }
    }
}

/// GELU (tanh approximation) under autodiff; the input is kept for the backward.
pub fn gelu_tanh<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    #[derive(Debug)]
    struct GeluTanh;
    impl Backward<Flex, 1> for GeluTanh {
        type State = FlexTensor;
        fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            give_gradients(ops, grads, |input, grad, _| vec![Some(super::gelu::backward(&input, grad))]);
        }
    }
    let t = tracked_f32(x)?;
    let input = t.primitive().clone();
    let out = super::gelu::forward(input.clone())?;
    Some(finish(GeluTanh, [&t], input, out))
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
            give_gradients(ops, grads, |weight, grad, _| vec![Some(super::linear::input_grad(grad, &weight))]);
        }
    }
    let t = tracked_f32(x)?;
    let weight = super::contiguous(super::flex_f32(weight)?);
    let bias = match bias {
        Some(b) => Some(super::flex_f32(b)?),
        None => None,
    };
    let (out, _) = super::linear::forward(t.primitive().clone(), &weight, bias)?;
    Some(finish(FrozenLinear, [&t], weight, out))
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
            give_gradients(ops, grads, |saved, grad, [want_x, ..]| {
                let Saved { x, h, weight, down, up } = saved;
                let grad = super::contiguous(grad);
                // The input's gradient only when it is wanted (not for the first block's input).
                let mut grad_x = want_x.then(|| super::linear::input_grad(grad.clone(), &weight));
                let (grad_down, grad_up) = super::linear::side_path_grads(&grad, &x, &h, (&down, &up), grad_x.as_mut());
                vec![grad_x, Some(grad_down), Some(grad_up)]
            });
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
    Some(finish(LoraLinear, [&t, &down_t, &up_t], saved, out))
}

/// Scaled dot-product attention under autodiff for q, k, v [B, H, L, D] (any of them leaves or
/// results of tracked ops), merged to [B, Lq, H·D]: the inference kernel's f32 forward, and a
/// backward from the probabilities it kept ([`keeping_probabilities`]), else recomputed per
/// head (see `attention::backward`). burn's path records eleven ops, the score matrix kept by
/// several of them, and copies the output to merge the heads.
pub fn attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Option<Tensor<3>> {
    #[derive(Debug)]
    struct Attention;
    impl Backward<Flex, 3> for Attention {
        type State = ([FlexTensor; 3], Option<FlexTensor>);
        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            give_gradients(ops, grads, |([q, k, v], kept), grad, _| {
                super::attention::backward(&q, &k, &v, kept.as_ref(), grad).map(Some).to_vec()
            });
        }
    }
    let [qt, kt, vt] = tracked_operands([q, k, v])?;
    let operands = [qt.primitive().clone(), kt.primitive().clone(), vt.primitive().clone()];
    let (out, kept) = attention_forward(&operands)?;
    Some(finish(Attention, [&qt, &kt, &vt], (operands, kept), out))
}

thread_local! {
    static KEEP_PROBABILITIES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (one block's forward under autodiff, as block recompute re-runs it) with attention
/// keeping its probabilities for the backward where they are small
/// (`attention::KEEP_PROBABILITIES`): with one block in the graph that is one block's scores
/// and saves the backward a product and a softmax. Over a whole model's graph (plain autodiff)
/// every block's would stay alive, which cost more than it saved (a 512² LoRA step 0.98× →
/// 1.08× torch's, 350 MiB more), so there they are recomputed.
pub fn keeping_probabilities<T>(f: impl FnOnce() -> T) -> T {
    let before = KEEP_PROBABILITIES.with(|k| k.replace(true));
    let out = f();
    KEEP_PROBABILITIES.with(|k| k.set(before));
    out
}

/// Attention's forward under autodiff, with its probabilities when asked to keep them
/// ([`keeping_probabilities`]) and they are small enough.
fn attention_forward([q, k, v]: &[FlexTensor; 3]) -> Option<(FlexTensor, Option<FlexTensor>)> {
    let [b, h, lq, _] = super::dims4(q);
    let lk = super::dims4(k)[2];
    if KEEP_PROBABILITIES.with(|k| k.get()) && b * h * lq * lk * 4 <= super::attention::KEEP_PROBABILITIES {
        let (out, p) = super::attention::forward_keeping(q, k, v)?;
        return Some((out, Some(p)));
    }
    Some((super::attention::forward(q, k, v, false)?, None))
}

/// A fused kernel over three activations of rank 3 with its own forward and backward.
pub(super) trait Kernel3: Clone + Send + std::fmt::Debug + 'static {
    fn forward(&self) -> FlexTensor;
    /// The gradients at the three inputs, in order, given the output's.
    fn backward(&self, grad: FlexTensor) -> [FlexTensor; 3];
}

/// A [`Kernel3`] under autodiff: `make` builds it from the inputs' flex tensors (plain ones
/// taken as untracked leaves).
fn kernel3<K: Kernel3>(inputs: [&Tensor<3>; 3], make: impl FnOnce([FlexTensor; 3]) -> Option<K>) -> Option<Tensor<3>> {
    #[derive(Debug)]
    struct Op<K>(std::marker::PhantomData<K>);
    impl<K: Kernel3> Backward<Flex, 3> for Op<K> {
        type State = K;
        fn backward(self, ops: Ops<K, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            give_gradients(ops, grads, |kernel, grad, _| kernel.backward(grad).map(Some).to_vec());
        }
    }
    let tracked = tracked_operands(inputs)?;
    let kernel = make(tracked.each_ref().map(|t| t.primitive().clone()))?;
    let out = kernel.forward();
    Some(finish(Op::<K>(std::marker::PhantomData), tracked.each_ref(), kernel, out))
}

/// AdaLN's (1 + scale)·LayerNorm(x) + shift under autodiff (x [B, L, H], shift and scale
/// [B, 1, H], any of them tracked), with its backward in one pass per token and one reduction
/// for the modulation (`modulated_norm`).
pub fn modulated_layer_norm(x: &Tensor<3>, shift: &Tensor<3>, scale: &Tensor<3>, eps: f32) -> Option<Tensor<3>> {
    kernel3([x, shift, scale], |[x, shift, scale]| super::modulated_norm::ModulatedNorm::of(x, shift, scale, eps))
}

/// x + gate·y under autodiff (x, y [B, L, H], gate [B, 1, H]; see `gated`): the residual
/// update of every block, its backward one pass and one reduction over the tokens.
pub fn gated_add(x: &Tensor<3>, gate: &Tensor<3>, y: &Tensor<3>) -> Option<Tensor<3>> {
    kernel3([x, gate, y], |[x, gate, y]| super::gated::Gated::of(x, gate, y))
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
        /// The heads' operands, q, k, v and the probabilities if kept.
        type State = (super::heads::Joint, [FlexTensor; 3], Option<FlexTensor>);
        fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
            give_gradients(ops, grads, |(joint, [q, k, v], kept), grad, _| {
                let qkv_grads = super::attention::backward(&q, &k, &v, kept.as_ref(), grad);
                joint.backward(&qkv_grads).into_iter().map(Some).collect()
            });
        }
    }
    let qkv: [&Tensor<3>; N] = streams.iter().map(|s| s.qkv).collect::<Vec<_>>().try_into().ok()?;
    let tracked = tracked_operands(qkv)?;
    let joint =
        super::heads::Joint::of(tracked.iter().map(|t| t.primitive().clone()).collect(), streams, heads, eps, rope)?;
    let qkv = joint.forward();
    if !super::attention::supported(&qkv[0], &qkv[1], &qkv[2]) {
        return None;
    }
    let (out, kept) = attention_forward(&qkv)?;
    Some(finish(JointAttention, tracked.each_ref(), (joint, qkv, kept), out))
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn::tensor::module::{attention as burn_attention, linear as burn_linear};

    use super::super::HeadStream;
    use super::super::test_util::{max_diff, random};
    use crate::engine::flux::model::rms_norm;
    use crate::engine::flux::rope::{Rope, image_ids, text_ids};

    /// An op's output and the gradient of Σ output·seed at each of its inputs.
    type Outcome<const D: usize, const E: usize> = (Tensor<E>, Vec<Tensor<D>>);

    /// The output of `f` on fresh leaf copies of `xs`, and the gradient of Σ out·`seed` at each.
    fn output_and_grads<const D: usize, const E: usize>(
        xs: &[&Tensor<D>],
        seed: &Tensor<E>,
        f: impl Fn(&[Tensor<D>]) -> Tensor<E>,
    ) -> Outcome<D, E> {
        let leaves: Vec<_> = xs.iter().map(|x| (*x).clone().autodiff().require_grad()).collect();
        let out = f(&leaves);
        let grads = (out.clone() * seed.clone().autodiff()).sum().backward();
        (out.inner(), leaves.iter().map(|l| l.grad(&grads).unwrap()).collect())
    }

    /// The fused op's outcome against burn's path: outputs within `out_tol`, gradients within
    /// `grad_tol`.
    fn assert_agree<const D: usize, const E: usize>(
        fused: Outcome<D, E>,
        burn: Outcome<D, E>,
        (out_tol, grad_tol): (f32, f32),
    ) {
        let diff = max_diff(fused.0, burn.0);
        assert!(diff < out_tol, "output: {diff}");
        for (i, (a, b)) in fused.1.into_iter().zip(burn.1).enumerate() {
            let diff = max_diff(a, b);
            assert!(diff < grad_tol, "gradient {i}: {diff}");
        }
    }

    #[test]
    fn gelu_matches_burns_path_and_its_gradient() {
        let x = random([2, 33, 70]) * 4.0;
        let seed = random([2, 33, 50]);
        // A narrow view (the MLP half of a fused projection) read in place.
        let fused = output_and_grads(&[&x], &seed, |x| super::gelu_tanh(&x[0].clone().narrow(2, 10, 50)).unwrap());
        let burn =
            output_and_grads(&[&x], &seed, |x| crate::engine::layers::gelu_tanh_burn(x[0].clone().narrow(2, 10, 50)));
        assert_agree(fused, burn, (2e-6, 1e-5));
        // Off autodiff, or in f16, the op stands aside.
        assert!(super::gelu_tanh(&x).is_none());
        assert!(super::gelu_tanh(&x.autodiff().cast(burn::tensor::DType::F16)).is_none());
    }

    #[test]
    fn frozen_linear_matches_burns_path_and_its_input_gradient() {
        let (w, b) = (random([24, 10]), random([10]));
        let seed = random([2, 7, 10]);
        let ours = |x: &Tensor<3>| super::linear(x, &w, Some(&b)).unwrap();
        let theirs = |x: &Tensor<3>| burn_linear(x.clone(), w.clone(), Some(b.clone()));
        let x = random([2, 7, 24]);
        let fused = output_and_grads(&[&x], &seed, |x| ours(&x[0]));
        assert_agree(fused, output_and_grads(&[&x], &seed, |x| theirs(&x[0])), (1e-5, 1e-5));
        // Past input_grad's column-major threshold: the gradient written row-major.
        let (many, seed600) = (random([1, 600, 24]), random([1, 600, 10]));
        let fused = output_and_grads(&[&many], &seed600, |x| ours(&x[0]));
        assert_agree(fused, output_and_grads(&[&many], &seed600, |x| theirs(&x[0])), (1e-5, 1e-5));
        // A view of a wider tensor, no bias: the gradient lands in the view's columns only.
        let wide = random([2, 7, 40]);
        let fused =
            output_and_grads(&[&wide], &seed, |x| super::linear(&x[0].clone().narrow(2, 16, 24), &w, None).unwrap());
        let burn = output_and_grads(&[&wide], &seed, |x| burn_linear(x[0].clone().narrow(2, 16, 24), w.clone(), None));
        assert_agree(fused, burn, (1e-5, 1e-5));
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

    #[test]
    fn attention_matches_burns_path_and_its_gradients_on_strided_views() {
        // One block of query rows in the backward, and three (600 > 2 · 256).
        for (lq, lk) in [(37, 29), (600, 45)] {
            // q, k, v as the model makes them: heads split from [B, L, H, D] by a swap (strided).
            let (b, h, d) = (2, 3, 16);
            let (q, k, v) = (random([b, lq, h, d]), random([b, lk, h, d]), random([b, lk, h, d]));
            let seed = random([b, lq, h * d]);
            let heads = |x: &[Tensor<4>]| x.iter().map(|t| t.clone().swap_dims(1, 2)).collect::<Vec<_>>();
            let fused = output_and_grads(&[&q, &k, &v], &seed, |x| {
                let [q, k, v] = &heads(x)[..] else { unreachable!() };
                super::attention(q, k, v).unwrap()
            });
            let burn = output_and_grads(&[&q, &k, &v], &seed, |x| {
                let [q, k, v]: [Tensor<4>; 3] = heads(x).try_into().unwrap();
                burn_attention(q, k, v, None, None, Default::default()).swap_dims(1, 2).reshape([b, lq, h * d])
            });
            assert_agree(fused, burn, (1e-5, 1e-4));
            // Plain tensors are the inference kernel's.
            assert!(super::attention(&q, &k, &v).is_none());
        }
    }

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
        let fused = output_and_grads(&[&txt, &img], &seed, |x| {
            let streams = [
                HeadStream { qkv: &x[0], q_scale: &scales[0], k_scale: &scales[1] },
                HeadStream { qkv: &x[1], q_scale: &scales[2], k_scale: &scales[3] },
            ];
            super::joint_attention(&streams, heads, 1e-6, (&rope.cos, &rope.sin)).unwrap()
        });
        let burn = output_and_grads(&[&txt, &img], &seed, |x| {
            let split = |x: &Tensor<3>, n: usize| {
                let [b, l, _] = x.dims();
                x.clone().narrow(2, n * hd, hd).reshape([b, l, heads, d]).swap_dims(1, 2)
            };
            let joined = |n: usize| {
                let (t, i) = (split(&x[0], n), split(&x[1], n));
                match n {
                    2 => Tensor::cat(vec![t, i], 2),
                    _ => Tensor::cat(vec![rms_norm(t, &scales[n]), rms_norm(i, &scales[2 + n])], 2),
                }
            };
            let (q, k) = (rope.apply(joined(0)), rope.apply(joined(1)));
            burn_attention(q, k, joined(2), None, None, Default::default()).swap_dims(1, 2).reshape([2, 17, hd])
        });
        assert_agree(fused, burn, (1e-5, 1e-4));
    }

    #[test]
    fn modulated_layer_norm_matches_burns_path_and_its_gradients() {
        let x = random([2, 37, 40]) * 3.0 + 1.5;
        let (shift, scale) = (random([2, 1, 40]), random([2, 1, 40]));
        let seed = random([2, 37, 40]);
        let fused = output_and_grads(&[&x, &shift, &scale], &seed, |t| {
            super::modulated_layer_norm(&t[0], &t[1], &t[2], 1e-6).unwrap()
        });
        let burn = output_and_grads(&[&x, &shift, &scale], &seed, |t| {
            (t[2].clone() + 1.0) * crate::engine::layers::layer_norm(t[0].clone(), 1e-6, None) + t[1].clone()
        });
        assert_agree(fused, burn, (1e-5, 1e-4));
    }

    #[test]
    fn gated_add_matches_burns_path_and_its_gradients() {
        let (x, y, gate) = (random([2, 37, 40]), random([2, 37, 40]), random([2, 1, 40]));
        let seed = random([2, 37, 40]);
        let fused = output_and_grads(&[&x, &gate, &y], &seed, |t| super::gated_add(&t[0], &t[1], &t[2]).unwrap());
        let burn = output_and_grads(&[&x, &gate, &y], &seed, |t| t[0].clone() + t[1].clone() * t[2].clone());
        assert_agree(fused, burn, (1e-6, 1e-4));
    }
}
