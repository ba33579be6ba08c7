//! PNG files with the A1111 `parameters` text, written so that nothing is left behind when
//! writing fails, and read back from either kind of text chunk.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use png::text_metadata::{EncodableTextChunk, ITXtChunk, TEXtChunk};

/// The keyword A1111 and Forge write the settings under and read them from.
pub const PARAMETERS: &str = "parameters";

/// A text chunk checked to encode. Latin-1 text goes in tEXt, anything else (CJK, emoji,
/// typographic dashes and quotes) in uncompressed iTXt as UTF-8: what PIL's `add_text`, and
/// so A1111 and Forge, write, and what their readers (PIL's `info`) accept in both forms.
#[derive(Debug, Clone)]
pub enum PngText {
    Latin1(TEXtChunk),
    Utf8(ITXtChunk),
}

impl PngText {
    /// The `parameters` chunk for `text`. Built (and encoded once) before a generation starts,
    /// so a prompt that cannot be stored fails before any compute.
    pub fn parameters(text: &str) -> Result<PngText> {
        let chunk = if text.chars().all(|c| (c as u32) < 0x100) {
            PngText::Latin1(TEXtChunk::new(PARAMETERS, text))
        } else {
            PngText::Utf8(ITXtChunk::new(PARAMETERS, text))
        };
        chunk.encode(&mut Vec::new()).context("encoding the PNG text")?;
        Ok(chunk)
    }

    fn encode(&self, w: &mut impl Write) -> Result<(), png::EncodingError> {
        match self {
            PngText::Latin1(c) => c.encode(w),
            PngText::Utf8(c) => c.encode(w),
        }
    }
}

/// Encodes `img` as an 8-bit RGB PNG carrying `text`.
pub fn encode(w: impl Write, img: &image::RgbImage, text: &PngText) -> Result<()> {
    let mut encoder = png::Encoder::new(w, img.width(), img.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    match text {
        PngText::Latin1(c) => writer.write_text_chunk(c)?,
        PngText::Utf8(c) => writer.write_text_chunk(c)?,
    }
    writer.write_image_data(img.as_raw())?;
    writer.finish()?;
    Ok(())
}

/// The `parameters` text of a PNG, from a tEXt, zTXt or iTXt chunk; None when it has none.
pub fn read_parameters(bytes: &[u8]) -> Result<Option<String>> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info()?;
    // Text may follow the image data: read to the end so those chunks are seen too.
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    reader.next_frame(&mut buf)?;
    reader.finish()?;
    let info = reader.info();
    if let Some(c) = info.uncompressed_latin1_text.iter().find(|c| c.keyword == PARAMETERS) {
        return Ok(Some(c.text.clone()));
    }
    if let Some(c) = info.compressed_latin1_text.iter().find(|c| c.keyword == PARAMETERS) {
        return Ok(Some(c.get_text()?));
    }
    match info.utf8_text.iter().find(|c| c.keyword == PARAMETERS) {
        Some(c) => Ok(Some(c.get_text()?)),
        None => Ok(None),
    }
}

/// A PNG on its way to `dest`: a file created beside it under a temporary name, renamed into
/// place by [`PendingPng::write`]. Dropped unwritten (any error on the way), it is removed, so
/// a failure never leaves a partial or empty file.
pub struct PendingPng {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<std::fs::File>,
}

impl PendingPng {
    /// Creates the temporary file; `private` makes it (and so the image) readable by its owner
    /// only. Errors name the folder that does not exist or cannot be written.
    pub fn create(dest: &Path, private: bool) -> Result<PendingPng> {
        if let Some(ext) = dest.extension()
            && !ext.eq_ignore_ascii_case("png")
        {
            bail!("cannot write the image to {}: atelier writes PNG files (name it .png)", dest.display());
        }
        let dest = &crate::engine::outfile::destination(dest).map_err(|e| {
            anyhow::anyhow!("{}", e.to_string().replacen("cannot write", "cannot write the image to", 1))
        })?;
        let options = if private { crate::private_files::open_options() } else { std::fs::OpenOptions::new() };
        let (tmp, file) = crate::engine::outfile::create_beside(dest, options)?;
        Ok(PendingPng { tmp, dest: dest.to_path_buf(), file: Some(file) })
    }

    /// Checks that `dest` can be written (its folder exists and takes a new file) without
    /// leaving anything there.
    pub fn check(dest: &Path) -> Result<()> {
        PendingPng::create(dest, false).map(drop)
    }

    /// Writes the image and renames it to its destination.
    pub fn write(mut self, img: &image::RgbImage, text: &PngText) -> Result<()> {
        let file = self.file.take().expect("a pending PNG is written once");
        let mut out = std::io::BufWriter::new(file);
        encode(&mut out, img, text).with_context(|| format!("writing {}", self.dest.display()))?;
        let file =
            out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", self.dest.display()))?;
        crate::engine::outfile::commit(&file, &self.tmp, &self.dest)?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for PendingPng {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> (Vec<u8>, Option<String>) {
        let mut bytes = Vec::new();
        encode(&mut bytes, &image::RgbImage::new(2, 2), &PngText::parameters(text).unwrap()).unwrap();
        let back = read_parameters(&bytes).unwrap();
        (bytes, back)
    }

    #[test]
    fn any_unicode_text_reads_back_identical() {
        for text in [
            "plain ascii",
            "café crème",
            "一只在雪地里的红狐狸",
            "雪の中の赤いキツネ",
            "fox 🦊 in snow ❄️",
            "“quoted” — dash… ‘ok’",
        ] {
            let (bytes, back) = round_trip(text);
            assert_eq!(back.as_deref(), Some(text));
            let kind: &[u8] = if text.chars().all(|c| (c as u32) < 0x100) { b"tEXt" } else { b"iTXt" };
            assert!(bytes.windows(4).any(|w| w == kind), "{text} is stored as {}", String::from_utf8_lossy(kind));
        }
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.png");
        let pending = PendingPng::create(&dest, true).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(pending);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        PendingPng::check(&dest).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let err = PendingPng::check(&dir.path().join("no/x.png")).unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
        assert!(format!("{:#}", PendingPng::check(dir.path()).unwrap_err()).contains("is a folder"));
    }
}
