//! The rectified-flow training objective every FLUX trainer uses: x_t = (1 − σ)·x0 + σ·ε, the
//! model predicts the velocity ε − x0, loss = MSE; and the two ways of getting the LoRA's
//! gradients of it (plain autodiff, block recompute).

use anyhow::Result;

use crate::engine::flux::Flux;
use crate::engine::noise::TorchGenerator;
use crate::engine::sampler::ScheduleConfig;

pub use super::batch::{Batch, mse};
use super::params::{PairGrad, TrainableLora, host};

/// How σ is drawn for each training item (`--timesteps`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Timesteps {
    /// σ = sigmoid(z), z ~ N(0, 1) (ai-toolkit, SimpleTuner): most weight on mid noise.
    Sigmoid,
    /// sigmoid(z) through FLUX's resolution-dependent shift (kohya's `flux_shift`): the same
    /// shift the dev sampler uses for this many image tokens.
    Shift,
}

/// σ for `n` items of `image_seq_len` packed tokens, from `rng`.
pub fn sample_sigmas(kind: Timesteps, n: usize, image_seq_len: usize, rng: &mut TorchGenerator) -> Vec<f32> {
    let z = rng.randn(n);
    z.into_iter()
        .map(|z| {
            let t = 1.0 / (1.0 + (-z as f64).exp());
            let s = match kind {
                Timesteps::Sigmoid => t,
                Timesteps::Shift => {
                    let mu = ScheduleConfig::dev().mu(image_seq_len);
                    mu.exp() / (mu.exp() + (1.0 / t - 1.0))
                }
            };
            s as f32
        })
        .collect()
}

/// How the gradients are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backprop {
    /// One autodiff graph over the whole forward: every block's activations are kept.
    Plain,
    /// Block-level recompute (`train::recompute`): activations of one block at a time.
    Recompute,
}

/// The loss of one batch and the gradient of each LoRA pair (index-aligned with `lora.pairs`).
pub struct StepGrads {
    pub loss: f32,
    pub grads: Vec<PairGrad>,
}

/// Forward + backward for one batch, the backward seeded with `loss_scale` (1, or an f16
/// run's [`super::adamw::LossScale`]; the gradients come back divided by it). The model's
/// adapters are left cleared.
pub fn loss_and_grads(
    model: &mut Flux,
    lora: &TrainableLora,
    batch: &Batch,
    how: Backprop,
    loss_scale: f32,
) -> Result<StepGrads> {
    let mut acc: Vec<Option<PairGrad>> = vec![None; lora.pairs.len()];
    let loss = match how {
        Backprop::Plain => {
            let leaves = lora.install(model, "", true);
            let pred = model.forward(batch.input(batch.noisy()))?;
            let loss = mse(pred, batch.target());
            let grads = gradients_of(scaled(loss.clone(), loss_scale));
            leaves.collect(&grads, &mut acc);
            host(loss)[0]
        }
        Backprop::Recompute => super::recompute::backward(model, lora, batch, &mut acc, loss_scale)?,
    };
    crate::engine::lora::clear_loras(model);
    let grads = acc
        .into_iter()
        .zip(&lora.pairs)
        .map(|(g, p)| {
            // A pair outside every path of the graph (cannot happen for block Linears) has
            // a zero gradient.
            let g = g.unwrap_or_else(|| PairGrad { down: p.down.zeros_like(), up: p.up.zeros_like() });
            match loss_scale {
                1.0 => g,
                s => PairGrad { down: g.down / s, up: g.up / s },
            }
        })
        .collect();
    Ok(StepGrads { loss, grads })
}

/// The gradients of `seed` (a scalar): burn's backward pass, as one profile span.
pub fn gradients_of(seed: burn::tensor::Tensor<1>) -> burn::tensor::Gradients {
    crate::engine::profile::span("backward", || seed.backward())
}

/// `loss · scale` in the loss's dtype, the seed of a scaled backward.
pub fn scaled(loss: burn::tensor::Tensor<1>, scale: f32) -> burn::tensor::Tensor<1> {
    if scale == 1.0 { loss } else { loss * scale }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `torch.manual_seed(0); torch.randn(4)` drawn through σ = sigmoid(z), and kohya's
    /// `flux_shift` of it (`time_shift(mu, 1, t)`, mu linear in the token count from 0.5 at
    /// 256 tokens to 1.15 at 4096), written out here independently of the sampler's code.
    #[test]
    fn sigmas_are_torchs_normal_draws_through_sigmoid_and_kohyas_flux_shift() {
        let z = [1.540_996_1_f64, -0.293_428_9, -2.178_789_4, 0.568_431_3];
        let sigmoid: Vec<f64> = z.iter().map(|z| 1.0 / (1.0 + (-z).exp())).collect();
        let got = sample_sigmas(Timesteps::Sigmoid, 4, 1024, &mut TorchGenerator::new(0));
        for (g, e) in got.iter().zip(&sigmoid) {
            assert!((*g as f64 - e).abs() < 1e-6, "sigmoid: {got:?} vs {sigmoid:?}");
        }
        for (tokens, mu) in [(256usize, 0.5f64), (1024, 0.63), (4096, 1.15)] {
            let got = sample_sigmas(Timesteps::Shift, 4, tokens, &mut TorchGenerator::new(0));
            for (g, t) in got.iter().zip(&sigmoid) {
                let e = mu.exp() / (mu.exp() + (1.0 / t - 1.0));
                assert!((*g as f64 - e).abs() < 1e-5, "{tokens} tokens: {g} vs {e}");
                assert!(*g as f64 > *t && *g < 1.0, "the shift moves σ toward noise, inside (0, 1)");
            }
        }
    }
}
