//! `config.toml`: defaults, loading and validation at start-up.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::ledger::{MeteringConfig, PlanConfig, PlansConfig, PricingConfig};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub engine: EngineConfig,
    pub limits: Limits,
    /// `[models.<id>]`: the models this installation serves.
    pub models: BTreeMap<String, ModelEntry>,
    /// `[metering]`, `[plans.*]`, `[pricing]`: read by the ledger (see `Config::plans`).
    pub metering: MeteringConfig,
    pub plans: BTreeMap<String, PlanConfig>,
    pub pricing: PricingConfig,
}

/// One model: a diffusers folder (`path`), or single files (BFL / ComfyUI layouts).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelEntry {
    pub path: Option<PathBuf>,
    pub transformer: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub clip: Option<PathBuf>,
    pub t5: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub device: String,
    pub dtype: String,
    pub weights_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_steps: u32,
}

impl Default for Config {
    fn default() -> Self {
        let plans = PlansConfig::shipped();
        Config {
            server: Default::default(),
            engine: Default::default(),
            limits: Default::default(),
            models: Default::default(),
            metering: plans.metering,
            plans: plans.plans,
            pricing: plans.pricing,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { listen: "127.0.0.1:8188".into(), data_dir: "data".into() }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { device: "auto".into(), dtype: "f32".into(), weights_dir: "weights".into() }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_width: 2048, max_height: 2048, max_steps: 100 }
    }
}

pub const DEFAULT_TOML: &str = include_str!("../config.toml");

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let config: Config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("invalid config {}", p.display()))?
            }
            None => Config::default(),
        };
        config.validate()?;
        Ok(config)
    }

    /// The metering configuration, validated; a config without `[plans.*]` keeps the shipped plans.
    pub fn plans(&self) -> Result<PlansConfig> {
        let plans = if self.plans.is_empty() { PlansConfig::shipped().plans } else { self.plans.clone() };
        Ok(PlansConfig::from_parts(self.metering.clone(), plans, self.pricing.clone())?)
    }

    pub fn validate(&self) -> Result<()> {
        self.plans()?;
        self.engine.device.parse::<crate::engine::device::DeviceChoice>()?;
        crate::engine::parse_dtype(&self.engine.dtype)?;
        let l = &self.limits;
        if l.max_width < 16 || l.max_height < 16 {
            bail!("limits.max_width and max_height must be at least 16");
        }
        if l.max_steps == 0 {
            bail!("limits.max_steps must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_is_valid_and_equals_the_defaults() {
        let shipped = Config::load(Some(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")))).unwrap();
        assert_eq!(shipped, Config::default(), "config.toml and the built-in defaults drifted apart");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<Config>("[engine]\ndevise = \"cpu\"").is_err());
    }
}
