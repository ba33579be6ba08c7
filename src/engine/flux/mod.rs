//! FLUX.1 transformer: configuration, checkpoint layouts, RoPE and the network itself.

pub mod config;
pub mod layout;
pub mod model;
pub mod rope;

pub use config::{DiffusersConfig, FluxConfig};
pub use layout::{Layout, TransformerWeights};
pub use model::{Embedded, Flux, FluxInput};
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
    let (weights, config) = open_checked(path, axes_hint)?;
    crate::engine::weights::low_peak_load(|| Flux::load(&weights, config, device, dtype))
        .with_context(|| format!("loading the transformer {}", path.display()))
}

/// [`load_transformer`] for full training: every parameter with its checkpoint name, refused
/// where some weights stay packed (GGUF, fp8).
pub fn load_transformer_named(
    path: &Path,
    device: &Device,
    dtype: DType,
    axes_hint: Option<&DiffusersConfig>,
) -> Result<(Flux, Vec<crate::engine::loader::NamedParam>, usize)> {
    let (weights, config) = open_checked(path, axes_hint)?;
    Flux::load_named(&weights, config, device, dtype)
        .with_context(|| format!("loading the transformer {}", path.display()))
}

/// Opens a transformer checkpoint and reads its configuration off the header, checking that
/// it holds exactly the tensors of that configuration. Reads no tensor data.
pub fn open_checked(path: &Path, axes_hint: Option<&DiffusersConfig>) -> Result<(TransformerWeights, FluxConfig)> {
    let weights = TransformerWeights::open(path)?;
    let hint = crate::engine::weights::component_config(path, axes_hint)?;
    let config = FluxConfig::infer(&weights, hint.as_ref())
        .with_context(|| format!("reading the transformer configuration of {}", path.display()))?;
    let cfg = config.clone();
    crate::engine::loader::check(&weights, &weights.describe(), "the FLUX layout", |l| Flux::build(l, cfg))?;
    Ok((weights, config))
}

/// The T5 length generation and training use by default: what the transformer was trained with
/// where its file records it (atelier's full training writes `max_sequence_length` into the
/// metadata: a model trained on short captions sees pad tokens it never learned beyond them),
/// else FLUX's 512 for dev and 256 for schnell.
pub fn default_sequence_length(path: &Path, is_dev: bool) -> usize {
    let recorded = TransformerWeights::open(path)
        .ok()
        .and_then(|w| w.metadata("max_sequence_length").and_then(|v| v.parse::<usize>().ok()));
    recorded.unwrap_or(if is_dev { 512 } else { 256 })
}

/// A diffusers `transformer/config.json`, if present.
pub fn read_diffusers_config(path: &Path) -> Result<Option<DiffusersConfig>> {
    crate::engine::weights::read_config_json(path)
}

/// Writes a random checkpoint of `config` in BFL layout: the tensors the model's own walk
/// reads, with the values `Walk::random` with `seed` gives (U(-1,1)/sqrt(fan_in), norm
/// scales 1), so it loads like a real file (`bench`, tests).
pub fn write_random_checkpoint(config: &FluxConfig, path: &Path, seed: u64) -> Result<()> {
    let walk = crate::engine::loader::Walk::plan();
    Flux::build(&walk.root(), config.clone())?;
    let axes = serde_json::to_string(&config.axes_dim)?;
    crate::engine::loader::write_random(path, &walk.entries(), &[("axes_dims_rope", &axes)], seed)
}
