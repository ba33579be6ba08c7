//! Fused kernels for the CPU backend (burn flex), where burn's own path makes several passes
//! over memory or runs a scalar loop: linear layers (bias fused, views read in place), GELU,
//! attention, the split of fused q/k/v projections into normalized and rotated heads,
//! GroupNorm + SiLU, and 3×3 convolutions. Each takes burn tensors and answers `None` unless
//! they are f32 tensors of the plain flex backend (not autodiff, not a GPU): the callers then
//! take burn's path, which stays the reference the kernels are tested against.

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(not(target_arch = "x86_64"))]
pub mod amx {
    //! AMX exists on x86-64 only: elsewhere bf16 on the CPU keeps burn's emulated half type.
    pub fn available() -> bool {
        false
    }
    pub fn fits(_outputs: usize, _inputs: usize) -> bool {
        false
    }
    pub fn pack(_rows: &[f32], _outputs: usize, _inputs: usize) -> Vec<u8> {
        unreachable!("no AMX tiles off x86-64")
    }
    pub fn unpack(_bytes: &[u8], _outputs: usize, _inputs: usize) -> Vec<f32> {
        unreachable!("no AMX tiles off x86-64")
    }
}
mod attention;
mod conv;
mod gated;
mod gelu;
mod heads;
mod linear;
mod math;
mod modulated_norm;
mod norm;
pub mod tracked;

pub use attention::attention;
pub use conv::{ConvInput, conv3x3, conv3x3_with};
pub use gated::gated_add;
pub use gelu::gelu_tanh;
pub use heads::{HeadStream, joint_heads};
pub use linear::{linear, tiled_linear};
pub use modulated_norm::modulated_layer_norm;
pub use norm::{group_affine, group_norm};

/// Whether weights loaded for `dtype` on `device` become bf16 AMX tiles (`amx`): bf16 asked
/// for on the CPU backend of a CPU with AMX.
pub fn bf16_tiles(device: &burn::tensor::Device, dtype: DType) -> bool {
    dtype == DType::BF16 && *device == burn::tensor::Device::flex() && amx::available()
}

/// The dtype activations (and every weight but the Linears') take when `dtype` is asked for
/// on `device`: f32 where the Linears are bf16 tiles, else `dtype` itself.
pub fn activation_dtype(device: &burn::tensor::Device, dtype: DType) -> DType {
    if bf16_tiles(device, dtype) { DType::F32 } else { dtype }
}

use burn::tensor::{DType, Tensor};
use burn_flex::{Flex, FlexTensor};

/// The flex tensor behind `x`, when `x` is an f32 tensor of the plain CPU backend.
fn flex_f32<const D: usize>(x: &Tensor<D>) -> Option<FlexTensor> {
    if x.dtype() != DType::F32 {
        return None;
    }
    x.clone().try_into_primitive::<Flex>().ok()
}

/// `t` laid out row-major from offset 0 of its own storage (a copy unless it already is).
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() && t.layout().start_offset() == 0 { t } else { t.to_contiguous() }
}

/// A zeroed contiguous f32 tensor of `shape`. `FlexTensor::empty` builds its storage from a
/// `Vec<u8>` and then copies it into a 16-byte-aligned allocation: a memset and a memmove of
/// every output, where this is one zeroed allocation (f32's own alignment is all flex needs).
fn zeros(shape: burn::tensor::Shape) -> FlexTensor {
    from_vec(vec![0f32; shape.num_elements()], shape)
}

/// A contiguous f32 tensor of `shape` holding `data`.
fn from_vec(data: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    debug_assert_eq!(data.len(), shape.num_elements());
    FlexTensor::new(burn_backend::Bytes::from_elems(data), burn_flex::Layout::contiguous(shape), DType::F32)
}

