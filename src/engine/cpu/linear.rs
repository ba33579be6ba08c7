//! y = x·W + b as one matrix product whose output starts as the bias rows, reading `x` in
//! place when it is a view of rows (a narrow of a wider projection); burn's path adds the
//! bias in a second pass and copies such views first.

use burn::tensor::{DType, Shape, Tensor};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{Strided, matmul};

/// Products smaller than this many multiply-adds run on one thread (as burn's flex does).
const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

/// `x` [..., K] times `weight` [K, N] plus `bias` [N].
pub fn linear<const D: usize>(x: &Tensor<D>, weight: &Tensor<2>, bias: Option<&Tensor<1>>) -> Option<Tensor<D>> {
    let mut t = super::flex_f32(x)?;
    let w = super::contiguous(super::flex_f32(weight)?);
    let [k, n] = w.layout().shape().dims::<2>();
    let bias = match bias {
        Some(b) => Some(super::contiguous(super::flex_f32(b)?)),
        None => None,
    };
    if bias.as_ref().is_some_and(|b| b.layout().num_elements() != n) {
        return None;
    }
    let (rows, len, stride) = match super::rows(&t) {
        Some(r) => r,
        None => {
            t = super::contiguous(t);
            super::rows(&t)?
        }
    };
    if len != k {
        return None;
    }
    let mut dims = t.layout().shape().to_vec();
    dims[D - 1] = n;
    let mut out = FlexTensor::empty(Shape::from(dims), DType::F32);
    let dst: &mut [f32] = out.storage_mut();
    if let Some(b) = &bias {
        let b: &[f32] = b.storage();
        dst.par_chunks_mut(n.max(1)).for_each(|row| row.copy_from_slice(b));
    }
    if rows == 0 || n == 0 || k == 0 {
        return Some(super::into_tensor(out));
    }
    let src = &t.storage::<f32>()[t.layout().start_offset()..];
    // SAFETY: lhs row r (< rows) starts at r·stride within `src` and holds k elements (the
    // layout's rows); rhs is the contiguous [k, n] weight; dst is the [rows, n] output.
    unsafe {
        matmul(
            rows,
            n,
            k,
            Strided { ptr: dst.as_mut_ptr(), row: n as isize, col: 1 },
            bias.is_some(),
            Strided { ptr: src.as_ptr(), row: stride as isize, col: 1 },
            Strided { ptr: w.storage::<f32>().as_ptr(), row: n as isize, col: 1 },
            1.0,
            rows * n * k >= PARALLEL_THRESHOLD,
        );
    }
    Some(super::into_tensor(out))
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::linear as burn_linear;

    use super::super::test_util::{max_diff, random};

    #[test]
    fn matches_burns_linear_with_and_without_bias_on_views() {
        let (w, b) = (random([24, 10]), random([10]));
        let x = random([2, 7, 24]);
        let want = burn_linear(x.clone(), w.clone(), Some(b.clone()));
        assert!(max_diff(super::linear(&x, &w, Some(&b)).unwrap(), want) < 1e-5);
        // A narrow of a wider projection, read in place.
        let wide = random([2, 7, 40]);
        let view = wide.narrow(2, 16, 24);
        let want = burn_linear(view.clone(), w.clone(), None);
        assert!(max_diff(super::linear(&view, &w, None).unwrap(), want) < 1e-5);
        // A transposed view falls back to a copy.
        let t = random([2, 24, 7]).swap_dims(1, 2);
        let want = burn_linear(t.clone(), w.clone(), Some(b.clone()));
        assert!(max_diff(super::linear(&t, &w, Some(&b)).unwrap(), want) < 1e-5);
    }
}
