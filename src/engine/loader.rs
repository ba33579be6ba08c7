//! One walk over a model's module tree, written once per model, serves every way a model is
//! made: loading a checkpoint, checking a checkpoint's header (no tensor data read), and
//! building a random model (tests, `atelier bench`).
//!
//! Each model's `load(l: &Loader, ..)` asks for its tensors by the checkpoint's own key
//! segments (`l.pp("double_blocks").pp(i).linear("qkv", ..)`, as candle's `VarBuilder::pp`),
//! giving the shape its configuration expects. The [`Walk`] behind the loader checks each
//! shape, records every key the walk read, and so knows afterwards which keys were missing and
//! which keys of the file no module read: there is no second, hand-kept list of names.
//!
//! Checkpoint layouts (ComfyUI prefixes, diffusers' split projections and renamed blocks) are
//! mapped at the source, by a [`TensorSource`] that answers in the model's naming; the walk
//! sees one naming only.
//!
//! # LoRA
//! Every linear layer the walk makes is atelier's [`Linear`] (`layers.rs`: weight stored
//! [in, out], the transpose of PyTorch's [out, in], optional bias, and a list of side-path
//! `Adapter`s, empty after loading). `engine::lora` parses LoRA files into changes keyed by
//! the checkpoint path of each Linear (`double_blocks.0.img_attn.qkv`, what kohya/ComfyUI keys
//! are written against; see `shared/LORA.md`) and sets the adapters through each model's
//! `linears_mut()` (path → Linear): `y = x·W + b + Σ (x·down)·up`, the base never modified.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Result, bail};
use burn::module::{Param, ParamId};
use burn::tensor::{DType, Device, Tensor};

use crate::engine::layers::{self, Conv2d, Embedding, GroupNorm, LayerNorm, Linear};
use crate::engine::noise::Mt19937;
use crate::engine::packed::{PackedHost, Weight};
use crate::engine::weights::{HostTensor, WeightSet, write_safetensors_f32};

/// Where a walk's tensors come from: a checkpoint seen through the model's own names.
pub trait TensorSource {
    /// The shape the tensor `name` (model naming) has here, if the source can produce it.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor `name`, converted to f32.
    fn read(&self, name: &str) -> Result<HostTensor>;
    /// The matrix `name` as the file packs it (GGUF quant blocks, fp8 with its scale), where it
    /// is packed and can stay so; None where it is read as f32 (see `engine::packed`).
    fn packed(&self, _name: &str) -> Result<Option<PackedHost>> {
        Ok(None)
    }
    /// The stored keys `name` is made from (a layout may stack several into one).
    fn stored_keys(&self, name: &str) -> Vec<String>;
    /// Every stored key this source answers for: what a walk must read all of. Keys of other
    /// components of an all-in-one file are not in it.
    fn own_keys(&self) -> Vec<String>;
    /// Said after the list of missing names (e.g. that they are named in another layout's terms).
    fn naming_note(&self) -> String {
        String::new()
    }
}

/// A safetensors set whose keys are the model's names behind a fixed prefix (the text
/// encoders' files: `text_encoders.t5xxl.transformer.` in an all-in-one file, or nothing).
pub struct Prefixed<'a> {
    pub set: &'a WeightSet,
    pub prefix: String,
    /// Keys under the prefix that belong to no module and are not an error (buffers, heads the
    /// model does not use).
    pub ignored: fn(&str) -> bool,
}

impl TensorSource for Prefixed<'_> {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.set.shape(&format!("{}{name}", self.prefix)).map(<[usize]>::to_vec)
    }

    fn read(&self, name: &str) -> Result<HostTensor> {
        self.set.read(&format!("{}{name}", self.prefix))
    }

    fn packed(&self, name: &str) -> Result<Option<PackedHost>> {
        self.set.packed(&format!("{}{name}", self.prefix))
    }

    fn stored_keys(&self, name: &str) -> Vec<String> {
        vec![format!("{}{name}", self.prefix)]
    }

    fn own_keys(&self) -> Vec<String> {
        self.set.keys().filter(|k| k.starts_with(&self.prefix) && !(self.ignored)(k)).map(String::from).collect()
    }
}

/// How a random walk fills a tensor (and how [`write_random`] writes it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// U(−b, b), b = 1/√fan_in.
    Uniform(f32),
    Ones,
    Zeros,
}

