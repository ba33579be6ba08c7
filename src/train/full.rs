//! Full training: every parameter of a model is trained (the FLUX transformer with
//! `atelier train --full`, the VAE with `atelier train-vae`). The parameters are the ones the
//! model's loader walk made, known by the checkpoint names they were read under
//! ([`NamedParam`]), so checkpoints and the exported model use the names other tools load.
//!
//! A step: the model is copied with every parameter an autodiff leaf ([`tracked`]), the loss
//! is backpropagated, each parameter's gradient is read by its id ([`FullParams::grads`]),
//! and AdamW's new values are put back into the plain model ([`FullParams::set`]).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Gradients, Tensor, TensorData};

use super::adamw::{AdamW, AdamWConfig, LossScale, StepOutcome, flat};
use super::params::host;
use crate::engine::layers::transpose;
use crate::engine::loader::NamedParam;
use crate::engine::weights::{StoreDtype, WeightSet, write_safetensors, write_safetensors_f32};

/// Every trained parameter of a model, in walk order (the order of the optimizer's slots).
#[derive(Debug, Clone)]
pub struct FullParams {
    pub params: Vec<NamedParam>,
}

impl FullParams {
    /// The parameters a load or random walk reported. A model with packed (GGUF / fp8) weights
    /// has matrices outside this list; full training needs a dense checkpoint.
    pub fn new(params: Vec<NamedParam>, expected: usize) -> Result<Self> {
        if params.len() != expected {
            bail!(
                "the checkpoint keeps some weights packed (GGUF or fp8; {} of its {expected} tensors are not \
                 plain parameters): full training needs a dense (f32/f16/bf16) checkpoint",
                expected - params.len()
            );
        }
        Ok(FullParams { params })
    }

