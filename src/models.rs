//! The models an installation serves: `[models.<id>]` entries (and `--model <id>=<path>`)
//! resolved to files, with their kind read off the weights and a state the UI and API show.
//! A model whose files are missing or unreadable is listed with the reason; it never stops the
//! server from starting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use serde::Serialize;

use crate::config::{Config, FluxKind, ModelEntry};
use crate::engine::pipeline::ModelFiles;
use crate::ledger::PlansConfig;

/// Whether a model can run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ModelState {
    Ready,
    Missing { reason: String },
}

/// One served model.
#[derive(Debug, Clone, Serialize)]
pub struct ServedModel {
    pub id: String,
    pub label: String,
    pub kind: Option<FluxKind>,
    #[serde(flatten)]
    pub state: ModelState,
    /// Access tags from the model's pricing entry (what plans are checked against).
    pub tags: Vec<String>,
    pub default_steps: u32,
    pub default_width: u32,
    pub default_height: u32,
    /// The transformer's width, read off its weights (None when the files are missing).
    #[serde(skip)]
    pub hidden_size: Option<usize>,
    #[serde(skip)]
    pub files: Option<ModelFiles>,
}

impl ServedModel {
    pub fn is_ready(&self) -> bool {
        self.state == ModelState::Ready
    }
}

/// Parses `--model <id>=<path>`: a diffusers folder, or one all-in-one checkpoint file.
pub fn parse_cli_model(arg: &str) -> Result<(String, ModelEntry)> {
    let (id, path) = arg.split_once('=').ok_or_else(|| anyhow!("--model {arg:?}: expected <id>=<path>"))?;
    let id = id.trim();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        bail!("--model {arg:?}: the id must be letters, digits, '-', '_' or '.'");
    }
    let path = PathBuf::from(path);
    let entry = if path.is_file() {
        // One file holding all four components (ComfyUI's all-in-one checkpoints).
        ModelEntry {
            transformer: Some(path.clone()),
            vae: Some(path.clone()),
            clip: Some(path.clone()),
            t5: Some(path),
            ..Default::default()
        }
    } else {
        ModelEntry { path: Some(path), ..Default::default() }
    };
    Ok((id.to_string(), entry))
}

/// The tokenizers folder under `weights_dir`, when the studio put one there (it overrides the
/// copies built into the binary).
pub fn tokenizers_dir(config: &Config) -> Option<PathBuf> {
    Some(config.engine.weights_dir.join("tokenizers")).filter(|p| p.join("t5/tokenizer.json").exists())
}

/// The files of a config entry.
pub fn resolve_files(id: &str, entry: &ModelEntry, tokenizers: Option<&Path>) -> Result<ModelFiles> {
    match (&entry.path, &entry.transformer) {
        // The folder gives every component; single files named beside it replace theirs (a
        // GGUF or fp8 transformer with the folder's VAE and text encoders), as on the CLI.
        (Some(p), _) => {
            let mut files = ModelFiles::from_diffusers(p, tokenizers)?;
            for (file, part) in [
                (&entry.transformer, &mut files.transformer),
                (&entry.vae, &mut files.vae),
                (&entry.clip, &mut files.clip),
                (&entry.t5, &mut files.t5),
            ] {
                if let Some(f) = file {
                    *part = f.clone();
                }
            }
            Ok(files)
        }
        (None, Some(t)) => {
            let need = |p: &Option<PathBuf>, what: &str| {
                p.clone().ok_or_else(|| anyhow!("[models.{id}] names a transformer file but no {what}"))
            };
            Ok(ModelFiles {
                transformer: t.clone(),
                vae: need(&entry.vae, "vae")?,
                clip: need(&entry.clip, "clip")?,
                t5: need(&entry.t5, "t5")?,
                scheduler: None,
                tokenizers: tokenizers.map(Path::to_path_buf),
            })
        }
        (None, None) => bail!("[models.{id}] names neither path nor transformer"),
    }
}

/// schnell or dev, from the transformer's weights (dev has the guidance embedding), after
/// checking every component's header, so a model whose VAE or text encoders are missing or
/// wrong is never listed as ready.
/// Also returns the transformer's hidden width (what a LoRA must fit).
pub fn check_files(files: &ModelFiles) -> Result<(FluxKind, usize)> {
    let config = files.check()?;
    Ok((if config.guidance_embed { FluxKind::Dev } else { FluxKind::Schnell }, config.hidden_size))
}

