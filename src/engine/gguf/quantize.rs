//! f32 → ggml blocks: what `atelier quantize` and `atelier bench --quant` write.
//!
//! Q8_0, Q5_0 and Q4_0 follow the Python `gguf` package (`gguf.quants.quantize`) operation for
//! operation, so a file written here holds the bytes the package (and llama.cpp's reference
//! quantizer) would write for the same values. Q4_K has no quantizer in that package; ours
//! is the plain one (min/max per 32-value sub-block, 6-bit scales and mins against the block's
//! largest): it writes valid blocks that every reader dequantizes alike, but not llama.cpp's
//! error-minimizing search, so its error is somewhat larger than llama-quantize's.

use anyhow::{Result, bail};
use half::{bf16, f16};

use super::quant::GgmlType;

/// The values of one tensor (row-major, rows along the last dim) as `ty`'s bytes.
pub fn quantize(ty: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    let (per_block, block_bytes) = ty.block();
    if !values.len().is_multiple_of(per_block) {
        bail!("{} values are not whole {} blocks of {per_block}", values.len(), ty.name());
    }
    let mut out = Vec::with_capacity(values.len() / per_block * block_bytes);
    match ty {
        GgmlType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => values.iter().for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values.iter().for_each(|v| out.extend(bf16_round(*v).to_le_bytes())),
        GgmlType::Q8_0 => values.chunks_exact(32).for_each(|b| q8_0(b, &mut out)),
        GgmlType::Q4_0 => values.chunks_exact(32).for_each(|b| q4_0(b, &mut out)),
        GgmlType::Q5_0 => values.chunks_exact(32).for_each(|b| q5_0(b, &mut out)),
        GgmlType::Q4K => values.chunks_exact(256).for_each(|b| q4_k(b, &mut out)),
        other => {
            bail!("atelier does not write {} blocks (it writes F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q4_K)", other.name())
        }
    }
    Ok(out)
}

/// f32 → bf16 as the `gguf` package does it: round to nearest even on the upper 16 bits, NaNs
/// kept quiet (`__compute_fp32_to_bf16`).
fn bf16_round(v: f32) -> bf16 {
    let n = v.to_bits();
    if v.is_nan() {
        return bf16::from_bits(((n >> 16) | 64) as u16);
    }
    let rounded = (n as u64 + (0x7fff + ((n >> 16) & 1)) as u64) as u32;
    bf16::from_bits((rounded >> 16) as u16)
}

/// Reciprocal as numpy's `np.where(d == 0, 0, 1 / d)`.
fn recip(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

fn q8_0(b: &[f32], out: &mut Vec<u8>) {
    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = recip(d);
    out.extend(f16::from_f32(d).to_le_bytes());
    // `np_roundf`: half away from zero, which is what f32::round does.
    out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
}

/// The value of largest magnitude, the first one on ties (numpy's argmax of |x|).
fn signed_max(b: &[f32]) -> f32 {
    let mut best = b[0];
    for &v in &b[1..] {
        if v.abs() > best.abs() {
            best = v;
        }
    }
    best
}

/// `trunc(x · id + offset)` in f32 (no fused multiply-add), clipped to `top`: the package's
/// rounding for Q4_0 / Q5_0.
fn q_offset(x: f32, id: f32, offset: f32, top: u8) -> u8 {
    let q = (x * id + offset).trunc();
    (q.max(0.0) as u8).min(top)
}

fn q4_0(b: &[f32], out: &mut Vec<u8>) {
    let d = signed_max(b) / -8.0;
    let id = recip(d);
    out.extend(f16::from_f32(d).to_le_bytes());
    let q: Vec<u8> = b.iter().map(|&v| q_offset(v, id, 8.5, 15)).collect();
    out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
}

fn q5_0(b: &[f32], out: &mut Vec<u8>) {
    let d = signed_max(b) / -16.0;
    let id = recip(d);
    out.extend(f16::from_f32(d).to_le_bytes());
    let q: Vec<u8> = b.iter().map(|&v| q_offset(v, id, 16.5, 31)).collect();
    let qh = q.iter().enumerate().fold(0u32, |acc, (e, &v)| acc | (u32::from(v >> 4) << e));
    out.extend(qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0xF) | (q[j + 16] << 4)));
}

