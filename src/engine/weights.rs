//! Reading safetensors checkpoints without a second copy in memory.
//!
//! Files are memory-mapped; each tensor is converted (BF16/F16/F32/F64 → f32) straight out of
//! the mapping when a model asks for it, and the pages it came from are then handed back to the
//! kernel, so loading a multi-GB file peaks near the size of the loaded model, not twice it.
//! Shards of a diffusers folder are opened together and look like one file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};

use crate::engine::fp8;
use crate::engine::gguf::{self, GgufFile};

pub use crate::engine::host_tensor::HostTensor;
use crate::engine::packed::{PackedHost, Packing};

/// One memory-mapped `.safetensors` file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
    /// Scaled-fp8 side tensors (`scaled_fp8`, `*.scale_weight`, `*.weight_scale`, input
    /// scales): not model tensors, so hidden from `tensors`; weights are multiplied by theirs.
    aux: HashMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

/// Per-layer scales of ComfyUI's scaled fp8 (older and newer spelling): w = fp8 · scale.
const WEIGHT_SCALES: [&str; 2] = [".scale_weight", ".weight_scale"];
/// Activation scales for fp8 matmuls; meaningless once weights are dequantized.
const INPUT_SCALES: [&str; 2] = [".scale_input", ".input_scale"];

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the mapping is read-only; a file truncated underneath us by another process
        // is outside what we can defend against, as for every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            anyhow!(
                "{} is not a valid safetensors file ({}); is it truncated or a different format?",
                path.display(),
                describe_safetensors_error(&e)
            )
        })?;
        let mut tensors: HashMap<String, TensorInfo> =
            meta.tensors().into_iter().map(|(k, v)| (k, v.clone())).collect();
        let side: Vec<String> = tensors
            .keys()
            .filter(|k| {
                // The marker sits under the component's prefix in all-in-one files.
                *k == "scaled_fp8"
                    || k.ends_with(".scaled_fp8")
                    || WEIGHT_SCALES
                        .iter()
                        .chain(&INPUT_SCALES)
                        .any(|s| k.strip_suffix(s).is_some_and(|stem| tensors.contains_key(&format!("{stem}.weight"))))
            })
            .cloned()
            .collect();
        let aux = side.into_iter().map(|k| (k.clone(), tensors.remove(&k).unwrap())).collect();
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, data_start: 8 + header_len, tensors, aux, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    fn read(&self, name: &str) -> Result<HostTensor> {
        let info = self.tensors.get(name).ok_or_else(|| anyhow!("tensor {name} not in {}", self.path.display()))?;
        let (start, end) = info.data_offsets;
        let bytes = &self.mmap[self.data_start + start..self.data_start + end];
        let mut data =
            decode_floats(bytes, info.dtype).with_context(|| format!("tensor {name} in {}", self.path.display()))?;
        if let Some(stem) = name.strip_suffix(".weight")
            && let Some((scale_name, scale)) =
                WEIGHT_SCALES.iter().find_map(|s| self.aux.get_key_value(&format!("{stem}{s}")))
        {
            let (s0, s1) = scale.data_offsets;
            let scale = decode_floats(&self.mmap[self.data_start + s0..self.data_start + s1], scale.dtype)
                .with_context(|| format!("tensor {scale_name} in {}", self.path.display()))?;
            apply_scale(&mut data, &info.shape, &scale)
                .with_context(|| format!("{scale_name} in {}", self.path.display()))?;
        }
        // The tensor now lives in `data`; drop the file pages it came from so the mapping does
        // not double the resident size. They are re-read from disk if ever touched again.
        // SAFETY: the mapping is private and read-only, so discarding pages loses nothing.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, self.data_start + start, end - start);
        }
        Ok(HostTensor { shape: info.shape.clone(), data })
    }
}

