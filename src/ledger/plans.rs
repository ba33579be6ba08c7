//! Plans, what they entitle (models by tag, parameter level, batch, queue class, quotas) and
//! the price of a job. This is the one place that decides what a plan allows: the server, the
//! UI and the CLI all ask it. The defaults live in `config.toml's metering tables`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ledger::LedgerError;

/// The default `[metering]`, `[plans.*]` and `[pricing]` tables, as shipped in the project's
/// `config.toml` (one file holds every default): those three tables of it, as TOML text.
pub fn default_plans_toml() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        // The file is part of the binary and covered by tests: failing here is a build bug.
        let mut table: toml::Table = toml::from_str(include_str!("../../config.toml")).expect("config.toml parses");
        table.retain(|key, _| ["metering", "plans", "pricing"].contains(&key));
        toml::to_string(&table).expect("config.toml's metering tables serialize")
    })
}

/// Billing period of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Weekly,
    Yearly,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Weekly => "weekly",
            Period::Yearly => "yearly",
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Period {
    type Err = LedgerError;
    fn from_str(s: &str) -> Result<Period, LedgerError> {
        match s {
            "weekly" => Ok(Period::Weekly),
            "yearly" => Ok(Period::Yearly),
            other => Err(LedgerError::Invalid(format!("unknown period {other:?} (weekly or yearly)"))),
        }
    }
}

/// Access a plan has to models with a given tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelAccess {
    Yes,
    /// Allowed up to `metering.limited_per_week[tag]` units per calendar week.
    Limited,
    No,
}

/// How much of a job a plan may set. Each level adds to the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamLevel {
    /// Prompt, size preset, batch.
    Basic,
    /// + seed, steps.
    Standard,
    /// + guidance, shift, LoRAs, custom size.
    Advanced,
    /// Every parameter, up to the configured maxima.
    Full,
}

impl fmt::Display for ParamLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParamLevel::Basic => "basic",
            ParamLevel::Standard => "standard",
            ParamLevel::Advanced => "advanced",
            ParamLevel::Full => "full",
        })
    }
}

/// Queue class, slowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueClass {
    Standard,
    Priority,
    Fastest,
    Instant,
}

impl fmt::Display for QueueClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueueClass::Standard => "standard",
            QueueClass::Priority => "priority",
            QueueClass::Fastest => "fastest",
            QueueClass::Instant => "instant",
        })
    }
}

/// A count a plan allows: `max_batch = 8` or `max_batch = "unlimited"` (and `loras`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CountLimit {
    Count(u32),
    Word(Unlimited),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unlimited {
    Unlimited,
}

impl CountLimit {
    fn zero() -> CountLimit {
        CountLimit::Count(0)
    }

    /// Whether `n` is within the limit.
    pub fn allows(self, n: u32) -> bool {
        self.max().is_none_or(|m| n <= m)
    }

    /// `None` = no limit from the plan.
    pub fn max(self) -> Option<u32> {
        match self {
            CountLimit::Count(n) => Some(n),
            CountLimit::Word(Unlimited::Unlimited) => None,
        }
    }
}

/// What a model is, for access and for pricing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Image,
    Video,
}

pub use crate::db::Synchronous;

/// `[metering]`: settings of the ledger itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeteringConfig {
    /// The plan of a new account (must have no periods).
    #[serde(default = "default_plan")]
    pub default_plan: String,
    pub hold_max_age_secs: i64,
    pub sweep_interval_secs: u64,
    pub low_balance_pct: u32,
    #[serde(default)]
    pub size_presets: Vec<[u32; 2]>,
    /// SQLite `synchronous`: `full` (every commit on disk before it returns) or `normal`
    /// (faster; a commit survives a crash of the server, not a power cut).
    #[serde(default)]
    pub synchronous: Synchronous,
    /// Tag -> units per calendar week for plans with `limited` access to it.
    #[serde(default)]
    pub limited_per_week: BTreeMap<String, u32>,
}

fn default_plan() -> String {
    "free".to_string()
}

impl Default for MeteringConfig {
    fn default() -> Self {
        PlansConfig::shipped().metering
    }
}

