//! FLUX.1 transformer: configuration, checkpoint layouts, RoPE and the network itself.

pub mod config;
pub mod layout;
pub mod model;
pub mod rope;

pub use config::{DiffusersConfig, FluxConfig};
pub use layout::{Layout, TransformerWeights};
pub use model::{Flux, FluxInput};
pub use rope::Rope;

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::{DType, Device};

/// Opens a transformer from a BFL/ComfyUI file or a diffusers `transformer/` folder,
/// infers its configuration and loads it onto `device`.
pub fn load_transformer(
    path: &Path,
    device: &Device,
    dtype: DType,
    axes_hint: Option<&DiffusersConfig>,
) -> Result<Flux> {
    let weights = TransformerWeights::open(path)?;
    let hint = crate::engine::weights::component_config(path, axes_hint)?;
    let config = FluxConfig::infer(&weights, hint.as_ref())
        .with_context(|| format!("reading the transformer configuration of {}", path.display()))?;
    crate::engine::weights::low_peak_load(|| Flux::load(&weights, config, device, dtype))
        .with_context(|| format!("loading the transformer {}", path.display()))
}

/// A diffusers `transformer/config.json`, if present.
pub fn read_diffusers_config(path: &Path) -> Result<Option<DiffusersConfig>> {
    crate::engine::weights::read_config_json(path)
}
