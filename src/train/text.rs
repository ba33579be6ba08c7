//! Full training with the text encoders trained too (`atelier train --full
//! --train-text-encoders`): T5 and CLIP run inside the step's autodiff graph instead of being
//! encoded once, so every word's embedding learns what it should draw — the way a
//! class-conditional model learns its class table. A transformer learning from frozen random
//! encoders has to untangle a fixed random code through shared weights, which took the demo
//! recipe hundreds of epochs (session notes of issue 17).
//!
//! One optimizer covers the three models; checkpoints name the encoders' parameters under
//! `text_encoder.` (CLIP) and `text_encoder_2.` (T5), the transformer's as a transformer-only
//! run does. The encoders are written as transformers folders beside the transformer file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::Device;

use super::adamw::{AdamW, AdamWConfig, StepOutcome};
use super::batch::{Batch, mse};
use super::cache::CachedText;
use super::full::FullParams;
use crate::engine::clip::{ClipText, pooled_position};
use crate::engine::flux::{Flux, FluxInput};
use crate::engine::loader::NamedParam;
use crate::engine::pipeline::{ModelFiles, PromptEmbeds};
use crate::engine::t5::T5Encoder;
use crate::engine::weights::StoreDtype;

/// The three trained models as one module (what the optimizer and checkpoints walk).
#[derive(Module, Debug)]
pub struct WithText {
    pub flux: Flux,
    pub t5: T5Encoder,
    pub clip: ClipText,
}

/// Checkpoint-name prefixes of the encoders' parameters (the folders they are written to).
const CLIP_DIR: &str = "text_encoder";
const T5_DIR: &str = "text_encoder_2";

/// A caption's token ids: T5's padded to the run's length, CLIP's to 77.
struct CaptionIds {
    t5: Vec<u32>,
    clip: Vec<u32>,
}

/// The encoders being trained, their parameters and every caption's token ids.
pub struct TrainedText {
    pub t5: T5Encoder,
    pub clip: ClipText,
    /// Transformer, T5 and CLIP parameters, in that order (optimizer slots, checkpoints).
    pub all: FullParams,
    flux: FullParams,
    t5_params: FullParams,
    clip_params: FullParams,
    ids: BTreeMap<String, CaptionIds>,
    sources: [PathBuf; 2],
}

impl TrainedText {
    /// Loads both encoders of `files` in f32 and tokenizes `texts` (every caption and sample
    /// prompt) once. `flux` are the transformer's parameters. The run has already refused
    /// sources that are not folders ([`check_sources`], before any work).
    pub fn load(
        files: &ModelFiles,
        flux: FullParams,
        texts: &[String],
        max_len: usize,
        device: &Device,
    ) -> Result<Self> {
        let (t5, t5_named, t5_tensors) = T5Encoder::load_named(&files.t5, device)?;
        let (clip, clip_named, clip_tensors) = ClipText::load_named(&files.clip, device)?;
        let t5_params = FullParams::new(t5_named, t5_tensors)?;
        let clip_params = FullParams::new(clip_named, clip_tensors)?;
        let prefixed = |dir: &str, p: &FullParams| -> Vec<NamedParam> {
            p.params.iter().map(|n| NamedParam { name: format!("{dir}.{}", n.name), ..n.clone() }).collect()
        };
        let mut all = flux.params.clone();
        all.extend(prefixed(T5_DIR, &t5_params));
        all.extend(prefixed(CLIP_DIR, &clip_params));
        let n = all.len();
        let tokenizers = files.load_tokenizers()?;
        let mut ids = BTreeMap::new();
        for t in texts {
            if !ids.contains_key(t) {
                ids.insert(t.clone(), CaptionIds { t5: tokenizers.t5(t, max_len)?.ids, clip: tokenizers.clip(t)?.ids });
            }
        }
        Ok(TrainedText {
            t5,
            clip,
            all: FullParams::new(all, n)?,
            flux,
            t5_params,
            clip_params,
            ids,
            sources: [files.clip.clone(), files.t5.clone()],
        })
    }

    pub fn numel(&self) -> usize {
        self.t5_params.numel() + self.clip_params.numel()
    }

    /// The module the optimizer walks (clones share their tensors: nothing is copied).
    fn with(&self, flux: &Flux) -> WithText {
        WithText { flux: flux.clone(), t5: self.t5.clone(), clip: self.clip.clone() }
    }

    fn take(&mut self, both: WithText, flux: &mut Flux) {
        *flux = both.flux;
        self.t5 = both.t5;
        self.clip = both.clip;
    }

    pub fn optimizer(&self, flux: &Flux, config: AdamWConfig) -> AdamW {
        AdamW::new(config, &self.all.values(&self.with(flux)))
    }

