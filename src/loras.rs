//! The LoRA libraries jobs name LoRAs from: the studio's folder (`[engine] loras_dir`, default
//! `weights/loras`), open to every user, and each user's private folder under the data folder
//! (`<data>/loras/<user id>/`), which only its owner lists, uses, renames or deletes; an admin
//! can publish a user's LoRA to the studio's folder.
//!
//! A LoRA is `NAME.safetensors` (any FLUX format `engine::lora` reads) with an optional sidecar
//! `NAME.json` (label, trigger words, default weight, licence, description; A1111's
//! `activation text` and `preferred weight` are read too) and an optional preview image
//! `NAME.preview.png` or `NAME.png` (A1111's and ComfyUI's conventions). Private names never
//! shadow studio ones: a name is refused where the studio has it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::engine::lora::Lora;
use crate::ledger::UserId;
use crate::spec::valid_lora_name;

/// Whose library a LoRA is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Studio,
    /// The caller's own.
    Mine,
}

/// `NAME.json` beside a LoRA.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_weight: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "license")]
    pub licence: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The model a trained LoRA was trained on (a model id of this server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// The training job that made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_job: Option<String>,
    /// When it was made (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// A1111's user metadata: comma-separated trigger words.
    #[serde(default, rename = "activation text", skip_serializing)]
    pub(crate) a1111_activation: Option<String>,
    #[serde(default, rename = "preferred weight", skip_serializing)]
    pub(crate) a1111_weight: Option<f32>,
}

impl Sidecar {
    /// Bounds on what a user may write into a sidecar (it is listed with every LoRA).
    pub fn check(&self) -> Result<(), LibraryError> {
        let long = |what: &str, text: &Option<String>, max: usize| match text {
            Some(t) if t.chars().count() > max => {
                Err(LibraryError::Invalid(format!("the {what} is longer than {max} characters")))
            }
            _ => Ok(()),
        };
        long("label", &self.label, 100)?;
        long("licence", &self.licence, 200)?;
        long("description", &self.description, 5000)?;
        if self.triggers.len() > 20 || self.triggers.iter().any(|t| t.trim().is_empty() || t.chars().count() > 100) {
            return Err(LibraryError::Invalid("at most 20 trigger words, each 1 to 100 characters".into()));
        }
        Ok(())
    }

    fn read(path: &Path) -> Sidecar {
        let Ok(bytes) = std::fs::read(path) else { return Sidecar::default() };
        match serde_json::from_slice::<Sidecar>(&bytes) {
            Ok(mut s) => {
                if s.triggers.is_empty()
                    && let Some(a) = s.a1111_activation.take()
                {
                    s.triggers = a.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
                }
                // A1111 writes 0 for "not set".
                if s.default_weight.is_none() {
                    s.default_weight = s.a1111_weight.filter(|w| *w != 0.0);
                }
                s
            }
            Err(e) => {
                log::warn!("ignoring the LoRA sidecar {}: {e}", path.display());
                Sidecar::default()
            }
        }
    }
}

/// One LoRA as the API lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraEntry {
    pub name: String,
    pub scope: Scope,
    pub label: String,
    pub triggers: Vec<String>,
    pub default_weight: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub licence: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training_job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    pub has_preview: bool,
    pub bytes: u64,
    /// Unix seconds.
    pub modified: i64,
}

/// What a LoRA file is, read once per file version: the detected format, the transformer width
/// it fits, A1111's hash.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSummary {
    pub format: &'static str,
    pub hidden_width: Option<usize>,
    pub hash: String,
    pub warnings: Vec<String>,
}

/// Why a library operation failed; the server maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    /// 404.
    #[error("no LoRA named {0:?} in your library or the studio's")]
    NotFound(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 400 (a file that is not a usable LoRA, a bad name).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub struct Library {
    studio: PathBuf,
    private_root: PathBuf,
    /// Summaries by (path, size, mtime).
    summaries: Mutex<HashMap<(PathBuf, u64, i128), Arc<LoraSummary>>>,
    /// Held while names are checked and files moved, so two uploads (or an upload and a
    /// rename) can never both take one name.
    changes: Mutex<()>,
}

const EXT: &str = "safetensors";
/// Uploads in progress: hidden files in the owner's folder, never listed.
const UPLOAD_PREFIX: &str = ".upload-";
/// The files that go with a LoRA: its sidecar, then the preview images in the order looked for.
const COMPANIONS: &[&str] = &["json", "preview.png", "png", "preview.jpg", "jpg", "preview.webp", "webp"];

fn mtime(meta: &std::fs::Metadata) -> i128 {
    meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as i128)
}