impl SafetensorsFile {
    /// An fp8 matrix as stored, with its ComfyUI scale (one value or one per row), or None
    /// for tensors of other dtypes and shapes.
    fn packed(&self, name: &str) -> Result<Option<PackedHost>> {
        let info = self.tensors.get(name).ok_or_else(|| anyhow!("tensor {name} not in {}", self.path.display()))?;
        let packing = match info.dtype {
            Dtype::F8_E4M3 => Packing::F8E4M3,
            Dtype::F8_E5M2 => Packing::F8E5M2,
            _ => return Ok(None),
        };
        if info.shape.len() != 2 {
            return Ok(None);
        }
        let (start, end) = info.data_offsets;
        let bytes = self.mmap[self.data_start + start..self.data_start + end].to_vec();
        let mut scale = Vec::new();
        if let Some(stem) = name.strip_suffix(".weight")
            && let Some((scale_name, s)) =
                WEIGHT_SCALES.iter().find_map(|suffix| self.aux.get_key_value(&format!("{stem}{suffix}")))
        {
            let (s0, s1) = s.data_offsets;
            scale = decode_floats(&self.mmap[self.data_start + s0..self.data_start + s1], s.dtype)
                .with_context(|| format!("tensor {scale_name} in {}", self.path.display()))?;
        }
        // SAFETY: as in `read`: a private read-only mapping loses nothing by dropping pages.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, self.data_start + start, end - start);
        }
        PackedHost::new(packing, &info.shape, bytes, scale)
            .map(Some)
            .with_context(|| format!("tensor {name} in {}", self.path.display()))
    }
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::MetadataIncompleteBuffer => "the data section is shorter or longer than its header says".into(),
        E::HeaderTooSmall | E::InvalidHeaderLength => "the header is cut short".into(),
        other => other.to_string(),
    }
}

/// w · scale for a scaled-fp8 weight: one scale for the tensor, or one per output row.
fn apply_scale(data: &mut [f32], shape: &[usize], scale: &[f32]) -> Result<()> {
    match scale.len() {
        1 => data.iter_mut().for_each(|w| *w *= scale[0]),
        n if shape.first() == Some(&n) && n > 0 => {
            let row = data.len() / n;
            for (chunk, s) in data.chunks_mut(row).zip(scale) {
                chunk.iter_mut().for_each(|w| *w *= s);
            }
        }
        n => bail!("{n} scale values for a weight of shape {shape:?} (expected 1 or one per row)"),
    }
    Ok(())
}

fn decode_floats(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    // Little-endian per the safetensors spec; the mapping is not necessarily aligned.
    Ok(match dtype {
        Dtype::F8_E4M3 => bytes.iter().map(|&b| fp8::e4m3fn(b)).collect(),
        Dtype::F8_E5M2 => bytes.iter().map(|&b| fp8::e5m2(b)).collect(),
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        other => bail!("dtype {other:?} is not supported (expected F32, F16, BF16, F64, F8_E4M3 or F8_E5M2)"),
    })
}

/// One file of a [`WeightSet`]: safetensors, or GGUF (dequantized as it is read).
enum WeightFile {
    Safetensors(SafetensorsFile),
    Gguf(GgufFile),
}

impl WeightFile {
    fn open(path: &Path) -> Result<Self> {
        Ok(if gguf::is_gguf(path) {
            Self::Gguf(GgufFile::open(path)?)
        } else {
            Self::Safetensors(SafetensorsFile::open(path)?)
        })
    }

    fn path(&self) -> &Path {
        match self {
            Self::Safetensors(f) => f.path(),
            Self::Gguf(f) => f.path(),
        }
    }

    fn names(&self) -> Vec<&String> {
        match self {
            Self::Safetensors(f) => f.tensors.keys().collect(),
            Self::Gguf(f) => f.tensors().keys().collect(),
        }
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        match self {
            Self::Safetensors(f) => f.tensors.get(name).map(|t| t.shape.as_slice()),
            Self::Gguf(f) => f.tensors().get(name).map(|t| t.shape.as_slice()),
        }
    }

    fn read(&self, name: &str) -> Result<HostTensor> {
        match self {
            Self::Safetensors(f) => f.read(name),
            Self::Gguf(f) => f.read(name),
        }
    }

