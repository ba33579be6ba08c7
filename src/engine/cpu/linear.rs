//! y = x·W + b as one matrix product whose output starts as the bias rows, reading `x` in
//! place when it is a view of rows (a narrow of a wider projection); burn's path adds the
//! bias in a second pass and copies such views first.

use burn::tensor::{Int, Shape, Tensor};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{SharedMut, Strided, matmul};

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
    /// The output's shape: the input's with its last dim N.
    out: Shape,
}

impl Operands {
    /// None unless `x` and `bias` are plain flex f32, `x`'s rows hold `k` values and the bias `n`.
    fn read<const D: usize>(x: &Tensor<D>, bias: Option<&Tensor<1>>, dims: (usize, usize)) -> Option<Self> {
        let bias = match bias {
            Some(b) => Some(super::flex_f32(b)?),
            None => None,
        };
        Self::of(super::flex_f32(x)?, bias, dims)
    }

    /// [`Operands::read`] of flex tensors (`x` f32, of any rank).
    fn of(mut x: FlexTensor, bias: Option<FlexTensor>, (k, n): (usize, usize)) -> Option<Self> {
        let bias = bias.map(super::contiguous);
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
        *dims.last_mut()? = n;
        Some(Operands { x, rows, stride, bias, out: Shape::from(dims) })
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
    product(Operands::read(x, bias, (k, n))?, &w).map(super::into_tensor)
}

/// [`linear`] of flex tensors: `x` f32 [..., K], `weight` a contiguous f32 [K, N]. Also
/// returns `x` as the product read it (rows at a uniform stride: itself, or a copy).
pub(super) fn forward(
    x: FlexTensor,
    weight: &FlexTensor,
    bias: Option<FlexTensor>,
) -> Option<(FlexTensor, FlexTensor)> {
    let [k, n] = weight.layout().shape().dims::<2>();
    let operands = Operands::of(x, bias, (k, n))?;
    let x = operands.x.clone();
    Some((product(operands, weight)?, x))
}

/// The gradient at a Linear's input given `grad` [..., N] at its output: grad · weightᵀ, with
/// `weight` the contiguous [K, N] matrix read transposed in place.
pub(super) fn input_grad(grad: FlexTensor, weight: &FlexTensor) -> FlexTensor {
    let [k, n] = weight.layout().shape().dims::<2>();
    let grad = super::contiguous(grad);
    let mut dims = grad.layout().shape().to_vec();
    let rows = grad.layout().num_elements() / n.max(1);
    *dims.last_mut().expect("a Linear's output has a last dim") = k;
    if rows == 0 || k == 0 || n == 0 {
        // An empty sum.
        return super::zeros(Shape::from(dims));
    }
    // gemm runs this product (its weight read transposed) 1.3-1.7x faster into a column-major
    // output when there are few rows (measured at 384 rows for 768 -> 2304..5376 Linears: 153-197
    // against 261-266 GFLOP/s; at 1152 rows within 5 %), and transposing the few rows back
    // costs far less; with many rows the transposition would cost what it saves.
    let column_major = rows <= COLUMN_MAJOR_ROWS;
    // SAFETY: lhs is the contiguous [rows, n] gradient; rhs element (j, i) = weight[i, j] sits
    // at j + i·n of the contiguous [k, n] weight; `target` is [rows, k] (its `row`/`col`
    // strides) and gemm writes every element of it (no accumulation).
    let product = |target: Strided<*mut f32>| unsafe {
        matmul(
            rows,
            k,
            n,
            target,
            false,
            Strided { ptr: grad.storage::<f32>().as_ptr(), row: n as isize, col: 1 },
            Strided { ptr: weight.storage::<f32>().as_ptr(), row: 1, col: n as isize },
            1.0,
            rows * n * k >= PARALLEL_THRESHOLD,
        )
    };
    let data = if column_major {
        // SAFETY: the column-major product writes all rows·k values.
        let scratch = unsafe { super::written(rows * k, |p| product(Strided { ptr: p, row: 1, col: rows as isize })) };
        let mut data = vec![0f32; rows * k];
        super::transpose_into(&scratch, k, rows, &mut data);
        data
    } else {
        // SAFETY: the row-major product writes all rows·k values.
        unsafe { super::written(rows * k, |p| product(Strided { ptr: p, row: k as isize, col: 1 })) }
    };
    super::from_vec(data, Shape::from(dims))
}

/// Up to this many rows [`input_grad`] goes through a column-major output.
const COLUMN_MAJOR_ROWS: usize = 512;

/// A LoRA side path's products on a Linear's input: with `x` rows [rows, K] read from
/// `from_start(x)` at `stride`, h = x·D [rows, r] (D the contiguous [K, r] `down`), then
/// `out` [rows, N] += h·U (U the contiguous [r, N] `up`). Returns h, which the backward needs.
pub(super) fn add_side_path(
    x: &FlexTensor,
    down: &FlexTensor,
    up: &FlexTensor,
    out: &mut FlexTensor,
) -> Option<FlexTensor> {
    let [k, r] = down.layout().shape().dims::<2>();
    let [ur, n] = up.layout().shape().dims::<2>();
    let (rows, len, stride) = super::rows(x)?;
    if len != k || ur != r || out.layout().num_elements() != rows * n {
        return None;
    }
    let mut h = super::zeros(Shape::new([rows, r]));
    if rows == 0 || r == 0 || k == 0 || n == 0 {
        return Some(h);
    }
    let parallel = rows * r * (k + n) >= PARALLEL_THRESHOLD;
    let dst: &mut [f32] = h.storage_mut();
    // SAFETY: x's rows as in `product`; down and up contiguous at their shapes; h and out are
    // the contiguous [rows, r] and [rows, n] outputs.
    unsafe {
        matmul(
            rows,
            r,
            k,
            Strided { ptr: dst.as_mut_ptr(), row: r as isize, col: 1 },
            false,
            Strided { ptr: from_start(x).as_ptr(), row: stride as isize, col: 1 },
            Strided { ptr: down.storage::<f32>().as_ptr(), row: r as isize, col: 1 },
            1.0,
            parallel,
        );
        matmul(
            rows,
            n,
            r,
            Strided { ptr: out.storage_mut::<f32>().as_mut_ptr(), row: n as isize, col: 1 },
            true,
            Strided { ptr: h.storage::<f32>().as_ptr(), row: r as isize, col: 1 },
            Strided { ptr: up.storage::<f32>().as_ptr(), row: n as isize, col: 1 },
            1.0,
            parallel,
        );
    }
    Some(h)
}

/// The gradients of a LoRA side path (see [`add_side_path`]) given `grad` [rows, N] (contiguous)
/// at the Linear's output: adds gh·Dᵀ into `input_grad` [rows, K] (gh = grad·Uᵀ) when the
/// input's gradient is wanted, and returns (dD = xᵀ·gh [K, r], dU = hᵀ·grad [r, N]).
pub(super) fn side_path_grads(
    grad: &FlexTensor,
    x: &FlexTensor,
    h: &FlexTensor,
    (down, up): (&FlexTensor, &FlexTensor),
    input_grad: Option<&mut FlexTensor>,
) -> (FlexTensor, FlexTensor) {
    let [k, r] = down.layout().shape().dims::<2>();
    let n = up.layout().shape().dims::<2>()[1];
    let (rows, _, stride) = super::rows(x).expect("the forward read x as rows");
    let mut gh = super::zeros(Shape::new([rows, r]));
    let mut d_down = super::zeros(Shape::new([k, r]));
    let mut d_up = super::zeros(Shape::new([r, n]));
    if rows == 0 || r == 0 || k == 0 || n == 0 {
        return (d_down, d_up);
    }
    let parallel = rows * r * (k + n) >= PARALLEL_THRESHOLD;
    let g = grad.storage::<f32>().as_ptr();
    // SAFETY: grad, h, gh, d_down, d_up, input_grad contiguous at their shapes; up [r, n] read
    // transposed (element (j, i) at j + i·n); x's rows as in the forward, read transposed
    // (element (i, row) at row·stride + i); down [k, r] read transposed likewise.
    unsafe {
        // gh = grad · Uᵀ
        matmul(
            rows,
            r,
            n,
            Strided { ptr: gh.storage_mut::<f32>().as_mut_ptr(), row: r as isize, col: 1 },
            false,
            Strided { ptr: g, row: n as isize, col: 1 },
            Strided { ptr: up.storage::<f32>().as_ptr(), row: 1, col: n as isize },
            1.0,
            parallel,
        );
        // dU = hᵀ · grad
        matmul(
            r,
            n,
            rows,
            Strided { ptr: d_up.storage_mut::<f32>().as_mut_ptr(), row: n as isize, col: 1 },
            false,
            Strided { ptr: h.storage::<f32>().as_ptr(), row: 1, col: r as isize },
            Strided { ptr: g, row: n as isize, col: 1 },
            1.0,
            parallel,
        );
        let gh = gh.storage::<f32>().as_ptr();
        // dD = xᵀ · gh
        matmul(
            k,
            r,
            rows,
            Strided { ptr: d_down.storage_mut::<f32>().as_mut_ptr(), row: r as isize, col: 1 },
            false,
            Strided { ptr: from_start(x).as_ptr(), row: 1, col: stride as isize },
            Strided { ptr: gh, row: r as isize, col: 1 },
            1.0,
            parallel,
        );
        // input_grad += gh · Dᵀ
        if let Some(input_grad) = input_grad {
            matmul(
                rows,
                k,
                r,
                Strided { ptr: input_grad.storage_mut::<f32>().as_mut_ptr(), row: k as isize, col: 1 },
                true,
                Strided { ptr: gh, row: r as isize, col: 1 },
                Strided { ptr: down.storage::<f32>().as_ptr(), row: 1, col: r as isize },
                1.0,
                parallel,
            );
        }
    }
    (d_down, d_up)
}

/// The product of a [`linear`]'s operands with the contiguous [K, N] `w`.
fn product(operands: Operands, w: &FlexTensor) -> Option<FlexTensor> {
    let [k, n] = w.layout().shape().dims::<2>();
    let Operands { x, rows, stride, bias, out } = operands;
    if rows == 0 || n == 0 || k == 0 {
        // An empty sum: the bias alone.
        let mut out = super::zeros(out);
        if let Some(b) = &bias {
            let b: &[f32] = b.storage();
            out.storage_mut::<f32>().chunks_mut(n.max(1)).for_each(|row| row.copy_from_slice(b));
        }
        return Some(out);
    }
    let src = from_start(&x);
    let write = |dst: *mut f32| {
        if let Some(b) = &bias {
            let (b, dst): (&[f32], _) = (b.storage(), SharedMut(dst));
            // SAFETY: row r of the [rows, n] output is written by its task alone.
            (0..rows)
                .into_par_iter()
                .for_each(|r| unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), dst.at(r * n), n) });
        }
        // SAFETY: lhs row r (< rows) starts at r·stride within `src` and holds k elements (the
        // layout's rows); rhs is the contiguous [k, n] weight; dst is the [rows, n] output,
        // which gemm adds to (over the bias) or writes whole.
        unsafe {
            matmul(
                rows,
                n,
                k,
                Strided { ptr: dst, row: n as isize, col: 1 },
                bias.is_some(),
                Strided { ptr: src.as_ptr(), row: stride as isize, col: 1 },
                Strided { ptr: w.storage::<f32>().as_ptr(), row: n as isize, col: 1 },
                1.0,
                rows * n * k >= PARALLEL_THRESHOLD,
            );
        }
    };
    // SAFETY: the bias rows, or else the product, write all rows·n values.
    Some(super::from_vec(unsafe { super::written(rows * n, write) }, out))
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
    let Operands { x, rows, stride, bias, out } = Operands::read(x, bias, (inputs, outputs))?;
    let mut out = super::zeros(out);
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
