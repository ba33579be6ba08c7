//! LoRA at inference: every FLUX LoRA format users download, parsed into one form (changes per
//! target Linear of the BFL-named model), and applied unmerged as side-path
//! [`Adapter`](crate::engine::layers::Adapter)s of the model's [`Linear`]s, so that the set of
//! LoRAs can change per job without reloading the base (see `shared/LORA.md` for the formats).
//!
//! Formats: kohya / ComfyUI `lora_unet_*` (BFL layout, fused qkv and linear1, with or without
//! `.alpha`, split-qkv block-diagonal factors included), ComfyUI `diffusion_model.*` (with
//! `lora_{down,up}`, `lora_{A,B}`, `.diff`, `.diff_b`), diffusers / PEFT `transformer.*`
//! (alpha from `.alpha` keys or the `lora_adapter_metadata` header, q/k/v/proj_mlp onto rows of
//! the fused weights, norm_out's halves swapped), ai-toolkit (PEFT, f16), OneTrainer
//! `lora_transformer_*`, XLabs `*.processor.*_lora*`; CLIP parts (`lora_te1_*`,
//! `text_encoder.*`) are applied to CLIP, T5 parts (`lora_te2_*`, `lora_te3_*`,
//! `text_encoder_2.*`) are skipped with a note. LoKr, LoHa, DoRA, LoCon mid weights and BFL
//! control LoRAs are refused by name.
//!
//! Sizes (hidden width, MLP width, block counts) come from the model's own Linears when the
//! LoRA is applied, never from constants.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use burn::module::Param;
use burn::tensor::{Tensor, TensorData};

use crate::engine::clip::ClipText;
use crate::engine::flux::Flux;
use crate::engine::layers::{Adapter, Linear};
use crate::engine::weights::{HostTensor, WeightSet};

/// Which rows of the target's output a low-rank change covers; resolved against the target
/// Linear's shape (h = its input width for the fused projections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Every row.
    All,
    /// Rows [i·h, (i+1)·h): q (0), k (1) or v (2) of a fused qkv / linear1.
    Block(usize),
    /// Rows [0, 3h): q, k and v of linear1 (XLabs' single-block `qkv_lora`).
    Qkv,
    /// Rows [3h, out): linear1's MLP input (diffusers' `proj_mlp`).
    Mlp,
    /// Every row, the two halves of B swapped (diffusers' `norm_out` is (scale, shift), BFL's
    /// `final_layer.adaLN_modulation.1` is (shift, scale)).
    SwapHalves,
}

/// One change to a Linear, in PyTorch's layouts.
#[derive(Debug, Clone)]
pub enum Change {
    /// ΔW = scale · B·A on `rows`: `down` (A) [r, in], `up` (B) [rows, r].
    LowRank { down: HostTensor, up: HostTensor, scale: f32, rows: Rows },
    /// A full weight delta [out, in] (ComfyUI `.diff`).
    Diff(HostTensor),
    /// A bias delta [out] (ComfyUI `.diff_b`).
    DiffBias(HostTensor),
}

/// The model a change applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Transformer,
    Clip,
}

/// A parsed LoRA file: its changes keyed by (model, Linear path in the checkpoint's naming,
/// e.g. `double_blocks.0.img_attn.qkv` or `encoder.layers.0.self_attn.q_proj`).
pub struct Lora {
    /// The file name without `.safetensors` (what `<lora:name:w>` shows).
    pub name: String,
    /// `sshs_model_hash` from the header when present, else the sha256 of the tensor bytes
    /// (after the header): the first 12 hex digits (A1111's `Lora hashes`).
    pub hash: String,
    /// The detected format, for messages.
    pub format: &'static str,
    pub changes: BTreeMap<(Part, String), Vec<(String, Change)>>,
    /// Keys that map to nothing this engine applies (each with why).
    pub unmatched: Vec<String>,
    /// Notes for the user (skipped T5 parts).
    pub notes: Vec<String>,
}

impl std::fmt::Debug for Lora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lora({}, {}, {} targets)", self.name, self.format, self.changes.len())
    }
}

/// A LoRA file and the strength to apply it with (`--lora FILE[:WEIGHT]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraChoice {
    pub path: PathBuf,
    pub weight: f32,
}

impl LoraChoice {
    /// `FILE[:WEIGHT]`; the weight defaults to 1.0 and may be negative. A path that itself has
    /// a colon works when the part after the last colon is not a number.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some((path, w)) = s.rsplit_once(':')
            && !path.is_empty()
            && let Ok(weight) = w.trim().parse::<f32>()
        {
            if !weight.is_finite() {
                bail!("LoRA weight {w:?} is not a finite number");
            }
            return Ok(LoraChoice { path: path.into(), weight });
        }
        if s.is_empty() {
            bail!("--lora needs a file (FILE[:WEIGHT])");
        }
        // `x.safetensors:abc` where no such file exists: a mistyped weight, not a path.
        if let Some((path, w)) = s.rsplit_once(':')
            && !std::path::Path::new(s).exists()
            && std::path::Path::new(path).is_file()
        {
            bail!("--lora {s}: the weight after the colon ({w:?}) is not a number");
        }
        Ok(LoraChoice { path: s.into(), weight: 1.0 })
    }
}

/// A parsed LoRA and its strength.
#[derive(Debug, Clone)]
pub struct LoraSet {
    pub lora: Arc<Lora>,
    pub weight: f32,
}

impl LoraSet {
    pub fn open(choice: &LoraChoice) -> Result<Self> {
        Ok(LoraSet { lora: Arc::new(Lora::open(&choice.path)?), weight: choice.weight })
    }
}

/// How a key ends: the role of the tensor in its module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Down,
    Up,
    Alpha,
    Diff,
    DiffBias,
}

