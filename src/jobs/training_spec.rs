//! What a LoRA training job asks for (`POST /api/trainings`) and the settings it runs with,
//! resolved against `[training]`: the preset for plans at the "standard" parameter level, or
//! the caller's steps / rank / lr / resolution / targets within the configured limits (which
//! the ledger allows only at the "advanced" level and above).

use serde::{Deserialize, Serialize};

use crate::config::TrainingConfig;
use crate::train::adamw::AdamWConfig;
use crate::train::export::Format;
use crate::train::objective::Timesteps;
use crate::train::params::Targets;
use crate::train::run::Settings;

/// The body of `POST /api/trainings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingOrder {
    /// The dataset to train on (its images are copied when the job is submitted).
    pub dataset: String,
    /// The base model (a model id of `GET /api/models`).
    pub model: String,
    /// The name of the LoRA in the caller's library.
    pub name: String,
    /// The trigger word; the dataset's when not given.
    #[serde(default)]
    pub trigger: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// Steps, rank, learning rate, resolution, targets: "advanced" plans and above.
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub rank: Option<usize>,
    #[serde(default)]
    pub lr: Option<f64>,
    #[serde(default)]
    pub resolution: Option<usize>,
    #[serde(default)]
    pub targets: Option<Targets>,
    /// Prompts of the sample images (default: the trigger word); at most 4.
    #[serde(default)]
    pub sample_prompts: Vec<String>,
}

/// A training job's settings as stored with the job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSpec {
    pub dataset: String,
    pub name: String,
    pub trigger: String,
    pub seed: u64,
    pub steps: usize,
    pub rank: usize,
    pub lr: f64,
    pub resolution: usize,
    pub targets: Targets,
    pub sample_prompts: Vec<String>,
    /// Images in the dataset when it was submitted (copied then).
    pub images: u32,
    /// Whether the settings are the plan's preset.
    pub preset: bool,
}

const MAX_SAMPLE_PROMPTS: usize = 4;

impl TrainingOrder {
    /// The settings set beyond the preset (what needs the "advanced" level).
    pub fn custom(&self) -> Vec<String> {
        let mut out = Vec::new();
        let set = [
            ("steps", self.steps.is_some()),
            ("rank", self.rank.is_some()),
            ("lr", self.lr.is_some()),
            ("resolution", self.resolution.is_some()),
            ("targets", self.targets.is_some()),
        ];
        for (name, is_set) in set {
            if is_set {
                out.push(name.to_string());
            }
        }
        out
    }

    /// The settings the job runs with, or why they are not allowed here (400).
    pub fn resolve(
        &self,
        cfg: &TrainingConfig,
        dataset_trigger: &str,
        images: u32,
        seed: u64,
    ) -> Result<TrainingSpec, String> {
        let steps = self.steps.unwrap_or(cfg.preset_steps);
        if steps == 0 || steps > cfg.max_steps {
            return Err(format!("steps must be 1 to {}, not {steps}", cfg.max_steps));
        }
        let rank = self.rank.unwrap_or(cfg.preset_rank);
        if rank == 0 || rank > cfg.max_rank {
            return Err(format!("rank must be 1 to {}, not {rank}", cfg.max_rank));
        }
        let lr = self.lr.unwrap_or(cfg.preset_lr);
        if !(lr > 0.0 && lr <= 1e-2) {
            return Err(format!("lr must be above 0 and at most 0.01, not {lr}"));
        }
        let resolution = self.resolution.unwrap_or(cfg.preset_resolution);
        if self.resolution.is_some() && !cfg.resolutions.contains(&resolution) {
            let list: Vec<String> = cfg.resolutions.iter().map(|r| r.to_string()).collect();
            return Err(format!("resolution must be one of {}, not {resolution}", list.join(", ")));
        }
        let trigger = self.trigger.clone().unwrap_or_else(|| dataset_trigger.to_string()).trim().to_string();
        if trigger.is_empty() || trigger.chars().count() > 100 || trigger.chars().any(char::is_control) {
            return Err("the trigger word must be 1 to 100 characters (set it on the dataset or in the request)".into());
        }
        if self.sample_prompts.len() > MAX_SAMPLE_PROMPTS
            || self.sample_prompts.iter().any(|p| p.trim().is_empty() || p.chars().count() > 500)
        {
            return Err(format!("at most {MAX_SAMPLE_PROMPTS} sample prompts, each 1 to 500 characters"));
        }
        let sample_prompts = if self.sample_prompts.is_empty() {
            vec![trigger.clone()]
        } else {
            self.sample_prompts.iter().map(|p| p.replace("[trigger]", &trigger)).collect()
        };
        Ok(TrainingSpec {
            dataset: self.dataset.clone(),
            name: self.name.clone(),
            trigger,
            seed,
            steps,
            rank,
            lr,
            resolution,
            targets: self.targets.unwrap_or(Targets::All),
            sample_prompts,
            images,
            preset: self.custom().is_empty(),
        })
    }
}

impl TrainingSpec {
    /// The trainer's settings (kohya output, alpha = rank, batch 1, checkpoints and samples as
    /// `[training]` says).
    pub fn settings(&self, cfg: &TrainingConfig) -> Settings {
        Settings {
            trigger: self.trigger.clone(),
            steps: self.steps,
            rank: self.rank,
            alpha: self.rank as f32,
            adamw: AdamWConfig { lr: self.lr, ..AdamWConfig::default() },
            batch: 1,
            resolution: self.resolution,
            timesteps: Timesteps::Sigmoid,
            targets: self.targets,
            caption_dropout: 0.05,
            seed: self.seed,
            format: Format::Kohya,
            save_every: cfg.checkpoint_every_steps,
            sample_every: if cfg.sample_every == 0 { self.steps } else { cfg.sample_every },
            sample_prompts: self.sample_prompts.clone(),
            max_images: self.images.max(1) as usize,
            max_sequence_length: cfg.max_sequence_length,
            recompute: true,
            ..Settings::default()
        }
    }
}
