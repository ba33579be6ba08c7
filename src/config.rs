//! `config.toml`: defaults, loading and validation at start-up.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::ledger::{MeteringConfig, ModelPricing, PlanConfig, PlansConfig, PricingConfig};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub engine: EngineConfig,
    pub limits: crate::spec::ConfiguredLimits,
    pub queue: QueueConfig,
    /// `[datasets]`: limits on training datasets (uploads, counts, captions).
    pub datasets: DatasetsConfig,
    /// `[training]`: LoRA training jobs (preset, limits, checkpoints).
    pub training: TrainingConfig,
    /// `[models.<id>]`: the models this installation serves.
    pub models: BTreeMap<String, ModelEntry>,
    /// `[metering]`, `[plans.*]`, `[pricing]`: read by the ledger (see `Config::plans`).
    pub metering: MeteringConfig,
    pub plans: BTreeMap<String, PlanConfig>,
    pub pricing: PricingConfig,
}

/// Which FLUX.1 a transformer is: dev has a guidance embedding, schnell does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FluxKind {
    Schnell,
    Dev,
}

impl FluxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FluxKind::Schnell => "schnell",
            FluxKind::Dev => "dev",
        }
    }
}

/// One model: a diffusers folder (`path`), or single files (BFL / ComfyUI layouts), and how the
/// server offers it.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelEntry {
    pub path: Option<PathBuf>,
    pub transformer: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub clip: Option<PathBuf>,
    pub t5: Option<PathBuf>,
    /// schnell or dev; read off the transformer's weights when not given.
    pub kind: Option<FluxKind>,
    /// The name users see; the id when not given.
    pub label: Option<String>,
    /// The `[pricing.models.<id>]` entry that prices the model and carries its access tags.
    /// Default: the entry with the model's own id, else `flux-<kind>`.
    pub price_as: Option<String>,
    /// Access tags (dev, uncensored, beta, ...) overriding those of the pricing entry.
    pub tags: Option<Vec<String>>,
    /// Steps a job gets when it names none (default: the pricing entry's).
    pub default_steps: Option<u32>,
    /// The size the UI starts with (default 1024×1024).
    pub default_width: Option<u32>,
    pub default_height: Option<u32>,
}

impl ModelEntry {
    /// The pricing entry this model is priced as (and takes its tags from), when it can be
    /// named without reading the weights.
    pub fn pricing_id(&self, id: &str, pricing: &PricingConfig, kind: Option<FluxKind>) -> Option<String> {
        if let Some(p) = &self.price_as {
            return Some(p.clone());
        }
        if pricing.models.contains_key(id) {
            return Some(id.to_string());
        }
        self.kind.or(kind).map(|k| format!("flux-{}", k.as_str()))
    }

    /// The ledger's view of this model: its pricing entry with this entry's tags and default
    /// steps laid over it.
    pub fn derived_pricing(
        &self,
        id: &str,
        pricing: &PricingConfig,
        kind: Option<FluxKind>,
    ) -> Result<Option<ModelPricing>> {
        let Some(base_id) = self.pricing_id(id, pricing, kind) else { return Ok(None) };
        let Some(base) = pricing.models.get(&base_id) else {
            bail!("[models.{id}] is priced as {base_id:?}, which has no [pricing.models.{base_id}] entry");
        };
        let mut m = base.clone();
        if let Some(tags) = &self.tags {
            m.tags = tags.clone();
        }
        if let Some(steps) = self.default_steps {
            m.default_steps = steps;
        }
        Ok(Some(m))
    }
}

/// `[queue]`: how jobs wait for the device.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Jobs one user may have waiting at once (queued, not yet running).
    pub max_queued_per_user: u32,
    /// Share of the device each queue class gets while several classes wait: a class with
    /// weight 8 starts 8 jobs for every one of a class with weight 1 (none ever starves).
    pub weights: QueueWeights,
    /// A preview image every this many steps (0: none).
    pub preview_every: u32,
    /// Keep the model's components loaded between jobs (fast; needs the memory of all of
    /// them) instead of loading each per stage.
    pub keep_resident: bool,
    /// The share of device time a running training keeps while image jobs wait, in [0, 1).
    /// At each training step boundary the worker runs the waiting image jobs (all of them,
    /// then resumes the training) unless the training's time since it last yielded is still
    /// below `training_share / (1 - training_share)` times the time the images took at the
    /// last yield. 0.0 (the default): images always go first, the training yields at every
    /// step boundary; 0.5: about one training step's time for each image job's time.
    pub training_share: f64,
}

