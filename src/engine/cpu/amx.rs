//! bf16 matrix products on Intel AMX (Sapphire Rapids and later): `--dtype bf16` on the CPU.
//!
//! The flex backend's half types are emulated (every op converts), so a bf16 model there ran
//! slower than f32. What bf16 buys on such a CPU is the tile unit: one `tdpbf16ps` multiplies a
//! 16×32 by a 32×16 bf16 block into 16×16 f32 sums, several times the f32 FMA rate of the AVX-512
//! units. So on the CPU, bf16 means: Linear weights held as bf16 in the tile layout below (half
//! of f32's memory), activations in f32, each product rounding its input rows to bf16 (as torch's
//! bf16 matmul does) and summing in f32; every other op stays f32.
//!
//! Weight layout: the [in K, out N] matrix in blocks of 32 outputs × 32 inputs, each two 1 KiB
//! tiles (outputs 0..16 and 16..32) of 16 rows (input pairs) × 16 outputs × 2 values, the
//! "VNNI" order `tdpbf16ps` reads its second operand in; blocks by output pair, then input.
//! Input rows are converted per product into tiles of 16 rows × 32 inputs.

use std::arch::asm;
use std::arch::x86_64::{__m256bh, __m256i, _mm256_storeu_si256, _mm512_cvtneps_pbh, _mm512_loadu_ps};
use std::sync::OnceLock;

use rayon::prelude::*;

use super::SharedMut;

/// Input blocks of 32 per chunk (8192 inputs): the sums stay in the tiles over a whole chunk,
/// so most of FLUX's products (3072 or 12288 inputs) reload them at most once. Shorter chunks,
/// which keep a weight panel in L1, measured slower (a standalone test at 1152×3072×3072:
/// 16 blocks ~460, 32 ~450, whole K ~540 GFLOP/s per core): reloading the f32 sums costs more.
/// (In `atelier bench`, 64 and 256 measured the same within the run-to-run ±5 %.)
const K_CHUNK: usize = 256;
/// Row pairs per cache block (256 rows: a 256 KiB input panel, kept in L2).
const M_BLOCK: usize = 8;

/// Whether this CPU and kernel let the process use AMX bf16 (checked once; the environment
/// variable `ATELIER_NO_AMX=1` turns it off, to compare with the f32 path).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var_os("ATELIER_NO_AMX").is_some_and(|v| v != "0") {
            return false;
        }
        // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE; the row conversion needs AVX512-BF16.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        let cpu = edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && std::arch::is_x86_feature_detected!("avx512bf16");
        cpu && request_tile_data()
    })
}

/// Linux hands the tile registers' 8 KiB of state to processes that ask (`arch_prctl`).
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

/// Whether an [out, in] weight takes the tile layout (whole 32×32 blocks).
pub fn fits(outputs: usize, inputs: usize) -> bool {
    outputs > 0 && inputs > 0 && outputs.is_multiple_of(32) && inputs.is_multiple_of(32)
}

/// Where value (input k, output n) sits in the tile layout of a K-input matrix.
fn tile_index(k: usize, n: usize, inputs: usize) -> usize {
    let (pair, half, col) = (n / 32, n % 32 / 16, n % 16);
    let (block, within) = (k / 32, k % 32);
    ((pair * (inputs / 32) + block) * 2 + half) * 512 + within / 2 * 32 + col * 2 + within % 2
}

/// PyTorch's [out, in] rows (f32) as bf16 (round to nearest even) in the tile layout, as
/// little-endian bytes.
pub fn pack(rows: &[f32], outputs: usize, inputs: usize) -> Vec<u8> {
    assert!(rows.len() == outputs * inputs);
    tiles_of(outputs, inputs, |n, k| rows[n * inputs + k]).into_iter().flat_map(u16::to_le_bytes).collect()
}

/// The [in, out] matrix (f32) of tile-layout bytes: what a product off the AMX path multiplies by.
pub fn unpack(bytes: &[u8], outputs: usize, inputs: usize) -> Vec<f32> {
    let mut dense = vec![0f32; outputs * inputs];
    dense.par_chunks_mut(outputs).enumerate().for_each(|(k, row)| {
        for (n, v) in row.iter_mut().enumerate() {
            let at = 2 * tile_index(k, n, inputs);
            *v = half::bf16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32();
        }
    });
    dense
}