/// `[plans.<id>]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub name: String,
    pub rank: u32,
    /// Billing periods a subscriber can pick; empty for a plan without a subscription (Free).
    pub periods: Vec<Period>,
    #[serde(default)]
    pub signup_credits: i64,
    pub credits_weekly: i64,
    pub credits_yearly: i64,
    pub training_weekly: i64,
    pub training_yearly: i64,
    pub training_images_per_lora: u32,
    pub parameters: ParamLevel,
    pub max_batch: CountLimit,
    /// LoRAs one job may apply (a number or "unlimited"); a config without it: none.
    #[serde(default = "CountLimit::zero")]
    pub loras: CountLimit,
    pub queue: QueueClass,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_yearly: Option<QueueClass>,
    #[serde(default)]
    pub support: String,
    /// Tag -> access. A model's every tag must be allowed.
    pub models: BTreeMap<String, ModelAccess>,
    /// Overrides `metering.low_balance_pct` for this plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_balance_pct: Option<u32>,
}

impl PlanConfig {
    pub fn credits_per(&self, period: Option<Period>) -> i64 {
        match period {
            Some(Period::Weekly) => self.credits_weekly,
            Some(Period::Yearly) => self.credits_yearly,
            None => 0,
        }
    }

    pub fn training_per(&self, period: Option<Period>) -> i64 {
        match period {
            Some(Period::Weekly) => self.training_weekly,
            Some(Period::Yearly) => self.training_yearly,
            None => 0,
        }
    }

    pub fn queue_for(&self, period: Option<Period>) -> QueueClass {
        match period {
            Some(Period::Yearly) => self.queue_yearly.unwrap_or(self.queue),
            _ => self.queue,
        }
    }
}

/// `[pricing]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingConfig {
    pub image_min: i64,
    pub image_max: i64,
    pub video_min: i64,
    pub video_max: i64,
    #[serde(default)]
    pub models: BTreeMap<String, ModelPricing>,
}

impl Default for PricingConfig {
    fn default() -> Self {
        PlansConfig::shipped().pricing
    }
}

/// `[pricing.models.<id>]`: a model's kind, access tags and price constants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPricing {
    pub kind: ModelKind,
    #[serde(default)]
    pub tags: Vec<String>,
    pub default_steps: u32,
    /// Credits per image (or per video second) before the size/steps term.
    pub base: f64,
    /// Credits per megapixel per step (per second of video as well).
    pub per_mp_step: f64,
    /// Video only: the duration a job gets when it names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_seconds: Option<f64>,
}

/// The `[metering]`, `[plans.*]` and `[pricing]` tables together, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlansConfig {
    pub metering: MeteringConfig,
    pub plans: BTreeMap<String, PlanConfig>,
    pub pricing: PricingConfig,
}

impl Default for PlansConfig {
    fn default() -> Self {
        PlansConfig::shipped()
    }
}

/// The price of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Price {
    /// Per image, or per video job.
    pub per_item: i64,
    pub batch: u32,
    pub total: i64,
}

/// The parameters of a job that matter to entitlements and price.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct JobParams {
    pub width: u32,
    pub height: u32,
    pub batch: u32,
    pub steps: Option<u32>,
    pub seed: Option<u64>,
    pub guidance: Option<f64>,
    pub shift: Option<f64>,
    /// Number of LoRAs applied (an entitlement of its own: the plan's `loras`).
    pub loras: u32,
    /// Names of any other parameters set (sampler, scheduler, ...): "full" level.
    pub extra: Vec<String>,
    /// Video duration in seconds (video models).
    pub video_seconds: Option<f64>,
}

impl JobParams {
    /// A basic job: a size and batch 1.
    pub fn new(width: u32, height: u32) -> JobParams {
        JobParams { width, height, batch: 1, ..JobParams::default() }
    }

    pub fn with_batch(mut self, batch: u32) -> JobParams {
        self.batch = batch;
        self
    }

    pub fn with_steps(mut self, steps: u32) -> JobParams {
        self.steps = Some(steps);
        self
    }

