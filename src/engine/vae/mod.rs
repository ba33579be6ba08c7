//! The FLUX autoencoder: checkpoint layouts and the network.

pub mod layout;
pub mod model;

pub use layout::{VaeLayout, VaeWeights};
pub use model::{Vae, VaeConfig, VaeHint};

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::{DType, Device};

use crate::engine::weights::WeightSet;

/// Opens a VAE from BFL's `ae.safetensors` or a diffusers `vae/` folder (whose `config.json`
/// supplies the GroupNorm groups and latent scaling; `hint` does for single files).
pub fn load_vae(path: &Path, device: &Device, dtype: DType, hint: Option<&VaeHint>) -> Result<Vae> {
    let (weights, config) = open_checked(path, hint)?;
    crate::engine::weights::low_peak_load(|| Vae::load(&weights, config, device, dtype))
        .with_context(|| format!("loading the VAE {}", path.display()))
}

/// Opens a VAE checkpoint and reads its configuration off the header, checking that it holds
/// every tensor of that configuration. Reads no tensor data.
pub fn open_checked(path: &Path, hint: Option<&VaeHint>) -> Result<(VaeWeights, VaeConfig)> {
    let weights = VaeWeights::new(WeightSet::open(path)?)?;
    let hint = crate::engine::weights::component_config(path, hint)?;
    let config = VaeConfig::infer(&weights, hint.as_ref())
        .with_context(|| format!("reading the VAE configuration of {}", path.display()))?;
    let cfg = config.clone();
    crate::engine::loader::check(&weights, &weights.describe(), "the expected layout", |l| Vae::build(l, cfg))?;
    Ok((weights, config))
}

/// A diffusers `vae/config.json`, if present.
pub fn read_hint(path: &Path) -> Result<Option<VaeHint>> {
    crate::engine::weights::read_config_json(path)
}