    fn packed(&self, name: &str) -> Result<Option<PackedHost>> {
        match self {
            Self::Safetensors(f) => f.packed(name),
            Self::Gguf(f) => match f.quantized(name)? {
                Some((ty, shape, bytes)) => PackedHost::new(Packing::Gguf(ty), &shape, bytes, Vec::new())
                    .map(Some)
                    .with_context(|| format!("tensor {name} in {}", f.path().display())),
                None => Ok(None),
            },
        }
    }

    /// What [`WeightFile::packed`] would return, in bytes, from the header alone.
    fn packed_len(&self, name: &str) -> Option<u64> {
        match self {
            Self::Safetensors(f) => {
                let info = f.tensors.get(name)?;
                let fp8 = matches!(info.dtype, Dtype::F8_E4M3 | Dtype::F8_E5M2) && info.shape.len() == 2;
                fp8.then_some((info.data_offsets.1 - info.data_offsets.0) as u64)
            }
            Self::Gguf(f) => f.quantized_len(name),
        }
    }

    fn metadata(&self, key: &str) -> Option<&str> {
        match self {
            Self::Safetensors(f) => f.metadata.get(key).map(|s| s.as_str()),
            Self::Gguf(f) => f.metadata().get(key).and_then(gguf::Value::as_str),
        }
    }

    fn len(&self) -> u64 {
        match self {
            Self::Safetensors(f) => f.mmap.len() as u64,
            Self::Gguf(f) => f.len(),
        }
    }
}

/// All tensors of a checkpoint, possibly spread over several files.
pub struct WeightSet {
    files: Vec<WeightFile>,
    /// Key (the set's naming) → file.
    index: BTreeMap<String, usize>,
    /// Key → the file's own name for it, where [`WeightSet::renamed`] changed it.
    stored: BTreeMap<String, String>,
}

impl WeightSet {
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        if paths.is_empty() {
            bail!("no weight files given");
        }
        let mut files: Vec<WeightFile> = Vec::new();
        let mut index = BTreeMap::new();
        for path in paths {
            let file = WeightFile::open(path)?;
            for name in file.names() {
                if let Some(prev) = index.insert(name.clone(), files.len()) {
                    bail!("tensor {name} appears in both {} and {}", files[prev].path().display(), path.display());
                }
            }
            files.push(file);
        }
        Ok(WeightSet { files, index, stored: BTreeMap::new() })
    }

    /// The same tensors under other keys: `rename` gives a file key's new name, or None to keep
    /// it (e.g. llama.cpp's T5 names seen as transformers' ones, `engine::gguf::t5_names`).
    pub fn renamed(self, rename: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let WeightSet { files, index, stored } = self;
        let (mut new_index, mut new_stored) = (BTreeMap::new(), BTreeMap::new());
        for (key, file) in index {
            let own = stored.get(&key).cloned().unwrap_or_else(|| key.clone());
            let name = rename(&key).unwrap_or(key);
            if new_index.insert(name.clone(), file).is_some() {
                bail!("two tensors of {} are both named {name}", files[file].path().display());
            }
            if name != own {
                new_stored.insert(name, own);
            }
        }
        Ok(WeightSet { files, index: new_index, stored: new_stored })
    }

    /// The file and the file's own name of the tensor `name`.
    fn locate(&self, name: &str) -> Option<(&WeightFile, String)> {
        let file = &self.files[*self.index.get(name)?];
        Some((file, self.stored.get(name).cloned().unwrap_or_else(|| name.to_string())))
    }

    /// A single `.safetensors` or `.gguf` file, or a diffusers component folder (sharded or not).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::open_files(&diffusers_weight_files(path)?)
        } else if path.exists() {
            Self::open_files(&[path.to_path_buf()])
        } else {
            bail!("{} does not exist", path.display())
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|k| k.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let (file, own) = self.locate(name)?;
        file.shape(&own)
    }

    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let (file, own) = self.locate(name).ok_or_else(|| anyhow!("missing tensor {name}"))?;
        file.read(&own)
    }

    /// The matrix `name` as its file packs it (GGUF quant blocks, fp8), or None where it is
    /// stored as plain floats (read it with [`WeightSet::read`]).
    pub fn packed(&self, name: &str) -> Result<Option<PackedHost>> {
        let (file, own) = self.locate(name).ok_or_else(|| anyhow!("missing tensor {name}"))?;
        file.packed(&own)
    }

    /// The bytes [`WeightSet::packed`] would return for `name` (None where it reads as floats),
    /// from the header alone: what the memory plan counts for a packed weight.
    pub fn packed_len(&self, name: &str) -> Option<u64> {
        let (file, own) = self.locate(name)?;
        file.packed_len(&own)
    }

    /// `__metadata__` entries of all files (string metadata of GGUF files).
    pub fn metadata(&self, key: &str) -> Option<&str> {
        self.files.iter().find_map(|f| f.metadata(key))
    }

    /// The GGUF files of the set (none for safetensors checkpoints).
    pub fn gguf_files(&self) -> impl Iterator<Item = &GgufFile> {
        self.files.iter().filter_map(|f| if let WeightFile::Gguf(g) = f { Some(g) } else { None })
    }

    /// An error naming the file when a GGUF file of the set is of another architecture than
    /// `expected` (`general.architecture`), e.g. a llama model given as a FLUX transformer.
    pub fn expect_gguf_architecture(&self, expected: &str, what: &str) -> Result<()> {
        for f in self.gguf_files() {
            match f.architecture() {
                Some(a) if a == expected => {}
                found => bail!(
                    "{} is a GGUF file of architecture {}, not a {what} (general.architecture = {expected})",
                    f.path().display(),
                    found.map_or_else(|| "(none given)".to_string(), |a| format!("{a:?}"))
                ),
            }
        }
        Ok(())
    }

    /// The key prefix in front of `anchor` (e.g. `text_encoders.t5xxl.transformer.` in a
    /// ComfyUI all-in-one file); an error naming `what` when no key ends in `anchor`.
    pub fn prefix_of(&self, anchor: &str, what: &str) -> Result<String> {
        self.keys()
            .find_map(|k| k.strip_suffix(anchor).filter(|p| p.is_empty() || p.ends_with('.')).map(String::from))
            .ok_or_else(|| {
                let sample: Vec<&str> = self.keys().take(4).collect();
                anyhow!("not a {what} checkpoint: no {anchor} (first keys: {})", sample.join(", "))
            })
    }

    pub fn paths(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path()).collect()
    }

    /// Total bytes of tensor data across files.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len()).sum()
    }
}