/// Every served model, by id.
#[derive(Debug, Clone, Default)]
pub struct ModelRegistry {
    pub models: BTreeMap<String, ServedModel>,
}

impl ModelRegistry {
    /// Resolves every `[models.*]` entry of `config` (plus `extra` from the command line, which
    /// win over config entries of the same id), reads each one's kind, and returns the
    /// registry with the plans config that prices and entitles those ids.
    pub fn build(config: &Config, extra: &[(String, ModelEntry)]) -> Result<(ModelRegistry, PlansConfig)> {
        let mut entries = config.models.clone();
        for (id, e) in extra {
            entries.insert(id.clone(), e.clone());
        }
        let tokenizers = tokenizers_dir(config);
        type Found = (Option<ModelFiles>, Option<FluxKind>, Option<usize>, ModelState);
        let mut found: BTreeMap<String, Found> = BTreeMap::new();
        for (id, entry) in &entries {
            let checked = resolve_files(id, entry, tokenizers.as_deref()).and_then(|files| {
                let (kind, hidden) = check_files(&files)?;
                if let Some(declared) = entry.kind
                    && declared != kind
                {
                    bail!("declared kind {} but the transformer is {}", declared.as_str(), kind.as_str());
                }
                Ok((files, kind, hidden))
            });
            let row = match checked {
                Ok((files, kind, hidden)) => (Some(files), Some(kind), Some(hidden), ModelState::Ready),
                Err(e) => {
                    log::warn!("model {id} is not available: {e:#}");
                    (None, entry.kind, None, ModelState::Missing { reason: format!("{e:#}") })
                }
            };
            found.insert(id.clone(), row);
        }
        let mut with_extra = config.clone();
        with_extra.models = entries.clone();
        let plans = with_extra.plans_with_kinds(&|id| found.get(id).and_then(|f| f.1))?;
        let mut models = BTreeMap::new();
        for (id, entry) in &entries {
            let (files, kind, hidden_size, mut state) = found.remove(id).expect("every entry was checked");
            let pricing = plans.pricing.models.get(id);
            if pricing.is_none() && state == ModelState::Ready {
                state = ModelState::Missing {
                    reason: format!(
                        "no pricing: add price_as or kind to [models.{id}], or a [pricing.models.{id}] table"
                    ),
                };
            }
            models.insert(
                id.clone(),
                ServedModel {
                    id: id.clone(),
                    label: entry.label.clone().unwrap_or_else(|| id.clone()),
                    kind,
                    state,
                    tags: pricing.map(|p| p.tags.clone()).unwrap_or_default(),
                    default_steps: pricing.map_or(4, |p| p.default_steps),
                    default_width: entry.default_width.unwrap_or(1024),
                    default_height: entry.default_height.unwrap_or(1024),
                    hidden_size,
                    files,
                },
            );
        }
        if models.values().all(|m| !m.is_ready()) {
            log::warn!(
                "no usable model: the server runs, but jobs are refused until one is added to [models] in the config"
            );
        }
        Ok((ModelRegistry { models }, plans))
    }

    pub fn get(&self, id: &str) -> Option<&ServedModel> {
        self.models.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_files_beside_a_folder_replace_its_components() {
        let demo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/demo/schnell");
        let gguf = PathBuf::from("/models/flux1-schnell-Q4_K.gguf");
        let entry = ModelEntry { path: Some(demo.clone()), transformer: Some(gguf.clone()), ..ModelEntry::default() };
        let files = resolve_files("x", &entry, None).unwrap();
        let folder = ModelFiles::from_diffusers(&demo, None).unwrap();
        assert_eq!(files.transformer, gguf);
        assert_eq!((&files.vae, &files.clip, &files.t5), (&folder.vae, &folder.clip, &folder.t5));
        assert_eq!(files.scheduler, folder.scheduler);
        let entry = ModelEntry { path: Some(demo), ..ModelEntry::default() };
        assert_eq!(resolve_files("x", &entry, None).unwrap().transformer, folder.transformer);
    }
}