const SUFFIXES: &[(&str, Role)] = &[
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora_A.default.weight", Role::Down),
    (".lora_B.default.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".down.weight", Role::Down),
    (".up.weight", Role::Up),
    (".alpha", Role::Alpha),
    (".diff_b", Role::DiffBias),
    (".diff", Role::Diff),
];

/// Where a module of a LoRA file lands.
#[derive(Debug, Clone, PartialEq)]
enum Target {
    Linear(Part, String, Rows),
    /// A T5 module: not applied.
    T5,
}

/// `t` when every value is finite: a NaN or infinity in a factor would turn every image made
/// with the LoRA black, so the file is refused when it is read.
fn finite(key: &str, t: HostTensor) -> Result<HostTensor> {
    let bad = t.data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        bail!("{key} holds {bad} NaN or infinite values of {}: the file is damaged", t.data.len());
    }
    Ok(t)
}

impl Lora {
    /// Reads and parses a LoRA file. Errors name the file and what is wrong with it.
    pub fn open(path: &Path) -> Result<Self> {
        let set = WeightSet::open(path).with_context(|| format!("LoRA {}", path.display()))?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.strip_suffix(".safetensors").unwrap_or(n).to_string())
            .unwrap_or_else(|| "lora".into());
        // The file's own hash only when it is one (hex): anything else would be copied into
        // every PNG's text, and slicing it could split a character.
        let hash = match set.metadata("sshs_model_hash") {
            Some(h) if h.len() >= 12 && h.as_bytes()[..12].iter().all(u8::is_ascii_hexdigit) => {
                h[..12].to_ascii_lowercase()
            }
            _ => tensor_bytes_hash(path)?,
        };
        Self::parse(&set, name, hash).with_context(|| format!("LoRA {}", path.display()))
    }

    fn parse(set: &WeightSet, name: String, hash: String) -> Result<Self> {
        let keys: Vec<String> = set.keys().map(String::from).collect();
        if keys.is_empty() {
            bail!("the file holds no tensors");
        }
        refuse_unsupported(&keys)?;
        let format = detect(&keys);
        let meta = Metadata::read(set);

        // Group keys by module.
        let mut modules: BTreeMap<String, BTreeMap<Role, String>> = BTreeMap::new();
        let mut unmatched = Vec::new();
        for k in &keys {
            match SUFFIXES.iter().find(|(s, _)| k.ends_with(s)) {
                Some((s, role)) => {
                    modules.entry(k[..k.len() - s.len()].to_string()).or_default().insert(*role, k.clone());
                }
                None => unmatched.push(format!("{k} (not a LoRA tensor)")),
            }
        }
        let mut changes: BTreeMap<(Part, String), Vec<(String, Change)>> = BTreeMap::new();
        let mut t5 = 0;
        for (module, roles) in &modules {
            let target = match resolve(module) {
                Some(t) => t,
                None => {
                    unmatched.extend(roles.values().cloned());
                    continue;
                }
            };
            let (part, path, rows) = match target {
                Target::T5 => {
                    t5 += 1;
                    continue;
                }
                Target::Linear(part, path, rows) => (part, path, rows),
            };
            let mut list = Vec::new();
            match (roles.get(&Role::Down), roles.get(&Role::Up)) {
                (Some(dk), Some(uk)) => {
                    let (down, up) = (finite(dk, set.read(dk)?)?, finite(uk, set.read(uk)?)?);
                    if down.shape.len() != 2 || up.shape.len() != 2 || down.shape[0] != up.shape[1] {
                        bail!(
                            "{module}: down {:?} and up {:?} are not the two factors of one LoRA (a conv LoRA?)",
                            down.shape,
                            up.shape
                        );
                    }
                    if down.shape[0] == 0 {
                        bail!(
                            "{module}: rank 0 (down {:?}, up {:?}): a LoRA needs at least one rank",
                            down.shape,
                            up.shape
                        );
                    }
                    let rank = down.shape[0] as f32;
                    let alpha = match roles.get(&Role::Alpha) {
                        Some(ak) => Some(set.read(ak)?.data.first().copied().ok_or_else(|| anyhow!("{ak} is empty"))?),
                        None => meta.alpha(module),
                    };
                    if let Some(a) = alpha
                        && !a.is_finite()
                    {
                        bail!("{module}: its alpha is {a}, not a number");
                    }
                    let scale = alpha.map_or(1.0, |a| a / rank);
                    list.push((dk.clone(), Change::LowRank { down, up, scale, rows }));
                }
                (Some(k), None) | (None, Some(k)) => {
                    bail!("{k} has no matching {} factor", if roles.contains_key(&Role::Down) { "up" } else { "down" })
                }
                (None, None) => {}
            }
            if let Some(k) = roles.get(&Role::Diff) {
                if rows != Rows::All {
                    bail!("{k}: a full delta on part of a fused weight is not supported");
                }
                list.push((k.clone(), Change::Diff(finite(k, set.read(k)?)?)));
            }
            if let Some(k) = roles.get(&Role::DiffBias) {
                if rows != Rows::All {
                    bail!("{k}: a bias delta on part of a fused weight is not supported");
                }
                list.push((k.clone(), Change::DiffBias(finite(k, set.read(k)?)?)));
            }
            // A module with only an alpha has nothing to apply.
            if !list.is_empty() {
                changes.entry((part, path)).or_default().extend(list);
            }
        }
        let mut notes = Vec::new();
        if t5 > 0 {
            notes.push(format!("{name}: its {t5} T5 text-encoder modules are skipped (not supported yet)"));
        }
        if !changes.keys().any(|(p, _)| *p == Part::Transformer) {
            let sample: Vec<&String> = keys.iter().take(3).collect();
            bail!(
                "no key matches a FLUX transformer ({} keys, e.g. {sample:?}); is it a LoRA for another model (SDXL, SD 1.5)?",
                keys.len()
            );
        }
        Ok(Lora { name, hash, format, changes, unmatched, notes })
    }

    /// The transformer width this LoRA was made for: the input width of its changes on the
    /// Linears that read the hidden stream (attention qkv and proj, the MLPs' first layer,
    /// linear1, the modulations). `None` when it changes none of those.
    pub fn hidden_width(&self) -> Option<usize> {
        const READS_HIDDEN: &[&str] =
            &["attn.qkv", "attn.proj", "mlp.0", ".linear1", "mod.lin", "modulation.lin", "final_layer.linear"];
        self.changes
            .iter()
            .filter(|((part, path), _)| *part == Part::Transformer && READS_HIDDEN.iter().any(|s| path.ends_with(s)))
            .find_map(|(_, list)| {
                list.iter().find_map(|(_, c)| match c {
                    Change::LowRank { down, .. } => down.shape.get(1).copied(),
                    Change::Diff(d) => d.shape.get(1).copied(),
                    Change::DiffBias(_) => None,
                })
            })
    }

    /// Bytes the parsed factors take in memory (f32 on the host).
    pub fn host_bytes(&self) -> usize {
        let tensor = |c: &Change| match c {
            Change::LowRank { down, up, .. } => down.data.len() + up.data.len(),
            Change::Diff(d) | Change::DiffBias(d) => d.data.len(),
        };
        4 * self.changes.values().flatten().map(|(_, c)| tensor(c)).sum::<usize>()
    }
}

