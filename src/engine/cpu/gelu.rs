//! GELU with the tanh approximation in one parallel, vectorized pass (burn's path makes five
//! passes and calls a scalar `exp`).

use burn::tensor::Tensor;
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::math::{exp, simd_dispatch};

/// Elements per parallel task: large enough to amortize scheduling, small enough to balance.
const CHUNK: usize = 16 * 1024;

/// x·σ(2z) with z = √(2/π)(x + 0.044715x³), which equals ½x(1 + tanh z).
pub fn gelu_tanh<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    forward(super::flex_f32(x)?).map(super::into_tensor)
}

/// [`gelu_tanh`] on an f32 flex tensor: a new contiguous tensor of its shape.
pub(super) fn forward(mut t: FlexTensor) -> Option<FlexTensor> {
    // Rows of a view (the MLP half of a single block's fused projection) are read in place.
    let (rows, len, stride) = match super::rows(&t) {
        Some(r) => r,
        None => {
            t = super::contiguous(t);
            super::rows(&t)?
        }
    };
    let mut out = super::zeros(t.layout().shape().clone());
    let src = &t.storage::<f32>()[t.layout().start_offset()..];
    let dst: &mut [f32] = out.storage_mut();
    if len == 0 {
        return Some(out);
    }
    let rows_per_task = CHUNK.div_ceil(len);
    dst.par_chunks_mut(rows_per_task * len).enumerate().for_each(|(i, d)| {
        for (r, d) in d.chunks_mut(len).enumerate() {
            gelu_slice(&src[(i * rows_per_task + r) * stride..][..len], d);
        }
    });
    debug_assert_eq!(rows * len, dst.len());
    Some(out)
}

/// The gradient at the input of [`gelu_tanh`] given `grad` at its output, in one pass:
/// with s = σ(2z), d(x·s)/dx = s + x·s·(1 − s)·2z', 2z' = C·(1 + 3·0.044715·x²).
pub(super) fn backward(input: &FlexTensor, grad: FlexTensor) -> FlexTensor {
    let input = super::contiguous(input.clone());
    let mut grad = super::contiguous(grad);
    let n = input.layout().num_elements();
    let x = &input.storage::<f32>()[..n];
    let g = &mut grad.storage_mut::<f32>()[..n];
    g.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(g, x)| gelu_grad_slice(x, g));
    grad
}

simd_dispatch! {
    fn gelu_grad_slice(src: &[f32], grad: &mut [f32]) {
        const C: f32 = 2.0 * 0.797_884_6;
        for (g, &x) in grad.iter_mut().zip(src) {
            let two_z = C * x * (1.0 + 0.044_715 * x * x);
            let s = 1.0 / (1.0 + exp(-two_z));
            let slope = C * (1.0 + 3.0 * 0.044_715 * x * x);
            *g *= s + x * s * (1.0 - s) * slope;
        }
    }
}

simd_dispatch! {
    fn gelu_slice(src: &[f32], dst: &mut [f32]) {
        const C: f32 = 2.0 * 0.797_884_6; // 2·√(2/π)
        for (d, &x) in dst.iter_mut().zip(src) {
            let two_z = C * x * (1.0 + 0.044_715 * x * x);
            *d = x / (1.0 + exp(-two_z));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{max_diff, random};

    #[test]
    fn matches_burns_gelu_on_contiguous_and_strided_input() {
        let x = random([2, 33, 70]) * 4.0;
        let reference = crate::engine::layers::gelu_tanh_burn(x.clone());
        assert!(max_diff(super::gelu_tanh(&x).unwrap(), reference) < 2e-6);
        let narrow = x.clone().narrow(2, 10, 50);
        let reference = crate::engine::layers::gelu_tanh_burn(narrow.clone());
        assert!(max_diff(super::gelu_tanh(&narrow).unwrap(), reference) < 2e-6);
        let strided = x.swap_dims(1, 2);
        let reference = crate::engine::layers::gelu_tanh_burn(strided.clone());
        assert!(max_diff(super::gelu_tanh(&strided).unwrap(), reference) < 2e-6);
    }

    #[test]
    fn answers_none_off_the_plain_cpu_backend_in_f32() {
        let x = random([4, 4]);
        assert!(super::gelu_tanh(&x.clone().cast(burn::tensor::DType::F16)).is_none());
        // LoRA training differentiates through the model: its tensors keep burn's path.
        assert!(super::gelu_tanh(&x.autodiff().require_grad()).is_none());
    }
}
