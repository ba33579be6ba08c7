//! Element-wise math written so that the compiler vectorizes it: no calls into libm, no
//! branches. Kernels call these from loops compiled for the widest vector unit the CPU has
//! (see [`simd_dispatch`]).

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two so that n·ln2 is exact in the first part (Cody–Waite).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// 1.5·2²³: adding it to a float of magnitude below 2²² rounds it to an integer, kept in the
/// low bits of the sum's representation (no float ↔ int conversion, which would not vectorize
/// as well).
const ROUNDER: f32 = 12_582_912.0;

/// eˣ within about 2 ulp over the f32 range (inputs are clamped: −87.3 gives ≈1e-38 instead
/// of a denormal, +88.3 about 2e38 instead of infinity): the Cephes polynomial on the
/// remainder after taking out a power of two.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUNDER;
    let n = t - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ: n sits in t's low mantissa bits; move it (biased) into the exponent field.
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUNDER.to_bits()).wrapping_add(127) << 23);
    e * two_n
}

/// Compiles `$body` (a closure-like block over its arguments) three times: for AVX-512, for
/// AVX2 + FMA and for the baseline, and runs the best one the CPU supports. The body's loops
/// are then vectorized at that width by the compiler.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features this copy was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_the_library_within_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, std) = (super::exp(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert!(super::exp(-1000.0) < 1e-37 && super::exp(-1000.0) >= 0.0);
        assert!(super::exp(1000.0).is_finite());
        assert_eq!(super::exp(0.0), 1.0);
    }
}