/// The second operand of a product whose value (input k, output n) is `value(n, k)`, in the
/// tile layout (`fits(outputs, inputs)` must hold), rounded to bf16 (nearest even): weights
/// ([`pack`]), attention's keys (n a key, k a head channel) and values (n a channel, k a key),
/// read in place from their strided storage.
pub fn tiles_of(outputs: usize, inputs: usize, value: impl Fn(usize, usize) -> f32 + Sync) -> Vec<u16> {
    assert!(fits(outputs, inputs));
    let mut tiles = vec![0u16; outputs * inputs];
    // One output pair's tiles are contiguous: a task per pair.
    tiles.par_chunks_mut(32 * inputs).enumerate().for_each(|(pair, out)| {
        for n in 0..32 {
            for k in 0..inputs {
                out[tile_index(k, n, inputs)] = half::bf16::from_f32(value(32 * pair + n, k)).to_bits();
            }
        }
    });
    tiles
}

/// The second operand of a product from f32 rows [k inputs][n outputs] (row-major, as the
/// Winograd convolution's transformed inputs come), into `out` in the tile layout;
/// `fits(n, k)` must hold. Rounds to nearest even in integer arithmetic the compiler
/// vectorizes (as `vcvtneps2bf16` for finite values), two input rows per pass.
pub fn tiles_from_rows(rows: &[f32], (k, n): (usize, usize), out: &mut [u16]) {
    assert!(available() && fits(n, k) && rows.len() == k * n && out.len() == k * n);
    // SAFETY: `available()` implies AVX-512 (AMX CPUs have it).
    unsafe { tiles_from_rows_avx512(rows, (k, n), out) }
}

#[target_feature(enable = "avx512f")]
unsafe fn tiles_from_rows_avx512(rows: &[f32], (k, n): (usize, usize), out: &mut [u16]) {
    let blocks = k / 32;
    let round = |x: u32| x.wrapping_add(0x7fff + ((x >> 16) & 1));
    for kp in 0..k / 2 {
        let (r0, r1) = (&rows[2 * kp * n..][..n], &rows[(2 * kp + 1) * n..][..n]);
        let (block, within) = (2 * kp / 32, 2 * kp % 32);
        for (c, (a, b)) in r0.chunks_exact(16).zip(r1.chunks_exact(16)).enumerate() {
            let (pair, half) = (c / 2, c % 2);
            let at = ((pair * blocks + block) * 2 + half) * 512 + within / 2 * 32;
            let dst = &mut out[at..at + 32];
            for i in 0..16 {
                let (x0, x1) = (round(a[i].to_bits()), round(b[i].to_bits()));
                dst[2 * i] = (x0 >> 16) as u16;
                dst[2 * i + 1] = (x1 >> 16) as u16;
            }
        }
    }
}

/// out [m, n] = x [m, k] · W on the calling thread (one task of a parallel loop), W as
/// [`tiles_of`] makes it; x row r at `x[r·stride..]`, out row r at `out + r·out_stride`.
///
/// # Safety
/// `out` must address m rows of n values at `out_stride`, written by no one else meanwhile.
pub unsafe fn product_rows(
    x: &[f32],
    (m, k, stride): (usize, usize, usize),
    weight: &[u16],
    n: usize,
    (out, out_stride): (*mut f32, usize),
) {
    assert!(available() && fits(n, k) && weight.len() == n * k && m > 0);
    let pairs_m = m.div_ceil(32);
    let a = input_tiles(x, (m, k, stride), pairs_m * 2, false);
    if m.is_multiple_of(32) {
        // SAFETY: as the caller promised; the tiles write exactly m rows of n.
        unsafe { block_product(&a, weight, None, (SharedMut(out), out_stride), (pairs_m, k), 0..n / 32) };
        return;
    }
    let mut padded = vec![0f32; pairs_m * 32 * n];
    // SAFETY: `padded` holds pairs_m·32 rows of n.
    unsafe { block_product(&a, weight, None, (SharedMut(padded.as_mut_ptr()), n), (pairs_m, k), 0..n / 32) };
    for (r, row) in padded.chunks_exact(n).take(m).enumerate() {
        // SAFETY: as the caller promised, row r of out holds n values.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * out_stride), n) };
    }
}

/// The tile shapes every product uses: tiles 0–3 the 16×16 f32 sums, 4–5 input rows, 6–7
/// weights; all 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

// Palette 1 has 8 tiles: the entries past them must stay zero (else `ldtilecfg` faults).
const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

macro_rules! tile_load {
    ($t:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $ptr, s = in(reg) $stride, options(nostack))
    };
}
macro_rules! tile_store {
    ($t:literal, $ptr:expr, $stride:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $ptr, s = in(reg) $stride, options(nostack))
    };
}