/// Parsed LoRAs kept between jobs so that switching back to a LoRA used recently costs no
/// parse (nor hash); the least recently used go first past `max_bytes` of parsed factors. A file
/// that changed on disk (size or mtime) is parsed again.
pub struct LoraCache {
    max_bytes: usize,
    /// (path, size, mtime) → LoRA, most recently used last.
    entries: Vec<((PathBuf, u64, std::time::SystemTime), Arc<Lora>)>,
}

impl LoraCache {
    pub fn new(max_bytes: usize) -> Self {
        LoraCache { max_bytes, entries: Vec::new() }
    }

    /// The parsed LoRA at `choice.path` with `choice.weight`.
    pub fn open(&mut self, choice: &LoraChoice) -> Result<LoraSet> {
        let meta = std::fs::metadata(&choice.path)
            .with_context(|| format!("LoRA {}: cannot read the file", choice.path.display()))?;
        let key = (choice.path.clone(), meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
        let lora = match self.entries.iter().position(|(k, _)| *k == key) {
            Some(i) => self.entries.remove(i).1,
            None => Arc::new(Lora::open(&choice.path)?),
        };
        self.entries.push((key, lora.clone()));
        let mut total: usize = self.entries.iter().map(|(_, l)| l.host_bytes()).sum();
        // The LoRA just asked for always stays.
        while total > self.max_bytes && self.entries.len() > 1 {
            total -= self.entries.remove(0).1.host_bytes();
        }
        Ok(LoraSet { lora, weight: choice.weight })
    }
}

/// sha256 of the bytes after the safetensors header, first 12 hex digits.
fn tensor_bytes_hash(path: &Path) -> Result<String> {
    Ok(crate::engine::filehash::sha256(path, crate::engine::filehash::Span::SafetensorsTensors)?[..12].to_string())
}

fn refuse_unsupported(keys: &[String]) -> Result<()> {
    let has = |pat: &str| keys.iter().find(|k| k.contains(pat));
    for (pat, kind) in [
        ("lokr_", "LoKr (LyCORIS Kronecker)"),
        ("hada_", "LoHa (LyCORIS Hadamard)"),
        ("dora_scale", "DoRA"),
        (".lora_magnitude_vector", "DoRA"),
        (".lora_mid.", "LoCon with a mid weight (LyCORIS)"),
        ("oft_", "OFT"),
        (".ia3", "IA3"),
    ] {
        if let Some(k) = has(pat) {
            bail!("{kind} files are not supported (key {k}); only LoRA (down/up or A/B factors) and full deltas are");
        }
    }
    if let Some(k) = keys.iter().find(|k| k.ends_with("norm.scale") || k.ends_with("lora_B.bias")) {
        bail!(
            "this looks like a BFL control LoRA (Canny/Depth: key {k}); control LoRAs need the control pipeline, which atelier does not have yet"
        );
    }
    Ok(())
}

fn detect(keys: &[String]) -> &'static str {
    let any = |p: &str| keys.iter().any(|k| k.contains(p));
    if any("lora_unet_") {
        "kohya"
    } else if any("lora_transformer_") {
        "OneTrainer"
    } else if any(".processor.") {
        "XLabs"
    } else if any("diffusion_model.") {
        "ComfyUI"
    } else if any("lora_te") {
        "kohya (text encoders only)"
    } else {
        "diffusers/PEFT"
    }
}

/// PEFT's `lora_adapter_metadata` (diffusers writes it into the safetensors header).
struct Metadata {
    alpha: Option<f32>,
    patterns: Vec<(String, f32)>,
}

impl Metadata {
    fn read(set: &WeightSet) -> Self {
        let mut m = Metadata { alpha: None, patterns: Vec::new() };
        let Some(text) = set.metadata("lora_adapter_metadata") else {
            return m;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return m;
        };
        // diffusers writes the PEFT config with keys prefixed by component
        // (`transformer.lora_alpha`); others write the config itself.
        let get = |k: &str| v.get(format!("transformer.{k}")).or_else(|| v.get(k));
        m.alpha = get("lora_alpha").and_then(serde_json::Value::as_f64).map(|a| a as f32);
        if let Some(p) = get("alpha_pattern").and_then(serde_json::Value::as_object) {
            m.patterns = p.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32))).collect();
        }
        m
    }

    fn alpha(&self, module: &str) -> Option<f32> {
        self.patterns.iter().find(|(p, _)| module.ends_with(p.as_str())).map(|(_, a)| *a).or(self.alpha)
    }
}