    /// The parameter level this job needs, and the parameters that need more than "basic".
    pub fn required_level(&self, size_presets: &[[u32; 2]]) -> (ParamLevel, Vec<String>) {
        let mut level = ParamLevel::Basic;
        let mut why = Vec::new();
        let mut need = |l: ParamLevel, name: &str| {
            level = level.max(l);
            why.push(format!("{name} ({l})"));
        };
        if self.seed.is_some() {
            need(ParamLevel::Standard, "seed");
        }
        if self.steps.is_some() {
            need(ParamLevel::Standard, "steps");
        }
        if self.guidance.is_some() {
            need(ParamLevel::Advanced, "guidance");
        }
        if self.shift.is_some() {
            need(ParamLevel::Advanced, "shift");
        }
        if !size_presets.contains(&[self.width, self.height]) {
            need(ParamLevel::Advanced, "custom size");
        }
        for e in &self.extra {
            need(ParamLevel::Full, e);
        }
        (level, why)
    }
}

/// A weekly quota that applies to a job ("limited" access).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quota {
    pub tag: String,
    pub limit: u32,
    /// Units this job uses: images for image models, 1 for a video job.
    pub units: u32,
}

/// What `check_job` lets through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Clearance {
    pub queue: QueueClass,
    /// Weekly quotas the job counts against; the ledger checks them when it places the hold.
    pub quotas: Vec<Quota>,
}

/// Why a job (or a training) may not run, and which plans would let it.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    #[error("invalid job: {message}")]
    InvalidParams { message: String },
    #[error("unknown model {model:?}")]
    UnknownModel { model: String },
    #[error("plan {plan} does not include {tag} models such as {model}{}", allow_hint(plans_allowing))]
    ModelNotInPlan { model: String, tag: String, plan: String, plans_allowing: Vec<String> },
    #[error("plan {plan} allows {has} parameters; this job needs {needs} for {}{}", params.join(", "), allow_hint(plans_allowing))]
    ParameterLevel {
        plan: String,
        has: ParamLevel,
        needs: ParamLevel,
        params: Vec<String>,
        plans_allowing: Vec<String>,
    },
    #[error("plan {plan} allows batches of up to {max}; this job asks for {batch}{}", allow_hint(plans_allowing))]
    BatchTooLarge { plan: String, batch: u32, max: u32, plans_allowing: Vec<String> },
    #[error("plan {plan} allows {} per job; this job asks for {loras}{}", lora_count(*max), allow_hint(plans_allowing))]
    TooManyLoras { plan: String, loras: u32, max: u32, plans_allowing: Vec<String> },
    #[error(
        "the weekly quota of {limit} for {tag} models is used up ({used} used, {requested} more asked); it resets at {resets_at}{}",
        allow_hint(plans_allowing)
    )]
    QuotaExhausted {
        tag: String,
        limit: u32,
        used: u32,
        requested: u32,
        resets_at: DateTime<Utc>,
        plans_allowing: Vec<String>,
    },
    #[error(
        "out of {resource}: {needed} needed, {available} available; {}{}",
        renewal_hint(next_renewal_at),
        allow_hint(plans_allowing)
    )]
    OutOfCredits {
        resource: String,
        needed: i64,
        available: i64,
        next_renewal_at: Option<DateTime<Utc>>,
        plans_allowing: Vec<String>,
    },
    #[error("plan {plan} includes no LoRA training{}", allow_hint(plans_allowing))]
    TrainingNotInPlan { plan: String, plans_allowing: Vec<String> },
    #[error(
        "plan {plan} trains on up to {max} images per LoRA; this training has {images}{}",
        allow_hint(plans_allowing)
    )]
    TooManyTrainingImages { plan: String, images: u32, max: u32, plans_allowing: Vec<String> },
}

fn lora_count(n: u32) -> String {
    match n {
        0 => "no LoRAs".into(),
        1 => "1 LoRA".into(),
        n => format!("up to {n} LoRAs"),
    }
}

fn allow_hint(plans: &[String]) -> String {
    if plans.is_empty() { String::new() } else { format!(" (allowed on: {})", plans.join(", ")) }
}

fn renewal_hint(at: &Option<DateTime<Utc>>) -> String {
    match at {
        Some(t) => format!("the next renewal is at {}", t.to_rfc3339()),
        None => "no renewal is scheduled".to_string(),
    }
}

