//! LoRA training for the FLUX transformer (`atelier train`).
//!
//! - `params`: the trainable side path on the frozen base. The base stays on the plain device
//!   and only the LoRA pairs become autodiff leaves, so no full-size weight gradient exists.
//! - `objective`: the flow-matching loss and its gradients, plainly or with block-level
//!   `recompute`; `adamw`: torch's AdamW with a global-norm clip.
//!
//! The engine's device comes in as a parameter; nothing here knows HTTP or SQL.

pub mod adamw;
pub mod objective;
pub mod params;
pub mod recompute;

#[cfg(test)]
mod tests;
