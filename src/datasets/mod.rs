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
//!
//! An upload is staged in `.upload-<random>/` inside the dataset's folder and moved into place
//! only when every file of the request passed (see [`upload`]); captions: [`captions`].

pub mod captions;
pub mod upload;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::ledger::{Refusal, UserId};

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
    /// No such dataset (or image), or another user's (404: the same answer, so ids cannot be probed).
    #[error("{0} not found")]
    NotFound(String),
    /// Bad input (400).
    #[error("{0}")]
    Invalid(String),
    /// A file too large, or an image with too many pixels (413).
    #[error("{0}")]
    TooLarge(String),
    /// A part that is not an accepted image type, by its content type or its content (415).
    #[error("{0}")]
    Unsupported(String),
    /// The user keeps as many datasets as allowed (409).
    #[error("{0}")]
    Full(String),
    /// More images than the plan trains on (403, naming the plans that allow more).
    #[error(transparent)]
    Refused(Refusal),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The datasets under `<data>/datasets/`.
pub struct Datasets {
    root: PathBuf,
    /// Held while images are moved into or out of a dataset and while datasets are created,
    /// so two requests at once cannot both pass a count limit.
    changing: Mutex<()>,
    /// Held while an upload decodes its images (one at a time: they are large).
    pub(crate) decoding: Mutex<()>,
}

/// One image of a dataset, as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageInfo {
    pub id: String,
    pub caption: String,
    pub width: u32,
    pub height: u32,
    /// Size of the stored PNG.
    pub bytes: u64,
    pub url: String,
    pub thumb_url: String,
}

/// A dataset with its size, for lists.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DatasetSummary {
    #[serde(flatten)]
    pub dataset: Dataset,
    pub image_count: u32,
    /// Bytes the stored images take.
    pub bytes: u64,
    /// The first image's thumbnail, if any.
    pub cover_url: Option<String>,
}

/// Whether `id` can be an image id (hex, as made here): anything else never reaches a path.
pub fn valid_image_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A dataset's name or trigger word, trimmed; `what` names it in the error.
fn check_text(what: &str, text: &str, max: usize, required: bool) -> Result<String, DatasetError> {
    let t = text.trim();
    if required && t.is_empty() {
        return Err(DatasetError::Invalid(format!("the {what} is empty")));
    }
    if t.chars().count() > max {
        return Err(DatasetError::Invalid(format!("the {what} is longer than {max} characters")));
    }
    if t.chars().any(char::is_control) {
        return Err(DatasetError::Invalid(format!("the {what} contains control characters")));
    }
    Ok(t.to_string())
}

pub fn check_name(name: &str) -> Result<String, DatasetError> {
    check_text("dataset name", name, 100, true)
}

pub fn check_trigger(trigger: &str) -> Result<String, DatasetError> {
    check_text("trigger word", trigger, 100, false)
}