/// A parameter a load or random walk made, with the name it was read under: what full
/// training updates and what a trained model is written back as.
#[derive(Debug, Clone)]
pub struct NamedParam {
    pub name: String,
    pub id: ParamId,
    /// The checkpoint's (PyTorch) shape.
    pub shape: Vec<usize>,
    /// Stored transposed in the module (a Linear's weight is [in, out], PyTorch's [out, in]).
    pub transposed: bool,
}

/// One tensor a walk read: its name (model naming), PyTorch shape, and random fill.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// A Linear's weight: what stays packed where its file packs it (embeddings and tables are
    /// read as floats whatever the file holds).
    pub packable: bool,
}

enum Mode<'a> {
    /// Read and upload every tensor; a missing or misshapen one is an error at once.
    Load(&'a dyn TensorSource),
    /// Only compare names and shapes with the source; modules get unmaterialized parameters.
    Check(&'a dyn TensorSource),
    /// Random values, drawn in walk order from one seeded stream.
    Random,
    /// Only record names and shapes (what a random checkpoint file holds).
    Plan,
}

/// The state of one walk: what it reads from, where it puts tensors, what it has read.
pub struct Walk<'a> {
    mode: Mode<'a>,
    device: Device,
    dtype: DType,
    /// Linear weights become bf16 AMX tiles (`engine::cpu::amx`), the rest f32: bf16 asked for
    /// on a CPU with AMX.
    bf16_tiles: bool,
    rng: RefCell<Mt19937>,
    entries: RefCell<Vec<Entry>>,
    params: RefCell<Vec<NamedParam>>,
    missing: RefCell<Vec<String>>,
    misshapen: RefCell<Vec<String>>,
}

impl<'a> Walk<'a> {
    fn new(mode: Mode<'a>, device: Device, dtype: DType, seed: u64) -> Self {
        let bf16_tiles = crate::engine::cpu::bf16_tiles(&device, dtype);
        Walk {
            mode,
            dtype: crate::engine::cpu::activation_dtype(&device, dtype),
            device,
            bf16_tiles,
            rng: RefCell::new(Mt19937::new(seed)),
            entries: RefCell::default(),
            params: RefCell::default(),
            missing: RefCell::default(),
            misshapen: RefCell::default(),
        }
    }

    /// Loads every tensor from `source` onto `device` in `dtype`.
    pub fn load(source: &'a dyn TensorSource, device: &Device, dtype: DType) -> Self {
        Self::new(Mode::Load(source), device.clone(), dtype, 0)
    }

    /// Compares the walk with `source`'s header; [`Walk::finish`] then names every problem.
    pub fn check(source: &'a dyn TensorSource) -> Self {
        Self::new(Mode::Check(source), Device::flex(), DType::F32, 0)
    }

    /// Random values from `seed`: the model [`write_random`] with the same seed writes.
    pub fn random(device: &Device, dtype: DType, seed: u64) -> Self {
        Self::new(Mode::Random, device.clone(), dtype, seed)
    }

    /// Records names and shapes only (see [`Walk::entries`]).
    pub fn plan() -> Self {
        Self::new(Mode::Plan, Device::flex(), DType::F32, 0)
    }

