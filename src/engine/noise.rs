//! Seeded Gaussian noise that equals PyTorch's CPU generator element for element.
//!
//! diffusers and ComfyUI draw the initial latents with
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=float32)`.
//! Reproducing that stream is what makes "same seed, same image" hold across tools.
//! Two facts from ATen's CPU kernels matter:
//! - the engine is MT19937 seeded with the low 32 bits of the seed;
//! - a contiguous float tensor of 16 or more elements is filled by `normal_fill`: all
//!   uniforms first, then Box–Muller over blocks of 16 (first 8 give cos, last 8 sin), with the
//!   last block recomputed from fresh uniforms when the size is not a multiple of 16
//!   (this is the portable kernel torch runs on AVX-512 and ARM CPUs; on CPUs whose best
//!   level is AVX2, torch uses a vectorized approximation that differs in the last bits);
//!   smaller tensors draw one double-precision normal at a time, pairing cos/sin through
//!   a cached second sample.

/// The Mersenne Twister MT19937 as ATen implements it (`at::mt19937`).
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    pub fn new(seed: u64) -> Self {
        // ATen keeps the full seed for `initial_seed()` but initializes from its low 32 bits.
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for j in 1..624 {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(j as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= MATRIX_A;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// ATen's `random64()`: the first draw is the high word.
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }
}

/// `torch.Generator("cpu").manual_seed(seed)` restricted to what `randn` needs.
pub struct TorchGenerator {
    engine: Mt19937,
    /// The second Box–Muller value of the scalar double path, returned by the next call.
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    pub fn new(seed: u64) -> Self {
        TorchGenerator { engine: Mt19937::new(seed), next_double_normal: None }
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled by 2^-24.
    fn uniform_f32(&mut self) -> f32 {
        let bits = self.engine.next_u32() & ((1 << 24) - 1);
        (bits as f64 / (1u64 << 24) as f64) as f32
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits scaled by 2^-53.
    fn uniform_f64(&mut self) -> f64 {
        let bits = self.engine.next_u64() & ((1u64 << 53) - 1);
        bits as f64 / (1u64 << 53) as f64
    }

    /// `normal_distribution<double>(0, 1)`, the path for tensors under 16 elements.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(numel elements, dtype=float32)` for a contiguous tensor.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        for start in (0..=numel - 16).step_by(16) {
            box_muller_16(&mut data[start..start + 16]);
        }
        if !numel.is_multiple_of(16) {
            // Torch overwrites the last 16 slots with fresh uniforms and transforms them again.
            let tail = &mut data[numel - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

/// ATen's `normal_fill_16` for float: every intermediate is a float (the angle is formed in
/// double, then stored as float), with libm's `logf`, `cosf` and `sinf`.
fn box_muller_16(block: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0f32 * u1.ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
        block[j] = radius * theta.cos();
        block[j + 8] = radius * theta.sin();
    }
}

/// Standard normal noise of `shape`, as `torch.randn(shape, generator=manual_seed(seed))`.
pub fn torch_randn(seed: u64, shape: &[usize]) -> Vec<f32> {
    TorchGenerator::new(seed).randn(shape.iter().product())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The C++ standard requires the 10000th output of mt19937 seeded 5489 to be 4123659995.
        let mut mt = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = mt.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn seed_uses_the_low_32_bits() {
        assert_eq!(torch_randn(1, &[20]), torch_randn((1u64 << 32) + 1, &[20]));
    }
}
