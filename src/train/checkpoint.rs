//! LoRA training checkpoints: a folder with `state.safetensors` holding the LoRA pairs and both
//! AdamW moments bit for bit (adapter layout, f32), and the step, seed and settings in its
//! metadata. All randomness of a step is drawn from (seed, step) (see `run`), so the step is
//! the whole RNG state and `--resume` continues exactly.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};

use super::adamw::{AdamW, AdamWConfig, LossScale, flat};
use super::params::{LoraPair, TrainableLora, host};
use crate::engine::weights::{WeightSet, write_safetensors_f32};

const FILE: &str = "state.safetensors";

/// What a checkpoint restores.
pub struct Restored {
    pub lora: TrainableLora,
    pub optimizer: AdamW,
    /// Steps done.
    pub step: usize,
    pub seed: u64,
    /// The settings the run was started with (`run::Settings` as JSON), to refuse a resume
    /// with different ones.
    pub settings: String,
}

/// Writes the state after `step` steps into `dir` (created).
pub fn save(dir: &Path, lora: &TrainableLora, opt: &AdamW, step: usize, seed: u64, settings: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut put = |name: String, t: &Tensor<2>| tensors.push((name, t.dims().to_vec(), host(t.clone())));
    for (pair, moments) in lora.pairs.iter().zip(opt.moments.chunks(2)) {
        let p = &pair.path;
        let [[md, vd], [mu, vu]] = moments else { unreachable!("two slots per pair") };
        let (down, up) = (pair.down.dims(), pair.up.dims());
        put(format!("{p}.down"), &pair.down);
        put(format!("{p}.up"), &pair.up);
        put(format!("m.{p}.down"), &md.clone().reshape(down));
        put(format!("v.{p}.down"), &vd.clone().reshape(down));
        put(format!("m.{p}.up"), &mu.clone().reshape(up));
        put(format!("v.{p}.up"), &vu.clone().reshape(up));
    }
    let meta = [
        ("step", step.to_string()),
        ("optimizer_step", opt.step.to_string()),
        (
            "loss_scale",
            serde_json::to_string(&(opt.loss_scale.scale, opt.loss_scale.good_steps, opt.loss_scale.dynamic))?,
        ),
        ("seed", seed.to_string()),
        ("rank", lora.rank.to_string()),
        ("alpha", lora.alpha.to_string()),
        ("adamw", serde_json::to_string(&opt.config)?),
        ("settings", settings.to_string()),
    ];
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let shapes: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    let mut data = tensors.into_iter().map(|(_, _, d)| d);
    // Written beside and renamed, so an interrupted save never leaves a torn checkpoint.
    let tmp = dir.join(format!("{FILE}.partial"));
    write_safetensors_f32(&tmp, &shapes, &meta, |_, _| data.next().expect("one data vector per tensor"))?;
    std::fs::rename(&tmp, dir.join(FILE))?;
    Ok(())
}

/// Refuses to resume from `dir` when the run that wrote it (LoRA, full or VAE training) had
/// other settings than `settings` (JSON), before anything is loaded.
pub fn check_settings(dir: &Path, settings: &str) -> Result<()> {
    let (path, set) = open(dir)?;
    let written =
        set.metadata("settings").ok_or_else(|| anyhow::anyhow!("{}: no settings in the metadata", path.display()))?;
    if written != settings {
        bail!(
            "{} was written by a run with other settings ({}); resume with the same settings",
            dir.display(),
            settings_difference(written, settings)
        );
    }
    Ok(())
}

/// What differs between two runs' settings (JSON objects), field by field: "steps: 1000 there,
/// 2000 here". Falls back to both texts when either is not an object.
fn settings_difference(there: &str, here: &str) -> String {
    use serde_json::Value;
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) =
        (serde_json::from_str::<Value>(there), serde_json::from_str::<Value>(here))
    else {
        return format!("{there} there, {here} here");
    };
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let shown = |v: Option<&Value>| v.map_or("none".to_string(), Value::to_string);
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} there, {} here", shown(a.get(k)), shown(b.get(k))))
        .collect();
    if diffs.is_empty() { "the same fields, in another order".into() } else { diffs.join("; ") }
}

