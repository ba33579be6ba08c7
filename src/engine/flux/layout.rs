//! The checkpoint layouts a FLUX transformer arrives in, mapped onto BFL's names.
//!
//! atelier's module tree uses Black Forest Labs' key names (`double_blocks.0.img_attn.qkv`).
//! ComfyUI files hold the same keys under `model.diffusion_model.`; diffusers folders split
//! the fused projections (q/k/v, and q/k/v/mlp for single blocks) and store the final
//! modulation as (scale, shift) where BFL has (shift, scale).

use std::path::Path;

use anyhow::{Result, bail};

use crate::engine::loader::TensorSource;
use crate::engine::packed::PackedHost;
use crate::engine::weights::{HostTensor, WeightSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Black Forest Labs' original single file (`flux1-dev.safetensors`).
    Bfl,
    /// ComfyUI: BFL keys under `model.diffusion_model.`, possibly beside other components.
    ComfyUi,
    /// diffusers `transformer/` folder (`transformer_blocks.0.attn.to_q`), sharded or not.
    Diffusers,
}

const COMFY_PREFIX: &str = "model.diffusion_model.";
/// Components an all-in-one ComfyUI checkpoint carries beside the transformer.
const COMFY_OTHER_COMPONENTS: [&str; 5] =
    ["first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.", "vae."];

/// How one BFL-named tensor is produced from the file.
enum Recipe {
    Direct(String),
    /// Stacked along rows (dim 0), in this order.
    Rows(Vec<String>),
    /// The file stores the two halves in the other order.
    SwapHalves(String),
}

/// A transformer checkpoint seen through BFL names, whatever its layout.
pub struct TransformerWeights {
    set: WeightSet,
    layout: Layout,
}

impl TransformerWeights {
    pub fn open(path: &Path) -> Result<Self> {
        Self::new(WeightSet::open(path)?)
    }

    pub fn new(set: WeightSet) -> Result<Self> {
        // city96's GGUF files say what they hold; a llama or T5 GGUF is refused by name.
        set.expect_gguf_architecture("flux", "FLUX transformer")?;
        let layout = detect_layout(&set)?;
        Ok(TransformerWeights { set, layout })
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn weight_set(&self) -> &WeightSet {
        &self.set
    }

    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.set.metadata(key)
    }

    fn recipe(&self, name: &str) -> Option<Recipe> {
        match self.layout {
            Layout::Bfl => Some(Recipe::Direct(name.to_string())),
            Layout::ComfyUi => Some(Recipe::Direct(format!("{COMFY_PREFIX}{name}"))),
            Layout::Diffusers => diffusers_recipe(name),
        }
    }

    fn sources(recipe: &Recipe) -> Vec<&str> {
        match recipe {
            Recipe::Direct(k) | Recipe::SwapHalves(k) => vec![k.as_str()],
            Recipe::Rows(ks) => ks.iter().map(|k| k.as_str()).collect(),
        }
    }

    /// The shape the BFL-named tensor will have, if the file can produce it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let recipe = self.recipe(name)?;
        let mut shape: Option<Vec<usize>> = None;
        for source in Self::sources(&recipe) {
            let s = self.set.shape(source)?;
            shape = Some(match shape {
                None => s.to_vec(),
                Some(mut acc) => {
                    acc[0] += s[0];
                    acc
                }
            });
        }
        shape
    }

    /// Reads one BFL-named tensor, converting to f32.
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let Some(recipe) = self.recipe(name) else {
            bail!("{name} has no counterpart in the {:?} layout", self.layout);
        };
        match recipe {
            Recipe::Direct(k) => self.set.read(&k),
            Recipe::SwapHalves(k) => self.set.read(&k)?.swap_row_halves(),
            Recipe::Rows(ks) => HostTensor::concat_rows(ks.iter().map(|k| self.set.read(k)).collect::<Result<_>>()?),
        }
    }

    /// The bytes [`TransformerWeights::packed`] would return for `name`, from the header.
    pub fn packed_len(&self, name: &str) -> Option<u64> {
        match self.recipe(name) {
            Some(Recipe::Direct(k)) => self.set.packed_len(&k),
            _ => None,
        }
    }

    /// The BFL-named matrix as the file packs it, where it is stored as one packed tensor.
    pub fn packed(&self, name: &str) -> Result<Option<PackedHost>> {
        match self.recipe(name) {
            Some(Recipe::Direct(k)) => self.set.packed(&k),
            _ => Ok(None),
        }
    }

    /// Number of blocks `prefix{i}.` present (e.g. `double_blocks.`), counted from 0 up.
    pub fn count_blocks(&self, prefix: &str) -> usize {
        let probe = if prefix.starts_with("double") { "img_mod.lin.weight" } else { "modulation.lin.weight" };
        (0..).take_while(|i| self.shape(&format!("{prefix}{i}.{probe}")).is_some()).count()
    }

    /// "Bfl transformer checkpoint <file>", … for errors.
    pub fn describe(&self) -> String {
        let paths = self.set.paths();
        let more = if paths.len() > 1 { format!(" (and {} more shards)", paths.len() - 1) } else { String::new() };
        format!("{:?} transformer checkpoint {}{more}", self.layout, paths[0].display())
    }
}