/// Maps a module name of any supported format to its target.
fn resolve(module: &str) -> Option<Target> {
    let flux = |(path, rows): (String, Rows)| Target::Linear(Part::Transformer, path, rows);
    if let Some(rest) = module.strip_prefix("lora_unet_") {
        return bfl_flat(rest).map(|p| flux((p, Rows::All)));
    }
    if let Some(rest) = module.strip_prefix("lora_transformer_") {
        return diffusers(rest, true).map(flux);
    }
    if let Some(rest) = module.strip_prefix("lora_te1_") {
        return clip_flat(rest).map(|p| Target::Linear(Part::Clip, p, Rows::All));
    }
    if module.starts_with("lora_te2_") || module.starts_with("lora_te3_") || module.starts_with("text_encoder_2.") {
        return Some(Target::T5);
    }
    if let Some(rest) = module.strip_prefix("text_encoder.") {
        let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
        return clip_flat(&rest.replace('.', "_")).map(|p| Target::Linear(Part::Clip, p, Rows::All));
    }
    let rest = ["diffusion_model.", "transformer.", "base_model.model.", "model.diffusion_model."]
        .iter()
        .find_map(|p| module.strip_prefix(p))
        .unwrap_or(module);
    if let Some(t) = xlabs(rest) {
        return Some(flux(t));
    }
    // BFL paths (`double_blocks.0.img_attn.qkv`); no diffusers name reads as one.
    if let Some(p) = bfl_flat(&rest.replace('.', "_")) {
        return Some(flux((p, Rows::All)));
    }
    diffusers(rest, false).map(flux)
}

/// A block index and what follows it (`3_img_attn_qkv` → (3, `img_attn_qkv`)).
fn index(s: &str, sep: char) -> Option<(usize, &str)> {
    let (i, tail) = s.split_once(sep)?;
    Some((i.parse().ok()?, tail))
}

/// A BFL Linear path with `.` written as `_` (kohya) → the dotted path.
fn bfl_flat(s: &str) -> Option<String> {
    if let Some((i, tail)) = s.strip_prefix("double_blocks_").and_then(|r| index(r, '_')) {
        let (stream, rest) = tail.split_once('_')?;
        if stream != "img" && stream != "txt" {
            return None;
        }
        let m = match rest {
            "attn_qkv" => "attn.qkv",
            "attn_proj" => "attn.proj",
            "mlp_0" => "mlp.0",
            "mlp_2" => "mlp.2",
            "mod_lin" => "mod.lin",
            _ => return None,
        };
        return Some(format!("double_blocks.{i}.{stream}_{m}"));
    }
    if let Some((i, tail)) = s.strip_prefix("single_blocks_").and_then(|r| index(r, '_')) {
        let m = match tail {
            "linear1" | "linear2" => tail,
            "modulation_lin" => "modulation.lin",
            _ => return None,
        };
        return Some(format!("single_blocks.{i}.{m}"));
    }
    Some(
        match s {
            "img_in" | "txt_in" => s,
            "time_in_in_layer" => "time_in.in_layer",
            "time_in_out_layer" => "time_in.out_layer",
            "vector_in_in_layer" => "vector_in.in_layer",
            "vector_in_out_layer" => "vector_in.out_layer",
            "guidance_in_in_layer" => "guidance_in.in_layer",
            "guidance_in_out_layer" => "guidance_in.out_layer",
            "final_layer_linear" => "final_layer.linear",
            "final_layer_adaLN_modulation_1" => "final_layer.adaLN_modulation.1",
            _ => return None,
        }
        .to_string(),
    )
}

/// diffusers module suffix in a double block → BFL suffix and rows.
const DOUBLE: &[(&str, &str, Rows)] = &[
    ("attn.to_q", "img_attn.qkv", Rows::Block(0)),
    ("attn.to_k", "img_attn.qkv", Rows::Block(1)),
    ("attn.to_v", "img_attn.qkv", Rows::Block(2)),
    ("attn.add_q_proj", "txt_attn.qkv", Rows::Block(0)),
    ("attn.add_k_proj", "txt_attn.qkv", Rows::Block(1)),
    ("attn.add_v_proj", "txt_attn.qkv", Rows::Block(2)),
    ("attn.to_out.0", "img_attn.proj", Rows::All),
    ("attn.to_add_out", "txt_attn.proj", Rows::All),
    ("ff.net.0.proj", "img_mlp.0", Rows::All),
    ("ff.net.2", "img_mlp.2", Rows::All),
    ("ff_context.net.0.proj", "txt_mlp.0", Rows::All),
    ("ff_context.net.2", "txt_mlp.2", Rows::All),
    ("norm1.linear", "img_mod.lin", Rows::All),
    ("norm1_context.linear", "txt_mod.lin", Rows::All),
];

const SINGLE: &[(&str, &str, Rows)] = &[
    ("attn.to_q", "linear1", Rows::Block(0)),
    ("attn.to_k", "linear1", Rows::Block(1)),
    ("attn.to_v", "linear1", Rows::Block(2)),
    ("proj_mlp", "linear1", Rows::Mlp),
    ("proj_out", "linear2", Rows::All),
    ("norm.linear", "modulation.lin", Rows::All),
];

const TOP: &[(&str, &str, Rows)] = &[
    ("norm_out.linear", "final_layer.adaLN_modulation.1", Rows::SwapHalves),
    ("proj_out", "final_layer.linear", Rows::All),
    ("x_embedder", "img_in", Rows::All),
    ("context_embedder", "txt_in", Rows::All),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", Rows::All),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", Rows::All),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", Rows::All),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", Rows::All),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", Rows::All),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", Rows::All),
];

/// A diffusers module path (`flat`: with `.` written as `_`, OneTrainer) → BFL path and rows.
fn diffusers(s: &str, flat: bool) -> Option<(String, Rows)> {
    let sep = if flat { '_' } else { '.' };
    let find = |table: &'static [(&'static str, &'static str, Rows)], tail: &str| -> Option<(&'static str, Rows)> {
        table
            .iter()
            .find(|(d, _, _)| if flat { d.replace('.', "_") == tail } else { *d == tail })
            .map(|(_, b, r)| (*b, *r))
    };
    let blocks = |prefix: &str| s.strip_prefix(&format!("{prefix}{sep}")).and_then(|r| index(r, sep));
    if let Some((i, tail)) = blocks("single_transformer_blocks") {
        return find(SINGLE, tail).map(|(b, r)| (format!("single_blocks.{i}.{b}"), r));
    }
    if let Some((i, tail)) = blocks("transformer_blocks") {
        return find(DOUBLE, tail).map(|(b, r)| (format!("double_blocks.{i}.{b}"), r));
    }
    find(TOP, s).map(|(b, r)| (b.to_string(), r))
}

