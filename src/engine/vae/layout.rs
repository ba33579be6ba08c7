//! VAE checkpoint layouts mapped onto the names of BFL's `ae.safetensors`
//! (the LDM autoencoder: `encoder.down.0.block.0.norm1`, `decoder.up.3.upsample.conv`, ...).
//! diffusers' `vae/` folder renames blocks, numbers the decoder's up blocks in the other order,
//! and stores the mid-block attention projections as linear [C, C] weights where BFL has 1×1
//! convolutions [C, C, 1, 1].

use anyhow::{Result, bail};

use crate::engine::loader::TensorSource;
use crate::engine::weights::{HostTensor, WeightSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeLayout {
    /// BFL `ae.safetensors` (also an all-in-one ComfyUI file's `first_stage_model.` / `vae.` part).
    Bfl,
    /// diffusers `vae/` folder.
    Diffusers,
}

/// A VAE checkpoint seen through BFL names.
pub struct VaeWeights {
    set: WeightSet,
    layout: VaeLayout,
    /// Prefix in front of every key (`first_stage_model.` in a ComfyUI all-in-one file).
    prefix: String,
    /// How many resolution levels the decoder has (needed to reverse diffusers' numbering).
    levels: usize,
}

impl VaeWeights {
    pub fn new(set: WeightSet) -> Result<Self> {
        let prefix = ["first_stage_model.", "vae.", ""]
            .into_iter()
            .find(|p| set.contains(&format!("{p}encoder.conv_in.weight")))
            .ok_or_else(|| {
                let sample: Vec<&str> = set.keys().take(5).collect();
                anyhow::anyhow!(
                    "not a VAE: no encoder.conv_in.weight (first keys: {}); expected BFL ae.safetensors or a diffusers vae/ folder",
                    sample.join(", ")
                )
            })?
            .to_string();
        let has = |k: &str| set.keys().any(|key| key.starts_with(&format!("{prefix}{k}")));
        let (layout, levels) = if has("decoder.up_blocks.") {
            (VaeLayout::Diffusers, count(&set, &format!("{prefix}decoder.up_blocks.")))
        } else if has("decoder.up.") {
            (VaeLayout::Bfl, count(&set, &format!("{prefix}decoder.up.")))
        } else {
            bail!("VAE checkpoint has no decoder blocks (decoder.up.* or decoder.up_blocks.*)")
        };
        Ok(VaeWeights { set, layout, prefix, levels })
    }

    pub fn layout(&self) -> VaeLayout {
        self.layout
    }

    pub fn levels(&self) -> usize {
        self.levels
    }

    fn source(&self, name: &str) -> Option<String> {
        let key = match self.layout {
            VaeLayout::Bfl => name.to_string(),
            VaeLayout::Diffusers => diffusers_name(name, self.levels)?,
        };
        Some(format!("{}{key}", self.prefix))
    }

    /// "Bfl VAE checkpoint" / "Diffusers VAE checkpoint", for errors.
    pub fn describe(&self) -> String {
        format!("{:?} VAE checkpoint", self.layout)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.source(name).is_some_and(|s| self.set.contains(&s))
    }
}

impl TensorSource for VaeWeights {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let mut s = self.set.shape(&self.source(name)?)?.to_vec();
        if s.len() == 2 {
            s.extend([1, 1]); // linear attention projection seen as a 1×1 conv
        }
        Some(s)
    }

    /// Reads a BFL-named tensor; attention projections always come out as [C, C, 1, 1].
    fn read(&self, name: &str) -> Result<HostTensor> {
        let Some(source) = self.source(name) else {
            bail!("{name} has no counterpart in the {:?} layout", self.layout)
        };
        let mut t = self.set.read(&source)?;
        if t.shape.len() == 2 && name.ends_with(".weight") {
            t.shape.extend([1, 1]);
        }
        Ok(t)
    }

    fn stored_keys(&self, name: &str) -> Vec<String> {
        self.source(name).into_iter().collect()
    }

    /// Every key of a VAE file; nothing of an all-in-one file (its other components' keys are
    /// not ours to judge, and its VAE part is checked for what is missing only).
    fn own_keys(&self) -> Vec<String> {
        if self.prefix.is_empty() { self.set.keys().map(String::from).collect() } else { Vec::new() }
    }
}

fn count(set: &WeightSet, prefix: &str) -> usize {
    set.keys()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

/// diffusers' key for a BFL VAE name.
pub fn diffusers_name(name: &str, levels: usize) -> Option<String> {
    let (side, rest) = name.split_once('.')?;
    let mapped = if let Some(r) = rest.strip_prefix("mid.") {
        let (part, tail) = r.split_once('.')?;
        match part {
            "block_1" => format!("mid_block.resnets.0.{}", resnet_tail(tail)),
            "block_2" => format!("mid_block.resnets.1.{}", resnet_tail(tail)),
            "attn_1" => {
                let (m, suffix) = tail.split_once('.')?;
                let m = match m {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return None,
                };
                format!("mid_block.attentions.0.{m}.{suffix}")
            }
            _ => return None,
        }
    } else if let Some(r) = rest.strip_prefix("down.") {
        let (i, r) = r.split_once('.')?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, tail) = r.split_once('.')?;
            format!("down_blocks.{i}.resnets.{j}.{}", resnet_tail(tail))
        } else {
            format!("down_blocks.{i}.downsamplers.0.{}", r.strip_prefix("downsample.")?)
        }
    } else if let Some(r) = rest.strip_prefix("up.") {
        let (i, r) = r.split_once('.')?;
        let i = levels.checked_sub(1)?.checked_sub(i.parse::<usize>().ok()?)?;
        if let Some(r) = r.strip_prefix("block.") {
            let (j, tail) = r.split_once('.')?;
            format!("up_blocks.{i}.resnets.{j}.{}", resnet_tail(tail))
        } else {
            format!("up_blocks.{i}.upsamplers.0.{}", r.strip_prefix("upsample.")?)
        }
    } else if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else {
        rest.to_string() // conv_in, conv_out
    };
    Some(format!("{side}.{mapped}"))
}

fn resnet_tail(tail: &str) -> String {
    match tail.strip_prefix("nin_shortcut.") {
        Some(s) => format!("conv_shortcut.{s}"),
        None => tail.to_string(),
    }
}
