//! Image uploads into a dataset, all or nothing: every part of a request is streamed into a
//! staging folder `<dataset>/.upload-<random>/` (removed however the request ends), checked
//! (content type, size, count against the plan, then sniffed by content and decoded within
//! pixel limits), re-encoded as PNG with a JPEG thumbnail, and moved into place only when every
//! file passed.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use super::{DatasetError, Datasets, ImageInfo, captions};
use crate::config::DatasetsConfig;
use crate::ledger::{PlansConfig, Refusal, UserId};

/// The long side of a thumbnail, in pixels.
pub const THUMB_PX: u32 = 256;

/// The most caption parts one upload may carry.
const MAX_CAPTIONS: usize = 1000;

/// What a multipart part is, from its field name, file name and content type.
#[derive(Debug, PartialEq)]
pub enum Part {
    /// An image file (its file name).
    Image(String),
    /// A kohya-style `NAME.txt` caption file for the image with the same stem.
    CaptionFile(String),
    /// A text field `caption:<image file name>`.
    CaptionField(String),
}

/// A client's file name, shortened for messages.
fn shown(name: &str) -> String {
    let n: String = name.chars().filter(|c| !c.is_control()).take(120).collect();
    if n.is_empty() { "(unnamed file)".into() } else { n }
}

/// The part of a name before its last dot.
fn stem(name: &str) -> &str {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    base.rsplit_once('.').map_or(base, |(s, _)| s)
}

/// Classifies a part; a file with a content type that is not an accepted image type is refused
/// here, before any of it is read.
pub fn classify(field: &str, filename: Option<&str>, content_type: Option<&str>) -> Result<Part, DatasetError> {
    let ct = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    match filename {
        Some(name) if name.to_ascii_lowercase().ends_with(".txt") => {
            if ct.as_deref().is_some_and(|c| c != "text/plain" && c != "application/octet-stream") {
                return Err(DatasetError::Unsupported(format!(
                    "{}: a caption file must be text/plain, not {}",
                    shown(name),
                    ct.unwrap_or_default()
                )));
            }
            Ok(Part::CaptionFile(name.to_string()))
        }
        // The bytes decide the format (sniffed at decoding). A file sent without a type or as
        // application/octet-stream is what Python's requests and curl send for extensions they do
        // not know (.webp), so only a type that says "not an image" is refused here.
        Some(name) => match ct.as_deref() {
            None
            | Some(
                "application/octet-stream"
                | "image/png"
                | "image/x-png"
                | "image/jpeg"
                | "image/jpg"
                | "image/pjpeg"
                | "image/webp",
            ) => Ok(Part::Image(name.to_string())),
            Some(other) => Err(DatasetError::Unsupported(format!(
                "{}: sent as {other}; images must be PNG, JPEG or WebP (image/png, image/jpeg, image/webp)",
                shown(name),
            ))),
        },
        None => match field.strip_prefix("caption:") {
            Some(target) if !target.is_empty() => Ok(Part::CaptionField(target.to_string())),
            _ => Err(DatasetError::Invalid(format!(
                "unexpected form field {:?}: send images as files, captions as caption:<file name> fields or <name>.txt files",
                shown(field)
            ))),
        },
    }
}

/// How many images the uploader's plan trains on, and which plans allow more.
pub struct ImageAllowance {
    pub plan: String,
    pub max: u32,
    pub plans: Arc<PlansConfig>,
}

impl ImageAllowance {
    /// Refuses a dataset of `images` images the plan cannot train on.
    pub fn check(&self, images: u32) -> Result<(), DatasetError> {
        if self.max == 0 {
            return Err(DatasetError::Refused(Refusal::TrainingNotInPlan {
                plan: self.plan.clone(),
                plans_allowing: self.plans.plans_allowing_training(1),
            }));
        }
        if images > self.max {
            return Err(DatasetError::Refused(Refusal::TooManyTrainingImages {
                plan: self.plan.clone(),
                images,
                max: self.max,
                plans_allowing: self.plans.plans_allowing_training(images),
            }));
        }
        Ok(())
    }
}

struct StagedImage {
    name: String,
    path: PathBuf,
    size: u64,
}

