//! The rectified-flow training objective every FLUX trainer uses: x_t = (1 − σ)·x0 + σ·ε, the
//! model predicts the velocity ε − x0, loss = MSE; and the two ways of getting the LoRA's
//! gradients of it (plain autodiff, block recompute).

use anyhow::Result;
use burn::tensor::{DType, Tensor, TensorData};

use crate::engine::flux::{Flux, FluxInput, Rope};
use crate::engine::noise::TorchGenerator;
use crate::engine::sampler::ScheduleConfig;

use super::params::{PairGrad, TrainableLora, host};

/// One training batch, everything on the device and already encoded.
pub struct Batch {
    /// Packed clean latents [B, L_img, C].
    pub x0: Tensor<3>,
    /// ε, same shape.
    pub noise: Tensor<3>,
    /// σ per item.
    pub sigmas: Vec<f32>,
    /// T5 states [B, L_txt, context].
    pub txt: Tensor<3>,
    /// CLIP pooled [B, vec_in].
    pub y: Tensor<2>,
    /// Per item, for guidance-distilled (dev) models: 1.0 when training.
    pub guidance: Option<Vec<f32>>,
    pub rope: Rope,
}

impl Batch {
    /// x_t = (1 − σ)·x0 + σ·ε, in the latents' dtype.
    pub fn noisy(&self) -> Tensor<3> {
        let b = self.sigmas.len();
        let device = self.x0.device();
        let s = Tensor::<3>::from_data(TensorData::new(self.sigmas.clone(), [b, 1, 1]), &device).cast(self.x0.dtype());
        self.x0.clone() * (s.clone().neg() + 1.0) + self.noise.clone() * s
    }

    /// The velocity the model should predict: ε − x0.
    pub fn target(&self) -> Tensor<3> {
        self.noise.clone() - self.x0.clone()
    }

    pub fn input<'a>(&'a self, noisy: Tensor<3>) -> FluxInput<'a> {
        FluxInput {
            img: noisy,
            txt: self.txt.clone(),
            y: self.y.clone(),
            timesteps: &self.sigmas,
            guidance: self.guidance.as_deref(),
            rope: &self.rope,
        }
    }
}

/// Mean squared error in f32 (a scalar tensor of one element).
pub fn mse(pred: Tensor<3>, target: Tensor<3>) -> Tensor<1> {
    (pred.cast(DType::F32) - target.cast(DType::F32)).square().mean()
}

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

/// Forward + backward for one batch. The model's adapters are left cleared.
pub fn loss_and_grads(model: &mut Flux, lora: &TrainableLora, batch: &Batch, how: Backprop) -> Result<StepGrads> {
    let mut acc: Vec<Option<PairGrad>> = vec![None; lora.pairs.len()];
    let loss = match how {
        Backprop::Plain => {
            let leaves = lora.install(model, "", true);
            let pred = model.forward(batch.input(batch.noisy()))?;
            let loss = mse(pred, batch.target());
            let grads = loss.backward();
            leaves.collect(&grads, &mut acc);
            host(loss)[0]
        }
        Backprop::Recompute => super::recompute::backward(model, lora, batch, &mut acc)?,
    };
    crate::engine::lora::clear_loras(model);
    let grads = acc
        .into_iter()
        .zip(&lora.pairs)
        .map(|(g, p)| {
            // A pair outside every path of the graph (cannot happen for block Linears) has
            // a zero gradient.
            g.unwrap_or_else(|| PairGrad { down: p.down.zeros_like(), up: p.up.zeros_like() })
        })
        .collect();
    Ok(StepGrads { loss, grads })
}