/// Checks from the checkpoint's header alone that its LoRA fits a transformer of `config`
/// (every pair names one of its Linears, with its sizes): resuming on another model is refused
/// before any image is encoded.
pub fn check_fits(dir: &Path, config: &crate::engine::flux::FluxConfig) -> Result<()> {
    let (path, set) = open(dir)?;
    let walk = crate::engine::loader::Walk::plan();
    crate::engine::flux::Flux::build(&walk.root(), config.clone())?;
    let weights: std::collections::HashMap<String, Vec<usize>> =
        walk.entries().into_iter().map(|e| (e.name, e.shape)).collect();
    for key in set.keys().filter(|k| !k.starts_with("m.") && !k.starts_with("v.")) {
        let Some(module) = key.strip_suffix(".down") else { continue };
        let (down, up) = (set.shape(key), set.shape(&format!("{module}.up")));
        let (Some(&[inputs, _]), Some(&[_, outputs])) = (down, up) else {
            bail!("{}: {module} is not a pair of LoRA matrices", path.display());
        };
        match weights.get(&format!("{module}.weight")).map(Vec::as_slice) {
            Some(&[o, i]) if (o, i) == (outputs, inputs) => {}
            Some(shape) => bail!(
                "its LoRA's {module} is [{outputs}, {inputs}] but the model's layer is {shape:?}: it was trained on another model"
            ),
            None => bail!("its LoRA trains {module}, which this model does not have: it was trained on another model"),
        }
    }
    Ok(())
}

/// The checkpoint file of `dir` (its path, for messages), header read.
fn open(dir: &Path) -> Result<(std::path::PathBuf, WeightSet)> {
    let path = dir.join(FILE);
    if !path.exists() {
        bail!("{} is not a training checkpoint (no {FILE})", dir.display());
    }
    let set = WeightSet::open(&path)?;
    Ok((path, set))
}

/// Reads a checkpoint folder written by [`save`].
pub fn load(dir: &Path, device: &Device) -> Result<Restored> {
    let (path, set) = open(dir)?;
    let meta = |k: &str| -> Result<String> {
        set.metadata(k).map(str::to_string).ok_or_else(|| anyhow::anyhow!("{}: no {k} in the metadata", path.display()))
    };
    let num = |k: &str| -> Result<u64> { Ok(meta(k)?.parse()?) };
    let rank = num("rank")? as usize;
    let alpha: f32 = meta("alpha")?.parse()?;
    let config: AdamWConfig = serde_json::from_str(&meta("adamw")?)?;
    let read = |name: &str| -> Result<Tensor<2>> {
        let t = set.read(name)?;
        let [a, b] = t.shape[..] else { bail!("{name}: not a matrix") };
        Ok(Tensor::from_data(TensorData::new(t.data, [a, b]), device))
    };
    let mut paths: Vec<String> = set
        .keys()
        .filter(|k| !k.starts_with("m.") && !k.starts_with("v."))
        .filter_map(|k| k.strip_suffix(".down"))
        .map(String::from)
        .collect();
    paths.sort();
    let mut pairs = Vec::new();
    let mut moments = Vec::new();
    for p in paths {
        pairs.push(LoraPair { down: read(&format!("{p}.down"))?, up: read(&format!("{p}.up"))?, path: p.clone() });
        let slot = |name: String| -> Result<Tensor<1>> { Ok(flat(read(&name)?)) };
        moments.push([slot(format!("m.{p}.down"))?, slot(format!("v.{p}.down"))?]);
        moments.push([slot(format!("m.{p}.up"))?, slot(format!("v.{p}.up"))?]);
    }
    let lora = TrainableLora { rank, alpha, pairs };
    // Checkpoints from before loss scaling have none: off, as those runs were.
    let loss_scale = match set.metadata("loss_scale") {
        Some(json) => {
            let (scale, good_steps, dynamic): (f32, u32, bool) = serde_json::from_str(json)
                .with_context(|| format!("{}: unreadable loss_scale {json}", path.display()))?;
            LossScale { scale, good_steps, dynamic }
        }
        None => LossScale::off(),
    };
    let optimizer = AdamW { config, step: num("optimizer_step")?, moments, loss_scale };
    Ok(Restored { lora, optimizer, step: num("step")? as usize, seed: num("seed")?, settings: meta("settings")? })
}