/// A component's `config.json` (diffusers / transformers), or None when the file is absent.
pub fn read_config_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?))
}

/// The configuration that goes with a component: a folder's own `config.json` when `path` is
/// a folder that has one, otherwise `fallback` (given by the caller for single files).
pub fn component_config<T: serde::de::DeserializeOwned + Clone>(
    path: &Path,
    fallback: Option<&T>,
) -> Result<Option<T>> {
    let own = if path.is_dir() { read_config_json(&path.join("config.json"))? } else { None };
    Ok(own.or_else(|| fallback.cloned()))
}

/// The weight files of a diffusers component folder: the shards named by
/// `*.safetensors.index.json`, or the single `*.safetensors` file in it.
pub fn diffusers_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    if let Some(index) = entries.iter().find(|p| p.to_string_lossy().ends_with(".safetensors.index.json")) {
        let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{} has no weight_map", index.display()))?;
        let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let mut singles: Vec<PathBuf> =
        entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    singles.sort();
    match singles.len() {
        0 => bail!("no .safetensors file in {}", dir.display()),
        1 => Ok(singles),
        _ => bail!("{} holds several .safetensors files but no index.json saying which belong together", dir.display()),
    }
}

/// Runs a checkpoint load so that it peaks near the size of what it loads.
///
/// Loading allocates and frees one buffer per tensor. glibc raises its mmap threshold after
/// such frees and then serves later buffers from the heap, where freed space stays resident;
/// pinning the threshold low for the load keeps each buffer an mmap that goes back to the
/// kernel when freed. Afterwards a high threshold keeps the per-step activations on the heap,
/// where reusing them is cheaper than mapping fresh zeroed pages every step.
pub fn low_peak_load<T>(load: impl FnOnce() -> T) -> T {
    set_mmap_threshold(1 << 20);
    let out = load();
    set_mmap_threshold(64 << 20);
    out
}

