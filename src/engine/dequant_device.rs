//! Packed weights dequantized on the device, with burn tensor ops over the packed words: what a
//! GPU runs instead of reading each layer's bytes back to the host, dequantizing there and
//! uploading the dense matrix again for every use (`engine::packed`).
//!
//! Every op is exact integer work or an exact float product (an f16 scale times a sub-block
//! scale times a quant stays within f32's 24-bit mantissa for every ggml type: at most
//! 11 + 7 + 5 bits, Q6_K's), then at most one rounded sum (− m), as `gguf::quant` computes, so
//! any backend gives the host's values bit for bit (fusing the last product and sum into one
//! FMA rounds the same, the product being exact). fp8 values come from a 256-entry table of
//! the host's exact decodings, times the layer's scale as the host multiplies it.
//! Covered: every type a packed weight holds (Q8_0, Q4_0/1, Q5_0/1, Q2_K … Q6_K, fp8 e4m3fn
//! and e5m2); F16/BF16/F32 GGUF tensors are read as floats at load and never packed.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::engine::fp8;
use crate::engine::gguf::quant::GgmlType;
use crate::engine::packed::Packing;

/// Whether [`dequantize`] handles `packing`.
pub fn supports(packing: Packing) -> bool {
    match packing {
        Packing::Gguf(ty) => !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16),
        Packing::F8E4M3 | Packing::F8E5M2 => true,
        // A CPU layout, never on a GPU.
        Packing::Bf16Tiles => false,
    }
}

/// The `len` stored bytes in `words` (little-endian i32 words) as [blocks, block bytes] ints
/// 0..=255.
fn block_bytes(words: Tensor<1, Int>, len: usize, block: usize) -> Tensor<2, Int> {
    let device = words.device();
    let count = words.dims()[0];
    let shifts = Tensor::<1, Int>::from_data(TensorData::new(vec![0i32, 8, 16, 24], [4]), &device);
    // Arithmetic shifts of negative words sign-extend; the mask keeps the byte.
    let bytes = words
        .reshape([count, 1])
        .expand([count, 4])
        .bitwise_right_shift(shifts.reshape([1, 4]).expand([count, 4]))
        .bitwise_and_scalar(255)
        .reshape([count * 4])
        .slice(0..len);
    bytes.reshape([len / block, block])
}

/// Columns `range` of `b` [blocks, bytes].
fn cols(b: &Tensor<2, Int>, range: std::ops::Range<usize>) -> Tensor<2, Int> {
    let rows = b.dims()[0];
    b.clone().slice([0..rows, range])
}

/// The little-endian integer of bytes `at..at + n` of each block, as [blocks, 1] (n ≤ 4; a
/// 4-byte value with its top bit set comes out negative, which right shifts and masks treat
/// as the same bits).
fn le(b: &Tensor<2, Int>, at: usize, n: usize) -> Tensor<2, Int> {
    (0..n)
        .map(|i| cols(b, at + i..at + i + 1).bitwise_left_shift_scalar(8 * i as i32))
        .reduce(|a, x| a.bitwise_or(x))
        .expect("n ≥ 1")
}

/// `n` bit fields of each block [blocks, bytes] → [blocks, n]: field k is
/// `(byte[i] >> shift) & mask` for `(i, shift, mask) = at(k)` (the K-quants scatter a value's
/// bits over several bytes, the same way in every block, so one gather per field does it).
fn fields(b: &Tensor<2, Int>, n: usize, at: impl Fn(usize) -> (usize, i32, i32)) -> Tensor<2, Int> {
    let device = b.device();
    let blocks = b.dims()[0];
    let (mut index, mut shift, mut mask) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for k in 0..n {
        let (i, s, m) = at(k);
        index.push(i as i32);
        shift.push(s);
        mask.push(m);
    }
    let row =
        |v: Vec<i32>| Tensor::<1, Int>::from_data(TensorData::new(v, [n]), &device).reshape([1, n]).expand([blocks, n]);
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [n]), &device);
    b.clone().select(1, index).bitwise_right_shift(row(shift)).bitwise_and(row(mask))
}

/// IEEE half bits [blocks, k] → f32: mantissa (with its implicit bit when normal) times a power
/// of two looked up from a table, so the result is exact (infinities and NaNs, which no valid
/// scale holds, come out finite).
fn f16_values(bits: Tensor<2, Int>, device: &Device) -> Tensor<2> {
    let dims = bits.dims();
    let sign = bits.clone().bitwise_right_shift_scalar(15).float();
    let exp = bits.clone().bitwise_right_shift_scalar(10).bitwise_and_scalar(31);
    let mant = bits.bitwise_and_scalar(1023);
    let normal = exp.clone().greater_elem(0).int();
    // 2^(e − 25) for e = max(exp, 1): (1024 + m)·2^(e−25) normal, m·2^−24 subnormal.
    let powers: Vec<f32> = (0..32).map(|e: i32| 2f32.powi(e.max(1) - 25)).collect();
    let table = Tensor::<1>::from_data(TensorData::new(powers, [32]), device);
    let scale = table.select(0, exp.reshape([dims[0] * dims[1]])).reshape(dims);
    let magnitude = (mant + normal * 1024).float() * scale;
    magnitude * (sign * -2.0 + 1.0)
}

