//! Generated images on disk: `<data>/images/<id>.png`, where the id is 128 random bits (also
//! the gallery id). Who may read them is decided by the metadata in SQLite, never by the name.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::engine::pngfile::{PendingPng, PngText};

/// The file of gallery image `id`; None when `id` is not one of ours (so never a path outside
/// the images folder).
pub fn image_path(dir: &Path, id: &str) -> Option<PathBuf> {
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| dir.join(format!("{id}.png")))
}

/// Writes a PNG (with its A1111 `parameters` text) under a new id, readable by the server's
/// user only; returns the id. Nothing is left in the folder when this fails.
pub fn save(dir: &Path, img: &image::RgbImage, text: &PngText) -> Result<String> {
    create_dir(dir)?;
    let id = crate::secret::random_hex(16);
    let Some(path) = image_path(dir, &id) else { bail!("bad image id {id}") };
    // Written under a temporary name and renamed, so a crash never leaves half a PNG.
    PendingPng::create(&path, true)?.write(img, text)?;
    Ok(id)
}

/// Checks that images can be saved in `dir` (creating it), leaving nothing there: run before a
/// job's compute, so a job whose images could not be kept fails before it starts.
pub fn check_writable(dir: &Path) -> Result<()> {
    create_dir(dir)?;
    PendingPng::check(&dir.join("check.png"))
}

fn create_dir(dir: &Path) -> Result<()> {
    crate::private_files::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

pub fn remove(dir: &Path, id: &str) {
    if let Some(p) = image_path(dir, id)
        && let Err(e) = std::fs::remove_file(&p)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log::warn!("removing {}: {e}", p.display());
    }
}

/// An 8-bit RGB image as a PNG data URL (previews).
pub fn png_data_url(img: &image::RgbImage) -> String {
    use base64::Engine as _;
    let mut bytes = Vec::new();
    let mut enc = png::Encoder::new(&mut bytes, img.width(), img.height());
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let ok = enc.write_header().and_then(|mut w| w.write_image_data(img.as_raw()));
    if ok.is_err() {
        return String::new();
    }
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_ids_map_to_files() {
        let d = Path::new("/data/images");
        assert!(image_path(d, "0123456789abcdef0123456789abcdef").is_some());
        for bad in ["../etc/passwd", "0123456789ABCDEF0123456789ABCDEF", "abc", "0123456789abcdef0123456789abcde/"] {
            assert!(image_path(d, bad).is_none(), "{bad}");
        }
    }
}
