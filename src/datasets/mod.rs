//! Training datasets: a user's images and captions for a LoRA training, each in its own folder
//! `<data>/datasets/<id>/` (the id is 128 random bits), private to the owner (admins can read).
//!
//! The folder layout is the one `atelier train` reads, so a training job points the trainer at
//! `images/` directly:
//! - `dataset.json`: [`Dataset`] (owner, name, trigger word, created).
//! - `images/<image id>.png`: the uploaded image, decoded, EXIF orientation applied, re-encoded
//!   (so metadata and orientation flags do not travel into training).
//! - `images/<image id>.txt`: its caption (`[trigger]` is replaced by the trigger word at training).
//! - `thumbs/<image id>.jpg`: the thumbnail the editor shows.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::ledger::UserId;

/// `dataset.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Dataset {
    pub id: String,
    pub owner: UserId,
    pub name: String,
    /// The trigger word captions refer to as `[trigger]`.
    pub trigger: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Why a dataset request failed. The server maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// No such dataset, or another user's (404: the same answer, so ids cannot be probed).
    #[error("no dataset {0:?}")]
    NotFound(String),
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The datasets under `<data>/datasets/`.
pub struct Datasets {
    root: PathBuf,
}

impl Datasets {
    pub fn new(data_dir: &Path) -> Datasets {
        Datasets { root: data_dir.join("datasets") }
    }

    /// The folder of dataset `id` (which may not exist). Ids are hex, so a crafted id cannot
    /// leave the root.
    fn dir(&self, id: &str) -> Result<PathBuf, DatasetError> {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DatasetError::NotFound(id.to_string()));
        }
        Ok(self.root.join(id))
    }

    /// Creates an empty dataset owned by `owner`.
    pub fn create(&self, owner: UserId, name: &str, trigger: &str) -> Result<Dataset, DatasetError> {
        let id = crate::secret::random_hex(16);
        let dir = self.dir(&id)?;
        let ds = Dataset {
            id,
            owner,
            name: name.trim().to_string(),
            trigger: trigger.trim().to_string(),
            created_at: chrono::Utc::now(),
        };
        crate::private_files::create_dir_all(&dir.join("images"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        crate::private_files::create_dir_all(&dir.join("thumbs"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        self.save(&ds)?;
        Ok(ds)
    }

    /// Writes `dataset.json` (through a temporary file, so a crash never leaves half of it).
    pub fn save(&self, ds: &Dataset) -> Result<(), DatasetError> {
        let dir = self.dir(&ds.id)?;
        let tmp = dir.join(".dataset.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(ds).context("dataset.json")?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join("dataset.json")).context("saving dataset.json")?;
        Ok(())
    }

    /// Dataset `id` as `user` sees it: the owner's, or any for an admin; anything else is
    /// `NotFound`.
    pub fn get(&self, user: UserId, is_admin: bool, id: &str) -> Result<Dataset, DatasetError> {
        let path = self.dir(id)?.join("dataset.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(DatasetError::NotFound(id.into())),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display())).into()),
        };
        let ds: Dataset = serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", path.display()))?;
        if ds.owner != user && !is_admin {
            return Err(DatasetError::NotFound(id.into()));
        }
        Ok(ds)
    }

    /// The folder a training reads (images and their `.txt` captions).
    pub fn images_dir(&self, id: &str) -> Result<PathBuf, DatasetError> {
        Ok(self.dir(id)?.join("images"))
    }

    /// The folder of thumbnails.
    pub fn thumbs_dir(&self, id: &str) -> Result<PathBuf, DatasetError> {
        Ok(self.dir(id)?.join("thumbs"))
    }

    /// How many images dataset `id` holds (what the plan's `training_images_per_lora` limits).
    pub fn image_count(&self, id: &str) -> Result<u32, DatasetError> {
        let dir = self.images_dir(id)?;
        let n = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
            .count();
        Ok(n as u32)
    }
}