impl Library {
    /// `studio`: the shared folder; `data_dir`: the server's data folder (private libraries
    /// live in its `loras/`).
    pub fn new(studio: PathBuf, data_dir: &Path) -> Library {
        Library {
            studio,
            private_root: data_dir.join("loras"),
            summaries: Mutex::new(HashMap::new()),
            changes: Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes uploads a previous run left half-written (a client that went away, a crash).
    pub fn sweep_uploads(&self) {
        let Ok(users) = std::fs::read_dir(&self.private_root) else { return };
        for dir in users.flatten() {
            for f in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
                if f.file_name().to_string_lossy().starts_with(UPLOAD_PREFIX) {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }

    pub fn studio_dir(&self) -> &Path {
        &self.studio
    }

    fn user_dir(&self, user: UserId) -> PathBuf {
        self.private_root.join(user.to_string())
    }

    fn dir(&self, scope: Scope, user: UserId) -> PathBuf {
        match scope {
            Scope::Studio => self.studio.clone(),
            Scope::Mine => self.user_dir(user),
        }
    }

    fn file(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.{EXT}"))
    }

    /// A name a LoRA may be stored under (see [`valid_lora_name`]), or why not.
    pub fn check_name(name: &str) -> Result<(), LibraryError> {
        if valid_lora_name(name) {
            Ok(())
        } else {
            Err(LibraryError::Invalid(format!(
                "{name:?} is not a LoRA name: 1 to 100 characters, no / \\ < > : or control characters, not starting with a dot or a space"
            )))
        }
    }

    /// The studio's LoRA `name`, if it has one (the command line's `<lora:name>` tags).
    pub fn studio_file(&self, name: &str) -> Option<PathBuf> {
        Some(Self::file(&self.studio, name)).filter(|p| valid_lora_name(name) && p.is_file())
    }

    /// Where the LoRA `name` that `user` may use is: their own, else the studio's.
    pub fn resolve(&self, user: UserId, name: &str) -> Result<(Scope, PathBuf), LibraryError> {
        if valid_lora_name(name) {
            for scope in [Scope::Mine, Scope::Studio] {
                let p = Self::file(&self.dir(scope, user), name);
                if p.is_file() {
                    return Ok((scope, p));
                }
            }
        }
        Err(LibraryError::NotFound(name.to_string()))
    }

    /// The name of the LoRA training job `job` stored in `user`'s library, if it stored one
    /// (a job that stopped between storing it and being marked succeeded).
    pub fn trained_by(&self, user: UserId, job: &str) -> Option<String> {
        let entries = self.list(user).ok()?;
        entries.into_iter().find(|e| e.scope == Scope::Mine && e.training_job.as_deref() == Some(job)).map(|e| e.name)
    }

    /// The studio's LoRAs and `user`'s own, studio first, each by name.
    pub fn list(&self, user: UserId) -> Result<Vec<LoraEntry>, LibraryError> {
        let mut out = Self::list_dir(&self.studio, Scope::Studio)?;
        out.extend(Self::list_dir(&self.user_dir(user), Scope::Mine)?);
        Ok(out)
    }

    fn list_dir(dir: &Path, scope: Scope) -> Result<Vec<LoraEntry>, LibraryError> {
        let read = match std::fs::read_dir(dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for e in read.flatten() {
            let path = e.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".safetensors"))
            else {
                continue;
            };
            if !valid_lora_name(name) {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            out.push(Self::entry(dir, name, scope, &meta));
        }
        out.sort_by_key(|e| e.name.to_lowercase());
        Ok(out)
    }

    fn entry(dir: &Path, name: &str, scope: Scope, meta: &std::fs::Metadata) -> LoraEntry {
        let side = Sidecar::read(&dir.join(format!("{name}.json")));
        LoraEntry {
            name: name.to_string(),
            scope,
            label: side.label.unwrap_or_else(|| name.to_string()),
            triggers: side.triggers,
            default_weight: side.default_weight.filter(|w| w.is_finite()).unwrap_or(1.0),
            licence: side.licence,
            description: side.description,
            base_model: side.base_model,
            training_job: side.training_job,
            created_at: side.created_at,
            has_preview: Self::preview_in(dir, name).is_some(),
            bytes: meta.len(),
            modified: (mtime(meta) / 1_000_000_000) as i64,
        }
    }

    fn preview_in(dir: &Path, name: &str) -> Option<PathBuf> {
        COMPANIONS[1..].iter().map(|ext| dir.join(format!("{name}.{ext}"))).find(|p| p.is_file())
    }

    /// The preview image of a LoRA `user` may use.
    pub fn preview(&self, user: UserId, name: &str) -> Result<PathBuf, LibraryError> {
        let (scope, _) = self.resolve(user, name)?;
        Self::preview_in(&self.dir(scope, user), name)
            .ok_or_else(|| LibraryError::NotFound(format!("{name} (preview)")))
    }

    /// What the file at `path` is, parsed once per version of the file.
    pub fn summary(&self, path: &Path) -> Result<Arc<LoraSummary>, LibraryError> {
        let meta = std::fs::metadata(path)?;
        let key = (path.to_path_buf(), meta.len(), mtime(&meta));
        if let Some(s) = self.summaries.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(s.clone());
        }
        let lora = Lora::open(path).map_err(|e| LibraryError::Invalid(format!("{e:#}")))?;
        let mut warnings = lora.notes.clone();
        if !lora.unmatched.is_empty() {
            warnings.push(format!(
                "{} keys match nothing FLUX has: {}",
                lora.unmatched.len(),
                lora.unmatched.join(", ")
            ));
        }
        let s = Arc::new(LoraSummary {
            format: lora.format,
            hidden_width: lora.hidden_width(),
            hash: lora.hash.clone(),
            warnings,
        });
        self.summaries.lock().unwrap_or_else(|p| p.into_inner()).insert(key, s.clone());
        Ok(s)
    }

    /// Checks that a LoRA fits a transformer of width `hidden` (a LoRA for another FLUX size).
    pub fn check_fits(&self, path: &Path, name: &str, model: &str, hidden: usize) -> Result<(), LibraryError> {
        let s = self.summary(path)?;
        match s.hidden_width {
            Some(w) if w != hidden => Err(LibraryError::Invalid(format!(
                "LoRA {name:?} was made for a FLUX transformer of width {w}; model {model} has width {hidden}"
            ))),
            _ => Ok(()),
        }
    }

    /// Stores an uploaded file (at `tmp`, in the same file system) as `user`'s LoRA `name`
    /// after checking it: a LoRA of a format atelier applies, with transformer keys, for a
    /// transformer of one of `widths` (the served models'; empty: no check). `tmp` is removed
    /// whatever happens.
    pub fn store_upload(
        &self,
        user: UserId,
        name: &str,
        tmp: &Path,
        widths: &[usize],
        max_per_user: usize,
    ) -> Result<(LoraEntry, Arc<LoraSummary>), LibraryError> {
        // Messages name the upload, never the server's folders.
        let out = self.store_checked(user, name, tmp, widths, max_per_user).map_err(|e| match e {
            LibraryError::Invalid(m) => LibraryError::Invalid(m.replace(&tmp.display().to_string(), name)),
            e => e,
        });
        let _ = std::fs::remove_file(tmp);
        self.summaries.lock().unwrap_or_else(|p| p.into_inner()).retain(|(p, _, _), _| p != tmp);
        out
    }

    fn store_checked(
        &self,
        user: UserId,
        name: &str,
        tmp: &Path,
        widths: &[usize],
        max_per_user: usize,
    ) -> Result<(LoraEntry, Arc<LoraSummary>), LibraryError> {
        Self::check_name(name)?;
        let summary = self.summary(tmp)?;
        if let Some(w) = summary.hidden_width
            && !widths.is_empty()
            && !widths.contains(&w)
        {
            return Err(LibraryError::Invalid(format!(
                "this LoRA is for a FLUX transformer of width {w}; the models served here have width {}",
                widths.iter().map(|w| w.to_string()).collect::<Vec<_>>().join(" or ")
            )));
        }
        let dir = self.user_dir(user);
        let _changing = self.lock();
        self.check_free(user, name)?;
        if Self::list_dir(&dir, Scope::Mine)?.len() >= max_per_user {
            return Err(LibraryError::Conflict(format!(
                "your library holds {max_per_user} LoRAs, the most allowed; delete one first"
            )));
        }
        std::fs::create_dir_all(&dir)?;
        let dest = Self::file(&dir, name);
        std::fs::rename(tmp, &dest)?;
        let meta = std::fs::metadata(&dest)?;
        Ok((Self::entry(&dir, name, Scope::Mine, &meta), summary))
    }

    /// A name `user` may give a new LoRA: valid, and taken neither in their library nor the
    /// studio's (409).
    pub fn check_available(&self, user: UserId, name: &str) -> Result<(), LibraryError> {
        Self::check_name(name)?;
        self.check_free(user, name)
    }

    /// Copies a trained LoRA (`file`, with `preview`) into `user`'s library as `name` with
    /// `sidecar`; when the name was taken meanwhile, as `name-2`, `name-3`, …. Returns the name.
    pub fn store_trained(
        &self,
        user: UserId,
        name: &str,
        file: &Path,
        sidecar: &Sidecar,
        preview: Option<&Path>,
    ) -> Result<String, LibraryError> {
        let _changing = self.lock();
        let dir = self.user_dir(user);
        std::fs::create_dir_all(&dir)?;
        let mut chosen = name.to_string();
        let mut n = 2;
        while self.check_free(user, &chosen).is_err() || !valid_lora_name(&chosen) {
            chosen = format!("{}-{n}", name.chars().take(90).collect::<String>());
            n += 1;
        }
        let tmp = dir.join(format!("{UPLOAD_PREFIX}{}", crate::secret::random_hex(8)));
        std::fs::copy(file, &tmp)?;
        if let Some(p) = preview {
            std::fs::copy(p, dir.join(format!("{chosen}.preview.png")))?;
        }
        let bytes = serde_json::to_vec_pretty(sidecar).map_err(anyhow::Error::from)?;
        std::fs::write(dir.join(format!("{chosen}.json")), bytes)?;
        std::fs::rename(&tmp, Self::file(&dir, &chosen))?;
        Ok(chosen)
    }

    /// Errors when `name` is taken in `user`'s library or the studio's.
    fn check_free(&self, user: UserId, name: &str) -> Result<(), LibraryError> {
        if Self::file(&self.user_dir(user), name).exists() {
            return Err(LibraryError::Conflict(format!("you already have a LoRA named {name:?}")));
        }
        if Self::file(&self.studio, name).exists() {
            return Err(LibraryError::Conflict(format!(
                "the studio library has a LoRA named {name:?}; pick another name"
            )));
        }
        Ok(())
    }

    /// `user`'s own LoRA `name` (404 for a studio one or someone else's).
    fn own(&self, user: UserId, name: &str) -> Result<PathBuf, LibraryError> {
        let p = Self::file(&self.user_dir(user), name);
        if valid_lora_name(name) && p.is_file() { Ok(p) } else { Err(LibraryError::NotFound(name.to_string())) }
    }

    /// Renames `user`'s LoRA and its sidecar and preview.
    pub fn rename(&self, user: UserId, from: &str, to: &str) -> Result<(), LibraryError> {
        let _changing = self.lock();
        let src = self.own(user, from)?;
        Self::check_name(to)?;
        if from == to {
            return Ok(());
        }
        self.check_free(user, to)?;
        let dir = self.user_dir(user);
        std::fs::rename(src, Self::file(&dir, to))?;
        for ext in COMPANIONS {
            let p = dir.join(format!("{from}.{ext}"));
            if p.is_file() {
                std::fs::rename(p, dir.join(format!("{to}.{ext}")))?;
            }
        }
        Ok(())
    }

    /// Sets the sidecar fields of `user`'s LoRA (what is `None` stays).
    pub fn update(&self, user: UserId, name: &str, change: &Sidecar) -> Result<(), LibraryError> {
        let _changing = self.lock();
        self.own(user, name)?;
        if *change == Sidecar::default() {
            return Ok(());
        }
        change.check()?;
        let path = self.user_dir(user).join(format!("{name}.json"));
        let mut side = Sidecar::read(&path);
        if change.label.is_some() {
            side.label = change.label.clone();
        }
        if !change.triggers.is_empty() {
            side.triggers = change.triggers.clone();
        }
        if let Some(w) = change.default_weight {
            if !(w.is_finite() && w.abs() <= crate::spec::MAX_LORA_WEIGHT) {
                return Err(LibraryError::Invalid(format!("default_weight must be a number within ±20, not {w}")));
            }
            side.default_weight = Some(w);
        }
        if change.licence.is_some() {
            side.licence = change.licence.clone();
        }
        if change.description.is_some() {
            side.description = change.description.clone();
        }
        let bytes = serde_json::to_vec_pretty(&side).map_err(anyhow::Error::from)?;
        std::fs::write(path, bytes)?;
        Ok(())
    }

    /// Deletes `user`'s LoRA with its sidecar and preview.
    pub fn delete(&self, user: UserId, name: &str) -> Result<(), LibraryError> {
        let _changing = self.lock();
        let p = self.own(user, name)?;
        std::fs::remove_file(p)?;
        let dir = self.user_dir(user);
        for ext in COMPANIONS {
            let _ = std::fs::remove_file(dir.join(format!("{name}.{ext}")));
        }
        Ok(())
    }

    /// Copies `owner`'s LoRA `name` (with its sidecar) into the studio library as `as_name`;
    /// the owner keeps theirs.
    pub fn publish(&self, owner: UserId, name: &str, as_name: &str) -> Result<LoraEntry, LibraryError> {
        let _changing = self.lock();
        let src = self.own(owner, name)?;
        Self::check_name(as_name)?;
        let dest = Self::file(&self.studio, as_name);
        if dest.exists() {
            return Err(LibraryError::Conflict(format!("the studio library has a LoRA named {as_name:?}")));
        }
        // Another user's LoRA of that name would shadow the studio's for them (private names
        // win in prompts), which uploads and renames already prevent. The owner's own copy under
        // the same name is the very file published.
        let owner_dir = self.user_dir(owner);
        let holders = std::fs::read_dir(&self.private_root)
            .map(|dirs| {
                dirs.filter_map(|d| d.ok())
                    .filter(|d| !(as_name == name && d.path() == owner_dir))
                    .filter(|d| Self::file(&d.path(), as_name).is_file())
                    .count()
            })
            .unwrap_or(0);
        if holders > 0 {
            return Err(LibraryError::Conflict(format!(
                "{holders} user(s) have a private LoRA named {as_name:?}; publish it under another name"
            )));
        }
        std::fs::create_dir_all(&self.studio)?;
        // Copied beside and renamed: the studio never lists half a file.
        let tmp = self.studio.join(format!(".{as_name}.publishing"));
        std::fs::copy(&src, &tmp)?;
        std::fs::rename(&tmp, &dest)?;
        let dir = self.user_dir(owner);
        for ext in COMPANIONS {
            let p = dir.join(format!("{name}.{ext}"));
            if p.is_file() {
                std::fs::copy(p, self.studio.join(format!("{as_name}.{ext}")))?;
            }
        }
        let meta = std::fs::metadata(&dest)?;
        Ok(Self::entry(&self.studio, as_name, Scope::Studio, &meta))
    }

    /// A fresh path in `user`'s library folder for an upload in progress (same file system as
    /// its destination, so storing it is a rename).
    pub fn upload_path(&self, user: UserId) -> Result<PathBuf, LibraryError> {
        let dir = self.user_dir(user);
        std::fs::create_dir_all(&dir)?;
        Ok(dir.join(format!("{UPLOAD_PREFIX}{}", crate::secret::random_hex(8))))
    }
}
