//! Writing the trained LoRA in the formats other tools load: kohya/ComfyUI keys (default)
//! or diffusers/PEFT keys. Key names are the inverse of `engine::lora`'s mapping, so a file
//! written here loads back through it at the trained strength.

use std::path::Path;

use anyhow::{Result, bail};
use sha2::{Digest, Sha256};

use super::params::TrainableLora;
use crate::engine::weights::write_safetensors_f32;

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `lora_unet_<BFL path>.lora_down/lora_up.weight` + `.alpha` (ComfyUI, Forge, A1111, kohya).
    Kohya,
    /// `transformer.<diffusers path>.lora_A/lora_B.weight` (diffusers `load_lora_weights`).
    Peft,
}

/// What the file's metadata records about the run.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    pub trigger: String,
    pub steps: usize,
    pub resolution: usize,
    pub images: usize,
    /// The base model's name (folder or file name) and a sha256 of its transformer file(s).
    pub base_model: String,
    pub base_model_hash: String,
    pub is_dev: bool,
    pub lr: f64,
    pub seed: u64,
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Writes `lora` to `path` in `format`.
pub fn write(lora: &TrainableLora, format: Format, info: &RunInfo, path: &Path) -> Result<()> {
    let tensors = match format {
        Format::Kohya => kohya(lora),
        Format::Peft => peft(lora)?,
    };
    let mut meta: Vec<(String, String)> = vec![
        ("ss_network_module".into(), "networks.lora_flux".into()),
        ("ss_network_dim".into(), lora.rank.to_string()),
        ("ss_network_alpha".into(), lora.alpha.to_string()),
        ("ss_base_model_version".into(), if info.is_dev { "flux1" } else { "flux1_schnell" }.into()),
        ("ss_sd_model_name".into(), info.base_model.clone()),
        ("ss_max_train_steps".into(), info.steps.to_string()),
        ("ss_steps".into(), info.steps.to_string()),
        ("ss_resolution".into(), format!("({}, {})", info.resolution, info.resolution)),
        ("ss_num_train_images".into(), info.images.to_string()),
        ("ss_learning_rate".into(), info.lr.to_string()),
        ("ss_seed".into(), info.seed.to_string()),
        ("ss_output_name".into(), path.file_stem().and_then(|s| s.to_str()).unwrap_or("lora").to_string()),
        ("ss_tag_frequency".into(), serde_json::json!({ "atelier": { &info.trigger: info.images } }).to_string()),
        ("modelspec.trigger_phrase".into(), info.trigger.clone()),
        ("modelspec.architecture".into(), format!("flux-1-{}/lora", if info.is_dev { "dev" } else { "schnell" })),
        ("atelier_trigger".into(), info.trigger.clone()),
        ("atelier_base_model_hash".into(), info.base_model_hash.clone()),
        ("atelier_format".into(), format!("{format:?}").to_lowercase()),
        // A1111 reads this as the LoRA's hash instead of hashing the file (see `engine::lora`).
        ("sshs_model_hash".into(), data_hash(&tensors)),
    ];
    if format == Format::Peft {
        // The scale is folded into B (see `peft`): every loader applies it as alpha = r.
        meta.retain(|(k, _)| k != "ss_network_alpha");
        meta.push(("ss_network_alpha".into(), lora.rank.to_string()));
    }
    let shapes: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    let meta_refs: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut data = tensors.into_iter().map(|(_, _, d)| d);
    write_safetensors_f32(path, &shapes, &meta_refs, |_, _| data.next().expect("one data vector per tensor"))
}