/// `[training]`: LoRA training jobs.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingConfig {
    /// The preset of plans with the "standard" parameter level (steps, rank, lr, resolution
    /// fixed; rank 16 / alpha 16 / lr 1e-4 at 512², as ai-toolkit's and kohya's FLUX recipes).
    pub preset_steps: usize,
    pub preset_rank: usize,
    pub preset_lr: f64,
    pub preset_resolution: usize,
    /// What "advanced"/"full" plans may set, at most.
    pub max_steps: usize,
    pub max_rank: usize,
    /// Resolutions (bucket sides) a training may ask for.
    pub resolutions: Vec<usize>,
    /// A checkpoint every this many steps (0: by time only)...
    pub checkpoint_every_steps: usize,
    /// ...or when this many seconds passed since the last one (0: by steps only).
    pub checkpoint_every_secs: u64,
    /// Sample images every this many steps (0: only at the end).
    pub sample_every: usize,
    /// T5 tokens per caption (None: 512 for dev, 256 for schnell).
    pub max_sequence_length: Option<usize>,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            preset_steps: 1500,
            preset_rank: 16,
            preset_lr: 1e-4,
            preset_resolution: 512,
            max_steps: 4000,
            max_rank: 64,
            resolutions: vec![256, 512, 768, 1024],
            checkpoint_every_steps: 100,
            checkpoint_every_secs: 300,
            sample_every: 250,
            max_sequence_length: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueWeights {
    pub standard: u32,
    pub priority: u32,
    pub fastest: u32,
    pub instant: u32,
}

impl QueueWeights {
    pub fn of(&self, class: crate::ledger::QueueClass) -> u32 {
        use crate::ledger::QueueClass::*;
        match class {
            Standard => self.standard,
            Priority => self.priority,
            Fastest => self.fastest,
            Instant => self.instant,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_queued_per_user: 8,
            weights: QueueWeights::default(),
            preview_every: 1,
            keep_resident: false,
            training_share: 0.0,
        }
    }
}

impl Default for QueueWeights {
    fn default() -> Self {
        QueueWeights { standard: 1, priority: 2, fastest: 4, instant: 8 }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    /// Days a login session lasts.
    pub session_days: u32,
    /// Failed logins allowed per (account, client address) in `login_window_secs` (20× as many
    /// per address across accounts); past that each failure doubles the wait, answered 429.
    pub login_attempts: u32,
    pub login_window_secs: u64,
    /// Mark the session cookie `Secure`: "auto" (when a trusted proxy's X-Forwarded-Proto says
    /// the request came over https), "always" or "never".
    pub secure_cookies: SecureCookies,
    /// The address clients reach the server at (e.g. `https://atelier.studio.lan`), for links
    /// the API hands out (the OpenAI route's `url`). Unset: the listen address when it is a
    /// specific one, else relative links.
    pub public_url: Option<String>,
    /// Reverse proxies whose `X-Forwarded-For` / `X-Forwarded-Proto` / `Forwarded` headers are
    /// believed (IP addresses). Headers from anyone else are ignored.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// `/metrics` for anyone; otherwise only for admins and requests from this machine.
    pub metrics_public: bool,
    /// The plan of the admin `serve` creates at first start: whoever installed the server uses
    /// all of it (entitlements still apply to admins like everyone else).
    pub admin_plan: String,
    /// The largest LoRA file a user may upload to their library, in MiB.
    pub max_lora_upload_mib: u64,
    /// The most LoRAs one user keeps in their private library.
    pub max_loras_per_user: usize,
}

/// `[datasets]`: what users may put into their training datasets.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetsConfig {
    /// The largest file one uploaded image may be, in MiB.
    pub max_image_mib: u64,
    /// The most one dataset may hold (its stored images), in MiB.
    pub max_dataset_mib: u64,
    /// The most pixels an uploaded image may have, in millions (checked from the header, before
    /// decoding: a small file claiming 20000×20000 is refused without allocating its pixels).
    pub max_image_megapixels: u32,
    /// The most datasets one user keeps.
    pub max_datasets_per_user: usize,
    /// The longest caption, in characters.
    pub max_caption_chars: usize,
}

impl Default for DatasetsConfig {
    fn default() -> Self {
        DatasetsConfig {
            max_image_mib: 30,
            max_dataset_mib: 1024,
            max_image_megapixels: 50,
            max_datasets_per_user: 20,
            max_caption_chars: 1000,
        }
    }
}

/// `[server] secure_cookies`: when the session cookie is marked `Secure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecureCookies {
    /// When the request came over https (as a trusted proxy's X-Forwarded-Proto says).
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// auto, cpu, wgpu or vulkan.
    pub device: crate::engine::device::DeviceChoice,
    pub dtype: Dtype,
    pub weights_dir: PathBuf,
    /// The studio's LoRA library; None: `<weights_dir>/loras`.
    pub loras_dir: Option<PathBuf>,
    /// Device memory jobs are planned against (`engine::memory`): bytes, or auto.
    pub memory_budget: crate::engine::memory::MemoryBudget,
}