/// `scale` [blocks, s] per sub-block times the quants `q` [blocks, s·k], as [blocks, s, k].
fn per_sub_block(scale: Tensor<2>, q: Tensor<2, Int>) -> Tensor<3> {
    let [blocks, s] = scale.dims();
    let k = q.dims()[1] / s;
    scale.reshape([blocks, s, 1]) * q.float().reshape([blocks, s, k])
}

/// A K-quant's values d·sc·q − dmin·m: `sc`, `m` [blocks, s] and `q` [blocks, 256] as ints,
/// `d`, `dmin` at bytes `d_at`, `d_at + 2`.
fn scaled_with_min(
    b: &Tensor<2, Int>,
    d_at: usize,
    sc: Tensor<2, Int>,
    m: Tensor<2, Int>,
    q: Tensor<2, Int>,
) -> Tensor<3> {
    let device = b.device();
    let d = f16_values(le(b, d_at, 2), &device);
    let dmin = f16_values(le(b, d_at + 2, 2), &device);
    let [blocks, s] = m.dims();
    per_sub_block(d * sc.float(), q) - (dmin * m.float()).reshape([blocks, s, 1])
}

/// The values of `len` bytes of `packing` held in `words`, in storage order, as f32 (fp8
/// before its layer scale).
pub fn dequantize(packing: Packing, words: Tensor<1, Int>, len: usize) -> Tensor<1> {
    let device = words.device();
    let ty = match packing {
        Packing::Gguf(ty) => ty,
        Packing::F8E4M3 | Packing::F8E5M2 => {
            let decode = if packing == Packing::F8E4M3 { fp8::e4m3fn } else { fp8::e5m2 };
            let table: Vec<f32> = (0..=255u8).map(decode).collect();
            let table = Tensor::<1>::from_data(TensorData::new(table, [256]), &device);
            return table.select(0, block_bytes(words, len, 1).reshape([len]));
        }
        Packing::Bf16Tiles => unreachable!("AMX tiles live on the CPU (see `supports`)"),
    };
    let (per_block, bytes) = ty.block();
    let b = block_bytes(words, len, bytes);
    let blocks = b.dims()[0];
    let d = |at| f16_values(le(&b, at, 2), &device);
    // Element e of a K-quant block: half e/128, quarter (e/32)%4, lane e%32.
    let values = match ty {
        GgmlType::Q8_0 => {
            // Two's complement of the byte: 0..127 stay, 128..255 become −128..−1.
            let q = cols(&b, 2..34).add_scalar(128).bitwise_and_scalar(255).sub_scalar(128);
            d(0) * q.float()
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let qs = if ty == GgmlType::Q4_1 { cols(&b, 4..20) } else { cols(&b, 2..18) };
            let q = Tensor::cat(vec![qs.clone().bitwise_and_scalar(15), qs.bitwise_right_shift_scalar(4)], 1);
            match ty {
                GgmlType::Q4_1 => d(0) * q.float() + d(2),
                _ => d(0) * q.sub_scalar(8).float(),
            }
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let at = if ty == GgmlType::Q5_1 { 4 } else { 2 };
            let qh = le(&b, at, 4).expand([blocks, 32]);
            let qs = cols(&b, at + 4..at + 20);
            let positions = Tensor::<1, Int>::arange(0..32, &device).reshape([1, 32]).expand([blocks, 32]);
            let high = qh.bitwise_right_shift(positions).bitwise_and_scalar(1).bitwise_left_shift_scalar(4);
            let low = Tensor::cat(vec![qs.clone().bitwise_and_scalar(15), qs.bitwise_right_shift_scalar(4)], 1);
            let q = low.bitwise_or(high);
            match ty {
                GgmlType::Q5_1 => d(0) * q.float() + d(2),
                _ => d(0) * q.sub_scalar(16).float(),
            }
        }
        GgmlType::Q2K => {
            // scales[16] (low nibble scale, high nibble min), qs[64], d, dmin.
            let sc = fields(&b, 16, |j| (j, 0, 15));
            let m = fields(&b, 16, |j| (j, 4, 15));
            let q = fields(&b, 256, |e| (16 + e / 128 * 32 + e % 32, 2 * (e / 32 % 4) as i32, 3));
            scaled_with_min(&b, 80, sc, m, q).reshape([blocks, 256])
        }
        GgmlType::Q3K => {
            // hmask[32], qs[64], scales[12] (6-bit, offset 32), d.
            let low = fields(&b, 16, |j| (96 + j % 8, 4 * (j / 8) as i32, 15));
            let high = fields(&b, 16, |j| (104 + j % 4, 2 * (j / 4) as i32, 3));
            let sc = low.bitwise_or(high.bitwise_left_shift_scalar(4)).sub_scalar(32);
            let ql = fields(&b, 256, |e| (32 + e / 128 * 32 + e % 32, 2 * (e / 32 % 4) as i32, 3));
            // A clear high bit subtracts 4.
            let hbit = fields(&b, 256, |e| (e % 32, (4 * (e / 128) + e / 32 % 4) as i32, 1));
            let q = ql + hbit.mul_scalar(4).sub_scalar(4);
            per_sub_block(d(108) * sc.float(), q).reshape([blocks, 256])
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            // d, dmin, scales[12] (eight 6-bit scales and mins), [qh[32]], qs[128].
            let six_bits = |low: fn(usize) -> (usize, i32, i32), high: fn(usize) -> (usize, i32, i32)| {
                fields(&b, 8, low).bitwise_or(fields(&b, 8, high).bitwise_left_shift_scalar(4))
            };
            let sc = six_bits(
                |g| if g < 4 { (4 + g, 0, 63) } else { (8 + g, 0, 15) },
                |g| if g < 4 { (4, 0, 0) } else { (g, 6, 3) },
            );
            let m = six_bits(
                |g| if g < 4 { (8 + g, 0, 63) } else { (8 + g, 4, 15) },
                |g| if g < 4 { (4, 0, 0) } else { (4 + g, 6, 3) },
            );
            let qs_at = if ty == GgmlType::Q5K { 48 } else { 16 };
            let mut q = fields(&b, 256, |e| (qs_at + e / 64 * 32 + e % 32, 4 * (e / 32 % 2) as i32, 15));
            if ty == GgmlType::Q5K {
                q = q.bitwise_or(fields(&b, 256, |e| (16 + e % 32, (e / 32) as i32, 1)).bitwise_left_shift_scalar(4));
            }
            scaled_with_min(&b, 0, sc, m, q).reshape([blocks, 256])
        }
        GgmlType::Q6K => {
            // ql[128], qh[64], scales[16] (int8), d.
            let low = fields(&b, 256, |e| (e / 128 * 64 + e % 64, 4 * (e % 128 / 64) as i32, 15));
            let high = fields(&b, 256, |e| (128 + e / 128 * 32 + e % 32, 2 * (e % 128 / 32) as i32, 3));
            let q = low.bitwise_or(high.bitwise_left_shift_scalar(4)).sub_scalar(32);
            let sc = fields(&b, 16, |j| (192 + j, 0, 255)).add_scalar(128).bitwise_and_scalar(255).sub_scalar(128);
            per_sub_block(d(208) * sc.float(), q).reshape([blocks, 256])
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("{} tensors are read as floats, never packed (see `supports`)", ty.name())
        }
    };
    values.reshape([blocks * per_block])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::packed::PackedHost;

    /// Where a block of `ty` keeps its f16 scales.
    fn f16_fields(ty: GgmlType) -> &'static [usize] {
        match ty {
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q2K => &[80, 82],
            GgmlType::Q3K => &[108],
            GgmlType::Q6K => &[208],
            _ => &[0],
        }
    }

    /// Random bytes with finite f16 scale fields (as the reference script's blocks).
    fn blocks(ty: GgmlType, count: usize, seed: u64) -> Vec<u8> {
        let (_, size) = ty.block();
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 32) as u32
        };
        let mut out: Vec<u8> = (0..count * size).map(|_| next() as u8).collect();
        for blk in out.chunks_mut(size) {
            for &at in f16_fields(ty) {
                // Normal and subnormal scales of both signs.
                let v = half::f16::from_f32(
                    (next() as f32 / u32::MAX as f32 - 0.5) * if next() % 4 == 0 { 1e-5 } else { 0.1 },
                );
                blk[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    fn assert_same(what: &str, got: Tensor<2>, want: &[f32]) {
        let got = got.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            // NaN (fp8 e4m3fn's 0x7f/0xff) equals NaN; everything else bit for bit.
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{what} value {i}: {a} vs {b}");
        }
    }

    #[test]
    fn every_packing_dequantizes_on_the_device_bit_for_bit_as_on_the_host() {
        let device = Device::flex();
        for ty in GgmlType::QUANTIZED {
            assert!(supports(Packing::Gguf(ty)));
            // 3 rows of one block: 102, 54 and 66 bytes (Q8_0, Q4_0, Q5_0) and Q3_K's 330 leave
            // the last word part padding.
            let (per_block, _) = ty.block();
            let packed =
                PackedHost::new(Packing::Gguf(ty), &[3, per_block], blocks(ty, 3, ty as u64 + 7), vec![]).unwrap();
            let want = packed.dequantize();
            assert_same(ty.name(), packed.upload(&device, burn::tensor::DType::F32).device_rows(), &want);
        }
        // Every byte value, with no scale, one scale, and one per row.
        let bytes: Vec<u8> = (0..=255).collect();
        for packing in [Packing::F8E4M3, Packing::F8E5M2] {
            for scale in [vec![], vec![0.37f32], (0..8).map(|r| 1.0 / (r as f32 + 3.0)).collect()] {
                let packed = PackedHost::new(packing, &[8, 32], bytes.clone(), scale).unwrap();
                let want = packed.dequantize();
                assert_same(packing.name(), packed.upload(&device, burn::tensor::DType::F32).device_rows(), &want);
            }
        }
        assert!(!supports(Packing::Gguf(GgmlType::F16)));
    }
}
