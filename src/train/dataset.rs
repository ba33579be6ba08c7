//! The training images: a folder of png/jpg/webp files with optional `.txt` captions beside
//! them, checked completely before any compute, and sorted into aspect-ratio buckets.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::{DynamicImage, ImageDecoder, ImageReader};

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// One training image, its caption and its bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub path: PathBuf,
    /// With `[trigger]` replaced; the trigger alone when there is no `.txt`. Several lines are
    /// several captions of the image, one drawn per step (see [`Item::variants`]).
    pub caption: String,
    /// The source size after EXIF orientation.
    pub source: (u32, u32),
    /// Bucket size in pixels (multiples of 16).
    pub width: usize,
    pub height: usize,
}

/// Reads the folder: every image must decode, `.txt` files are captions of the image with the
/// same stem, anything else is an error (so a typo'd extension is not silently skipped).
/// Hidden files (`.DS_Store`) are ignored. Sorted by file name.
pub fn scan(dir: &Path, trigger: &str, resolution: usize, max_images: usize) -> Result<Vec<Item>> {
    image_files(dir, max_images)?
        .into_iter()
        .map(|path| {
            let img = open_oriented(&path)?;
            let source = (img.width(), img.height());
            let (width, height) = bucket(source.0 as usize, source.1 as usize, resolution)
                .with_context(|| format!("{}", path.display()))?;
            let caption = caption(&path, trigger)?;
            Ok(Item { path, caption, source, width, height })
        })
        .collect()
}

/// The folder's images as `side`² squares (scaled to cover, center-cropped), captions
/// ignored: what the VAE trains and is measured on. Every image must decode.
pub fn scan_square(dir: &Path, side: usize, max_images: usize) -> Result<Vec<Item>> {
    image_files(dir, max_images)?
        .into_iter()
        .map(|path| {
            let img = open_oriented(&path)?;
            let source = (img.width(), img.height());
            if 2 * (source.0.min(source.1) as usize) < side {
                bail!(
                    "{}: {}×{} pixels is too small for --resolution {side} (images are never upscaled past 2×)",
                    path.display(),
                    source.0,
                    source.1
                );
            }
            Ok(Item { path, caption: String::new(), source, width: side, height: side })
        })
        .collect()
}

/// The image files of `dir`, sorted; `.txt` captions are skipped, any other file is an error.
fn image_files(dir: &Path, max_images: usize) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read the image folder {}", dir.display()))?;
    let mut images = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || path.is_dir() {
            continue;
        }
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
        if ext == "txt" {
            continue;
        }
        if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            bail!("{} is not a training image (png, jpg or webp) or a .txt caption", path.display());
        }
        images.push(path);
    }
    images.sort();
    if images.is_empty() {
        bail!("{} holds no images (png, jpg or webp)", dir.display());
    }
    if images.len() > max_images {
        bail!("{} holds {} images; at most {max_images} are allowed (--max-images)", dir.display(), images.len());
    }
    Ok(images)
}

impl Item {
    /// The image's captions: each line of its caption (kohya's multi-line captions with
    /// `--enable_wildcard`): the name alone, the name with more words, ... so a prompt of plain
    /// words meets a caption the model trained on.
    pub fn variants(&self) -> Vec<&str> {
        let v: Vec<&str> = self.caption.lines().collect();
        if v.is_empty() { vec![""] } else { v }
    }
}

/// The most pixels a training image may have (a 10000×10000 photo).
const MAX_PIXELS: u64 = 100_000_000;

/// Decodes what `decoder` holds (its header read and its size checked by the caller) with no
/// more memory than an image of `max_pixels` needs, its EXIF orientation applied.
pub fn decode_bounded(mut decoder: impl ImageDecoder, max_pixels: u64) -> image::ImageResult<DynamicImage> {
    let mut limits = image::Limits::default();
    // Room for the largest allowed image at 16 bits × 4 channels, and no more.
    limits.max_alloc = Some(max_pixels * 8 + (16 << 20));
    decoder.set_limits(limits)?;
    let orientation = decoder.orientation()?;
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Decodes an image with its EXIF orientation applied.
pub fn open_oriented(path: &Path) -> Result<DynamicImage> {
    let what = || format!("cannot read the image {}", path.display());
    let reader = ImageReader::open(path).with_context(what)?.with_guessed_format().with_context(what)?;
    // Making the decoder reads the header only: the size is checked before any pixel is
    // allocated (a header can claim any size).
    let decoder = reader.into_decoder().with_context(what)?;
    let (w, h) = decoder.dimensions();
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        bail!("{}: {w}×{h} pixels, more than training reads ({} megapixels)", path.display(), MAX_PIXELS / 1_000_000);
    }
    let img = decode_bounded(decoder, MAX_PIXELS).with_context(what)?;
    if img.width() == 0 || img.height() == 0 {
        bail!("{} is empty (0 pixels)", path.display());
    }
    Ok(img)
}

