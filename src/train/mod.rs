//! Training (`atelier train`): a LoRA for the FLUX transformer, or (`full`) every weight of it.
//!
//! - `dataset`: the image folder, captions, aspect buckets; `cache`: VAE latents and T5/CLIP
//!   outputs computed once, encoders dropped after.
//! - `params`: the trainable side path on the frozen base. The base stays on the plain device
//!   and only the LoRA pairs become autodiff leaves, so no full-size weight gradient exists.
//! - `objective`: the flow-matching loss and its gradients, plainly or with block-level
//!   `recompute`; `adamw`: torch's AdamW with a global-norm clip.
//! - `run`: the loop (progress, loss.csv, checkpoints, samples); `checkpoint`, `samples`,
//!   `export` (kohya or diffusers/PEFT keys).
//!
//! The engine's device comes in as a parameter; nothing here knows HTTP or SQL.

pub mod adamw;
pub mod batch;
pub mod cache;
pub mod checkpoint;
pub mod convert;
pub mod dataset;
pub mod export;
pub mod full;
pub mod objective;
pub mod params;
pub mod recompute;
pub mod run;
pub mod samples;
pub mod text;
pub mod trainee;
pub mod vae;

#[cfg(test)]
mod run_tests;
#[cfg(test)]
mod tests;