/// XLabs' processor LoRAs.
fn xlabs(s: &str) -> Option<(String, Rows)> {
    if let Some((i, tail)) = s.strip_prefix("double_blocks.").and_then(|r| index(r, '.')) {
        let m = match tail.strip_prefix("processor.")? {
            "qkv_lora1" => "img_attn.qkv",
            "qkv_lora2" => "txt_attn.qkv",
            "proj_lora1" => "img_attn.proj",
            "proj_lora2" => "txt_attn.proj",
            _ => return None,
        };
        return Some((format!("double_blocks.{i}.{m}"), Rows::All));
    }
    let (i, tail) = s.strip_prefix("single_blocks.").and_then(|r| index(r, '.'))?;
    // XLabs' single-block `proj_lora` acts on linear2's output, which is no Linear's input:
    // it stays unmatched.
    (tail == "processor.qkv_lora").then(|| (format!("single_blocks.{i}.linear1"), Rows::Qkv))
}

/// CLIP-L's `text_model_encoder_layers_{i}_{self_attn_q_proj,…,mlp_fc1}` → dotted path.
fn clip_flat(s: &str) -> Option<String> {
    let s = s.strip_prefix("text_model_").unwrap_or(s);
    let (i, tail) = s.strip_prefix("encoder_layers_").and_then(|r| index(r, '_'))?;
    let m = match tail {
        "self_attn_q_proj" => "self_attn.q_proj",
        "self_attn_k_proj" => "self_attn.k_proj",
        "self_attn_v_proj" => "self_attn.v_proj",
        "self_attn_out_proj" => "self_attn.out_proj",
        "mlp_fc1" => "mlp.fc1",
        "mlp_fc2" => "mlp.fc2",
        _ => return None,
    };
    Some(format!("encoder.layers.{i}.{m}"))
}

/// Applies `sets` to the transformer's Linears, replacing any adapters it had (an empty list
/// clears them). Returns warnings (keys this model lacks, skipped parts). Errors when a LoRA
/// has no key for this transformer or a factor's shape does not fit (another FLUX size).
pub fn set_loras(model: &mut Flux, sets: &[LoraSet]) -> Result<Vec<String>> {
    let linears = model.linears_mut();
    apply(linears, sets, Part::Transformer, true, &[])
}

/// [`set_loras`] for a streamed transformer's non-block layers: `block_paths` (the Linears of
/// its blocks, built later) count as present, so the checks and warnings are those of the
/// whole model.
pub fn set_stem_loras(stem: &mut Flux, block_paths: &[String], sets: &[LoraSet]) -> Result<Vec<String>> {
    apply(stem.linears_mut(), sets, Part::Transformer, true, block_paths)
}

/// The adapters of `sets` on one streamed block's Linears (checked and warned about once, by
/// [`set_stem_loras`]).
pub fn set_block_loras(linears: Vec<(String, &mut Linear)>, sets: &[LoraSet]) -> Result<()> {
    apply(linears, sets, Part::Transformer, false, &[]).map(drop)
}

/// Applies the CLIP parts of `sets` to the CLIP text encoder (replacing earlier ones).
pub fn set_clip_loras(model: &mut ClipText, sets: &[LoraSet]) -> Result<Vec<String>> {
    apply(model.linears_mut(), sets, Part::Clip, false, &[])
}

/// Removes every adapter of the transformer.
pub fn clear_loras(model: &mut Flux) {
    for (_, l) in model.linears_mut() {
        l.adapters.clear();
    }
}