/// x rows (m of them, `k` values each, row r at `x[r·stride..]`) → bf16 tiles [row block of
/// 16][input block of 32][16][32], rows past m zero, `blocks16` row blocks.
fn input_tiles(x: &[f32], (m, k, stride): (usize, usize, usize), blocks16: usize, parallel: bool) -> Vec<u16> {
    let kb = k / 32;
    let mut tiles = vec![0u16; blocks16 * kb * 512];
    let convert = |(b, out): (usize, &mut [u16])| {
        for r in 0..16.min(m.saturating_sub(b * 16)) {
            let row = &x[(b * 16 + r) * stride..][..k];
            for (blk, chunk) in row.chunks_exact(32).enumerate() {
                let dst = &mut out[blk * 512 + r * 32..][..32];
                // SAFETY: `available()` checked AVX512-BF16; 32 floats in, 32 halves out.
                unsafe { to_bf16(chunk, dst) };
            }
        }
    };
    if parallel {
        tiles.par_chunks_mut(kb * 512).enumerate().for_each(convert);
    } else {
        tiles.chunks_mut(kb * 512).enumerate().for_each(convert);
    }
    tiles
}

/// 32 f32 → 32 bf16, rounding to nearest even.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn to_bf16(src: &[f32], dst: &mut [u16]) {
    for half in 0..2 {
        // SAFETY: src and dst hold 32 values (the caller's chunks).
        unsafe {
            let v = _mm512_loadu_ps(src.as_ptr().add(16 * half));
            let b = _mm512_cvtneps_pbh(v);
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(16 * half) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(b),
            );
        }
    }
}

/// y [m, n] = x [m, k] · W + bias, W in the tile layout (`weight`, [k, n]); x row r at
/// `x[r·stride..]`. `fits(n, k)` and [`available`] must hold.
pub fn matmul(
    x: &[f32],
    (m, k, stride): (usize, usize, usize),
    weight: &[u16],
    n: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    assert!(available() && fits(n, k) && weight.len() == n * k && y.len() == m * n);
    // The tiles read the bias 16 values at a time, unchecked.
    assert!(bias.is_none_or(|b| b.len() == n), "a bias of {} values for {n} outputs", bias.map_or(0, <[f32]>::len));
    let pairs_m = m.div_ceil(32);
    let a = input_tiles(x, (m, k, stride), pairs_m * 2, true);
    // The tiles write whole pairs of 16 rows: a row count that is not a multiple of 32 goes
    // through a padded buffer.
    let mut padded = Vec::new();
    let out = if m.is_multiple_of(32) {
        SharedMut(y.as_mut_ptr())
    } else {
        padded = vec![0f32; pairs_m * 32 * n];
        SharedMut(padded.as_mut_ptr())
    };
    let pairs_n = n / 32;
    let threads = rayon::current_num_threads().min(pairs_n).max(1);
    let per = pairs_n.div_ceil(threads);
    (0..threads).into_par_iter().for_each(|t| {
        let range = t * per..((t + 1) * per).min(pairs_n);
        // SAFETY: each task writes the output columns of its own output pairs; the tiles and
        // rows read are inside `a`, `weight`, `bias` by the shapes checked above.
        unsafe { block_product(&a, weight, bias, (out, n), (pairs_m, k), range) };
    });
    if !padded.is_empty() {
        y.copy_from_slice(&padded[..m * n]);
    }
}

