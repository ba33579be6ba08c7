//! AdamW over the LoRA pairs, step for step what `torch.optim.AdamW` does (decoupled weight
//! decay, bias-corrected moments, eps added after the square root), preceded by
//! `clip_grad_norm_`'s global-norm clip. Written here because burn's optimizer has other
//! defaults (eps 1e-5, weight decay 1e-4) and clips per tensor, not globally.

use burn::tensor::Tensor;

use super::params::{PairGrad, TrainableLora, host};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global L2 norm of all gradients to this (None: no clip).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    /// torch's defaults, with the 1.0 clip every FLUX trainer uses.
    fn default() -> Self {
        AdamWConfig { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, max_grad_norm: Some(1.0) }
    }
}

/// How the learning rate moves over a run: a linear warmup from 0 over the first
/// `warmup_steps`, then constant or a cosine decay towards 0 at the last step (the usual recipe
/// for training from scratch: the warmup keeps the first steps from blowing up fresh AdamW
/// moments, the decay settles the weights the last steps leave behind).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    pub warmup_steps: usize,
    pub cosine: bool,
}

impl LrSchedule {
    /// A constant rate (what every run had before schedules existed).
    pub fn is_constant(&self) -> bool {
        *self == LrSchedule::default()
    }

    /// The rate of step `step` (0-based) of a `total`-step run whose peak rate is `base`.
    pub fn lr(&self, base: f64, step: usize, total: usize) -> f64 {
        if step < self.warmup_steps {
            return base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if !self.cosine {
            return base;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// The optimizer state: step count and both moments of every slot. A slot is one trained
/// tensor, flattened: a LoRA's down or up matrix, or one parameter of a fully trained model.
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    /// (m, v) of every slot, index-aligned with the slots `update` is given.
    pub moments: Vec<[Tensor<1>; 2]>,
    /// The loss scale of an f16 run (part of the state a checkpoint keeps).
    pub loss_scale: LossScale,
}

/// Dynamic loss scaling for f16 training (torch's `GradScaler`, its defaults): the loss is
/// multiplied by `scale` before the backward so small gradients survive f16's range (below
/// 6e-8 they flush to zero), the gradients divided by it after (a power of two: exact). A step
/// whose gradients are not finite is skipped and halves the scale; 2000 finite steps in a row
/// double it. Off (scale 1, never changed) for f32 and bf16, which have f32's range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    pub scale: f32,
    /// Finite steps since the scale last changed.
    pub good_steps: u32,
    pub dynamic: bool,
}

impl LossScale {
    pub const INITIAL: f32 = 65536.0;
    pub const GROWTH_INTERVAL: u32 = 2000;

    pub fn off() -> Self {
        LossScale { scale: 1.0, good_steps: 0, dynamic: false }
    }

    /// Dynamic scaling where the base computes in `dtype` (f16), else off.
    pub fn for_dtype(dtype: burn::tensor::DType) -> Self {
        match dtype {
            burn::tensor::DType::F16 => LossScale { scale: Self::INITIAL, good_steps: 0, dynamic: true },
            _ => Self::off(),
        }
    }

    /// After a step: back off on an overflow, grow after a long run of finite steps.
    pub fn update(&mut self, outcome: StepOutcome) {
        if !self.dynamic {
            return;
        }
        match outcome {
            StepOutcome::SkippedNonFinite => {
                // Never below 2^-24: a scale that small means the loss itself is not finite.
                self.scale = (self.scale * 0.5).max(f32::powi(2.0, -24));
                self.good_steps = 0;
            }
            StepOutcome::Applied { .. } => {
                self.good_steps += 1;
                if self.good_steps >= Self::GROWTH_INTERVAL {
                    self.scale = (self.scale * 2.0).min(f32::powi(2.0, 64));
                    self.good_steps = 0;
                }
            }
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepOutcome {
    /// Applied; the global gradient norm before clipping.
    Applied { grad_norm: f64 },
    /// Skipped: the gradients were not finite (an f16 overflow); nothing changed.
    SkippedNonFinite,
}

impl AdamW {
    /// Zero moments for `slots`.
    pub fn new(config: AdamWConfig, slots: &[Tensor<1>]) -> Self {
        let moments = slots.iter().map(|p| [p.zeros_like(), p.zeros_like()]).collect();
        AdamW { config, step: 0, moments, loss_scale: LossScale::off() }
    }

    /// For the pairs of `lora` (slots: each pair's down, then its up).
    pub fn for_lora(config: AdamWConfig, lora: &TrainableLora) -> Self {
        Self::new(config, &lora.slots())
    }

    /// One update of `lora` with `grads` (index-aligned with its pairs).
    pub fn step(&mut self, lora: &mut TrainableLora, grads: Vec<PairGrad>) -> StepOutcome {
        let mut slots = lora.slots();
        let grads = grads.into_iter().flat_map(|g| [flat(g.down), flat(g.up)]).collect();
        let outcome = self.update(&mut slots, grads);
        lora.set_slots(slots);
        outcome
    }

    /// One update of `params` with `grads` (both index-aligned with the moments).
    pub fn update(&mut self, params: &mut [Tensor<1>], grads: Vec<Tensor<1>>) -> StepOutcome {
        assert_eq!(params.len(), self.moments.len(), "one moment pair per slot");
        assert_eq!(grads.len(), self.moments.len(), "one gradient per slot");
        let c = self.config;
        // Summed on the device and read once (one read per tensor costs a sync each).
        let sums: Vec<Tensor<1>> = grads.iter().map(|g| g.clone().square().sum()).collect();
        let norm = match sums.is_empty() {
            true => 0.0,
            false => (host(Tensor::cat(sums, 0).sum())[0] as f64).sqrt(),
        };
        if !norm.is_finite() {
            return StepOutcome::SkippedNonFinite;
        }
        // torch: coef = max_norm / (norm + 1e-6), clamped to 1, always multiplied in.
        let clip = c.max_grad_norm.map(|m| (m / (norm + 1e-6)).min(1.0));
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = c.lr / bc1;
        let decay = 1.0 - c.lr * c.weight_decay;
        for ((p, g), moments) in params.iter_mut().zip(grads).zip(&mut self.moments) {
            let [m, v] = moments.clone();
            let g = match clip {
                Some(k) => g * k,
                None => g,
            };
            // m.lerp_(g, 1 − β1) = m + (g − m)(1 − β1); v = β2 v + (1 − β2) g².
            let m = m.clone() + (g.clone() - m) * (1.0 - c.beta1);
            let v = v * c.beta2 + g.clone() * g * (1.0 - c.beta2);
            let denom = v.clone().sqrt() / bc2_sqrt + c.eps;
            *p = p.clone() * decay - m.clone() / denom * step_size;
            *moments = [m, v];
        }
        StepOutcome::Applied { grad_norm: norm }
    }
}

/// A tensor as one row of its values (row-major).
pub fn flat<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n = t.shape().num_elements();
    t.reshape([n])
}

#[cfg(test)]
mod loss_scale_tests {
    use super::{LossScale, StepOutcome};

    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_the_growth_interval() {
        let applied = StepOutcome::Applied { grad_norm: 1.0 };
        let mut s = LossScale::for_dtype(burn::tensor::DType::F16);
        s.update(StepOutcome::SkippedNonFinite);
        s.update(StepOutcome::SkippedNonFinite);
        assert_eq!((s.scale, s.good_steps), (16384.0, 0));
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            s.update(applied);
        }
        assert_eq!(s.scale, 16384.0);
        s.update(applied);
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
        let mut off = LossScale::for_dtype(burn::tensor::DType::F32);
        off.update(StepOutcome::SkippedNonFinite);
        assert_eq!(off, LossScale::off());
    }
}

#[cfg(test)]
mod schedule_tests {
    use super::LrSchedule;

    #[test]
    fn warmup_then_cosine_reaches_the_peak_and_decays_towards_zero() {
        let s = LrSchedule { warmup_steps: 4, cosine: true };
        let lrs: Vec<f64> = (0..12).map(|i| s.lr(1.0, i, 12)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert_eq!(lrs[4], 1.0);
        // Halfway through the decay: half the peak.
        assert!((lrs[8] - 0.5).abs() < 1e-12);
        assert!(lrs.windows(2).skip(4).all(|w| w[1] < w[0]));
        assert!(lrs[11] > 0.0 && lrs[11] < 0.04);
        let constant = LrSchedule::default();
        assert!(constant.is_constant());
        assert!((0..12).all(|i| constant.lr(3e-4, i, 12) == 3e-4));
        let warm_only = LrSchedule { warmup_steps: 2, cosine: false };
        assert_eq!([0, 1, 2, 9].map(|i| warm_only.lr(2.0, i, 10)), [1.0, 2.0, 2.0, 2.0]);
    }
}