    /// Number of trained values.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.shape.iter().product::<usize>()).sum()
    }

    fn index(&self) -> HashMap<ParamId, usize> {
        self.params.iter().enumerate().map(|(i, p)| (p.id, i)).collect()
    }

    /// The current values, flattened (the optimizer's slots).
    pub fn values<M: Module>(&self, model: &M) -> Vec<Tensor<1>> {
        let mut v = Collect { index: self.index(), grads: None, out: vec![None; self.params.len()] };
        model.visit(&mut v);
        v.out
            .into_iter()
            .zip(&self.params)
            .map(|(t, p)| t.unwrap_or_else(|| panic!("{} is not a parameter of this model", p.name)))
            .collect()
    }

    /// The model with `values` (flattened, as [`FullParams::values`]) as its parameters.
    pub fn set<M: Module>(&self, model: M, values: Vec<Tensor<1>>) -> M {
        let by_id = self.params.iter().map(|p| p.id).zip(values).collect();
        model.map(&mut Replace { by_id })
    }

    /// The gradient of every parameter of `tracked` (a [`tracked`] copy of the model) in
    /// `grads`, flattened. A parameter the loss does not reach is an error: it would never train.
    pub fn grads<M: Module>(&self, tracked: &M, grads: &Gradients) -> Result<Vec<Tensor<1>>> {
        let mut v = Collect { index: self.index(), grads: Some(grads), out: vec![None; self.params.len()] };
        tracked.visit(&mut v);
        let missing: Vec<&str> =
            v.out.iter().zip(&self.params).filter(|(g, _)| g.is_none()).map(|(_, p)| p.name.as_str()).collect();
        if !missing.is_empty() {
            bail!("the loss does not depend on {}: those weights would never train", missing.join(", "));
        }
        Ok(v.out.into_iter().flatten().collect())
    }

    /// One training step of `model`: `loss` computed on an autodiff copy whose every parameter is
    /// a leaf, backpropagated, and (when finite) one AdamW update written back into `model`.
    /// Returns the loss and what the update did.
    pub fn step<M: Module>(
        &self,
        model: &mut M,
        opt: &mut AdamW,
        loss: impl FnOnce(&M) -> Result<Tensor<1>>,
    ) -> Result<(f32, StepOutcome)> {
        let leaves = tracked(&*model);
        let loss = loss(&leaves)?;
        let grads = loss.backward();
        let loss = host(loss)[0];
        if !loss.is_finite() {
            return Ok((loss, StepOutcome::SkippedNonFinite));
        }
        let grads = self.grads(&leaves, &grads)?;
        drop(leaves);
        let mut values = self.values(&*model);
        let outcome = opt.update(&mut values, grads);
        if outcome != StepOutcome::SkippedNonFinite {
            *model = self.set(model.clone(), values);
        }
        Ok((loss, outcome))
    }

    /// Writes the model in its checkpoint layout (PyTorch shapes, the walk's names) to `path`.
    /// f16 refuses values it cannot hold rather than write infinities.
    pub fn export<M: Module>(
        &self,
        model: &M,
        path: &Path,
        dtype: StoreDtype,
        metadata: &[(&str, &str)],
    ) -> Result<()> {
        self.export_as(model, path, dtype, metadata, |p| Some((p.name.clone(), p.shape.clone())))
    }

    /// [`FullParams::export`] under another layout's names: `key` gives each parameter's stored
    /// name and shape (the same number of values, row-major).
    pub fn export_as<M: Module>(
        &self,
        model: &M,
        path: &Path,
        dtype: StoreDtype,
        metadata: &[(&str, &str)],
        key: impl Fn(&NamedParam) -> Option<(String, Vec<usize>)>,
    ) -> Result<()> {
        let mut shapes = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let (name, shape) = key(p).with_context(|| format!("{} has no name in the layout written", p.name))?;
            if shape.iter().product::<usize>() != p.shape.iter().product::<usize>() {
                bail!("{}: stored shape {shape:?} does not hold {:?}", p.name, p.shape);
            }
            shapes.push((name, shape));
        }
        let values = self.values(model);
        let mut tensors = Vec::with_capacity(values.len());
        for (p, v) in self.params.iter().zip(values) {
            let v = host(v);
            if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                bail!("{} holds {bad}: the weights are broken, nothing was written", p.name);
            }
            if dtype == StoreDtype::F16
                && let Some(bad) = v.iter().find(|x| x.abs() > f32::from(half::f16::MAX))
            {
                bail!("{} holds {bad}, beyond f16's range: export it as bf16 or f32", p.name);
            }
            // The module holds [in, out]; the file [out, in].
            let v = if p.transposed { transpose(&v, p.shape[1], p.shape[0]) } else { v };
            tensors.push(v);
        }
        let mut data = tensors.into_iter();
        // (Written beside and renamed by the writer: an interrupted export leaves no torn file.)
        write_safetensors(path, &shapes, metadata, dtype, |_, _| data.next().expect("one tensor per name"))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Saves parameters and AdamW state after `step` steps into `dir/state.safetensors`, with
    /// the run's seed and settings (what a resume must match) in its metadata.
    pub fn save_checkpoint<M: Module>(
        &self,
        dir: &Path,
        model: &M,
        opt: &AdamW,
        (step, seed, settings): (usize, u64, &str),
    ) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let values = self.values(model);
        let mut shapes = Vec::new();
        let mut data = Vec::new();
        for ((p, v), [m, s]) in self.params.iter().zip(values).zip(&opt.moments) {
            for (prefix, t) in [("", v), ("m.", m.clone()), ("v.", s.clone())] {
                let t = host(t);
                shapes.push((format!("{prefix}{}", p.name), vec![t.len()]));
                data.push(t);
            }
        }
        // Which flat vectors hold a matrix transposed ([in, out]), so tools outside atelier can
        // rebuild the checkpoint layout (scripts/demo/eval_checkpoint.py).
        let transposed: Vec<&str> = self.params.iter().filter(|p| p.transposed).map(|p| p.name.as_str()).collect();
        let meta = [
            ("step", step.to_string()),
            ("seed", seed.to_string()),
            ("settings", settings.to_string()),
            ("optimizer_step", opt.step.to_string()),
            ("adamw", serde_json::to_string(&opt.config)?),
            ("transposed", serde_json::to_string(&transposed)?),
        ];
        let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let tmp = dir.join(format!("{STATE}.partial"));
        let mut data = data.into_iter();
        write_safetensors_f32(&tmp, &shapes, &meta, |_, _| data.next().expect("one vector per tensor"))?;
        std::fs::rename(&tmp, dir.join(STATE))?;
        Ok(())
    }

    /// Restores what [`FullParams::save_checkpoint`] wrote: the model with the saved values, the
    /// optimizer, and the steps done.
    pub fn load_checkpoint<M: Module>(&self, dir: &Path, model: M, device: &Device) -> Result<(M, AdamW, usize)> {
        let path = dir.join(STATE);
        if !path.exists() {
            bail!("{} is not a training checkpoint (no {STATE})", dir.display());
        }
        let set = WeightSet::open(&path)?;
        let read = |name: String, p: &NamedParam| -> Result<Tensor<1>> {
            let t = set.read(&name).with_context(|| format!("{}: not a checkpoint of this model", path.display()))?;
            if t.data.len() != p.shape.iter().product::<usize>() {
                bail!("{}: {name} has {} values, the model {:?}", path.display(), t.data.len(), p.shape);
            }
            let n = t.data.len();
            Ok(Tensor::from_data(TensorData::new(t.data, [n]), device))
        };
        let mut values = Vec::new();
        let mut moments = Vec::new();
        for p in &self.params {
            values.push(read(p.name.clone(), p)?);
            moments.push([read(format!("m.{}", p.name), p)?, read(format!("v.{}", p.name), p)?]);
        }
        let meta = |k: &str| -> Result<&str> {
            set.metadata(k).ok_or_else(|| anyhow::anyhow!("{}: no {k} in the metadata", path.display()))
        };
        let number = |k: &str| -> Result<u64> {
            meta(k)?.parse().with_context(|| format!("{}: {k} is not a number", path.display()))
        };
        let config: AdamWConfig = serde_json::from_str(meta("adamw")?)?;
        let optimizer = AdamW { config, step: number("optimizer_step")?, moments, loss_scale: LossScale::off() };
        Ok((self.set(model, values), optimizer, number("step")? as usize))
    }
}

const STATE: &str = "state.safetensors";

/// A copy of `model` whose every float parameter is an autodiff leaf.
pub fn tracked<M: Module>(model: &M) -> M {
    model.clone().map(&mut Track)
}

struct Track;

impl ModuleMapper for Track {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| t.autodiff().require_grad())
    }
}

struct Replace {
    by_id: HashMap<ParamId, Tensor<1>>,
}

impl ModuleMapper for Replace {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        match self.by_id.remove(&param.id) {
            Some(v) => param.map(|t| v.reshape(t.dims())),
            None => param,
        }
    }
}

struct Collect<'a> {
    index: HashMap<ParamId, usize>,
    grads: Option<&'a Gradients>,
    out: Vec<Option<Tensor<1>>>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(&i) = self.index.get(&param.id) else { return };
        self.out[i] = match self.grads {
            Some(g) => param.val().grad(g).map(flat),
            None => Some(flat(param.val())),
        };
    }
}