impl EngineConfig {
    /// The studio's LoRA library folder.
    pub fn loras_dir(&self) -> PathBuf {
        self.loras_dir.clone().unwrap_or_else(|| self.weights_dir.join("loras"))
    }
}

/// `[engine] dtype`: the compute dtype of the transformer and the VAE (any case: `F16`, `bf16`,
/// `fp32`, …); `auto` picks per device (`engine::device::compute_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Auto,
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Dtype::Auto),
            "f32" | "fp32" | "float32" => Ok(Dtype::F32),
            "f16" | "fp16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            _ => Err(format!("unknown dtype {s:?}: expected auto, f32, f16 or bf16")),
        }
    }
}

impl<'de> Deserialize<'de> for Dtype {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Dtype {
    /// The dtype asked for; None for `auto`.
    pub fn burn(self) -> Option<burn::tensor::DType> {
        match self {
            Dtype::Auto => None,
            Dtype::F32 => Some(burn::tensor::DType::F32),
            Dtype::F16 => Some(burn::tensor::DType::F16),
            Dtype::Bf16 => Some(burn::tensor::DType::BF16),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let plans = PlansConfig::shipped();
        Config {
            server: Default::default(),
            engine: Default::default(),
            limits: Default::default(),
            queue: Default::default(),
            datasets: Default::default(),
            training: Default::default(),
            models: shipped_models(),
            metering: plans.metering,
            plans: plans.plans,
            pricing: plans.pricing,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8188".into(),
            data_dir: "data".into(),
            session_days: 30,
            login_attempts: 5,
            login_window_secs: 300,
            secure_cookies: SecureCookies::Auto,
            public_url: None,
            trusted_proxies: Vec::new(),
            metrics_public: false,
            admin_plan: "max".into(),
            max_lora_upload_mib: 2048,
            max_loras_per_user: 200,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device: crate::engine::device::DeviceChoice::Auto,
            dtype: Dtype::Auto,
            weights_dir: "weights".into(),
            loras_dir: None,
            memory_budget: crate::engine::memory::MemoryBudget::Auto,
        }
    }
}

pub const DEFAULT_TOML: &str = include_str!("../config.toml");

/// The `[models.*]` tables of the shipped config.toml (the demo models).
fn shipped_models() -> BTreeMap<String, ModelEntry> {
    // The file is part of the binary and a test parses it: failing here is a build bug.
    let table: toml::Table = toml::from_str(DEFAULT_TOML).expect("config.toml parses");
    table.get("models").cloned().map(|m| m.try_into().expect("config.toml's [models] parse")).unwrap_or_default()
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let config: Config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("cannot read config {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("invalid config {}", p.display()))?
            }
            None => Config::default(),
        };
        config.validate()?;
        Ok(config)
    }

    /// The metering configuration, validated; a config without `[plans.*]` keeps the shipped plans.
    /// Every `[models.<id>]` whose pricing can be named without reading weights is added to
    /// `[pricing.models]` under its own id (see [`ModelEntry::derived_pricing`]), so the ledger
    /// prices and entitles served models by the ids users send.
    pub fn plans(&self) -> Result<PlansConfig> {
        self.plans_with_kinds(&|_| None)
    }

    /// [`Config::plans`], with the kinds of models read off their weights (`kind_of`).
    pub fn plans_with_kinds(&self, kind_of: &dyn Fn(&str) -> Option<FluxKind>) -> Result<PlansConfig> {
        let plans = if self.plans.is_empty() { PlansConfig::shipped().plans } else { self.plans.clone() };
        let mut pricing = self.pricing.clone();
        for (id, entry) in &self.models {
            if pricing.models.contains_key(id) && entry.tags.is_none() && entry.default_steps.is_none() {
                continue;
            }
            if let Some(m) = entry.derived_pricing(id, &self.pricing, kind_of(id))? {
                pricing.models.insert(id.clone(), m);
            }
        }
        Ok(PlansConfig::from_parts(self.metering.clone(), plans, pricing)?)
    }

