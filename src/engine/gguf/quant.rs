//! ggml's tensor types and their dequantization to f32.
//!
//! Block layouts follow ggml-common.h; the arithmetic follows the Python `gguf` package
//! (`gguf.quants.dequantize`) operation for operation (f32 products, then the offset; no fused
//! multiply-add), so the values are bit for bit the package's.

use anyhow::{Result, bail};
use half::f16;

/// The ggml tensor types atelier reads (`ggml_type` numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

const QK_K: usize = 256;

impl GgmlType {
    /// The block-quantized types (every type but the plain floats), legacy then K-quants.
    pub const QUANTIZED: [GgmlType; 10] = [
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// The type with ggml number `n`; an error naming known-but-unsupported types.
    pub fn from_u32(n: u32) -> Result<Self> {
        Ok(match n {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => {
                let name = match other {
                    9 => "Q8_1",
                    15 => "Q8_K",
                    16..=23 | 29 => "an IQ (importance) quant",
                    24..=27 => "an integer type",
                    28 => "F64",
                    34 | 35 => "a ternary quant (TQ1_0/TQ2_0)",
                    _ => "unknown",
                };
                bail!(
                    "ggml block type {other} ({name}) is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, \
                     Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
                )
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::BF16 => "BF16",
        }
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (QK_K, 84),
            Self::Q3K => (QK_K, 110),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
        }
    }

    /// Bytes of `numel` values, or None when `numel` is not a whole number of blocks.
    pub fn bytes_for(self, numel: usize) -> Option<usize> {
        let (values, bytes) = self.block();
        numel.is_multiple_of(values).then(|| numel / values * bytes)
    }
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes `bytes` (whole blocks of `ty`) to f32, in storage order.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>> {
    let (per_block, block_bytes) = ty.block();
    if !bytes.len().is_multiple_of(block_bytes) {
        bail!("{} bytes are not a whole number of {} blocks of {block_bytes} bytes", bytes.len(), ty.name());
    }
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * per_block);
    dequantize_into(ty, bytes, &mut out);
    Ok(out)
}

/// Appends the values of `bytes` (whole blocks of `ty`, checked by the caller) to `out`: the
/// kernel behind [`dequantize`] and the per-layer dequantization of packed weights.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    let (_, block_bytes) = ty.block();
    for b in bytes.chunks_exact(block_bytes) {
        match ty {
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(h(b, 0)),
            GgmlType::BF16 => out.push(f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
            GgmlType::Q8_0 => {
                let d = h(b, 0);
                out.extend(b[2..34].iter().map(|&q| d * f32::from(q as i8)));
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let d = h(b, 0);
                let (m, qs) = if ty == GgmlType::Q4_1 { (Some(h(b, 2)), &b[4..20]) } else { (None, &b[2..18]) };
                for shift in [0, 4] {
                    for &q in qs {
                        let q = (q >> shift) & 0xF;
                        out.push(match m {
                            Some(m) => d * f32::from(q) + m,
                            None => d * f32::from(q as i8 - 8),
                        });
                    }
                }
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let d = h(b, 0);
                let (m, at) = if ty == GgmlType::Q5_1 { (Some(h(b, 2)), 4) } else { (None, 2) };
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                let qs = &b[at + 4..at + 20];
                for e in 0..32 {
                    let q = ((qs[e % 16] >> (4 * (e / 16))) & 0xF) | ((((qh >> e) & 1) as u8) << 4);
                    out.push(match m {
                        Some(m) => d * f32::from(q) + m,
                        None => d * f32::from(q as i8 - 16),
                    });
                }
            }
            GgmlType::Q2K => {
                let (scales, qs) = (&b[0..16], &b[16..80]);
                let (d, dmin) = (h(b, 80), h(b, 82));
                for e in 0..QK_K {
                    let (half, s, l) = (e / 128, (e / 32) % 4, e % 32);
                    let sc = scales[e / 16];
                    let dl = d * f32::from(sc & 0xF);
                    let ml = dmin * f32::from(sc >> 4);
                    let q = (qs[half * 32 + l] >> (2 * s)) & 3;
                    out.push(dl * f32::from(q) - ml);
                }
            }
            GgmlType::Q3K => {
                let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
                let d = h(b, 108);
                for e in 0..QK_K {
                    let (half, s, l) = (e / 128, (e / 32) % 4, e % 32);
                    let j = e / 16;
                    let low = if j < 8 { scales[j] & 0xF } else { scales[j - 8] >> 4 };
                    let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
                    let scale = ((low | (high << 4)) as i8).wrapping_sub(32);
                    let dl = d * f32::from(scale);
                    let ql = ((qs[half * 32 + l] >> (2 * s)) & 3) as i8;
                    let hbit = ((hmask[l] >> (4 * half + s)) & 1) ^ 1;
                    out.push(dl * f32::from(ql - ((hbit << 2) as i8)));
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, dmin, scales) = (h(b, 0), h(b, 2), &b[4..16]);
                let (qh, qs) = if ty == GgmlType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
                for e in 0..QK_K {
                    let (g, l) = (e / 32, e % 32);
                    let (sc, mn) = scale_min_k4(scales, g);
                    let dl = d * f32::from(sc);
                    let dm = dmin * f32::from(mn);
                    let mut q = (qs[(g / 2) * 32 + l] >> (4 * (g % 2))) & 0xF;
                    if let Some(qh) = qh {
                        q |= ((qh[l] >> g) & 1) << 4;
                    }
                    out.push(dl * f32::from(q) - dm);
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = h(b, 208);
                for e in 0..QK_K {
                    let (half, r) = (e / 128, e % 128);
                    let low = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
                    let high = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 3;
                    let q = ((low | (high << 4)) as i8) - 32;
                    let dl = d * f32::from(scales[e / 16] as i8);
                    out.push(dl * f32::from(q));
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K / Q5_K block.
fn scale_min_k4(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_and_q4_0_by_hand() {
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let v = dequantize(GgmlType::Q8_0, &b).unwrap();
        assert_eq!(v[0], -8.0);
        assert_eq!(v[31], 7.5);
        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend([0x9Fu8; 16]);
        let v = dequantize(GgmlType::Q4_0, &b).unwrap();
        assert_eq!((v[0], v[16]), (14.0, 2.0));
        assert!(dequantize(GgmlType::Q4_0, &b[..17]).is_err());
        assert!(GgmlType::from_u32(16).unwrap_err().to_string().contains("IQ"));
    }
}