    /// The loader at the root of the model's names.
    pub fn root(&self) -> Loader<'_> {
        Loader { walk: self, path: String::new() }
    }

    /// Every tensor the walk read, in walk order.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.borrow().clone()
    }

    /// Every parameter a load or random walk made, in walk order (packed weights and check or
    /// plan walks' placeholders are not among them).
    pub fn named_params(&self) -> Vec<NamedParam> {
        self.params.borrow().clone()
    }

    fn record(&self, name: String, id: ParamId, shape: Vec<usize>, transposed: bool) {
        self.params.borrow_mut().push(NamedParam { name, id, shape, transposed });
    }

    /// After a check walk: an error naming every missing, misshapen and unknown key, with
    /// `what` ("Bfl transformer checkpoint") and `expected` ("the FLUX layout") in front.
    pub fn finish(&self, what: &str, expected: &str) -> Result<()> {
        let source = match self.mode {
            Mode::Load(s) | Mode::Check(s) => s,
            Mode::Random | Mode::Plan => return Ok(()),
        };
        let read: BTreeSet<String> = self.entries.borrow().iter().flat_map(|e| source.stored_keys(&e.name)).collect();
        let mut unknown: Vec<String> = source.own_keys().into_iter().filter(|k| !read.contains(k)).collect();
        unknown.sort();
        let (missing, misshapen) = (self.missing.borrow(), self.misshapen.borrow());
        if missing.is_empty() && misshapen.is_empty() && unknown.is_empty() {
            return Ok(());
        }
        let mut msg = format!("{what} does not match {expected}:");
        if !missing.is_empty() {
            msg += &format!(" missing {}{};", list(&missing), source.naming_note());
        }
        if !misshapen.is_empty() {
            msg += &format!(" {};", list(&misshapen));
        }
        if !unknown.is_empty() {
            msg += &format!(" unknown keys {};", list(&unknown));
        }
        bail!(msg.trim_end_matches(';').to_string())
    }

    /// The host values of `name`, or None where the walk makes no values (check, plan).
    fn host(&self, name: String, shape: &[usize], init: Init) -> Result<Option<HostTensor>> {
        self.host_as(name, shape, init, false)
    }

    /// [`Walk::host`], recording whether the tensor is a Linear's weight.
    fn host_as(&self, name: String, shape: &[usize], init: Init, packable: bool) -> Result<Option<HostTensor>> {
        let entry = Entry { name, shape: shape.to_vec(), init, packable };
        let out = match self.mode {
            Mode::Load(source) => {
                match source.shape(&entry.name) {
                    None => bail!("checkpoint lacks {}{}", entry.name, source.naming_note()),
                    Some(found) if found != shape => {
                        bail!("{}: expected shape {shape:?}, found {found:?}", entry.name)
                    }
                    Some(_) => {}
                }
                Some(source.read(&entry.name)?)
            }
            Mode::Check(source) => {
                match source.shape(&entry.name) {
                    None => self.missing.borrow_mut().push(entry.name.clone()),
                    Some(found) if found != shape => {
                        self.misshapen.borrow_mut().push(format!("{} has shape {found:?}, not {shape:?}", entry.name))
                    }
                    Some(_) => {}
                }
                None
            }
            Mode::Random => Some(HostTensor { shape: shape.to_vec(), data: fill(&mut self.rng.borrow_mut(), &entry) }),
            Mode::Plan => None,
        };
        self.entries.borrow_mut().push(entry);
        Ok(out)
    }

    /// In a load walk, the matrix `name` still packed, where the source keeps it so (shape
    /// problems are left to [`Walk::host`], which names them).
    fn packed(&self, name: &str, shape: &[usize], init: Init) -> Result<Option<PackedHost>> {
        let Mode::Load(source) = self.mode else { return Ok(None) };
        if source.shape(name).as_deref() != Some(shape) {
            return Ok(None);
        }
        let Some(packed) = source.packed(name)? else { return Ok(None) };
        self.entries.borrow_mut().push(Entry { name: name.to_string(), shape: shape.to_vec(), init, packable: true });
        Ok(Some(packed))
    }

    fn param<const D: usize>(&self, name: String, shape: [usize; D], init: Init) -> Result<Param<Tensor<D>>> {
        Ok(match self.host(name.clone(), &shape, init)? {
            Some(t) => {
                let p = Param::from_tensor(layers::upload(t, &name, &self.device, self.dtype)?);
                self.record(name, p.id, shape.to_vec(), false);
                p
            }
            None => placeholder(shape, &self.device),
        })
    }

    fn has(&self, name: &str) -> bool {
        match self.mode {
            Mode::Load(s) | Mode::Check(s) => s.shape(name).is_some(),
            Mode::Random | Mode::Plan => true,
        }
    }
}

/// A parameter with a shape but no values, never materialized unless touched (check walks).
fn placeholder<const D: usize>(shape: [usize; D], device: &Device) -> Param<Tensor<D>> {
    Param::uninitialized(
        ParamId::new(),
        move |device, _| Tensor::zeros(shape, device),
        device.clone(),
        false,
        shape.into(),
    )
}

fn fill(rng: &mut Mt19937, entry: &Entry) -> Vec<f32> {
    let n = entry.shape.iter().product();
    match entry.init {
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
        Init::Uniform(bound) => (0..n).map(|_| (rng.next_u32() as f32 / u32::MAX as f32 * 2.0 - 1.0) * bound).collect(),
    }
}