/// What one plan (on one period) entitles: the answer to "what may this user do?".
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entitlements {
    pub plan: String,
    pub name: String,
    pub rank: u32,
    pub period: Option<Period>,
    pub periods: Vec<Period>,
    pub credits_per_period: i64,
    pub credits_weekly: i64,
    pub credits_yearly: i64,
    pub signup_credits: i64,
    pub training_per_period: i64,
    pub training_weekly: i64,
    pub training_yearly: i64,
    pub training_images_per_lora: u32,
    pub parameters: ParamLevel,
    /// `null` = unlimited.
    pub max_batch: Option<u32>,
    /// LoRAs per job; `null` = unlimited.
    pub max_loras: Option<u32>,
    pub queue: QueueClass,
    pub models: BTreeMap<String, ModelAccess>,
    /// The weekly quota of each `limited` tag.
    pub limited_per_week: BTreeMap<String, u32>,
    pub low_balance_pct: u32,
    pub support: String,
}

impl PlansConfig {
    /// The shipped defaults (`config.toml's metering tables`).
    pub fn shipped() -> PlansConfig {
        // The file is part of the binary and covered by tests: failing here is a build bug.
        toml::from_str(default_plans_toml()).expect("config.toml's metering tables parse")
    }

    /// The shipped defaults, validated.
    pub fn defaults() -> PlansConfig {
        let cfg = PlansConfig::shipped();
        // Same as above: a test keeps the shipped file valid.
        cfg.validate().expect("config.toml's metering tables is valid");
        cfg
    }