fn apply(
    linears: Vec<(String, &mut Linear)>,
    sets: &[LoraSet],
    part: Part,
    required: bool,
    elsewhere: &[String],
) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let paths: BTreeSet<&str> =
        linears.iter().map(|(p, _)| p.as_str()).chain(elsewhere.iter().map(String::as_str)).collect();
    for set in sets {
        let lora = &set.lora;
        let mine: Vec<&(Part, String)> = lora.changes.keys().filter(|(p, _)| *p == part).collect();
        let missing: Vec<String> = mine
            .iter()
            .filter(|(_, path)| !paths.contains(path.as_str()))
            .flat_map(|k| lora.changes[*k].iter().map(|(key, _)| key.clone()))
            .collect();
        if required && !mine.is_empty() && missing.len() == mine.iter().map(|k| lora.changes[*k].len()).sum::<usize>() {
            bail!(
                "LoRA {}: none of its keys match this model's transformer (e.g. {}); is it for another model?",
                lora.name,
                missing[0]
            );
        }
        let mut unmatched = missing;
        if part == Part::Transformer {
            unmatched.extend(lora.unmatched.iter().cloned());
            warnings.extend(lora.notes.iter().cloned());
        }
        if !unmatched.is_empty() {
            let shown: Vec<&str> = unmatched.iter().take(8).map(String::as_str).collect();
            warnings.push(format!(
                "LoRA {}: {} keys match nothing in this model and are ignored: {}{}",
                lora.name,
                unmatched.len(),
                shown.join(", "),
                if unmatched.len() > shown.len() { ", …" } else { "" }
            ));
        }
    }
    for (path, linear) in linears {
        linear.adapters.clear();
        let (inputs, outputs) = linear.dims();
        // Low-rank parts of every LoRA, stacked into one adapter: down [in, R], up [R, out].
        let mut downs: Vec<Vec<f32>> = Vec::new(); // each [r, in] row-major
        let mut ups: Vec<(Vec<f32>, usize)> = Vec::new(); // each [out, r] row-major, and r
        let mut diff: Option<Vec<f32>> = None;
        let mut diff_bias: Option<Vec<f32>> = None;
        for set in sets {
            let Some(list) = set.lora.changes.get(&(part, path.clone())) else {
                continue;
            };
            let what = |key: &str| format!("LoRA {}: {key}", set.lora.name);
            for (key, change) in list {
                match change {
                    Change::LowRank { down, up, scale, rows } => {
                        let r = down.shape[0];
                        let h = inputs;
                        let range = match rows {
                            Rows::All | Rows::SwapHalves => 0..outputs,
                            Rows::Block(i) => i * h..(i + 1) * h,
                            Rows::Qkv => 0..3 * h,
                            Rows::Mlp => 3 * h..outputs,
                        };
                        if down.shape[1] != inputs || up.shape[0] != range.len() || range.end > outputs {
                            bail!(
                                "{}: factors down {:?} / up {:?} do not fit {path} ([{outputs}, {inputs}] in this model): a LoRA for a different model size?",
                                what(key),
                                down.shape,
                                up.shape
                            );
                        }
                        let m = set.weight * scale;
                        let mut full = vec![0f32; outputs * r];
                        for (row, src) in up.data.chunks(r).enumerate() {
                            let mut dst = range.start + row;
                            if *rows == Rows::SwapHalves {
                                dst = (dst + outputs / 2) % outputs;
                            }
                            for (d, s) in full[dst * r..(dst + 1) * r].iter_mut().zip(src) {
                                *d = s * m;
                            }
                        }
                        downs.push(down.data.clone());
                        ups.push((full, r));
                    }
                    Change::Diff(d) => {
                        if d.shape != [outputs, inputs] {
                            bail!(
                                "{}: delta {:?} does not fit {path} ([{outputs}, {inputs}]): a LoRA for a different model size?",
                                what(key),
                                d.shape
                            );
                        }
                        let acc = diff.get_or_insert_with(|| vec![0.0; outputs * inputs]);
                        for (a, v) in acc.iter_mut().zip(&d.data) {
                            *a += set.weight * v;
                        }
                    }
                    Change::DiffBias(b) => {
                        if b.shape != [outputs] {
                            bail!("{}: bias delta {:?} does not fit {path} ([{outputs}])", what(key), b.shape);
                        }
                        let acc = diff_bias.get_or_insert_with(|| vec![0.0; outputs]);
                        for (a, v) in acc.iter_mut().zip(&b.data) {
                            *a += set.weight * v;
                        }
                    }
                }
            }
        }
        // Read off the weight without materializing it (a packed base stays packed).
        let (device, dtype) = (linear.weight.device(), linear.weight.dtype());
        let upload2 = |data: Vec<f32>, shape: [usize; 2]| {
            Param::from_tensor(Tensor::<2>::from_data(TensorData::new(data, shape), &device).cast(dtype))
        };
        if !downs.is_empty() {
            let rank: usize = ups.iter().map(|(_, r)| r).sum();
            // downᵀ: [in, R]; column block j holds LoRA part j's A rows.
            let mut down_t = vec![0f32; inputs * rank];
            let mut up_t = vec![0f32; rank * outputs];
            let mut col = 0;
            for (d, (u, r)) in downs.iter().zip(&ups) {
                for k in 0..*r {
                    for i in 0..inputs {
                        down_t[i * rank + col + k] = d[k * inputs + i];
                    }
                    for o in 0..outputs {
                        up_t[(col + k) * outputs + o] = u[o * r + k];
                    }
                }
                col += r;
            }
            linear.adapters.push(Adapter {
                down: upload2(down_t, [inputs, rank]),
                up: Some(upload2(up_t, [rank, outputs])),
                bias: None,
            });
        }
        if diff.is_some() || diff_bias.is_some() {
            let down = match diff {
                Some(d) => {
                    let mut t = vec![0f32; inputs * outputs];
                    for o in 0..outputs {
                        for i in 0..inputs {
                            t[i * outputs + o] = d[o * inputs + i];
                        }
                    }
                    t
                }
                None => vec![0f32; inputs * outputs],
            };
            let bias = diff_bias.map(|b| {
                Param::from_tensor(Tensor::<1>::from_data(TensorData::new(b, [outputs]), &device).cast(dtype))
            });
            linear.adapters.push(Adapter { down: upload2(down, [inputs, outputs]), up: None, bias });
        }
    }
    Ok(warnings)
}

/// A random LoRA of `rank` on every Linear of `model` (benchmarks): small uniform factors.
pub fn random_for(model: &mut Flux, rank: usize, seed: u64) -> Lora {
    let mut rng = crate::engine::noise::Mt19937::new(seed);
    let mut draw = |n: usize, bound: f32| -> Vec<f32> {
        (0..n).map(|_| (rng.next_u32() as f32 / u32::MAX as f32 * 2.0 - 1.0) * bound).collect()
    };
    let mut changes = BTreeMap::new();
    for (path, linear) in model.linears_mut() {
        let (i, o) = linear.dims();
        let down = HostTensor { shape: vec![rank, i], data: draw(rank * i, 1.0 / (i as f32).sqrt()) };
        let up = HostTensor { shape: vec![o, rank], data: draw(o * rank, 0.01) };
        let change = Change::LowRank { down, up, scale: 1.0, rows: Rows::All };
        changes.insert((Part::Transformer, path.clone()), vec![(path, change)]);
    }
    Lora {
        name: format!("random{seed}"),
        hash: "0".repeat(12),
        format: "random",
        changes,
        unmatched: Vec::new(),
        notes: Vec::new(),
    }
}

