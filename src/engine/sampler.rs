//! Flow-matching sampling: the sigma schedule (with FLUX.1-dev's resolution-dependent shift)
//! and the Euler step, as diffusers' `FlowMatchEulerDiscreteScheduler` and `FluxPipeline` do it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, Tensor};
use serde::Deserialize;

/// The parts of a diffusers `scheduler_config.json` that shape FLUX's schedule.
/// Defaults are diffusers' own defaults for the class.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct ScheduleConfig {
    pub num_train_timesteps: usize,
    /// Static shift, used when `use_dynamic_shifting` is off.
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    /// "exponential" (FLUX) or "linear".
    pub time_shift_type: String,
    /// When set, the schedule is stretched so that its last sigma equals this value.
    pub shift_terminal: Option<f64>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            time_shift_type: "exponential".into(),
            shift_terminal: None,
        }
    }
}

impl ScheduleConfig {
    /// FLUX.1-schnell: timestep-distilled, no shift (its `scheduler_config.json`).
    pub fn schnell() -> Self {
        ScheduleConfig { shift: 1.0, use_dynamic_shifting: false, ..Default::default() }
    }

    /// FLUX.1-dev: shift mu interpolated over the image token count from (256, 0.5) to
    /// (4096, 1.15) (its `scheduler_config.json`; BFL's `get_schedule`).
    pub fn dev() -> Self {
        ScheduleConfig { shift: 3.0, use_dynamic_shifting: true, ..Default::default() }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading scheduler config {}", path.display()))?;
        let config: ScheduleConfig =
            serde_json::from_str(&text).with_context(|| format!("parsing scheduler config {}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.use_dynamic_shifting && self.max_image_seq_len <= self.base_image_seq_len {
            bail!("scheduler config: max_image_seq_len must exceed base_image_seq_len");
        }
        if self.shift.is_nan() || self.shift <= 0.0 {
            bail!("scheduler config: shift must be positive");
        }
        if !matches!(self.time_shift_type.as_str(), "exponential" | "linear") {
            bail!("scheduler config: unknown time_shift_type {:?}", self.time_shift_type);
        }
        Ok(())
    }

    /// FluxPipeline's `calculate_shift`: mu as a linear function of the image token count.
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift) / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        image_seq_len as f64 * m + b
    }

    /// The sigmas for `steps` steps, ending with the final 0.
    pub fn sigmas(&self, steps: usize, image_seq_len: usize) -> Vec<f32> {
        assert!(steps > 0, "at least one step");
        // np.linspace(1.0, 1 / steps, steps)
        let base: Vec<f64> = (0..steps)
            .map(|i| {
                if steps == 1 {
                    1.0
                } else {
                    let end = 1.0 / steps as f64;
                    1.0 + (end - 1.0) * i as f64 / (steps - 1) as f64
                }
            })
            .collect();
        let mut sigmas: Vec<f64> = if self.use_dynamic_shifting {
            let mu = self.mu(image_seq_len);
            base.iter().map(|&t| self.time_shift(mu, t)).collect()
        } else {
            base.iter().map(|&t| self.shift * t / (1.0 + (self.shift - 1.0) * t)).collect()
        };
        if let Some(terminal) = self.shift_terminal {
            let one_minus_last = 1.0 - sigmas[sigmas.len() - 1];
            let scale = one_minus_last / (1.0 - terminal);
            for s in sigmas.iter_mut() {
                *s = 1.0 - (1.0 - *s) / scale;
            }
        }
        // diffusers stores sigmas as float32 tensors.
        let mut out: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        out.push(0.0);
        out
    }

    fn time_shift(&self, mu: f64, t: f64) -> f64 {
        match self.time_shift_type.as_str() {
            "linear" => mu / (mu + (1.0 / t - 1.0)),
            _ => mu.exp() / (mu.exp() + (1.0 / t - 1.0)),
        }
    }

    /// The timesteps the scheduler reports (sigma × num_train_timesteps), one per step.
    pub fn timesteps(&self, sigmas: &[f32]) -> Vec<f32> {
        sigmas[..sigmas.len() - 1].iter().map(|s| s * self.num_train_timesteps as f32).collect()
    }
}

/// One Euler step of the flow ODE: x ← x + (σ_next − σ) · v, in f32 as diffusers does.
pub fn euler_step<const D: usize>(x: Tensor<D>, velocity: Tensor<D>, sigma: f32, sigma_next: f32) -> Tensor<D> {
    let dtype = x.dtype();
    (x.cast(DType::F32) + velocity.cast(DType::F32) * (sigma_next - sigma)).cast(dtype)
}

/// What [`denoise`] reports around each step `i`.
pub enum StepEvent<'a> {
    /// Before the step (an error here stops the loop, e.g. a cancel).
    Start { step: usize },
    /// The velocity v at the current point x, with the step's σ.
    Velocity { step: usize, x: &'a Tensor<3>, v: &'a Tensor<3>, sigma: f32 },
    /// After the Euler step.
    Done { step: usize },
}

/// Integrates the flow from noise to clean latents with Euler steps over `sigmas` (one more
/// than the steps, ending at 0): x ← x + (σ_{i+1} − σ_i) · v(x, i).
pub fn denoise(
    mut x: Tensor<3>,
    sigmas: &[f32],
    mut velocity: impl FnMut(&Tensor<3>, usize) -> Result<Tensor<3>>,
    mut on: impl FnMut(StepEvent) -> Result<()>,
) -> Result<Tensor<3>> {
    for step in 0..sigmas.len().saturating_sub(1) {
        on(StepEvent::Start { step })?;
        let v = velocity(&x, step)?;
        on(StepEvent::Velocity { step, x: &x, v: &v, sigma: sigmas[step] })?;
        x = euler_step(x, v, sigmas[step], sigmas[step + 1]);
        on(StepEvent::Done { step })?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schnell_four_steps_is_a_plain_linspace() {
        let s = ScheduleConfig::schnell().sigmas(4, 4096);
        assert_eq!(s, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
    }

    #[test]
    fn denoise_follows_a_constant_velocity_from_one_to_zero() {
        let device = burn::tensor::Device::flex();
        let x = Tensor::<3>::from_data(burn::tensor::TensorData::new(vec![2.0f32, -1.0], [1, 1, 2]), &device);
        let v = x.clone() * 0.5;
        let mut events = Vec::new();
        let out = denoise(
            x,
            &[1.0, 0.75, 0.5, 0.0],
            |_, _| Ok(v.clone()),
            |e| {
                events.push(match e {
                    StepEvent::Start { step } => (0, step),
                    StepEvent::Velocity { step, .. } => (1, step),
                    StepEvent::Done { step } => (2, step),
                });
                Ok(())
            },
        )
        .unwrap();
        // x(0) = x(1) − v: each step adds (σ_next − σ)·v and the σ steps sum to −1.
        assert_eq!(out.into_data().try_to_vec::<f32>().unwrap(), vec![1.0, -0.5]);
        assert_eq!(events, [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)]);
    }

    #[test]
    fn dev_shift_endpoints() {
        let c = ScheduleConfig::dev();
        assert!((c.mu(256) - 0.5).abs() < 1e-12);
        assert!((c.mu(4096) - 1.15).abs() < 1e-12);
    }
}