impl TensorSource for TransformerWeights {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        TransformerWeights::shape(self, name)
    }

    fn read(&self, name: &str) -> Result<HostTensor> {
        TransformerWeights::read(self, name)
    }

    fn packed(&self, name: &str) -> Result<Option<PackedHost>> {
        TransformerWeights::packed(self, name)
    }

    fn stored_keys(&self, name: &str) -> Vec<String> {
        self.recipe(name).map_or_else(Vec::new, |r| Self::sources(&r).into_iter().map(String::from).collect())
    }

    /// Every key but those of the other components of an all-in-one ComfyUI file.
    fn own_keys(&self) -> Vec<String> {
        self.set
            .keys()
            .filter(|k| !(self.layout == Layout::ComfyUi && COMFY_OTHER_COMPONENTS.iter().any(|p| k.starts_with(p))))
            .map(String::from)
            .collect()
    }

    fn naming_note(&self) -> String {
        if self.layout == Layout::Diffusers { " (named in BFL terms)".into() } else { String::new() }
    }
}

fn detect_layout(set: &WeightSet) -> Result<Layout> {
    let any = |p: &str| set.keys().any(|k| k.starts_with(p));
    if any(&format!("{COMFY_PREFIX}img_in.")) || any(&format!("{COMFY_PREFIX}double_blocks.")) {
        Ok(Layout::ComfyUi)
    } else if any("double_blocks.") || any("single_blocks.") || any("img_in.") {
        Ok(Layout::Bfl)
    } else if any("transformer_blocks.") || any("x_embedder.") || any("single_transformer_blocks.") {
        Ok(Layout::Diffusers)
    } else {
        let sample: Vec<&str> = set.keys().take(5).collect();
        bail!(
            "unrecognized transformer layout (first keys: {}); expected BFL, ComfyUI or diffusers FLUX keys",
            sample.join(", ")
        )
    }
}

/// diffusers' names for a BFL-named tensor (inverse of diffusers' `convert_flux_to_diffusers`).
fn diffusers_recipe(name: &str) -> Option<Recipe> {
    // Split "module.path" + "weight|bias|scale"; BFL's RMSNorm `scale` is diffusers' `weight`.
    let (module, suffix) = name.rsplit_once('.')?;
    let suffix = if suffix == "scale" { "weight" } else { suffix };
    let one = |m: &str| Some(Recipe::Direct(format!("{m}.{suffix}")));
    let rows = |ms: &[&str]| Some(Recipe::Rows(ms.iter().map(|m| format!("{m}.{suffix}")).collect()));

    let fixed = match module {
        "img_in" => Some("x_embedder"),
        "txt_in" => Some("context_embedder"),
        "time_in.in_layer" => Some("time_text_embed.timestep_embedder.linear_1"),
        "time_in.out_layer" => Some("time_text_embed.timestep_embedder.linear_2"),
        "vector_in.in_layer" => Some("time_text_embed.text_embedder.linear_1"),
        "vector_in.out_layer" => Some("time_text_embed.text_embedder.linear_2"),
        "guidance_in.in_layer" => Some("time_text_embed.guidance_embedder.linear_1"),
        "guidance_in.out_layer" => Some("time_text_embed.guidance_embedder.linear_2"),
        "final_layer.linear" => Some("proj_out"),
        "final_layer.adaLN_modulation.1" => {
            return Some(Recipe::SwapHalves(format!("norm_out.linear.{suffix}")));
        }
        _ => None,
    };
    if let Some(m) = fixed {
        return one(m);
    }

    if let Some(rest) = module.strip_prefix("double_blocks.") {
        let (i, part) = rest.split_once('.')?;
        let b = format!("transformer_blocks.{i}");
        let m = |s: &str| format!("{b}.{s}");
        return match part {
            "img_mod.lin" => one(&m("norm1.linear")),
            "txt_mod.lin" => one(&m("norm1_context.linear")),
            "img_attn.qkv" => rows(&[&m("attn.to_q"), &m("attn.to_k"), &m("attn.to_v")]),
            "txt_attn.qkv" => rows(&[&m("attn.add_q_proj"), &m("attn.add_k_proj"), &m("attn.add_v_proj")]),
            "img_attn.norm.query_norm" => one(&m("attn.norm_q")),
            "img_attn.norm.key_norm" => one(&m("attn.norm_k")),
            "txt_attn.norm.query_norm" => one(&m("attn.norm_added_q")),
            "txt_attn.norm.key_norm" => one(&m("attn.norm_added_k")),
            "img_attn.proj" => one(&m("attn.to_out.0")),
            "txt_attn.proj" => one(&m("attn.to_add_out")),
            "img_mlp.0" => one(&m("ff.net.0.proj")),
            "img_mlp.2" => one(&m("ff.net.2")),
            "txt_mlp.0" => one(&m("ff_context.net.0.proj")),
            "txt_mlp.2" => one(&m("ff_context.net.2")),
            _ => None,
        };
    }
    if let Some(rest) = module.strip_prefix("single_blocks.") {
        let (i, part) = rest.split_once('.')?;
        let b = format!("single_transformer_blocks.{i}");
        let m = |s: &str| format!("{b}.{s}");
        return match part {
            "linear1" => rows(&[&m("attn.to_q"), &m("attn.to_k"), &m("attn.to_v"), &m("proj_mlp")]),
            "linear2" => one(&m("proj_out")),
            "norm.query_norm" => one(&m("attn.norm_q")),
            "norm.key_norm" => one(&m("attn.norm_k")),
            "modulation.lin" => one(&m("norm.linear")),
            _ => None,
        };
    }
    None
}
