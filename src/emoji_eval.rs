//! How well the demo model draws what it is asked for: the nearest training emoji of a
//! generated image (L2 on 32×32 pixels). The reference set is one atlas PNG of every training
//! emoji at 32×32 (over white, 2×2 box average of the 64×64 image, 48 per row) with its names
//! (`tests/fixtures/demo/emoji32.{png,tsv}`, made by `scripts/demo/make_atlas.py`). Used by the
//! retrieval test, the browser test and `examples/demo_sheets.rs`.

use std::path::Path;

use anyhow::{Context, Result, bail};

const TILE: usize = 32;
const COLS: usize = 48;

/// Every training emoji at 32×32 (RGB in [0, 1], row-major) and its name.
pub struct EmojiAtlas {
    pub tiles: Vec<Vec<f32>>,
    pub names: Vec<String>,
}

impl EmojiAtlas {
    /// Reads `emoji32.png` and `emoji32.tsv` (index, code, name) from `dir`.
    pub fn load(dir: &Path) -> Result<EmojiAtlas> {
        let png = dir.join("emoji32.png");
        let img = image::open(&png).with_context(|| format!("reading {}", png.display()))?.to_rgb8();
        let tsv = dir.join("emoji32.tsv");
        let text = std::fs::read_to_string(&tsv).with_context(|| format!("reading {}", tsv.display()))?;
        let names: Vec<String> = text.lines().map(|l| l.split('\t').nth(2).unwrap_or_default().to_string()).collect();
        let rows = names.len().div_ceil(COLS);
        if img.width() as usize != COLS * TILE || (img.height() as usize) < rows * TILE {
            bail!("{} is not an atlas of {} emoji at {TILE}×{TILE}, {COLS} per row", png.display(), names.len());
        }
        let tiles = (0..names.len())
            .map(|i| {
                let (r, c) = (i / COLS, i % COLS);
                let mut t = Vec::with_capacity(TILE * TILE * 3);
                for y in 0..TILE {
                    for x in 0..TILE {
                        let p = img.get_pixel((c * TILE + x) as u32, (r * TILE + y) as u32);
                        t.extend(p.0.iter().map(|v| *v as f32 / 255.0));
                    }
                }
                t
            })
            .collect();
        Ok(EmojiAtlas { tiles, names })
    }

    /// The index of the emoji nearest a 64×64 image (2×2 box average to 32×32, then L2).
    pub fn nearest(&self, img: &image::RgbImage) -> Result<usize> {
        let d = self.distances(img)?;
        (0..d.len()).min_by(|&a, &b| d[a].total_cmp(&d[b])).context("the atlas is empty")
    }

    /// How many emoji are nearer the image than emoji `i` (0: `i` is the nearest).
    pub fn rank_of(&self, img: &image::RgbImage, i: usize) -> Result<usize> {
        let d = self.distances(img)?;
        let own = *d.get(i).context("no such emoji")?;
        Ok(d.iter().filter(|&&x| x < own).count())
    }

    /// Squared L2 distance of the image (box-averaged to 32×32) to every tile.
    fn distances(&self, img: &image::RgbImage) -> Result<Vec<f32>> {
        if img.dimensions() != (64, 64) {
            bail!("the nearest emoji is measured on 64×64 images, not {:?}", img.dimensions());
        }
        let mut small = Vec::with_capacity(TILE * TILE * 3);
        for y in 0..TILE as u32 {
            for x in 0..TILE as u32 {
                for ch in 0..3 {
                    let sum: f32 = [(0, 0), (1, 0), (0, 1), (1, 1)]
                        .iter()
                        .map(|(dx, dy)| img.get_pixel(2 * x + dx, 2 * y + dy)[ch] as f32)
                        .sum();
                    small.push(sum / 4.0 / 255.0);
                }
            }
        }
        Ok(self.tiles.iter().map(|t| t.iter().zip(&small).map(|(a, b)| (a - b) * (a - b)).sum::<f32>()).collect())
    }

    /// Tile `i` upscaled 2× (nearest), as a 64×64 image.
    pub fn tile_image(&self, i: usize) -> image::RgbImage {
        let t = &self.tiles[i];
        image::RgbImage::from_fn(64, 64, |x, y| {
            let o = ((y as usize / 2) * TILE + x as usize / 2) * 3;
            image::Rgb([0, 1, 2].map(|c| (t[o + c] * 255.0).round() as u8))
        })
    }
}