/// Writes the checkpoint a random walk with `seed` makes: `entries` from a [`Walk::plan`] of
/// the same model, values drawn in the same order.
pub fn write_random(path: &Path, entries: &[Entry], metadata: &[(&str, &str)], seed: u64) -> Result<()> {
    let mut rng = Mt19937::new(seed);
    let tensors: Vec<(String, Vec<usize>)> = entries.iter().map(|e| (e.name.clone(), e.shape.clone())).collect();
    let mut next = entries.iter();
    write_safetensors_f32(path, &tensors, metadata, |name, _| {
        let entry = next.next().filter(|e| e.name == name).expect("tensors are written in entry order");
        fill(&mut rng, entry)
    })
}

fn list(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(12).map(String::as_str).collect();
    if items.len() > shown.len() {
        format!("{} (and {} more)", shown.join(", "), items.len() - shown.len())
    } else {
        shown.join(", ")
    }
}

/// A position in the model's names; `pp` goes one segment deeper.
#[derive(Clone)]
pub struct Loader<'a> {
    walk: &'a Walk<'a>,
    path: String,
}

impl<'a> Loader<'a> {
    /// The loader under `segment` (`pp` as in candle: "push prefix").
    pub fn pp(&self, segment: impl std::fmt::Display) -> Loader<'a> {
        Loader { walk: self.walk, path: self.key(&segment.to_string()) }
    }

    /// The full name of `name` here.
    pub fn key(&self, name: &str) -> String {
        if self.path.is_empty() { name.to_string() } else { format!("{}.{name}", self.path) }
    }

    /// Whether the source has the tensor `name` here (a random walk has everything).
    pub fn has(&self, name: &str) -> bool {
        self.walk.has(&self.key(name))
    }

    /// A tensor parameter of exactly `shape`.
    pub fn param<const D: usize>(&self, name: &str, shape: [usize; D], init: Init) -> Result<Param<Tensor<D>>> {
        self.walk.param(self.key(name), shape, init)
    }

    /// The tensor `name` on the host, in f32, whatever the compute dtype (small tables the
    /// forward reads on the host). None in a check walk.
    pub fn host(&self, name: &str, shape: &[usize], init: Init) -> Result<Option<HostTensor>> {
        self.walk.host(self.key(name), shape, init)
    }

    /// `name.weight` [out, in] (PyTorch's layout) and, with `bias`, `name.bias` [out], as
    /// burn's [`Linear`] (its weight stored transposed, [in, out]).
    pub fn linear(&self, name: &str, inputs: usize, outputs: usize, bias: bool) -> Result<Linear> {
        let l = self.pp(name);
        let w = l.walk;
        let bound = Init::Uniform(1.0 / (inputs as f32).sqrt());
        if let Some(packed) = w.packed(&l.key("weight"), &[outputs, inputs], bound)? {
            let bias = if bias { w.host(l.key("bias"), &[outputs], bound)? } else { None };
            return layers::packed_linear(packed, bias, &l.path, &w.device, w.dtype);
        }
        let weight = w.host_as(l.key("weight"), &[outputs, inputs], bound, true)?;
        let bias = if bias { Some(w.host(l.key("bias"), &[outputs], bound)?) } else { None };
        if let Some(rows) = weight.as_ref().filter(|_| w.bf16_tiles)
            && let Some(tiles) = PackedHost::bf16_tiles(&rows.data, outputs, inputs)
        {
            return layers::packed_linear(tiles, bias.flatten(), &l.path, &w.device, w.dtype);
        }
        match weight {
            Some(weight) => {
                let linear = layers::linear(weight, bias.flatten(), &l.path, &w.device, w.dtype)?;
                if let Weight::Dense(p) = &linear.weight {
                    w.record(l.key("weight"), p.id, vec![outputs, inputs], true);
                }
                if let Some(b) = &linear.bias {
                    w.record(l.key("bias"), b.id, vec![outputs], false);
                }
                Ok(linear)
            }
            None => Ok(Linear {
                weight: Weight::Dense(placeholder([inputs, outputs], &w.device)),
                bias: bias.map(|_| placeholder([outputs], &w.device)),
                adapters: Vec::new(),
            }),
        }
    }

    /// A 2-D convolution `name.{weight,bias}` of a k×k kernel.
    pub fn conv2d(
        &self,
        name: &str,
        inputs: usize,
        outputs: usize,
        kernel: usize,
        stride: usize,
        padding: (usize, usize),
    ) -> Result<Conv2d> {
        let l = self.pp(name);
        let bound = Init::Uniform(1.0 / ((inputs * kernel * kernel) as f32).sqrt());
        Ok(Conv2d {
            weight: l.param("weight", [outputs, inputs, kernel, kernel], bound)?,
            bias: l.param("bias", [outputs], bound)?,
            stride,
            pad_before: padding.0,
            pad_after: padding.1,
            bf16_tiles: l.walk.bf16_tiles,
        })
    }

    /// GroupNorm `name.{weight,bias}` over `channels`.
    pub fn group_norm(&self, name: &str, channels: usize, groups: usize) -> Result<GroupNorm> {
        let l = self.pp(name);
        Ok(GroupNorm {
            weight: l.param("weight", [channels], Init::Ones)?,
            bias: l.param("bias", [channels], Init::Zeros)?,
            groups,
        })
    }

    /// LayerNorm `name.{weight,bias}` over `channels`.
    pub fn layer_norm(&self, name: &str, channels: usize, eps: f64) -> Result<LayerNorm> {
        let l = self.pp(name);
        Ok(LayerNorm {
            weight: l.param("weight", [channels], Init::Ones)?,
            bias: l.param("bias", [channels], Init::Zeros)?,
            eps,
        })
    }

    /// An embedding table `name.weight` [count, dim].
    pub fn embedding(&self, name: &str, count: usize, dim: usize) -> Result<Embedding> {
        Ok(Embedding { weight: self.pp(name).param("weight", [count, dim], Init::Uniform(1.0))? })
    }
}