impl Datasets {
    pub fn new(data_dir: &Path) -> Datasets {
        Datasets { root: data_dir.join("datasets"), changing: Mutex::new(()), decoding: Mutex::new(()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The folder of dataset `id` (which may not exist). Ids are hex, so a crafted id cannot
    /// leave the root.
    fn dir(&self, id: &str) -> Result<PathBuf, DatasetError> {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(DatasetError::NotFound(format!("dataset {id:?}")));
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
            name: check_name(name)?,
            trigger: check_trigger(trigger)?,
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DatasetError::NotFound(format!("dataset {id:?}")));
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display())).into()),
        };
        let ds: Dataset = serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", path.display()))?;
        if ds.owner != user && !is_admin {
            return Err(DatasetError::NotFound(format!("dataset {id:?}")));
        }
        Ok(ds)
    }

    /// [`Datasets::create`] unless `owner` already keeps `max` datasets.
    pub fn create_limited(
        &self,
        owner: UserId,
        name: &str,
        trigger: &str,
        max: usize,
    ) -> Result<Dataset, DatasetError> {
        let _changing = self.lock();
        if self.list(Some(owner))?.len() >= max {
            return Err(DatasetError::Full(format!(
                "you keep {max} datasets, the most allowed here ([datasets] max_datasets_per_user); delete one first"
            )));
        }
        self.create(owner, name, trigger)
    }

    /// Every dataset of `owner` (all users' for `None`), newest first.
    pub fn list(&self, owner: Option<UserId>) -> Result<Vec<Dataset>, DatasetError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", self.root.display())).into()),
        };
        let mut out = Vec::new();
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(id) = entry.file_name().to_str().map(str::to_string) else { continue };
            // Any user and admin: the owner check is the filter below.
            match self.get(0, true, &id) {
                Ok(ds) if owner.is_none_or(|o| o == ds.owner) => out.push(ds),
                Ok(_) | Err(DatasetError::NotFound(_)) => {}
                Err(e) => log::warn!("skipping dataset {id}: {e}"),
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// `ds` with its image count, size and cover.
    pub fn summary(&self, ds: Dataset) -> Result<DatasetSummary, DatasetError> {
        let images = self.images(&ds.id)?;
        Ok(DatasetSummary {
            image_count: images.len() as u32,
            bytes: images.iter().map(|i| i.bytes).sum(),
            cover_url: images.first().map(|i| i.thumb_url.clone()),
            dataset: ds,
        })
    }

    /// Renames dataset `id` of `owner` or changes its trigger word.
    pub fn update(
        &self,
        owner: UserId,
        id: &str,
        name: Option<&str>,
        trigger: Option<&str>,
    ) -> Result<Dataset, DatasetError> {
        let _changing = self.lock();
        let mut ds = self.get(owner, false, id)?;
        if let Some(n) = name {
            ds.name = check_name(n)?;
        }
        if let Some(t) = trigger {
            ds.trigger = check_trigger(t)?;
        }
        self.save(&ds)?;
        Ok(ds)
    }

    /// Deletes dataset `id` of `owner`, the whole folder.
    pub fn delete(&self, owner: UserId, id: &str) -> Result<(), DatasetError> {
        let _changing = self.lock();
        self.get(owner, false, id)?;
        let dir = self.dir(id)?;
        // Renamed away first: a crash halfway never leaves a dataset with half its files.
        let doomed = self.root.join(format!(".deleting-{id}"));
        std::fs::rename(&dir, &doomed).with_context(|| format!("cannot delete {}", dir.display()))?;
        drop(_changing);
        // The dataset is gone once renamed; a removal that fails is swept at the next start.
        if let Err(e) = std::fs::remove_dir_all(&doomed) {
            log::warn!("removing {}: {e}", doomed.display());
        }
        Ok(())
    }

    /// Removes what a crash left: datasets half deleted, uploads half staged, and captions or
    /// thumbnails whose image never landed. Run at start, before any request.
    pub fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".deleting-") {
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    log::warn!("removing {}: {e}", path.display());
                }
                continue;
            }
            if !path.is_dir() {
                continue;
            }
            for inner in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                if inner.file_name().to_string_lossy().starts_with(".upload-") {
                    let _ = std::fs::remove_dir_all(inner.path());
                }
            }
            let images = path.join("images");
            let has_png = |stem: &std::ffi::OsStr| images.join(stem).with_extension("png").exists();
            for (dir, ext) in [(path.join("images"), "txt"), (path.join("thumbs"), "jpg")] {
                for f in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let p = f.path();
                    if p.extension().is_some_and(|x| x == ext) && p.file_stem().is_some_and(|s| !has_png(s)) {
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
        }
    }

    /// The images of dataset `id`, oldest first (ids sort in upload order).
    pub fn images(&self, id: &str) -> Result<Vec<ImageInfo>, DatasetError> {
        let dir = self.images_dir(id)?;
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            // Deleted meanwhile (an upload that ends after its dataset was deleted).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DatasetError::NotFound(format!("dataset {id:?}")));
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", dir.display())).into()),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "png") {
                continue;
            }
            let Some(img) = path.file_stem().and_then(|s| s.to_str()).filter(|s| valid_image_id(s)) else { continue };
            let bytes = entry.metadata().with_context(|| format!("reading {}", path.display()))?.len();
            let (width, height) = image::image_dimensions(&path).unwrap_or((0, 0));
            found.push(ImageInfo {
                id: img.to_string(),
                caption: captions::read(&dir, img)?,
                width,
                height,
                bytes,
                url: format!("/api/datasets/{id}/images/{img}/file"),
                thumb_url: format!("/api/datasets/{id}/images/{img}/thumb"),
            });
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    /// The stored PNG of image `img` (`NotFound` unless it exists).
    pub fn image_file(&self, id: &str, img: &str) -> Result<PathBuf, DatasetError> {
        self.existing(self.images_dir(id)?, img, "png")
    }

    /// The thumbnail of image `img`.
    pub fn thumb_file(&self, id: &str, img: &str) -> Result<PathBuf, DatasetError> {
        self.existing(self.thumbs_dir(id)?, img, "jpg")
    }

    fn existing(&self, dir: PathBuf, img: &str, ext: &str) -> Result<PathBuf, DatasetError> {
        let not_found = || DatasetError::NotFound(format!("image {img}"));
        if !valid_image_id(img) {
            return Err(not_found());
        }
        let path = dir.join(format!("{img}.{ext}"));
        if path.is_file() { Ok(path) } else { Err(not_found()) }
    }

    /// Deletes image `img` (its PNG, caption and thumbnail) of dataset `id` of `owner`.
    pub fn delete_image(&self, owner: UserId, id: &str, img: &str) -> Result<(), DatasetError> {
        let _changing = self.lock();
        self.get(owner, false, id)?;
        let png = self.image_file(id, img)?;
        std::fs::remove_file(&png).with_context(|| format!("cannot delete {}", png.display()))?;
        for path in [png.with_extension("txt"), self.thumbs_dir(id)?.join(format!("{img}.jpg"))] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    log::warn!("cannot delete {}: {e}", path.display())
                }
                _ => {}
            }
        }
        Ok(())
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
        Ok(count_images(&self.images_dir(id)?)?)
    }
}

/// How many images (stored as PNG) a dataset's `images/` folder, or a copy of it, holds.
pub fn count_images(dir: &Path) -> anyhow::Result<u32> {
    let n = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .count();
    Ok(n as u32)
}