    /// Parses exactly the three tables (nothing else allowed) and validates them.
    pub fn from_toml(text: &str) -> Result<PlansConfig, LedgerError> {
        let cfg: PlansConfig = toml::from_str(text).map_err(|e| LedgerError::Config(format!("plans config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `[metering]`, `[plans.*]` and `[pricing]` out of a whole `config.toml`, ignoring
    /// its other tables; a missing table takes the shipped default.
    pub fn from_config_toml(text: &str) -> Result<PlansConfig, LedgerError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| LedgerError::Config(format!("config: {e}")))?;
        let defaults = PlansConfig::shipped();
        fn part<T: serde::de::DeserializeOwned>(table: &toml::Table, key: &str, default: T) -> Result<T, LedgerError> {
            match table.get(key) {
                None => Ok(default),
                Some(v) => v.clone().try_into().map_err(|e| LedgerError::Config(format!("config [{key}]: {e}"))),
            }
        }
        PlansConfig::from_parts(
            part(&table, "metering", defaults.metering)?,
            part(&table, "plans", defaults.plans)?,
            part(&table, "pricing", defaults.pricing)?,
        )
    }

    /// Builds from tables an outer config already parsed, and validates.
    pub fn from_parts(
        metering: MeteringConfig,
        plans: BTreeMap<String, PlanConfig>,
        pricing: PricingConfig,
    ) -> Result<PlansConfig, LedgerError> {
        let cfg = PlansConfig { metering, plans, pricing };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks everything the ledger relies on; the message names the table and the key.
    pub fn validate(&self) -> Result<(), LedgerError> {
        let bad = |m: String| Err(LedgerError::Config(m));
        let m = &self.metering;
        if self.plans.is_empty() {
            return bad("[plans]: at least one plan is needed".into());
        }
        match self.plans.get(&m.default_plan) {
            None => return bad(format!("[metering] default_plan {:?} is not a plan", m.default_plan)),
            Some(p) if !p.periods.is_empty() => {
                return bad(format!(
                    "[metering] default_plan {:?} must have periods = [] (it is the plan without a subscription)",
                    m.default_plan
                ));
            }
            Some(_) => {}
        }
        if m.hold_max_age_secs <= 0 {
            return bad("[metering] hold_max_age_secs must be > 0".into());
        }
        if m.sweep_interval_secs == 0 {
            return bad("[metering] sweep_interval_secs must be > 0".into());
        }
        if m.low_balance_pct > 100 {
            return bad("[metering] low_balance_pct must be 0..=100".into());
        }
        if m.size_presets.iter().any(|[w, h]| *w == 0 || *h == 0) {
            return bad("[metering] size_presets: sizes must be > 0".into());
        }
        let mut ranks = BTreeSet::new();
        let model_tags: BTreeSet<&str> =
            self.pricing.models.values().flat_map(|mp| mp.tags.iter().map(String::as_str)).collect();
        for (id, p) in &self.plans {
            let at = |k: &str| format!("[plans.{id}] {k}");
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return bad(format!("[plans.{id}]: plan ids are letters, digits, - and _"));
            }
            if !ranks.insert(p.rank) {
                return bad(format!("{}: rank {} is used by another plan", at("rank"), p.rank));
            }
            for (k, v) in [
                ("signup_credits", p.signup_credits),
                ("credits_weekly", p.credits_weekly),
                ("credits_yearly", p.credits_yearly),
                ("training_weekly", p.training_weekly),
                ("training_yearly", p.training_yearly),
            ] {
                if !(0..=crate::ledger::MAX_GRANT).contains(&v) {
                    return bad(format!("{} must be 0 to {}", at(k), crate::ledger::MAX_GRANT));
                }
            }
            let mut seen = BTreeSet::new();
            if !p.periods.iter().all(|x| seen.insert(*x)) {
                return bad(format!("{} lists a period twice", at("periods")));
            }
            if !p.periods.contains(&Period::Weekly) && (p.credits_weekly > 0 || p.training_weekly > 0) {
                return bad(format!("{}: weekly credits/training without a weekly period", at("periods")));
            }
            if !p.periods.contains(&Period::Yearly) && (p.credits_yearly > 0 || p.training_yearly > 0) {
                return bad(format!("{}: yearly credits/training without a yearly period", at("periods")));
            }
            if p.max_batch == CountLimit::Count(0) {
                return bad(format!("{} must be >= 1 or \"unlimited\"", at("max_batch")));
            }
            if p.low_balance_pct.is_some_and(|x| x > 100) {
                return bad(format!("{} must be 0..=100", at("low_balance_pct")));
            }
            for tag in &model_tags {
                if !p.models.contains_key(*tag) {
                    return bad(format!("{}: no access given for tag {tag:?} (yes, limited or no)", at("models")));
                }
            }
            for (tag, access) in &p.models {
                if *access == ModelAccess::Limited && !m.limited_per_week.contains_key(tag) {
                    return bad(format!(
                        "{}: {tag} is limited but [metering.limited_per_week] has no {tag}",
                        at("models")
                    ));
                }
            }
        }
        let pr = &self.pricing;
        if pr.image_min <= 0 || pr.image_min > pr.image_max {
            return bad("[pricing] needs 0 < image_min <= image_max".into());
        }
        if pr.video_min <= 0 || pr.video_min > pr.video_max {
            return bad("[pricing] needs 0 < video_min <= video_max".into());
        }
        for (id, mp) in &pr.models {
            let at = |k: &str| format!("[pricing.models.{id}] {k}");
            if mp.default_steps == 0 {
                return bad(format!("{} must be >= 1", at("default_steps")));
            }
            if !(mp.base.is_finite() && mp.base >= 0.0) {
                return bad(format!("{} must be a number >= 0", at("base")));
            }
            if !(mp.per_mp_step.is_finite() && mp.per_mp_step >= 0.0) {
                return bad(format!("{} must be a number >= 0", at("per_mp_step")));
            }
            match (mp.kind, mp.default_seconds) {
                (ModelKind::Video, None) => {
                    return bad(format!("{} is required for video models", at("default_seconds")));
                }
                (ModelKind::Video, Some(s)) if !(s.is_finite() && s > 0.0) => {
                    return bad(format!("{} must be > 0", at("default_seconds")));
                }
                (ModelKind::Image, Some(_)) => {
                    return bad(format!("{} is for video models only", at("default_seconds")));
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn plan(&self, id: &str) -> Result<&PlanConfig, LedgerError> {
        self.plans
            .get(id)
            .ok_or_else(|| LedgerError::UnknownPlan { plan: id.to_string(), known: self.plan_ids_by_rank().join(", ") })
    }

    pub fn model(&self, id: &str) -> Result<&ModelPricing, Refusal> {
        self.pricing.models.get(id).ok_or_else(|| Refusal::UnknownModel { model: id.to_string() })
    }

    /// Plan ids, lowest rank first.
    pub fn plan_ids_by_rank(&self) -> Vec<String> {
        let mut v: Vec<(&u32, &String)> = self.plans.iter().map(|(id, p)| (&p.rank, id)).collect();
        v.sort();
        v.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// What `plan` entitles on `period` (`None`: the plan's first period, or none).
    pub fn entitlements(&self, plan: &str, period: Option<Period>) -> Result<Entitlements, LedgerError> {
        let p = self.plan(plan)?;
        let period = period.or_else(|| p.periods.first().copied());
        let limited_per_week = p
            .models
            .iter()
            .filter(|(_, a)| **a == ModelAccess::Limited)
            .map(|(t, _)| (t.clone(), self.metering.limited_per_week.get(t).copied().unwrap_or(0)))
            .collect();
        Ok(Entitlements {
            plan: plan.to_string(),
            name: p.name.clone(),
            rank: p.rank,
            period,
            periods: p.periods.clone(),
            credits_per_period: p.credits_per(period),
            credits_weekly: p.credits_weekly,
            credits_yearly: p.credits_yearly,
            signup_credits: p.signup_credits,
            training_per_period: p.training_per(period),
            training_weekly: p.training_weekly,
            training_yearly: p.training_yearly,
            training_images_per_lora: p.training_images_per_lora,
            parameters: p.parameters,
            max_batch: p.max_batch.max(),
            max_loras: p.loras.max(),
            queue: p.queue_for(period),
            models: p.models.clone(),
            limited_per_week,
            low_balance_pct: self.low_balance_pct(p),
            support: p.support.clone(),
        })
    }

    pub(crate) fn low_balance_pct(&self, p: &PlanConfig) -> u32 {
        p.low_balance_pct.unwrap_or(self.metering.low_balance_pct)
    }

    /// Whether `plan` may run this job, leaving out credits and quota counts (which need the
    /// database): model tags, parameter level and batch size. On success, the queue class and
    /// the weekly quotas the job counts against.
    pub fn check_job(
        &self,
        plan: &str,
        period: Option<Period>,
        model: &ModelPricing,
        params: &JobParams,
    ) -> Result<Clearance, Refusal> {
        validate_params(model, params)?;
        let p = self.plan(plan).map_err(|e| Refusal::InvalidParams { message: e.to_string() })?;
        let mut quotas = Vec::new();
        for tag in &model.tags {
            match p.models.get(tag).copied().unwrap_or(ModelAccess::No) {
                ModelAccess::Yes => {}
                ModelAccess::Limited => quotas.push(Quota {
                    tag: tag.clone(),
                    limit: self.metering.limited_per_week.get(tag).copied().unwrap_or(0),
                    units: quota_units(model, params),
                }),
                ModelAccess::No => {
                    return Err(Refusal::ModelNotInPlan {
                        model: self.model_name(model),
                        tag: tag.clone(),
                        plan: plan.to_string(),
                        plans_allowing: self.plans_allowing(model, params, false, 0),
                    });
                }
            }
        }
        let (needs, why) = params.required_level(&self.metering.size_presets);
        if needs > p.parameters {
            return Err(Refusal::ParameterLevel {
                plan: plan.to_string(),
                has: p.parameters,
                needs,
                params: why,
                plans_allowing: self.plans_allowing(model, params, false, 0),
            });
        }
        if let Some(max) = p.max_batch.max()
            && params.batch > max
        {
            return Err(Refusal::BatchTooLarge {
                plan: plan.to_string(),
                batch: params.batch,
                max,
                plans_allowing: self.plans_allowing(model, params, false, 0),
            });
        }
        if let Some(max) = p.loras.max()
            && params.loras > max
        {
            return Err(Refusal::TooManyLoras {
                plan: plan.to_string(),
                loras: params.loras,
                max,
                plans_allowing: self.plans_allowing(model, params, false, 0),
            });
        }
        Ok(Clearance { queue: p.queue_for(period), quotas })
    }

    /// `check_job` with the model named by id.
    pub fn check_job_by_id(
        &self,
        plan: &str,
        period: Option<Period>,
        model_id: &str,
        params: &JobParams,
    ) -> Result<Clearance, Refusal> {
        let model = self.model(model_id)?;
        self.check_job(plan, period, model, params)
    }

    /// Plans (lowest rank first) that allow this job; `unlimited` asks for full (not
    /// `limited`) access, and `credits` for at least that many credits in one period.
    pub fn plans_allowing(
        &self,
        model: &ModelPricing,
        params: &JobParams,
        unlimited: bool,
        credits: i64,
    ) -> Vec<String> {
        let (needs, _) = params.required_level(&self.metering.size_presets);
        self.plan_ids_by_rank()
            .into_iter()
            .filter(|id| {
                let p = &self.plans[id];
                let tags_ok = model.tags.iter().all(|t| match p.models.get(t).copied().unwrap_or(ModelAccess::No) {
                    ModelAccess::Yes => true,
                    ModelAccess::Limited => !unlimited,
                    ModelAccess::No => false,
                });
                let counts_ok = p.max_batch.allows(params.batch) && p.loras.allows(params.loras);
                let credits_ok = credits <= 0 || p.credits_weekly.max(p.credits_yearly) >= credits;
                tags_ok && needs <= p.parameters && counts_ok && credits_ok
            })
            .collect()
    }

    /// Plans (lowest rank first) that include training on `images` images.
    pub fn plans_allowing_training(&self, images: u32) -> Vec<String> {
        self.plan_ids_by_rank()
            .into_iter()
            .filter(|id| {
                let p = &self.plans[id];
                p.training_weekly.max(p.training_yearly) > 0 && images <= p.training_images_per_lora
            })
            .collect()
    }

    fn model_name(&self, model: &ModelPricing) -> String {
        self.pricing
            .models
            .iter()
            .find(|(_, m)| std::ptr::eq(*m, model))
            .map(|(id, _)| id.clone())
            .unwrap_or_else(|| format!("a {} model", model.tags.join("/")))
    }

    /// `price` with the model named by id.
    pub fn price_job(&self, model_id: &str, params: &JobParams) -> Result<Price, Refusal> {
        let model = self.model(model_id)?;
        price(&self.pricing, model, params.width, params.height, params.steps, params.batch, params.video_seconds)
    }
}

fn quota_units(model: &ModelPricing, params: &JobParams) -> u32 {
    match model.kind {
        ModelKind::Image => params.batch,
        ModelKind::Video => 1,
    }
}

fn validate_params(model: &ModelPricing, params: &JobParams) -> Result<(), Refusal> {
    let bad = |m: &str| Err(Refusal::InvalidParams { message: m.to_string() });
    if params.width == 0 || params.height == 0 {
        return bad("width and height must be > 0");
    }
    if params.batch == 0 {
        return bad("batch must be >= 1");
    }
    if params.steps == Some(0) {
        return bad("steps must be >= 1");
    }
    if let Some(s) = params.video_seconds {
        if model.kind != ModelKind::Video {
            return bad("a duration is only for video models");
        }
        if !(s.is_finite() && s > 0.0) {
            return bad("the video duration must be > 0 seconds");
        }
    }
    Ok(())
}

/// The price of a job, computed server-side only:
/// per item = ceil(base + per_mp_step × megapixels × steps [× seconds for video]), clamped to
/// `[image_min, image_max]` per image or `[video_min, video_max]` per video job, × batch.
/// `steps = None` takes the model's `default_steps`; `video_seconds = None` its
/// `default_seconds`.
pub fn price(
    pricing: &PricingConfig,
    model: &ModelPricing,
    width: u32,
    height: u32,
    steps: Option<u32>,
    batch: u32,
    video_seconds: Option<f64>,
) -> Result<Price, Refusal> {
    let params = JobParams { width, height, batch, steps, video_seconds, ..JobParams::default() };
    validate_params(model, &params)?;
    let steps = steps.unwrap_or(model.default_steps) as f64;
    let mp = width as f64 * height as f64 / 1_000_000.0;
    let (raw, lo, hi) = match model.kind {
        ModelKind::Image => (model.base + model.per_mp_step * mp * steps, pricing.image_min, pricing.image_max),
        ModelKind::Video => {
            let secs = video_seconds.or(model.default_seconds).unwrap_or(1.0);
            (model.base * secs + model.per_mp_step * mp * steps * secs, pricing.video_min, pricing.video_max)
        }
    };
    // A huge or NaN raw price lands on the maximum: the clamp is the contract.
    let per_item = if raw.is_finite() { (raw.ceil().min(hi as f64) as i64).clamp(lo, hi) } else { hi };
    let total = per_item
        .checked_mul(batch as i64)
        .ok_or_else(|| Refusal::InvalidParams { message: "batch too large".into() })?;
    Ok(Price { per_item, batch, total })
}