/// Runs a walk's model builder as a check of `source` against what it reads.
pub fn check<T>(
    source: &dyn TensorSource,
    what: &str,
    expected: &str,
    build: impl FnOnce(&Loader) -> Result<T>,
) -> Result<()> {
    let walk = Walk::check(source);
    build(&walk.root())?;
    walk.finish(what, expected)
}

/// Opens a checkpoint whose keys sit under a prefix (a standalone text encoder, or its part of
/// an all-in-one file) and checks it against the walk: the file, the prefix and the
/// configuration `infer` read off its header.
pub fn open_prefixed<C: Clone, M>(
    path: &Path,
    (what, expected): (&str, &str),
    ignored: fn(&str) -> bool,
    infer: impl FnOnce(&WeightSet) -> Result<(String, C)>,
    build: impl FnOnce(&Loader, C) -> Result<M>,
) -> Result<(WeightSet, String, C)> {
    check_prefixed(WeightSet::open(path)?, (what, expected), ignored, infer, build)
}

/// [`open_prefixed`] on a set already open (e.g. [`WeightSet::renamed`] into the model's names).
pub fn check_prefixed<C: Clone, M>(
    set: WeightSet,
    (what, expected): (&str, &str),
    ignored: fn(&str) -> bool,
    infer: impl FnOnce(&WeightSet) -> Result<(String, C)>,
    build: impl FnOnce(&Loader, C) -> Result<M>,
) -> Result<(WeightSet, String, C)> {
    let (prefix, config) = infer(&set)?;
    let source = Prefixed { set: &set, prefix: prefix.clone(), ignored };
    check(&source, what, expected, |l| build(l, config.clone()))?;
    Ok((set, prefix, config))
}

/// Checks `source` against the walk, then loads it (so a broken file fails before any data is
/// read, naming every problem at once).
pub fn load<T>(
    source: &dyn TensorSource,
    device: &Device,
    dtype: DType,
    labels: (&str, &str),
    build: impl Fn(&Loader) -> Result<T>,
) -> Result<T> {
    Ok(load_named(source, device, dtype, labels, build)?.0)
}

/// [`load`], with the parameters it made and their checkpoint names, and the number of
/// tensors it read (more than the parameters where some stay packed).
pub fn load_named<T>(
    source: &dyn TensorSource,
    device: &Device,
    dtype: DType,
    (what, expected): (&str, &str),
    build: impl Fn(&Loader) -> Result<T>,
) -> Result<(T, Vec<NamedParam>, usize)> {
    check(source, what, expected, &build)?;
    let walk = Walk::load(source, device, dtype);
    let model = build(&walk.root())?;
    Ok((model, walk.named_params(), walk.entries.borrow().len()))
}

impl std::fmt::Debug for Loader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Loader({:?})", self.path)
    }
}

#[cfg(test)]
mod tests;
