//! What a run trains: a LoRA on the frozen transformer (the default), every weight of the
//! transformer (`--full`), or that and both text encoders (`--full --train-text-encoders`). The loop in `run` is the same for both; this is where they differ.

use std::path::Path;

use anyhow::Result;
use burn::tensor::Tensor;

use super::adamw::{AdamW, StepOutcome};
use super::batch::{Batch, mse};
use super::checkpoint;
use super::full::{FullParams, tracked};
use super::objective::{Backprop, loss_and_grads};
use super::params::{TrainableLora, host};
use super::text::TrainedText;
use crate::engine::flux::Flux;

pub enum Trainee {
    Lora(TrainableLora),
    Full(FullParams),
    /// Every weight of the transformer and of both text encoders.
    FullWithText(Box<TrainedText>),
}

impl Trainee {
    /// For the progress line: what is trained.
    pub fn describe(&self) -> String {
        match self {
            Trainee::Lora(l) => format!("training {} LoRA values on {} Linears", l.numel(), l.pairs.len()),
            Trainee::Full(f) => {
                format!("training all {} values of the transformer ({} tensors)", f.numel(), f.params.len())
            }
            Trainee::FullWithText(t) => format!(
                "training all {} values of the transformer and {} of the text encoders ({} tensors)",
                t.all.numel() - t.numel(),
                t.numel(),
                t.all.params.len()
            ),
        }
    }

    /// The optimizer state of a fresh run.
    pub fn optimizer(&self, model: &Flux, config: super::adamw::AdamWConfig) -> AdamW {
        match self {
            Trainee::Lora(l) => AdamW::for_lora(config, l),
            Trainee::Full(f) => AdamW::new(config, &f.values(model)),
            Trainee::FullWithText(t) => t.optimizer(model, config),
        }
    }

    /// Forward, backward and (where the loss is finite) one AdamW update on `batch`: the loss
    /// and what the update did.
    pub fn step(
        &mut self,
        model: &mut Flux,
        opt: &mut AdamW,
        batch: &Batch,
        how: Backprop,
    ) -> Result<(f32, StepOutcome)> {
        match self {
            Trainee::Lora(lora) => {
                let grads = loss_and_grads(model, lora, batch, how, opt.loss_scale.scale)?;
                let outcome =
                    if grads.loss.is_finite() { opt.step(lora, grads.grads) } else { StepOutcome::SkippedNonFinite };
                opt.loss_scale.update(outcome);
                Ok((grads.loss, outcome))
            }
            Trainee::Full(params) => params.step(model, opt, |leaves| full_loss(leaves, batch)),
            Trainee::FullWithText(t) => t.step(model, opt, batch),
        }
    }

    /// A checkpoint of the run after `step` steps.
    pub fn save(&self, dir: &Path, model: &Flux, opt: &AdamW, step: usize, seed: u64, settings: &str) -> Result<()> {
        match self {
            Trainee::Lora(lora) => checkpoint::save(dir, lora, opt, step, seed, settings),
            Trainee::Full(params) => params.save_checkpoint(dir, model, opt, (step, seed, settings)),
            Trainee::FullWithText(t) => t.save_checkpoint(dir, model, opt, (step, seed, settings)),
        }
    }

    /// The LoRA trained, if a LoRA is.
    pub fn into_lora(self) -> Option<TrainableLora> {
        match self {
            Trainee::Lora(l) => Some(l),
            Trainee::Full(_) | Trainee::FullWithText(_) => None,
        }
    }

    /// The LoRA, when one is trained (samples show it applied).
    pub fn lora(&self) -> Option<&TrainableLora> {
        match self {
            Trainee::Lora(l) => Some(l),
            Trainee::Full(_) | Trainee::FullWithText(_) => None,
        }
    }
}

/// The flow-matching loss of `model` on `batch` (every weight may be a leaf: full training keeps
/// one graph over the whole forward, since block recompute would save nothing there).
pub fn full_loss(model: &Flux, batch: &Batch) -> Result<Tensor<1>> {
    Ok(mse(model.forward(batch.input(batch.noisy()))?, batch.target()))
}

/// The loss of `batch` and the gradient of every parameter of the transformer (flattened, in
/// `params` order).
pub fn full_loss_and_grads(model: &Flux, params: &FullParams, batch: &Batch) -> Result<(f32, Vec<Tensor<1>>)> {
    let leaves = tracked(model);
    let loss = full_loss(&leaves, batch)?;
    let grads = loss.backward();
    Ok((host(loss)[0], params.grads(&leaves, &grads)?))
}
