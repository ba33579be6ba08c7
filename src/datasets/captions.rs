//! Captions: `images/<image id>.txt` beside each image, as kohya datasets keep them. No file (or
//! an empty one) means "the trigger word alone" to the trainer; `[trigger]` in a caption is
//! replaced by the dataset's trigger word at training.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use super::{DatasetError, Datasets, ImageInfo, valid_image_id};
use crate::ledger::UserId;

/// The caption of image `img` in `images_dir` ("" without one).
pub fn read(images_dir: &Path, img: &str) -> Result<String, DatasetError> {
    let path = images_dir.join(format!("{img}.txt"));
    match std::fs::read_to_string(&path) {
        Ok(t) => Ok(t.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", path.display())).into()),
    }
}

/// A caption as stored: trimmed, at most `max` characters, no control characters but line
/// breaks and tabs. `what` names the image in the error.
pub fn check(what: &str, caption: &str, max: usize) -> Result<String, DatasetError> {
    let c = caption.trim();
    if c.chars().count() > max {
        return Err(DatasetError::Invalid(format!(
            "the caption of {what} is longer than {max} characters ([datasets] max_caption_chars)"
        )));
    }
    if c.chars().any(|ch| ch.is_control() && ch != '\n' && ch != '\t') {
        return Err(DatasetError::Invalid(format!("the caption of {what} contains control characters")));
    }
    Ok(c.to_string())
}

/// Writes (or, when empty, removes) the caption file of `img`, through a temporary file.
pub fn write(images_dir: &Path, img: &str, caption: &str) -> Result<(), DatasetError> {
    let path = images_dir.join(format!("{img}.txt"));
    if caption.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(anyhow::Error::new(e).context(format!("removing {}", path.display())).into())
            }
            _ => Ok(()),
        };
    }
    let tmp = images_dir.join(format!(".{img}.txt.tmp"));
    std::fs::write(&tmp, caption).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `PATCH /api/datasets/{id}/captions`: changes to many captions at once, applied in this
/// order to each image in `images` (default: all): `captions[img]` sets one; `set_all` sets
/// every one; `find` → `replace` replaces text literally; `prefix` / `suffix` are added where
/// the caption does not already start / end with them (so applying twice changes nothing).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkEdit {
    #[serde(default)]
    pub captions: BTreeMap<String, String>,
    pub set_all: Option<String>,
    pub find: Option<String>,
    pub replace: Option<String>,
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    /// The images the other fields apply to; `captions` names its own.
    pub images: Option<Vec<String>>,
}

impl BulkEdit {
    /// The new caption of `img`, given its current one.
    fn apply(&self, img: &str, current: &str, selected: bool) -> String {
        let mut c = self.captions.get(img).cloned().unwrap_or_else(|| current.to_string());
        if !selected {
            return c;
        }
        if let Some(all) = &self.set_all {
            c = all.clone();
        }
        if let Some(find) = self.find.as_deref().filter(|f| !f.is_empty()) {
            c = c.replace(find, self.replace.as_deref().unwrap_or(""));
        }
        if let Some(p) = self.prefix.as_deref().map(str::trim).filter(|p| !p.is_empty())
            && !c.starts_with(p)
        {
            c = if c.is_empty() { p.to_string() } else { format!("{p} {c}") };
        }
        if let Some(s) = self.suffix.as_deref().map(str::trim).filter(|s| !s.is_empty())
            && !c.ends_with(s)
        {
            // ", high quality" joins without a space; a word with one.
            let sep = if c.is_empty() || s.starts_with([',', '.', ';', ':']) { "" } else { " " };
            c = format!("{c}{sep}{s}");
        }
        c
    }
}

impl Datasets {
    /// Sets the caption of image `img` of dataset `id` of `owner`.
    pub fn set_caption(
        &self,
        owner: UserId,
        id: &str,
        img: &str,
        caption: &str,
        max: usize,
    ) -> Result<ImageInfo, DatasetError> {
        let _changing = self.lock();
        self.get(owner, false, id)?;
        self.image_file(id, img)?;
        let caption = check(&format!("image {img}"), caption, max)?;
        write(&self.images_dir(id)?, img, &caption)?;
        self.images(id)?.into_iter().find(|i| i.id == img).ok_or_else(|| DatasetError::NotFound(format!("image {img}")))
    }

    /// Applies `edit` to the captions of dataset `id` of `owner`: every new caption is checked
    /// before any is written. Returns the images.
    pub fn edit_captions(
        &self,
        owner: UserId,
        id: &str,
        edit: &BulkEdit,
        max: usize,
    ) -> Result<Vec<ImageInfo>, DatasetError> {
        // Texts longer than a caption may be are refused before any is applied (a long
        // `replace` times many matches would otherwise build huge strings first).
        let texts = [&edit.set_all, &edit.find, &edit.replace, &edit.prefix, &edit.suffix];
        if texts.iter().any(|t| t.as_ref().is_some_and(|t| t.chars().count() > max)) {
            return Err(DatasetError::Invalid(format!("a caption text is longer than {max} characters")));
        }
        if let Some(find) = edit.find.as_deref().filter(|f| !f.is_empty()) {
            let grows = edit.replace.as_deref().map_or(0, str::len).saturating_sub(find.len());
            if grows > 0 && (max * 4 / find.len().max(1)).saturating_mul(grows) > 1 << 20 {
                return Err(DatasetError::Invalid("the replacement would make captions far too long".into()));
            }
        }
        let _changing = self.lock();
        self.get(owner, false, id)?;
        let images = self.images(id)?;
        let named = edit.captions.keys().chain(edit.images.iter().flatten());
        for img in named {
            if !valid_image_id(img) || !images.iter().any(|i| &i.id == img) {
                return Err(DatasetError::Invalid(format!("dataset {id} has no image {img:?}")));
            }
        }
        let mut changes = Vec::new();
        for i in &images {
            let selected = edit.images.as_ref().is_none_or(|sel| sel.contains(&i.id));
            let new = check(&format!("image {}", i.id), &edit.apply(&i.id, &i.caption, selected), max)?;
            if new != i.caption {
                changes.push((i.id.clone(), new));
            }
        }
        let dir = self.images_dir(id)?;
        for (img, caption) in &changes {
            write(&dir, img, caption)?;
        }
        self.images(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_edits_apply_in_order_and_twice_is_once() {
        let edit = BulkEdit {
            find: Some("dog".into()),
            replace: Some("[trigger] dog".into()),
            prefix: Some("photo of".into()),
            suffix: Some(", high quality".into()),
            ..BulkEdit::default()
        };
        let once = edit.apply("a", "a dog on grass", true);
        assert_eq!(once, "photo of a [trigger] dog on grass, high quality");
        let mut no_find = edit;
        no_find.find = None;
        assert_eq!(no_find.apply("a", &once, true), once);
        assert_eq!(no_find.apply("a", "x", false), "x");
    }

    #[test]
    fn captions_are_checked() {
        assert_eq!(check("a", "  two\nlines ", 10).unwrap(), "two\nlines");
        assert!(check("a", "x".repeat(11).as_str(), 10).is_err());
        assert!(check("a", "bell\u{7}", 10).is_err());
    }
}
