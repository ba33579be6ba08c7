//! The two FLUX tokenizers, padded and truncated as diffusers' `FluxPipeline` does:
//! T5 (Unigram) appends `</s>` and pads with 0 to the max sequence length (256 for schnell,
//! 512 for dev); CLIP (BPE) wraps in `<|startoftext|>` … `<|endoftext|>` and pads with
//! `<|endoftext|>` to 77. Over-long prompts keep their start and the closing token.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use tokenizers::Tokenizer;

/// FLUX's T5 tokenizer (T5 v1.1's Unigram, `weights/tokenizers/t5/`), built into the binary.
pub const T5_TOKENIZER_JSON: &[u8] = include_bytes!("../../weights/tokenizers/t5/tokenizer.json");

/// CLIP's context length.
pub const CLIP_LENGTH: usize = 77;
const CLIP_EOS: u32 = 49407;
const T5_PAD: u32 = 0;
const T5_EOS: u32 = 1;

/// Token ids for one prompt, and whether it had to be cut.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// How many tokens (closing token included) the prompt had before truncation.
    pub untruncated_len: usize,
}

impl Tokens {
    pub fn truncated(&self) -> bool {
        self.untruncated_len > self.ids.len()
    }
}

/// The shortest T5 sequence: one piece of the prompt and `</s>`.
pub const MIN_T5_LENGTH: usize = 2;

pub struct FluxTokenizers {
    t5: Tokenizer,
    clip: Tokenizer,
}

impl FluxTokenizers {
    /// Loads `t5/tokenizer.json` and `clip/tokenizer.json` from a folder such as the shipped
    /// `weights/tokenizers/`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_files(&dir.join("t5/tokenizer.json"), &dir.join("clip/tokenizer.json"))
    }

    pub fn from_files(t5: &Path, clip: &Path) -> Result<Self> {
        let load = |p: &Path| {
            if !p.exists() {
                bail!("tokenizer file {} does not exist", p.display());
            }
            let t = Tokenizer::from_file(p).map_err(|e| anyhow!("cannot load tokenizer {}: {e}", p.display()))?;
            ours(t, &p.display().to_string())
        };
        Ok(FluxTokenizers { t5: load(t5)?, clip: load(clip)? })
    }

    /// The tokenizers shipped in `weights/tokenizers/`, built into the binary so that it works
    /// from any folder.
    pub fn builtin() -> Result<Self> {
        const CLIP: &[u8] = include_bytes!("../../weights/tokenizers/clip/tokenizer.json");
        let load = |bytes: &[u8], what: &str| {
            let t = Tokenizer::from_bytes(bytes).map_err(|e| anyhow!("built-in {what} tokenizer: {e}"))?;
            ours(t, what)
        };
        Ok(FluxTokenizers { t5: load(T5_TOKENIZER_JSON, "T5")?, clip: load(CLIP, "CLIP")? })
    }

    fn raw(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
        let encoding = tokenizer.encode(prompt, true).map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// T5 ids padded with 0 to `max_len`; a longer prompt keeps `max_len − 1` pieces and `</s>`.
    pub fn t5(&self, prompt: &str, max_len: usize) -> Result<Tokens> {
        if max_len < MIN_T5_LENGTH {
            bail!("max sequence length must be at least {MIN_T5_LENGTH}, not {max_len}");
        }
        let raw = Self::raw(&self.t5, prompt)?;
        Ok(fit(raw, max_len, T5_EOS, T5_PAD))
    }

    /// CLIP ids padded with `<|endoftext|>` to 77; a longer prompt keeps 75 pieces.
    pub fn clip(&self, prompt: &str) -> Result<Tokens> {
        let raw = Self::raw(&self.clip, prompt)?;
        Ok(fit(raw, CLIP_LENGTH, CLIP_EOS, CLIP_EOS))
    }
}

/// Padding and truncation are ours to do (see `fit`), whatever the file says.
fn ours(mut t: Tokenizer, what: &str) -> Result<Tokenizer> {
    t.with_padding(None);
    t.with_truncation(None).map_err(|e| anyhow!("{what}: {e}"))?;
    Ok(t)
}

/// Truncates to `len` keeping the closing token last, then pads.
fn fit(mut ids: Vec<u32>, len: usize, eos: u32, pad: u32) -> Tokens {
    let untruncated_len = ids.len();
    if ids.len() > len {
        ids.truncate(len - 1);
        ids.push(eos);
    }
    ids.resize(len, pad);
    Tokens { ids, untruncated_len }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_pads_and_truncates_keeping_eos() {
        assert_eq!(fit(vec![5, 6, 1], 5, 1, 0).ids, vec![5, 6, 1, 0, 0]);
        let t = fit(vec![5, 6, 7, 8, 1], 3, 1, 0);
        assert_eq!(t.ids, vec![5, 6, 1]);
        assert!(t.truncated());
    }
}