/// sha256 of the tensor bytes in file order (what follows the header), hex: A1111's LoRA hash.
fn data_hash(tensors: &Tensors) -> String {
    let mut h = Sha256::new();
    for (_, _, d) in tensors {
        for v in d {
            h.update(v.to_le_bytes());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// kohya: one pair per BFL Linear (fused qkv / linear1 as they are), alpha as trained.
fn kohya(lora: &TrainableLora) -> Tensors {
    let r = lora.rank;
    let mut out = Vec::new();
    for (path, a, b) in lora.factors() {
        let name = format!("lora_unet_{}", path.replace('.', "_"));
        let (inputs, outputs) = (a.len() / r, b.len() / r);
        out.push((format!("{name}.alpha"), vec![], vec![lora.alpha]));
        out.push((format!("{name}.lora_down.weight"), vec![r, inputs], a));
        out.push((format!("{name}.lora_up.weight"), vec![outputs, r], b));
    }
    out
}

/// diffusers module names and the rows of the fused BFL output each covers.
pub(crate) fn diffusers_modules(path: &str, outputs: usize, h: usize) -> Result<Vec<(String, std::ops::Range<usize>)>> {
    let parts: Vec<&str> = path.splitn(3, '.').collect();
    let [kind, index, rest] = parts[..] else { bail!("{path} is not a block Linear") };
    let all = 0..outputs;
    let qkv = |prefix: &str, names: [&str; 3]| -> Vec<(String, std::ops::Range<usize>)> {
        names.iter().enumerate().map(|(i, n)| (format!("{prefix}.{n}"), i * h..(i + 1) * h)).collect()
    };
    Ok(match (kind, rest) {
        ("double_blocks", _) => {
            let p = format!("transformer.transformer_blocks.{index}");
            match rest {
                "img_attn.qkv" => qkv(&format!("{p}.attn"), ["to_q", "to_k", "to_v"]),
                "txt_attn.qkv" => qkv(&format!("{p}.attn"), ["add_q_proj", "add_k_proj", "add_v_proj"]),
                "img_attn.proj" => vec![(format!("{p}.attn.to_out.0"), all)],
                "txt_attn.proj" => vec![(format!("{p}.attn.to_add_out"), all)],
                "img_mlp.0" => vec![(format!("{p}.ff.net.0.proj"), all)],
                "img_mlp.2" => vec![(format!("{p}.ff.net.2"), all)],
                "txt_mlp.0" => vec![(format!("{p}.ff_context.net.0.proj"), all)],
                "txt_mlp.2" => vec![(format!("{p}.ff_context.net.2"), all)],
                "img_mod.lin" => vec![(format!("{p}.norm1.linear"), all)],
                "txt_mod.lin" => vec![(format!("{p}.norm1_context.linear"), all)],
                _ => bail!("{path} has no diffusers name"),
            }
        }
        ("single_blocks", _) => {
            let p = format!("transformer.single_transformer_blocks.{index}");
            match rest {
                "linear1" => {
                    let mut v = qkv(&format!("{p}.attn"), ["to_q", "to_k", "to_v"]);
                    v.push((format!("{p}.proj_mlp"), 3 * h..outputs));
                    v
                }
                "linear2" => vec![(format!("{p}.proj_out"), all)],
                "modulation.lin" => vec![(format!("{p}.norm.linear"), all)],
                _ => bail!("{path} has no diffusers name"),
            }
        }
        _ => bail!("{path} is not a block Linear"),
    })
}

/// diffusers/PEFT: a fused pair becomes one pair per diffusers module: each keeps the whole A
/// and the rows of B for its part (ΔW's rows split exactly; no factor of 3). The scale
/// alpha/r is folded into B and no alpha is written, so every loader (diffusers, ComfyUI,
/// atelier) applies it at the trained strength without reading metadata.
fn peft(lora: &TrainableLora) -> Result<Tensors> {
    let (r, s) = (lora.rank, lora.scale());
    let mut out = Vec::new();
    for (path, a, b) in lora.factors() {
        let (inputs, outputs) = (a.len() / r, b.len() / r);
        for (name, rows) in diffusers_modules(&path, outputs, inputs)? {
            let up: Vec<f32> = b[rows.start * r..rows.end * r].iter().map(|v| v * s).collect();
            out.push((format!("{name}.lora_A.weight"), vec![r, inputs], a.clone()));
            out.push((format!("{name}.lora_B.weight"), vec![rows.len(), r], up));
        }
    }
    Ok(out)
}