/// RGB of `img`, its alpha (if any) composited over white.
pub fn over_white(img: DynamicImage) -> image::RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    image::RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y);
        let a = p[3] as u32;
        // Rounded: c·a/255 + 255·(255 − a)/255.
        let mix = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        image::Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
    })
}

/// The `.txt` beside the image, `[trigger]` replaced, else the trigger word; without a trigger
/// every image needs its caption (and captions cannot name `[trigger]`). Each non-empty line
/// is one caption (trimmed); they are kept one per line.
fn caption(image: &Path, trigger: &str) -> Result<String> {
    let trigger = trigger.trim();
    let txt = image.with_extension("txt");
    let text = match txt.exists() {
        true => std::fs::read_to_string(&txt).with_context(|| format!("cannot read the caption {}", txt.display()))?,
        false => String::new(),
    };
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if trigger.is_empty() {
        if lines.is_empty() {
            bail!("{} has no caption (.txt) and no --trigger was given to stand in for one", image.display());
        }
        if lines.iter().any(|l| l.contains("[trigger]")) {
            bail!("{} says [trigger] but no --trigger was given", txt.display());
        }
    }
    if lines.is_empty() {
        return Ok(trigger.to_string());
    }
    Ok(lines.iter().map(|l| l.replace("[trigger]", trigger)).collect::<Vec<_>>().join("\n"))
}

/// The bucket for a `w`×`h` image at `resolution`: about resolution² pixels with the image's
/// aspect ratio, both sides multiples of 16 (the VAE's 8 × FLUX's 2×2 packing); never more
/// than 2× the source size on either side (a small image gets a smaller bucket rather than a
/// blurry upscale).
pub fn bucket(w: usize, h: usize, resolution: usize) -> Result<(usize, usize)> {
    let area = (resolution * resolution) as f64;
    let aspect = w as f64 / h as f64;
    let snap = |v: f64| ((v / 16.0).round() as usize).max(1) * 16;
    let (mut bw, mut bh) = (snap((area * aspect).sqrt()), snap((area / aspect).sqrt()));
    let up = (bw as f64 / w as f64).max(bh as f64 / h as f64);
    if up > 2.0 {
        let s = 2.0 / up;
        let floor = |v: f64| (v / 16.0).floor() as usize * 16;
        (bw, bh) = (floor(bw as f64 * s), floor(bh as f64 * s));
    }
    if bw == 0 || bh == 0 {
        bail!("the image ({w}×{h}) is too small to train on: a side needs at least 8 pixels");
    }
    Ok((bw, bh))
}

/// The image scaled to cover the bucket and center-cropped to it, as CHW values in [-1, 1]
/// (what the VAE encoder takes). Transparent pixels are composited over white (dropping the
/// alpha channel would show whatever colour the transparent pixels happen to store).
pub fn pixels(item: &Item) -> Result<Vec<f32>> {
    let img = over_white(open_oriented(&item.path)?);
    let (w, h) = (item.width as u32, item.height as u32);
    let scale = (w as f64 / img.width() as f64).max(h as f64 / img.height() as f64);
    let sw = ((img.width() as f64 * scale).round() as u32).max(w);
    let sh = ((img.height() as f64 * scale).round() as u32).max(h);
    let resized = image::imageops::resize(&img, sw, sh, image::imageops::FilterType::CatmullRom);
    let cropped = image::imageops::crop_imm(&resized, (sw - w) / 2, (sh - h) / 2, w, h).to_image();
    Ok(to_chw(&cropped))
}