fn q4_k(b: &[f32], out: &mut Vec<u8>) {
    // Per sub-block of 32: x ≈ scale·q − min with q in 0..=15, min ≥ 0.
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (g, sub) in b.chunks_exact(32).enumerate() {
        let lo = sub.iter().fold(0f32, |m, &v| m.min(v));
        let hi = sub.iter().fold(f32::MIN, |m, &v| m.max(v));
        scales[g] = (hi - lo) / 15.0;
        mins[g] = -lo;
    }
    // The block's two f16 factors; the 6-bit per-sub-block values multiply them.
    let d = f16::from_f32(scales.iter().fold(0f32, |m, &s| m.max(s)) / 63.0);
    let dmin = f16::from_f32(mins.iter().fold(0f32, |m, &s| m.max(s)) / 63.0);
    let six = |v: f32, unit: f32| if unit > 0.0 { (v / unit).round().clamp(0.0, 63.0) as u8 } else { 0 };
    let sc: Vec<u8> = scales.iter().map(|&s| six(s, d.to_f32())).collect();
    let mn: Vec<u8> = mins.iter().map(|&m| six(m, dmin.to_f32())).collect();
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
    // The 12-byte packing `scale_min_k4` reads back.
    let mut packed = [0u8; 12];
    for j in 0..4 {
        packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        packed[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        packed[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
    out.extend(packed);
    let mut qs = [0u8; 128];
    for (e, &v) in b.iter().enumerate() {
        let (g, l) = (e / 32, e % 32);
        let step = d.to_f32() * f32::from(sc[g]);
        let offset = dmin.to_f32() * f32::from(mn[g]);
        let q = if step > 0.0 { ((v + offset) / step).round().clamp(0.0, 15.0) as u8 } else { 0 };
        qs[(g / 2) * 32 + l] |= q << (4 * (g % 2));
    }
    out.extend(qs);
}

#[cfg(test)]
mod tests {
    use super::super::quant::dequantize;
    use super::*;

    fn wave(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 7) as f32 * 0.2) - 0.1).collect()
    }

    #[test]
    fn round_trips_within_each_types_step() {
        let x = wave(512);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Worst error: half a step d for Q8_0 (d = amax/127); a whole step for Q5_0 / Q4_0
        // (d = amax/16, amax/8), whose reference rounding clips the far end of the range.
        for (ty, worst_allowed) in
            [(GgmlType::Q8_0, amax / 254.0), (GgmlType::Q5_0, amax / 16.0), (GgmlType::Q4_0, amax / 8.0)]
        {
            let back = dequantize(ty, &quantize(ty, &x).unwrap()).unwrap();
            let worst = x.iter().zip(&back).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= worst_allowed * 1.01 + 1e-3, "{}: {worst}", ty.name());
        }
        // Q4_K: 15 levels over each sub-block's range, scales on a 6-bit grid.
        let back = dequantize(GgmlType::Q4K, &quantize(GgmlType::Q4K, &x).unwrap()).unwrap();
        let worst = x.iter().zip(&back).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= amax * 2.0 / 15.0, "Q4_K: {worst}");
        let exact = [0.5f32, -1.25, 3.0, 0.0009765625];
        assert_eq!(dequantize(GgmlType::F16, &quantize(GgmlType::F16, &exact).unwrap()).unwrap(), exact);
        assert_eq!(dequantize(GgmlType::BF16, &quantize(GgmlType::BF16, &exact[..3]).unwrap()).unwrap(), exact[..3]);
        assert!(quantize(GgmlType::Q6K, &x[..256]).is_err());
        assert!(quantize(GgmlType::Q8_0, &x[..31]).is_err());
    }

    #[test]
    fn q8_0_of_a_known_block() {
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[1] = -63.5; // half away from zero → -64
        x[2] = 0.49;
        let b = quantize(GgmlType::Q8_0, &x).unwrap();
        assert_eq!(f16::from_le_bytes([b[0], b[1]]).to_f32(), 1.0);
        assert_eq!((b[2] as i8, b[3] as i8, b[4] as i8), (127, -64, 0));
    }
}