/// One upload request in progress.
pub struct Staging {
    dir: PathBuf,
    dataset: String,
    limits: DatasetsConfig,
    allowance: ImageAllowance,
    existing_images: u32,
    existing_bytes: u64,
    images: Vec<StagedImage>,
    /// (stem of the image it belongs to, caption, where it came from).
    captions: Vec<(String, String, String)>,
    current: Option<std::fs::File>,
    received: u64,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Whatever happened (an error, a client gone mid-body): nothing staged stays.
        self.current = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Staging {
    /// Starts an upload into dataset `id` of `owner` (`NotFound` unless the owner's).
    pub fn new(
        datasets: &Datasets,
        owner: UserId,
        id: &str,
        limits: DatasetsConfig,
        allowance: ImageAllowance,
    ) -> Result<Staging, DatasetError> {
        datasets.get(owner, false, id)?;
        let existing = datasets.images(id)?;
        let dir = datasets.dir(id)?.join(format!(".upload-{}", crate::secret::random_hex(8)));
        crate::private_files::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let staging = Staging {
            dir,
            dataset: id.to_string(),
            limits,
            allowance,
            existing_images: existing.len() as u32,
            existing_bytes: existing.iter().map(|i| i.bytes).sum(),
            images: Vec::new(),
            captions: Vec::new(),
            current: None,
            received: 0,
        };
        // A full dataset (or a plan without training) is refused before any byte is read.
        staging.allowance.check(staging.existing_images + 1)?;
        Ok(staging)
    }

    /// Starts the next image file `name`.
    pub fn start_image(&mut self, name: &str) -> Result<(), DatasetError> {
        self.allowance.check(self.existing_images + self.images.len() as u32 + 1)?;
        let path = self.dir.join(format!("{}.upload", self.images.len()));
        let file = crate::private_files::open_options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        self.current = Some(file);
        self.images.push(StagedImage { name: name.to_string(), path, size: 0 });
        Ok(())
    }

    /// Appends a chunk to the current image, within the per-file and per-dataset limits.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), DatasetError> {
        let (Some(file), Some(img)) = (self.current.as_mut(), self.images.last_mut()) else {
            return Err(anyhow::anyhow!("no image started").into());
        };
        img.size += chunk.len() as u64;
        self.received += chunk.len() as u64;
        let max = self.limits.max_image_mib;
        if img.size > max << 20 {
            return Err(DatasetError::TooLarge(format!(
                "{}: larger than {max} MiB, the most one image may be here ([datasets] max_image_mib)",
                shown(&img.name)
            )));
        }
        let max_ds = self.limits.max_dataset_mib;
        if self.existing_bytes + self.received > max_ds << 20 {
            return Err(DatasetError::TooLarge(format!(
                "{}: the dataset would hold more than {max_ds} MiB, the most one dataset may ([datasets] max_dataset_mib)",
                shown(&img.name)
            )));
        }
        file.write_all(chunk).with_context(|| format!("writing {}", img.path.display()))?;
        Ok(())
    }

    /// Ends the current image.
    pub fn end_image(&mut self) -> Result<(), DatasetError> {
        self.current = None;
        match self.images.last() {
            Some(img) if img.size == 0 => {
                Err(DatasetError::Invalid(format!("{}: the file is empty", shown(&img.name))))
            }
            _ => Ok(()),
        }
    }

    /// The caption for the image whose file name (or stem) is `target`; `source` names where it
    /// came from in errors.
    pub fn add_caption(&mut self, target: &str, text: &[u8], source: &str) -> Result<(), DatasetError> {
        // Captions are held in memory until the end of the request: a bounded number of them.
        if self.captions.len() >= MAX_CAPTIONS {
            return Err(DatasetError::Invalid(format!("more than {MAX_CAPTIONS} captions in one upload")));
        }
        let text = std::str::from_utf8(text)
            .map_err(|_| DatasetError::Invalid(format!("{}: the caption is not UTF-8 text", shown(source))))?;
        let caption = captions::check(&shown(target), text, self.limits.max_caption_chars)?;
        self.captions.push((stem(target).to_string(), caption, source.to_string()));
        Ok(())
    }

    /// The most bytes a caption part may have (characters of up to 4 bytes, some spaces).
    pub fn max_caption_bytes(&self) -> usize {
        self.limits.max_caption_chars * 4 + 64
    }

