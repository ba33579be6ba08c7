//! Encoding everything once before training: the VAE latents of every image and the T5/CLIP
//! outputs of every caption (and of the sample prompts). The encoders are dropped when this
//! returns, so only the transformer and the LoRA stay for the training loop.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::engine::pipeline::{ModelFiles, PromptEmbeds, Resident, encode_prompt, pack};
use crate::engine::vae;

use super::dataset::{Item, pixels};
use super::params::host;

/// One image's packed latents on the host.
#[derive(Debug, Clone)]
pub struct CachedLatents {
    /// [tokens, 4·channels], row-major.
    pub packed: Vec<f32>,
    /// Latent grid (rows, cols), each even; tokens = rows/2 · cols/2.
    pub rows: usize,
    pub cols: usize,
    pub channels: usize,
}

impl CachedLatents {
    pub fn tokens(&self) -> usize {
        (self.rows / 2) * (self.cols / 2)
    }
}

/// A caption's T5 states [L, d] and CLIP pooled [dim], on the host.
#[derive(Debug, Clone)]
pub struct CachedText {
    pub txt: Vec<f32>,
    pub txt_shape: [usize; 2],
    pub y: Vec<f32>,
}

impl CachedText {
    pub(super) fn from_embeds(e: PromptEmbeds) -> Self {
        let [_, l, d] = e.txt.dims();
        CachedText { txt: host(e.txt), txt_shape: [l, d], y: host(e.y) }
    }

    /// As batch-of-one tensors on `device` in `dtype`.
    pub fn upload(&self, device: &Device, dtype: DType) -> (Tensor<3>, Tensor<2>) {
        let [l, d] = self.txt_shape;
        let txt = Tensor::<3>::from_data(TensorData::new(self.txt.clone(), [1, l, d]), device).cast(dtype);
        let y = Tensor::<2>::from_data(TensorData::new(self.y.clone(), [1, self.y.len()]), device).cast(dtype);
        (txt, y)
    }
}

/// VAE latents ((mean − shift)·scale, no sampling: the posterior mean, as kohya caches it) of
/// every item, in its bucket size. Items of one bucket are encoded together, up to
/// [`ENCODE_BATCH`] at a time (one image per call costs more in per-op overhead than in work
/// for small images).
pub fn encode_images(files: &ModelFiles, items: &[Item], device: &Device) -> Result<Vec<CachedLatents>> {
    let vae = vae::load_vae(&files.vae, device, DType::F32, None)
        .with_context(|| format!("loading the VAE {}", files.vae.display()))?;
    let mut out: Vec<Option<CachedLatents>> = vec![None; items.len()];
    let mut buckets: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        buckets.entry((item.width, item.height)).or_default().push(i);
    }
    for ((w, h), members) in buckets {
        // A batch of small images, one image at a time at large sizes (the encoder's activations
        // grow with the pixels: 128 channels × 1024² is 0.5 GB per image).
        let batch = (ENCODE_PIXELS / (w * h)).clamp(1, ENCODE_BATCH);
        for chunk in members.chunks(batch) {
            let mut x = Vec::with_capacity(chunk.len() * 3 * w * h);
            for &i in chunk {
                x.extend(pixels(&items[i])?);
            }
            let z = vae.encode(Tensor::<4>::from_data(TensorData::new(x, [chunk.len(), 3, h, w]), device));
            let [_, c, rows, cols] = z.dims();
            let z = host(z);
            for (k, &i) in chunk.iter().enumerate() {
                let one = &z[k * c * rows * cols..(k + 1) * c * rows * cols];
                out[i] = Some(CachedLatents { packed: pack(one, c, rows, cols), rows, cols, channels: c });
            }
        }
    }
    Ok(out.into_iter().map(|l| l.expect("every item is in a bucket")).collect())
}

/// Images the VAE encodes in one call while caching, at most, and the pixels of one call.
const ENCODE_BATCH: usize = 16;
const ENCODE_PIXELS: usize = 16 * 128 * 128;

/// T5 + CLIP outputs of each distinct text, the encoders loaded once for all of them.
pub fn encode_texts(
    files: &ModelFiles,
    texts: &[String],
    max_len: usize,
    device: &Device,
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<String, CachedText>> {
    let mut resident = Resident::new(true);
    let mut out = BTreeMap::new();
    for t in texts {
        if out.contains_key(t) {
            continue;
        }
        let e = encode_prompt(files, t, max_len, &[], device, &mut resident, false, warnings)?;
        out.insert(t.clone(), CachedText::from_embeds(e));
    }
    Ok(out)
}
