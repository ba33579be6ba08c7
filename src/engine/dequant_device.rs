//! GGUF blocks dequantized on the device, with burn tensor ops over the packed words: what a
//! GPU runs instead of reading each layer's bytes back to the host, dequantizing there and
//! uploading the dense matrix again for every use (`engine::packed`).
//!
//! Every op is exact integer work or an exact float product (an f16 scale times a quant of at
//! most 8 bits fits f32's mantissa), then at most one rounded sum (+ m), as `gguf::quant`
//! computes, so any backend gives the host's values bit for bit (fusing d·q + m into one FMA
//! rounds the same, the product being exact).
//! Covered: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; the K-quants still take the host path.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::engine::gguf::quant::GgmlType;

/// Whether [`dequantize`] handles `ty`.
pub fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1)
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

/// The values of `len` bytes of `ty` blocks held in `words`, in storage order, as f32.
pub fn dequantize(ty: GgmlType, words: Tensor<1, Int>, len: usize) -> Tensor<1> {
    let device = words.device();
    let (per_block, bytes) = ty.block();
    let b = block_bytes(words, len, bytes);
    let blocks = b.dims()[0];
    let d = || f16_values(le(&b, 0, 2), &device);
    let values = match ty {
        GgmlType::Q8_0 => {
            // Two's complement of the byte: 0..127 stay, 128..255 become −128..−1.
            let q = cols(&b, 2..34).add_scalar(128).bitwise_and_scalar(255).sub_scalar(128);
            d() * q.float()
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let qs = if ty == GgmlType::Q4_1 { cols(&b, 4..20) } else { cols(&b, 2..18) };
            let q = Tensor::cat(vec![qs.clone().bitwise_and_scalar(15), qs.bitwise_right_shift_scalar(4)], 1);
            match ty {
                GgmlType::Q4_1 => d() * q.float() + f16_values(le(&b, 2, 2), &device),
                _ => d() * q.sub_scalar(8).float(),
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
                GgmlType::Q5_1 => d() * q.float() + f16_values(le(&b, 2, 2), &device),
                _ => d() * q.sub_scalar(16).float(),
            }
        }
        other => unreachable!("{} is dequantized on the host (see `supports`)", other.name()),
    };
    values.reshape([blocks * per_block])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gguf::dequantize as host;
    use crate::engine::packed::{PackedHost, Packing};

    /// Random bytes with finite f16 scale fields (as the reference script's blocks).
    fn blocks(ty: GgmlType, count: usize, seed: u64) -> Vec<u8> {
        let (_, size) = ty.block();
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 32) as u32
        };
        let mut out: Vec<u8> = (0..count * size).map(|_| next() as u8).collect();
        let halves: &[usize] = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) { &[0, 2] } else { &[0] };
        for blk in out.chunks_mut(size) {
            for &at in halves {
                // Normal and subnormal scales of both signs.
                let v = half::f16::from_f32(
                    (next() as f32 / u32::MAX as f32 - 0.5) * if next() % 4 == 0 { 1e-5 } else { 0.1 },
                );
                blk[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    #[test]
    fn every_supported_type_dequantizes_on_the_device_bit_for_bit_as_on_the_host() {
        let device = Device::flex();
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1] {
            assert!(supports(ty));
            // 3 rows of one block: 102, 54 and 66 bytes (Q8_0, Q4_0, Q5_0) leave the last
            // word part padding.
            let bytes = blocks(ty, 3, ty as u64 + 7);
            let want = host(ty, &bytes).unwrap();
            let packed = PackedHost::new(Packing::Gguf(ty), &[3, 32], bytes.clone(), vec![]).unwrap();
            let weight = packed.upload(&device, burn::tensor::DType::F32);
            let got = dequantize(ty, weight.words.clone(), bytes.len()).into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(got.len(), want.len(), "{}", ty.name());
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{} value {i}: {a} vs {b}", ty.name());
            }
        }
        assert!(!supports(GgmlType::Q4K));
    }
}