    /// Checks, decodes and re-encodes every staged image, then moves them into the dataset;
    /// on any error nothing is moved. Blocking (decoding). Returns the new images.
    pub fn finish(mut self, datasets: &Datasets) -> Result<Vec<ImageInfo>, DatasetError> {
        self.current = None;
        // One upload decodes at a time: a 50-megapixel image takes about 1 GB while it is
        // decoded, rotated and converted.
        let _decoding = datasets.decoding.lock().unwrap_or_else(|e| e.into_inner());
        if self.images.is_empty() {
            return Err(DatasetError::Invalid(
                "no image in the request: send PNG, JPEG or WebP files as multipart/form-data".into(),
            ));
        }
        for (target, _, source) in &self.captions {
            if !self.images.iter().any(|i| stem(&i.name) == target) {
                return Err(DatasetError::Invalid(format!(
                    "{}: a caption for {target:?}, but no image of that name is in this upload",
                    shown(source)
                )));
            }
        }
        let mut ready = Vec::new();
        let mut new_bytes = 0;
        let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        for (n, img) in self.images.iter().enumerate() {
            let decoded = decode(&img.path, &img.name, self.limits.max_image_megapixels)?;
            let id = image_id(now_ms, n);
            let png = self.dir.join(format!("{id}.png"));
            save_png(&decoded, &png)?;
            save_thumb(&decoded, &self.dir.join(format!("{id}.jpg")))?;
            // The last caption given for the name wins.
            let caption = self.captions.iter().rev().find(|(t, _, _)| t == stem(&img.name)).map(|(_, c, _)| c);
            if let Some(c) = caption {
                captions::write(&self.dir, &id, c)?;
            }
            std::fs::remove_file(&img.path).ok();
            new_bytes += std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
            ready.push(id);
        }
        let _changing = datasets.lock();
        // Again under the lock: another upload may have landed meanwhile.
        let existing = datasets.images(&self.dataset)?;
        self.allowance.check((existing.len() + ready.len()) as u32)?;
        let stored: u64 = existing.iter().map(|i| i.bytes).sum::<u64>() + new_bytes;
        let max_ds = self.limits.max_dataset_mib;
        if stored > max_ds << 20 {
            return Err(DatasetError::TooLarge(format!(
                "the dataset would hold {} MiB as PNG, more than {max_ds} MiB ([datasets] max_dataset_mib)",
                stored.div_ceil(1 << 20)
            )));
        }
        self.move_into(datasets, &ready)?;
        let images = datasets.images(&self.dataset)?;
        Ok(images.into_iter().filter(|i| ready.contains(&i.id)).collect())
    }

    /// Moves the staged files of `ids` into the dataset; takes back what it moved on a failure.
    fn move_into(&self, datasets: &Datasets, ids: &[String]) -> Result<(), DatasetError> {
        let images = datasets.images_dir(&self.dataset)?;
        let thumbs = datasets.thumbs_dir(&self.dataset)?;
        let mut moved: Vec<(PathBuf, PathBuf)> = Vec::new();
        let mut result = Ok(());
        'all: for id in ids {
            // The PNG last: an image counts once its caption and thumbnail are in place.
            for (name, to) in
                [(format!("{id}.txt"), &images), (format!("{id}.jpg"), &thumbs), (format!("{id}.png"), &images)]
            {
                let from = self.dir.join(&name);
                if !from.exists() {
                    continue;
                }
                let dest = to.join(&name);
                if let Err(e) = std::fs::rename(&from, &dest) {
                    result = Err(anyhow::Error::new(e).context(format!("moving {} into place", dest.display())));
                    break 'all;
                }
                moved.push((from, dest));
            }
        }
        if let Err(e) = result {
            for (from, dest) in moved.iter().rev() {
                let _ = std::fs::rename(dest, from);
            }
            return Err(e.into());
        }
        Ok(())
    }
}

/// A new image id: hex of the upload time (ms) and the place in the request, so ids sort in
/// upload order, then 64 random bits.
fn image_id(now_ms: u64, n: usize) -> String {
    format!("{now_ms:012x}{:04x}{}", n & 0xffff, crate::secret::random_hex(8))
}

/// The shortest side a dataset image may have.
const MIN_SIDE: u32 = 16;