/// `n` values that `write` stores through the pointer it is given, without zeroing them first
/// (for outputs a product writes whole, the zeroing was a memset of every output: 3 % of a
/// LoRA training step).
///
/// # Safety
/// `write` must initialise all `n` values.
unsafe fn written(n: usize, write: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(n);
    // SAFETY: MaybeUninit values need no initialisation.
    unsafe { v.set_len(n) };
    write(v.as_mut_ptr().cast());
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: the caller initialised every value; MaybeUninit<f32> has f32's layout, and the
    // allocation, length and capacity are the vector's own.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// Per batch item, Σ over its `tokens` of what `add(token row, acc)` adds into a `width`-long
/// accumulator (a modulation's gradient): blocks of tokens summed in parallel, then the blocks.
/// Returns batch × width values.
fn token_sums((batch, tokens): (usize, usize), width: usize, add: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    const TOKENS: usize = 64;
    let mut sums = vec![0f32; batch * width];
    for (bi, sums) in sums.chunks_mut(width.max(1)).enumerate() {
        let total = (0..tokens.div_ceil(TOKENS))
            .into_par_iter()
            .map(|i| {
                let mut acc = vec![0f32; width];
                for r in bi * tokens + i * TOKENS..bi * tokens + ((i + 1) * TOKENS).min(tokens) {
                    add(r, &mut acc);
                }
                acc
            })
            .reduce(|| vec![0f32; width], |a, c| a.iter().zip(&c).map(|(a, c)| a + c).collect());
        sums.copy_from_slice(&total);
    }
    sums
}

/// `dst` [cols, rows] = `src` [rows, cols]ᵀ, both row-major, in parallel over blocks of dst
/// rows, each read from `src` in cache-sized tiles.
pub fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    use rayon::prelude::*;
    const TILE: usize = 32;
    if rows == 0 {
        return;
    }
    dst.par_chunks_mut(TILE * rows).enumerate().for_each(|(block, d)| {
        let c0 = block * TILE;
        for r0 in (0..rows).step_by(TILE) {
            for (i, d) in d.chunks_mut(rows).enumerate() {
                let c = c0 + i;
                for r in r0..(r0 + TILE).min(rows) {
                    d[r] = src[r * cols + c];
                }
            }
        }
    });
}

/// (rows, row length, row stride) when `t` is rows of contiguous elements at a uniform stride
/// from its start offset: a contiguous tensor, or a narrow of its last dim.
fn rows(t: &FlexTensor) -> Option<(usize, usize, usize)> {
    let (shape, strides) = (t.layout().shape(), t.layout().strides());
    let n = strides.len();
    if n == 0 || strides[n - 1] != 1 {
        return None;
    }
    let len = shape[n - 1];
    let rows: usize = (0..n - 1).map(|i| shape[i]).product();
    if n == 1 {
        return Some((1, len, len));
    }
    let stride = strides[n - 2];
    // Outer dims must nest: each one steps over the whole of the dims inside it.
    let mut expected = stride;
    for i in (0..n - 1).rev() {
        if shape[i] != 1 && strides[i] != expected {
            return None;
        }
        expected *= shape[i] as isize;
    }
    (stride >= len as isize).then_some((rows, len, stride as usize))
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    t.layout().shape().dims::<4>()
}

fn into_tensor<const D: usize>(t: FlexTensor) -> Tensor<D> {
    Tensor::from_primitive::<Flex>(t)
}

/// One matrix of a product: its first element and the steps between rows and between columns,
/// in elements.
#[derive(Clone, Copy)]
struct Strided<P> {
    ptr: P,
    row: isize,
    col: isize,
}

/// dst[m, n] = (dst +) scale · lhs[m, k] · rhs[k, n], with `gemm::gemm`'s arguments named;
/// `parallel` lets gemm split the product over rayon's threads.
///
/// # Safety
/// Each pointer must address its m×n, m×k or k×n matrix at its strides, and dst must not be
/// written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: Strided<*mut f32>,
    accumulate: bool,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    scale: f32,
    parallel: bool,
) {
    let parallelism = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: as the caller promised; gemm reads dst only when `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col,
            dst.row,
            accumulate,
            lhs.ptr,
            lhs.col,
            lhs.row,
            rhs.ptr,
            rhs.col,
            rhs.row,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A pointer shared by parallel tasks that write disjoint parts of one output buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);

// SAFETY: every task writes its own, non-overlapping region (see each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: offsets stay inside the buffer the pointer came from (see each use).
        unsafe { self.0.add(offset) }
    }
}

/// Keeps freed activation buffers in the heap for the next operation instead of handing them
/// back to the kernel: glibc serves blocks above 128 KiB (dynamically up to 32 MiB) with fresh
/// `mmap`s, so every activation of a CPU forward pass was page-faulted and zeroed anew, which
/// cost more than the GELU it held. Now blocks up to 256 MiB come from the heap and up to
/// 256 MiB of free heap stays mapped. One arena for every thread: the server computes on its
/// worker thread, and a thread's own arena grows in heaps of at most 64 MiB, past which glibc
/// would `mmap` again. (The kernels' outputs are still zeroed on allocation, a memset that
/// costs far less than the page faults.) Called once at start by the binary.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds.
    unsafe {
        const MIB: libc::c_int = 1 << 20;
        libc::mallopt(libc::M_ARENA_MAX, 1);
        if libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * MIB) == 0 {
            // A glibc that caps the threshold at half its 64 MiB heap size still takes this.
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * MIB);
        }
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 * MIB);
    }
}

#[cfg(test)]
mod test_util {
    use burn::tensor::{Device, Distribution, Tensor};

    pub fn random<const D: usize>(shape: [usize; D]) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Device::flex())
    }

    /// Largest absolute difference between two tensors of the same shape.
    pub fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a = a.into_data().try_to_vec::<f32>().unwrap();
        let b = b.into_data().try_to_vec::<f32>().unwrap();
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }
}