/// The A1111/Forge record of the LoRAs: ` <lora:name:w>` tags for the prompt text and the
/// `Lora hashes: "name: hash, …"` field.
pub fn a1111_tags(sets: &[LoraSet]) -> (String, Option<String>) {
    if sets.is_empty() {
        return (String::new(), None);
    }
    let tags: String = sets.iter().map(|s| format!(" <lora:{}:{}>", s.lora.name, s.weight)).collect();
    let hashes: Vec<String> = sets.iter().map(|s| format!("{}: {}", s.lora.name, s.lora.hash)).collect();
    (tags, Some(format!("Lora hashes: \"{}\"", hashes.join(", "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-module kohya file with `sshs_model_hash` = `hash`.
    fn with_sshs_hash(dir: &Path, hash: &str) -> PathBuf {
        use safetensors::tensor::{Dtype, TensorView};
        let bytes = vec![0u8; 4 * 4 * 8];
        let views = [
            ("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight", [4usize, 8usize]),
            ("lora_unet_double_blocks_0_img_attn_proj.lora_up.weight", [8, 4]),
        ]
        .map(|(k, s)| (k.to_string(), TensorView::new(Dtype::F32, s.to_vec(), &bytes).unwrap()));
        let meta = std::collections::HashMap::from([("sshs_model_hash".to_string(), hash.to_string())]);
        let path = dir.join(format!("l{}.safetensors", hash.len()));
        std::fs::write(&path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
        path
    }

    #[test]
    fn sshs_model_hash_is_used_only_when_it_is_hex() {
        let dir = tempfile::tempdir().unwrap();
        let good = with_sshs_hash(dir.path(), "ABCDEF0123456789ffff");
        assert_eq!(Lora::open(&good).unwrap().hash, "abcdef012345");
        // A crafted value (a multi-byte character across byte 12, quotes) is never sliced or
        // copied: the tensor bytes are hashed instead.
        let bad = with_sshs_hash(dir.path(), "abcdef01234\u{e9}\", oops");
        let h = Lora::open(&bad).unwrap().hash;
        assert_eq!(h, tensor_bytes_hash(&bad).unwrap());
        assert!(h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()), "{h}");
    }

    #[test]
    fn names_of_every_format_map_to_bfl_linears_and_rows() {
        let t = |m: &str| resolve(m);
        let flux = |p: &str, r: Rows| Some(Target::Linear(Part::Transformer, p.into(), r));
        assert_eq!(t("lora_unet_double_blocks_3_img_attn_qkv"), flux("double_blocks.3.img_attn.qkv", Rows::All));
        assert_eq!(t("lora_unet_double_blocks_0_txt_mod_lin"), flux("double_blocks.0.txt_mod.lin", Rows::All));
        assert_eq!(t("lora_unet_single_blocks_11_modulation_lin"), flux("single_blocks.11.modulation.lin", Rows::All));
        assert_eq!(t("lora_unet_final_layer_adaLN_modulation_1"), flux("final_layer.adaLN_modulation.1", Rows::All));
        assert_eq!(t("diffusion_model.single_blocks.2.linear1"), flux("single_blocks.2.linear1", Rows::All));
        assert_eq!(t("diffusion_model.img_in"), flux("img_in", Rows::All));
        assert_eq!(
            t("transformer.transformer_blocks.1.attn.to_k"),
            flux("double_blocks.1.img_attn.qkv", Rows::Block(1))
        );
        assert_eq!(
            t("transformer.transformer_blocks.1.attn.add_v_proj"),
            flux("double_blocks.1.txt_attn.qkv", Rows::Block(2))
        );
        assert_eq!(
            t("transformer.single_transformer_blocks.0.attn.to_q"),
            flux("single_blocks.0.linear1", Rows::Block(0))
        );
        assert_eq!(
            t("transformer.single_transformer_blocks.0.attn.to_v"),
            flux("single_blocks.0.linear1", Rows::Block(2))
        );
        assert_eq!(t("transformer.single_transformer_blocks.4.proj_mlp"), flux("single_blocks.4.linear1", Rows::Mlp));
        assert_eq!(t("transformer.single_transformer_blocks.4.proj_out"), flux("single_blocks.4.linear2", Rows::All));
        assert_eq!(t("transformer.proj_out"), flux("final_layer.linear", Rows::All));
        assert_eq!(t("transformer.norm_out.linear"), flux("final_layer.adaLN_modulation.1", Rows::SwapHalves));
        assert_eq!(
            t("transformer.time_text_embed.guidance_embedder.linear_2"),
            flux("guidance_in.out_layer", Rows::All)
        );
        assert_eq!(t("base_model.model.transformer_blocks.0.ff.net.2"), flux("double_blocks.0.img_mlp.2", Rows::All));
        assert_eq!(
            t("lora_transformer_transformer_blocks_0_ff_context_net_0_proj"),
            flux("double_blocks.0.txt_mlp.0", Rows::All)
        );
        assert_eq!(
            t("lora_transformer_single_transformer_blocks_7_attn_to_q"),
            flux("single_blocks.7.linear1", Rows::Block(0))
        );
        assert_eq!(t("double_blocks.2.processor.qkv_lora2"), flux("double_blocks.2.txt_attn.qkv", Rows::All));
        assert_eq!(t("double_blocks.2.processor.proj_lora1"), flux("double_blocks.2.img_attn.proj", Rows::All));
        assert_eq!(t("single_blocks.5.processor.qkv_lora"), flux("single_blocks.5.linear1", Rows::Qkv));
        assert_eq!(t("single_blocks.5.processor.proj_lora"), None);
        assert_eq!(
            t("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
            Some(Target::Linear(Part::Clip, "encoder.layers.0.self_attn.q_proj".into(), Rows::All))
        );
        assert_eq!(
            t("text_encoder.text_model.encoder.layers.1.mlp.fc2"),
            Some(Target::Linear(Part::Clip, "encoder.layers.1.mlp.fc2".into(), Rows::All))
        );
        assert_eq!(t("lora_te3_encoder_block_0_layer_0_SelfAttention_q"), Some(Target::T5));
        // SDXL names map to nothing.
        assert_eq!(t("lora_unet_down_blocks_0_attentions_0_proj_in"), None);
        assert_eq!(t("lora_unet_input_blocks_4_1_proj_in"), None);
    }

    /// ΔWᵀ [in, out] of a Linear's adapters, on the host.
    fn delta(l: &Linear) -> Vec<f32> {
        let (i, o) = l.dims();
        let mut out = vec![0f32; i * o];
        for a in &l.adapters {
            let d = match &a.up {
                Some(up) => a.down.val().matmul(up.val()),
                None => a.down.val(),
            };
            for (x, v) in out.iter_mut().zip(d.into_data().try_to_vec::<f32>().unwrap()) {
                *x += v;
            }
        }
        out
    }

    /// diffusers' q/k/v/proj_mlp land on linear1's four row blocks, add_k_proj on the txt
    /// qkv's k rows, norm_out on the final modulation with its halves swapped; alpha from the
    /// header's `lora_adapter_metadata`; the user's weight multiplies; clearing removes all.
    #[test]
    fn peft_modules_land_on_the_right_rows_of_fused_weights() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peft.safetensors");
        let (h, mlp) = (16, 32);
        let b = "transformer.single_transformer_blocks.0";
        let tensors: Vec<(String, Vec<usize>)> = vec![
            (format!("{b}.attn.to_q.lora_A.weight"), vec![1, h]),
            (format!("{b}.attn.to_q.lora_B.weight"), vec![h, 1]),
            (format!("{b}.attn.to_k.lora_A.weight"), vec![1, h]),
            (format!("{b}.attn.to_k.lora_B.weight"), vec![h, 1]),
            (format!("{b}.attn.to_v.lora_A.weight"), vec![1, h]),
            (format!("{b}.attn.to_v.lora_B.weight"), vec![h, 1]),
            (format!("{b}.proj_mlp.lora_A.weight"), vec![1, h]),
            (format!("{b}.proj_mlp.lora_B.weight"), vec![mlp, 1]),
            ("transformer.norm_out.linear.lora_A.weight".into(), vec![1, h]),
            ("transformer.norm_out.linear.lora_B.weight".into(), vec![2 * h, 1]),
            ("transformer.transformer_blocks.0.attn.add_k_proj.lora_A.weight".into(), vec![1, h]),
            ("transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight".into(), vec![h, 1]),
        ];
        // alpha 2, rank 1: scale 2.
        let meta = [("lora_adapter_metadata", r#"{"transformer.r": 1, "transformer.lora_alpha": 2}"#)];
        crate::engine::weights::write_safetensors_f32(&path, &tensors, &meta, |name, shape| {
            let base = if name.contains("to_q") {
                0.0
            } else if name.contains("to_k") {
                100.0
            } else if name.contains("to_v") {
                200.0
            } else if name.contains("proj_mlp") {
                300.0
            } else {
                0.0
            };
            let n: usize = shape.iter().product();
            if name.contains("lora_A") { vec![1.0; n] } else { (0..n).map(|i| base + i as f32).collect() }
        })
        .unwrap();
        let walk = crate::engine::loader::Walk::random(&burn::tensor::Device::flex(), burn::tensor::DType::F32, 1);
        let mut model = Flux::build(&walk.root(), crate::engine::flux::FluxConfig::tiny()).unwrap();
        let set = LoraSet { lora: Arc::new(Lora::open(&path).unwrap()), weight: 0.5 };
        assert_eq!(set.lora.format, "diffusers/PEFT");
        let warnings = set_loras(&mut model, std::slice::from_ref(&set)).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        // Row o of ΔW is column o of ΔWᵀ; input 0 is row 0 of ΔWᵀ. m·s = 0.5·2 = 1.
        let d = delta(&model.single_blocks[0].linear1);
        let row0: Vec<f32> = d[..3 * h + mlp].to_vec();
        let expected: Vec<f32> = (0..3 * h + mlp)
            .map(|o| match o / h {
                0 => o as f32,
                1 => 100.0 + (o - h) as f32,
                2 => 200.0 + (o - 2 * h) as f32,
                _ => 300.0 + (o - 3 * h) as f32,
            })
            .collect();
        assert_eq!(row0, expected);
        let d = delta(&model.final_layer.ada_ln_modulation);
        let swapped: Vec<f32> = (0..2 * h).map(|o| ((o + h) % (2 * h)) as f32).collect();
        assert_eq!(d[..2 * h].to_vec(), swapped);
        let d = delta(&model.double_blocks[0].txt_attn.qkv);
        let k_rows: Vec<f32> = (0..3 * h).map(|o| if (h..2 * h).contains(&o) { (o - h) as f32 } else { 0.0 }).collect();
        assert_eq!(d[..3 * h].to_vec(), k_rows);
        assert!(model.double_blocks[0].img_attn.qkv.adapters.is_empty());
        assert!(model.single_blocks[1].linear1.adapters.is_empty());
        // Two LoRAs stack into one adapter of summed rank; clearing removes everything.
        set_loras(&mut model, &[set.clone(), set.clone()]).unwrap();
        assert_eq!(model.single_blocks[0].linear1.adapters.len(), 1);
        assert_eq!(delta(&model.single_blocks[0].linear1)[h], 200.0);
        clear_loras(&mut model);
        assert!(model.linears_mut().iter().all(|(_, l)| l.adapters.is_empty()));
    }

    #[test]
    fn lora_choices_parse_file_and_weight() {
        assert_eq!(
            LoraChoice::parse("a.safetensors").unwrap(),
            LoraChoice { path: "a.safetensors".into(), weight: 1.0 }
        );
        assert_eq!(LoraChoice::parse("x/a.safetensors:0.8").unwrap().weight, 0.8);
        assert_eq!(LoraChoice::parse("a.safetensors:-1.5").unwrap().weight, -1.5);
        assert_eq!(LoraChoice::parse("C:dir:x").unwrap().path, PathBuf::from("C:dir:x"));
        assert!(LoraChoice::parse("").is_err());
    }
}