/// Decodes the image at `path` (the client called it `name`): the format sniffed from its
/// bytes, never its name; its size read from the header and refused past `max_megapixels`
/// before any pixel is allocated; EXIF orientation applied.
pub fn decode(path: &Path, name: &str, max_megapixels: u32) -> Result<DynamicImage, DatasetError> {
    let name = shown(name);
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = ImageReader::new(BufReader::new(file)).with_guessed_format().context("reading an upload")?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        Some(f) => {
            return Err(DatasetError::Unsupported(format!(
                "{name}: a {} image; PNG, JPEG or WebP only",
                f.extensions_str().first().unwrap_or(&"other").to_uppercase()
            )));
        }
        None => return Err(DatasetError::Unsupported(format!("{name}: not a PNG, JPEG or WebP image"))),
    }
    let max_pixels = u64::from(max_megapixels) * 1_000_000;
    let too_many = |w: u32, h: u32| {
        DatasetError::TooLarge(format!(
            "{name}: {w}×{h} pixels, more than {max_megapixels} megapixels ([datasets] max_image_megapixels)"
        ))
    };
    let undecodable = |e: image::ImageError| match e {
        image::ImageError::Limits(_) => DatasetError::TooLarge(format!(
            "{name}: the image is too large to decode here ([datasets] max_image_megapixels is {max_megapixels})"
        )),
        e => DatasetError::Invalid(format!("{name}: not a readable image (damaged or truncated?): {e}")),
    };
    // Making the decoder reads the header only (within image's default limits).
    let decoder = reader.into_decoder().map_err(undecodable)?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > max_pixels {
        return Err(too_many(w, h));
    }
    if w == 0 || h == 0 {
        return Err(DatasetError::Invalid(format!("{name}: the image has no pixels ({w}×{h})")));
    }
    // Training never upscales past 2× and needs 16-pixel sides: anything smaller would only
    // fail the training later.
    if w.min(h) < MIN_SIDE {
        return Err(DatasetError::Invalid(format!(
            "{name}: {w}×{h} pixels is too small to train on (a side needs at least {MIN_SIDE} pixels)"
        )));
    }
    crate::train::dataset::decode_bounded(decoder, max_pixels).map_err(undecodable)
}

/// Writes `img` as an 8-bit PNG (RGBA when it has alpha, else RGB): no metadata travels.
fn save_png(img: &DynamicImage, path: &Path) -> Result<(), DatasetError> {
    let flat = if img.color().has_alpha() {
        DynamicImage::ImageRgba8(img.to_rgba8())
    } else {
        DynamicImage::ImageRgb8(img.to_rgb8())
    };
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::new(file);
    flat.write_to(&mut w, ImageFormat::Png).with_context(|| format!("encoding {}", path.display()))?;
    w.flush().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Writes the [`THUMB_PX`] thumbnail of `img` as a JPEG.
fn save_thumb(img: &DynamicImage, path: &Path) -> Result<(), DatasetError> {
    // Smaller images stay as they are (no upscaling).
    let thumb = if img.width().max(img.height()) > THUMB_PX { img.thumbnail(THUMB_PX, THUMB_PX) } else { img.clone() };
    let thumb = thumb.to_rgb8();
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::new(file);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, 85)
        .encode_image(&thumb)
        .with_context(|| format!("encoding {}", path.display()))?;
    w.flush().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_told_apart_and_wrong_types_refused() {
        assert_eq!(classify("files", Some("a.png"), Some("image/png")).unwrap(), Part::Image("a.png".into()));
        assert_eq!(classify("files", Some("a.txt"), Some("text/plain")).unwrap(), Part::CaptionFile("a.txt".into()));
        assert_eq!(classify("caption:a.png", None, None).unwrap(), Part::CaptionField("a.png".into()));
        let e = classify("files", Some("a.png"), Some("text/html")).unwrap_err().to_string();
        assert!(e.contains("a.png") && e.contains("text/html"), "{e}");
        assert!(classify("files", Some("a.gif"), Some("image/gif")).is_err());
        assert!(classify("files", Some("a.png"), None).is_ok(), "the bytes decide");
        assert!(classify("files", Some("a.webp"), Some("application/octet-stream")).is_ok());
        assert!(classify("other", None, None).is_err());
        assert_eq!(stem("dir/a.b.png"), "a.b");
    }
}
