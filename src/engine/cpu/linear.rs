//! y = x·W + b as one matrix product whose output starts as the bias rows, reading `x` in
//! place when it is a view of rows (a narrow of a wider projection); burn's path adds the
//! bias in a second pass and copies such views first.

use burn::tensor::{DType, Int, Shape, Tensor};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{Strided, matmul};

/// Products smaller than this many multiply-adds run on one thread (as burn's flex does).
const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

/// A Linear's input as the kernels read it: `x` [..., K] as rows of K at a uniform stride
/// from `offset` of its storage (copied only when it is not such a view), the bias contiguous,
/// and the output [..., N] to write.
struct Operands {
    x: FlexTensor,
    rows: usize,
    stride: usize,
    bias: Option<FlexTensor>,
    out: FlexTensor,
}

impl Operands {
    /// None unless `x` and `bias` are plain flex f32, `x`'s rows hold `k` values and the bias `n`.
    fn read<const D: usize>(x: &Tensor<D>, bias: Option<&Tensor<1>>, (k, n): (usize, usize)) -> Option<Self> {
        let mut x = super::flex_f32(x)?;
        let bias = match bias {
            Some(b) => Some(super::contiguous(super::flex_f32(b)?)),
            None => None,
        };
        if bias.as_ref().is_some_and(|b| b.layout().num_elements() != n) {
            return None;
        }
        let (rows, len, stride) = match super::rows(&x) {
            Some(r) => r,
            None => {
                x = super::contiguous(x);
                super::rows(&x)?
            }
        };
        if len != k {
            return None;
        }
        let mut dims = x.layout().shape().to_vec();
        dims[D - 1] = n;
        let out = FlexTensor::empty(Shape::from(dims), DType::F32);
        Some(Operands { x, rows, stride, bias, out })
    }
}

/// The storage of `x` from its first element: row r of an [`Operands`] input at `[r·stride..]`.
fn from_start(x: &FlexTensor) -> &[f32] {
    &x.storage::<f32>()[x.layout().start_offset()..]
}

/// `x` [..., K] times `weight` [K, N] plus `bias` [N].
pub fn linear<const D: usize>(x: &Tensor<D>, weight: &Tensor<2>, bias: Option<&Tensor<1>>) -> Option<Tensor<D>> {
    let w = super::contiguous(super::flex_f32(weight)?);
    let [k, n] = w.layout().shape().dims::<2>();
    let Operands { x, rows, stride, bias, mut out } = Operands::read(x, bias, (k, n))?;
    let dst: &mut [f32] = out.storage_mut();
    if let Some(b) = &bias {
        let b: &[f32] = b.storage();
        dst.par_chunks_mut(n.max(1)).for_each(|row| row.copy_from_slice(b));
    }
    if rows == 0 || n == 0 || k == 0 {
        return Some(super::into_tensor(out));
    }
    let src = from_start(&x);
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

/// `x` [..., K] times a tile-layout bf16 weight (`words`, [K, N] as `amx` lays it out) plus
/// `bias`: the AMX product, when `x` is an f32 tensor of the plain CPU backend.
#[cfg(target_arch = "x86_64")]
pub fn tiled_linear<const D: usize>(
    x: &Tensor<D>,
    words: &Tensor<1, Int>,
    (inputs, outputs): (usize, usize),
    bias: Option<&Tensor<1>>,
) -> Option<Tensor<D>> {
    if !super::amx::available() {
        return None;
    }
    let Operands { x, rows, stride, bias, mut out } = Operands::read(x, bias, (inputs, outputs))?;
    let words = super::contiguous(words.clone().try_into_primitive::<Flex>().ok()?);
    let weight: &[i32] = words.storage();
    // SAFETY: the words hold the tile layout's u16 values, two per word, little-endian.
    let weight = unsafe { std::slice::from_raw_parts(weight.as_ptr() as *const u16, weight.len() * 2) };
    let bias = bias.as_ref().map(|b| b.storage::<f32>());
    let weight = &weight[..inputs * outputs];
    super::amx::matmul(from_start(&x), (rows, inputs, stride), weight, outputs, bias, out.storage_mut());
    Some(super::into_tensor(out))
}

#[cfg(not(target_arch = "x86_64"))]
pub fn tiled_linear<const D: usize>(
    _x: &Tensor<D>,
    _words: &Tensor<1, Int>,
    _dims: (usize, usize),
    _bias: Option<&Tensor<1>>,
) -> Option<Tensor<D>> {
    None
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