    pub fn validate(&self) -> Result<()> {
        self.plans()?.plan(&self.server.admin_plan).context("[server] admin_plan")?;
        let l = &self.limits;
        if l.max_width < 16 || l.max_height < 16 {
            bail!("limits.max_width and max_height must be at least 16");
        }
        if l.max_steps == 0 {
            bail!("limits.max_steps must be at least 1");
        }
        if !(0.0..1.0).contains(&self.queue.training_share) {
            bail!("queue.training_share must be in [0, 1), not {}", self.queue.training_share);
        }
        let t = &self.training;
        if t.preset_steps == 0
            || t.preset_rank == 0
            || t.max_steps < 1
            || t.max_rank < 1
            || t.preset_lr.is_nan()
            || t.preset_lr <= 0.0
        {
            bail!("[training]: preset_steps, preset_rank, preset_lr, max_steps and max_rank must be positive");
        }
        if t.preset_steps > t.max_steps || t.preset_rank > t.max_rank {
            bail!("[training]: the preset's steps and rank must be within max_steps and max_rank");
        }
        if t.resolutions.iter().chain([&t.preset_resolution]).any(|r| *r < 16 || r % 16 != 0) {
            bail!("[training]: resolutions must be multiples of 16");
        }
        let w = &self.queue.weights;
        if [w.standard, w.priority, w.fastest, w.instant].contains(&0) {
            bail!("queue.weights must all be at least 1");
        }
        if self.server.login_attempts == 0 || self.server.login_window_secs == 0 {
            bail!("server.login_attempts and login_window_secs must be at least 1");
        }
        let d = &self.datasets;
        if d.max_image_mib == 0 || d.max_dataset_mib == 0 || d.max_image_megapixels == 0 || d.max_caption_chars == 0 {
            bail!(
                "datasets.max_image_mib, max_dataset_mib, max_image_megapixels and max_caption_chars must be at least 1"
            );
        }
        if let Some(u) = &self.server.public_url {
            let rest = u.strip_prefix("https://").or_else(|| u.strip_prefix("http://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains(['?', '#', ' ', '"', '<', '>'])) {
                bail!(
                    "server.public_url must be an http:// or https:// address like \"https://atelier.studio.lan\" (not {u:?})"
                );
            }
        }
        for (id, m) in &self.models {
            if m.path.is_none() && m.transformer.is_none() {
                bail!("[models.{id}] names neither path (a diffusers folder) nor transformer (single files)");
            }
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
    fn an_admin_plan_that_is_no_plan_is_refused() {
        let mut config = Config::default();
        config.server.admin_plan = "platinum".into();
        let err = format!("{:#}", config.validate().unwrap_err());
        assert!(err.contains("admin_plan") && err.contains("platinum") && err.contains("max"), "{err}");
    }

    #[test]
    fn a_wrong_setting_names_the_allowed_values() {
        for (toml, allowed) in [
            ("[engine]\ndevice = \"tpu\"", "auto, cpu, wgpu or vulkan"),
            ("[engine]\ndtype = \"f64\"", "auto, f32, f16 or bf16"),
            ("[server]\nsecure_cookies = \"sometimes\"", "`auto`, `always`, `never`"),
        ] {
            let err = toml::from_str::<Config>(toml).unwrap_err().to_string();
            assert!(err.contains(allowed), "{toml}: {err}");
        }
        let c: Config =
            toml::from_str("[engine]\ndevice = \"cpu\"\ndtype = \"bf16\"\n[server]\nsecure_cookies = \"never\"")
                .unwrap();
        assert_eq!(c.engine.device, crate::engine::device::DeviceChoice::Cpu);
        assert_eq!(c.engine.dtype, Dtype::Bf16);
        assert_eq!(c.server.secure_cookies, SecureCookies::Never);
        // Settings read as they always were: in any case.
        let c: Config = toml::from_str("[engine]\ndevice = \"CPU\"\ndtype = \"BF16\"").unwrap();
        assert_eq!((c.engine.device, c.engine.dtype), (crate::engine::device::DeviceChoice::Cpu, Dtype::Bf16));
    }

    #[test]
    fn the_memory_budget_reads_bytes_sizes_and_auto() {
        use crate::engine::memory::MemoryBudget;
        let budget = |t: &str| {
            toml::from_str::<Config>(&format!("[engine]\nmemory_budget = {t}")).map(|c| c.engine.memory_budget)
        };
        assert_eq!(budget("\"12GiB\"").unwrap(), MemoryBudget::Bytes(12 << 30));
        assert_eq!(budget("\"800MiB\"").unwrap(), MemoryBudget::Bytes(800 << 20));
        assert_eq!(budget("1000000").unwrap(), MemoryBudget::Bytes(1_000_000));
        assert_eq!(budget("\"auto\"").unwrap(), MemoryBudget::Auto);
        let err = budget("\"lots\"").unwrap_err().to_string();
        assert!(err.contains("12GiB"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<Config>("[engine]\ndevise = \"cpu\"").is_err());
    }
}