fn set_mmap_threshold(bytes: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator's policy for later allocations.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, bytes);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// Writes an f32 safetensors file tensor by tensor, so a large synthetic checkpoint
/// never has to sit in memory whole. `fill` produces each tensor's values in order.
pub fn write_safetensors_f32(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    metadata: &[(&str, &str)],
    fill: impl FnMut(&str, &[usize]) -> Vec<f32>,
) -> Result<()> {
    write_safetensors(path, tensors, metadata, StoreDtype::F32, fill)
}

/// The float type a written safetensors file stores its tensors in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    F32,
    F16,
    Bf16,
}

impl StoreDtype {
    fn name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "F32",
            StoreDtype::F16 => "F16",
            StoreDtype::Bf16 => "BF16",
        }
    }

    fn bytes(self) -> usize {
        if self == StoreDtype::F32 { 4 } else { 2 }
    }
}

/// [`write_safetensors_f32`] storing `dtype` (f16 and bf16 round to nearest even, as torch's
/// casts do).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    metadata: &[(&str, &str)],
    dtype: StoreDtype,
    mut fill: impl FnMut(&str, &[usize]) -> Vec<f32>,
) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
        header.insert("__metadata__".into(), meta.into());
    }
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * dtype.bytes();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_string(&header)?.into_bytes();
    // Pad so the data section starts 8-byte aligned, as the reference writer does.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    // Written beside `path` and renamed into place: a failure leaves no torn file.
    crate::engine::outfile::write_replacing(path, |file| {
        let mut out = std::io::BufWriter::new(file);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for (name, shape) in tensors {
            let values = fill(name, shape);
            if values.len() != shape.iter().product::<usize>() {
                bail!("{name}: {} values for shape {shape:?}", values.len());
            }
            for v in values {
                match dtype {
                    StoreDtype::F32 => out.write_all(&v.to_le_bytes())?,
                    StoreDtype::F16 => out.write_all(&half::f16::from_f32(v).to_le_bytes())?,
                    StoreDtype::Bf16 => out.write_all(&half::bf16::from_f32(v).to_le_bytes())?,
                }
            }
        }
        out.flush()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_half_precision() {
        let one_bf16 = half::bf16::from_f32(1.5).to_le_bytes();
        let one_f16 = half::f16::from_f32(-2.25).to_le_bytes();
        assert_eq!(decode_floats(&one_bf16, Dtype::BF16).unwrap(), vec![1.5]);
        assert_eq!(decode_floats(&one_f16, Dtype::F16).unwrap(), vec![-2.25]);
        assert!(decode_floats(&[0u8; 4], Dtype::I32).is_err());
    }

    #[test]
    fn scaled_fp8_side_tensors_are_hidden_and_applied() {
        use safetensors::tensor::TensorView;
        let (w, scale) = ([0x38u8, 0xB8], 0.5f32.to_le_bytes()); // e4m3fn 1.0, -1.0
        let views = vec![
            ("model.diffusion_model.scaled_fp8", TensorView::new(Dtype::F8_E4M3, vec![0], &[]).unwrap()),
            ("model.diffusion_model.a.weight", TensorView::new(Dtype::F8_E4M3, vec![2, 1], &w).unwrap()),
            ("model.diffusion_model.a.scale_weight", TensorView::new(Dtype::F32, vec![], &scale).unwrap()),
            ("model.diffusion_model.a.input_scale", TensorView::new(Dtype::F32, vec![], &scale).unwrap()),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scaled.safetensors");
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        let set = WeightSet::open(&path).unwrap();
        assert_eq!(set.keys().collect::<Vec<_>>(), ["model.diffusion_model.a.weight"]);
        assert_eq!(set.read("model.diffusion_model.a.weight").unwrap().data, vec![0.5, -0.5]);
    }

    #[test]
    fn swaps_halves() {
        let t = HostTensor { shape: vec![4, 1], data: vec![1., 2., 3., 4.] };
        assert_eq!(t.swap_row_halves().unwrap().data, vec![3., 4., 1., 2.]);
    }
}