    /// One step: both encoders encode the batch's captions inside the graph, the transformer
    /// predicts, and AdamW updates all three.
    pub fn step(&mut self, flux: &mut Flux, opt: &mut AdamW, batch: &Batch) -> Result<(f32, StepOutcome)> {
        let (mut t5_ids, mut clip_ids) = (Vec::new(), Vec::new());
        for c in &batch.captions {
            let ids = self.ids.get(c).with_context(|| format!("{c:?} was not tokenized"))?;
            t5_ids.push(ids.t5.clone());
            clip_ids.push(ids.clip.clone());
        }
        // CLIP is causal and pools at each row's argmax (its first end-of-text): the padding
        // after the batch's last pooled position changes nothing, so it is not computed.
        let len = clip_ids.iter().map(|row| pooled_position(row)).max().unwrap_or(0) + 1;
        clip_ids.iter_mut().for_each(|row| row.truncate(len));
        let device = batch.x0.device();
        let mut both = self.with(flux);
        let result = self.all.step(&mut both, opt, |m| {
            let input = FluxInput {
                txt: m.t5.forward(&t5_ids, &device)?,
                y: m.clip.forward(&clip_ids)?.pooled,
                ..batch.input(batch.noisy())
            };
            Ok(mse(m.flux.forward(input)?, batch.target()))
        });
        self.take(both, flux);
        result
    }

    /// A prompt's encodings by the encoders as they are now (samples during the run).
    pub fn encode(&self, prompt: &str, device: &Device) -> Result<CachedText> {
        let ids = self.ids.get(prompt).with_context(|| format!("{prompt:?} was not tokenized"))?;
        let txt = self.t5.forward(std::slice::from_ref(&ids.t5), device)?;
        let y = self.clip.forward(std::slice::from_ref(&ids.clip))?.pooled;
        Ok(CachedText::from_embeds(PromptEmbeds { txt, y }))
    }

    pub fn save_checkpoint(
        &self,
        dir: &Path,
        flux: &Flux,
        opt: &AdamW,
        (step, seed, settings): (usize, u64, &str),
    ) -> Result<()> {
        self.all.save_checkpoint(dir, &self.with(flux), opt, (step, seed, settings))
    }

    /// Restores a checkpoint [`TrainedText::save_checkpoint`] wrote into `flux` and the encoders.
    pub fn load_checkpoint(&mut self, dir: &Path, flux: &mut Flux, device: &Device) -> Result<(AdamW, usize)> {
        let (both, opt, step) = self.all.load_checkpoint(dir, self.with(flux), device)?;
        self.take(both, flux);
        Ok((opt, step))
    }

    /// The transformer to `out` (as a transformer-only run writes it) and the encoders as
    /// `<stem>_text_encoder/` and `<stem>_text_encoder_2/` beside it (transformers folders:
    /// `model.safetensors` under the names they were read with, and the source's `config.json`).
    /// Returns the two folders.
    pub fn export(
        &self,
        flux: &Flux,
        out: &Path,
        dtype: StoreDtype,
        metadata: &[(&str, &str)],
    ) -> Result<[PathBuf; 2]> {
        self.flux.export(flux, out, dtype, metadata)?;
        let [clip_dir, t5_dir] = encoder_dirs(out);
        let [clip_source, t5_source] = &self.sources;
        let model = |dir: &Path, source: &Path| -> Result<PathBuf> {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let config = source.join("config.json");
            std::fs::copy(&config, dir.join("config.json"))
                .with_context(|| format!("copying {} into {}", config.display(), dir.display()))?;
            Ok(dir.join("model.safetensors"))
        };
        self.clip_params.export(&self.clip, &model(&clip_dir, clip_source)?, dtype, &[])?;
        self.t5_params.export(&self.t5, &model(&t5_dir, t5_source)?, dtype, &[])?;
        Ok([clip_dir, t5_dir])
    }
}

/// Refuses encoders that are not transformers folders: the trained ones are written back as
/// folders with the source's `config.json` (a bare file's sizes are not all in its shapes).
pub fn check_sources(files: &ModelFiles) -> Result<()> {
    for (source, what) in [(&files.clip, "CLIP"), (&files.t5, "T5")] {
        if !source.join("config.json").is_file() {
            bail!(
                "--train-text-encoders writes the trained encoders back as transformers folders: the {what} encoder \
                 {} must be one (a folder with config.json), not a single file",
                source.display()
            );
        }
    }
    Ok(())
}

/// `<stem>_text_encoder/` (CLIP) and `<stem>_text_encoder_2/` (T5) beside `out`.
pub fn encoder_dirs(out: &Path) -> [PathBuf; 2] {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    [CLIP_DIR, T5_DIR].map(|d| out.with_file_name(format!("{stem}_{d}")))
}