/// The products of output pairs `pairs` over all rows, blocked so 256 rows' inputs stay in L2
/// while every output pair's weights meet them.
unsafe fn block_product(
    a: &[u16],
    w: &[u16],
    bias: Option<&[f32]>,
    (y, y_stride): (SharedMut, usize),
    (pairs_m, k): (usize, usize),
    pairs: std::ops::Range<usize>,
) {
    let kb = k / 32;
    let row_bytes = y_stride * 4;
    // SAFETY: CONFIG is a valid palette-1 configuration; every load, store and product below
    // stays inside the buffers (rows pairs_m·32 of y, pairs_m·2 row blocks of a, the pairs of w).
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack));
        for k0 in (0..kb).step_by(K_CHUNK) {
            let k1 = (k0 + K_CHUNK).min(kb);
            for m0 in (0..pairs_m).step_by(M_BLOCK) {
                for p in pairs.clone() {
                    for mp in m0..(m0 + M_BLOCK).min(pairs_m) {
                        let c0 = y.at(mp * 32 * y_stride + p * 32);
                        let (c1, c2, c3) = (c0.add(16), c0.add(16 * y_stride), c0.add(16 * y_stride + 16));
                        if k0 > 0 {
                            tile_load!("0", c0, row_bytes);
                            tile_load!("1", c1, row_bytes);
                            tile_load!("2", c2, row_bytes);
                            tile_load!("3", c3, row_bytes);
                        } else if let Some(b) = bias {
                            // Stride 0: every row of the sums starts as the bias.
                            let b = b.as_ptr().add(p * 32);
                            tile_load!("0", b, 0usize);
                            tile_load!("1", b.add(16), 0usize);
                            tile_load!("2", b, 0usize);
                            tile_load!("3", b.add(16), 0usize);
                        } else {
                            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
                        }
                        for blk in k0..k1 {
                            let a0 = a.as_ptr().add((2 * mp * kb + blk) * 512);
                            let a1 = a0.add(kb * 512);
                            let b0 = w.as_ptr().add((p * kb + blk) * 1024);
                            let b1 = b0.add(512);
                            // Each product starts as soon as its two tiles are in (10%
                            // faster than four loads, then four products).
                            tile_load!("4", a0, 64usize);
                            tile_load!("6", b0, 64usize);
                            asm!("tdpbf16ps tmm0, tmm4, tmm6", options(nostack));
                            tile_load!("7", b1, 64usize);
                            asm!("tdpbf16ps tmm1, tmm4, tmm7", options(nostack));
                            tile_load!("5", a1, 64usize);
                            asm!("tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7", options(nostack));
                        }
                        tile_store!("0", c0, row_bytes);
                        tile_store!("1", c1, row_bytes);
                        tile_store!("2", c2, row_bytes);
                        tile_store!("3", c3, row_bytes);
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn the_tile_layout_round_trips_through_bf16() {
        let (outputs, inputs) = (64, 96);
        let rows = random(outputs * inputs, 1);
        let dense = unpack(&pack(&rows, outputs, inputs), outputs, inputs);
        for n in 0..outputs {
            for k in 0..inputs {
                let want = half::bf16::from_f32(rows[n * inputs + k]).to_f32();
                assert_eq!(dense[k * outputs + n].to_bits(), want.to_bits(), "({k}, {n})");
            }
        }
        assert!(!fits(48, 64) && !fits(64, 48) && fits(32, 32));
        if available() {
            // The same tiles from [in][out] rows (the convolution's operand).
            let columns: Vec<f32> = (0..inputs * outputs).map(|i| rows[(i % outputs) * inputs + i / outputs]).collect();
            let mut tiles = vec![0u16; outputs * inputs];
            tiles_from_rows(&columns, (inputs, outputs), &mut tiles);
            let bytes: Vec<u8> = tiles.iter().flat_map(|t| t.to_le_bytes()).collect();
            assert_eq!(bytes, pack(&rows, outputs, inputs));
        }
    }

    /// Against f64 sums of the bf16-rounded operands: odd row counts (padding), a bias, and
    /// rows read at a stride wider than the row (a view of a wider projection).
    #[test]
    fn products_equal_f64_sums_of_the_rounded_operands() {
        if !available() {
            eprintln!("no AMX bf16 on this CPU: the kernel is not run (the layout test still is)");
            return;
        }
        for (m, k, n, stride) in [(1, 32, 32, 32), (37, 96, 64, 96), (64, 512 + 64, 96, 700)] {
            let x = random(m * stride, 2);
            let rows = random(n * k, 3);
            let bias = random(n, 4);
            let tiles: Vec<u16> = pack(&rows, n, k).chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
            for with_bias in [false, true] {
                let mut y = vec![f32::NAN; m * n];
                matmul(&x, (m, k, stride), &tiles, n, with_bias.then_some(&bias[..]), &mut y);
                for r in 0..m {
                    for c in 0..n {
                        let round = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
                        let dot: f64 = (0..k).map(|i| round(x[r * stride + i]) * round(rows[c * k + i])).sum();
                        let want = dot + if with_bias { bias[c] as f64 } else { 0.0 };
                        let got = y[r * n + c] as f64;
                        // f32 sums of k exact products: a few ulps of the magnitudes summed.
                        let scale: f64 =
                            (0..k).map(|i| (round(x[r * stride + i]) * round(rows[c * k + i])).abs()).sum();
                        assert!((got - want).abs() <= 1e-6 * (scale + 1.0), "({m},{k},{n}) [{r},{c}]: {got} vs {want}");
                    }
                }
            }
        }
    }
}