/// An image as CHW values in [-1, 1], what the VAE encoder takes.
pub fn to_chw(img: &image::RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut chw = vec![0f32; 3 * w * h];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            chw[c * w * h + y as usize * w + x as usize] = p[c] as f32 / 127.5 - 1.0;
        }
    }
    chw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_the_aspect_in_multiples_of_16_and_never_upscale_past_2x() {
        assert_eq!(bucket(1024, 1024, 512).unwrap(), (512, 512));
        let (w, h) = bucket(1600, 900, 512).unwrap();
        assert!(w % 16 == 0 && h % 16 == 0 && w > h, "{w}×{h}");
        assert!(((w * h) as f64 / (512.0 * 512.0) - 1.0).abs() < 0.1);
        // 100×100 at 512: at most 200×200, rounded down to 16.
        assert_eq!(bucket(100, 100, 512).unwrap(), (192, 192));
        assert!(bucket(3, 3, 512).is_err());
    }

    fn write_png(path: &Path, w: u32, h: u32) {
        image::RgbImage::from_pixel(w, h, image::Rgb([200, 10, 10])).save(path).unwrap();
    }

    #[test]
    fn folders_give_captions_and_refuse_bad_input_before_compute() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(format!("{:#}", scan(d, "sks", 64, 30).unwrap_err()).contains("holds no images"));
        write_png(&d.join("a.png"), 64, 32);
        write_png(&d.join("b.png"), 32, 32);
        std::fs::write(d.join("a.txt"), "a photo of [trigger] dog\n").unwrap();
        std::fs::write(d.join(".DS_Store"), "x").unwrap();
        let items = scan(d, "sks", 64, 30).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].caption, "a photo of sks dog");
        assert_eq!(items[1].caption, "sks");
        assert_eq!((items[0].width % 16, items[0].height % 16), (0, 0));
        assert!(items[0].width > items[0].height);
        let px = pixels(&items[1]).unwrap();
        assert_eq!(px.len(), 3 * items[1].width * items[1].height);
        assert!((px[0] - (200.0 / 127.5 - 1.0)).abs() < 0.02);
        // Transparent pixels read as white, half-transparent red as pink.
        let mut rgba = image::RgbaImage::from_pixel(16, 16, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(0, 0, image::Rgba([255, 0, 0, 128]));
        rgba.save(d.join("t.png")).unwrap();
        let t = Item { path: d.join("t.png"), caption: String::new(), source: (16, 16), width: 16, height: 16 };
        let px = pixels(&t).unwrap();
        let near = |a: f32, b: f32| (a - b).abs() < 0.01;
        assert!(near(px[0], 1.0) && near(px[256], 127.0 / 127.5 - 1.0) && near(px[512], px[256]), "{px:?}");
        assert!(near(px[1], 1.0) && near(px[257], 1.0), "transparent black reads as white");
        std::fs::remove_file(d.join("t.png")).unwrap();
        // Without a trigger every image needs its caption, and none may say [trigger].
        let err = scan(d, "", 64, 30).unwrap_err();
        assert!(format!("{err:#}").contains("a.txt says [trigger] but no --trigger"), "{err:#}");
        std::fs::write(d.join("a.txt"), "a photo of a dog\n").unwrap();
        let err = scan(d, "", 64, 30).unwrap_err();
        assert!(format!("{err:#}").contains("b.png has no caption"), "{err:#}");
        std::fs::write(d.join("b.txt"), "red square").unwrap();
        assert_eq!(scan(d, "", 64, 30).unwrap()[1].caption, "red square");
        // Several lines are several captions; blank lines and spaces around them are dropped.
        std::fs::write(d.join("b.txt"), "red square\n\n  red square, a shape  \n").unwrap();
        assert_eq!(scan(d, "", 64, 30).unwrap()[1].variants(), ["red square", "red square, a shape"]);
        std::fs::remove_file(d.join("b.txt")).unwrap();
        let err = scan(d, "sks", 64, 1).unwrap_err();
        assert!(format!("{err:#}").contains("at most 1"), "{err:#}");
        std::fs::write(d.join("c.png"), "not a png").unwrap();
        assert!(format!("{:#}", scan(d, "sks", 64, 30).unwrap_err()).contains("c.png"));
        std::fs::remove_file(d.join("c.png")).unwrap();
        std::fs::write(d.join("notes.doc"), "x").unwrap();
        assert!(format!("{:#}", scan(d, "sks", 64, 30).unwrap_err()).contains("not a training image"));
    }
}
