//! GGUF files (llama.cpp / city96's ComfyUI-GGUF): a memory-mapped reader whose tensors come
//! out dequantized to f32 in PyTorch's shape order.
//!
//! ggml lists a tensor's dims innermost first (`ne[0]` is the row length), the reverse of
//! PyTorch; quant blocks run along that innermost dim. city96's FLUX files use BFL's key names
//! and keep 1-D and small tensors (and those whose rows are not whole blocks) in F32/F16.

pub mod header;
pub mod quant;
pub mod quantize;
pub mod t5_names;
pub mod t5_vocab;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use memmap2::{Mmap, UncheckedAdvice};

pub use header::Value;
pub use quant::{GgmlType, dequantize};

use crate::engine::host_tensor::HostTensor;

/// One tensor of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// PyTorch order (outermost first): ggml's dims reversed.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: HashMap<String, GgufTensor>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only mapping; see SafetensorsFile::open.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (version, metadata, tensors) =
            Self::index(&mmap).map_err(|e| anyhow!("{} is not a valid GGUF file: {e}", path.display()))?;
        Ok(GgufFile { path: path.to_path_buf(), mmap, version, metadata, tensors })
    }

    #[allow(clippy::type_complexity)]
    fn index(bytes: &[u8]) -> Result<(u32, BTreeMap<String, Value>, HashMap<String, GgufTensor>)> {
        let h = header::parse(bytes)?;
        let mut tensors = HashMap::new();
        let mut ranges = Vec::new();
        for t in &h.tensors {
            let ty = GgmlType::from_u32(t.ty).map_err(|e| anyhow!("tensor {}: {e}", t.name))?;
            let dims: Vec<usize> = t.dims.iter().map(|&d| usize::try_from(d)).collect::<Result<_, _>>()?;
            let numel = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            let inner = dims.first().copied().unwrap_or(1);
            let (per_block, _) = ty.block();
            let len = match numel {
                Some(n) if inner.is_multiple_of(per_block) => ty.bytes_for(n).unwrap(),
                _ => bail!(
                    "tensor {} has ggml dims {:?}, not whole {} blocks of {per_block} along its rows",
                    t.name,
                    t.dims,
                    ty.name()
                ),
            };
            if !t.offset.is_multiple_of(h.alignment) {
                bail!(
                    "tensor {} starts at offset {}, not a multiple of the alignment {}",
                    t.name,
                    t.offset,
                    h.alignment
                );
            }
            let start = h.data_start.checked_add(t.offset).and_then(|s| usize::try_from(s).ok());
            let end = start.and_then(|s| s.checked_add(len));
            let (start, end) = match (start, end) {
                (Some(s), Some(e)) if e <= bytes.len() => (s, e),
                _ => bail!(
                    "tensor {} ({} × {:?}, {len} bytes at data offset {}) runs past the end of the file ({} bytes): \
                     is it truncated?",
                    t.name,
                    ty.name(),
                    t.dims,
                    t.offset,
                    bytes.len()
                ),
            };
            ranges.push((start, end, t.name.clone()));
            let shape = dims.iter().rev().copied().collect();
            if tensors.insert(t.name.clone(), GgufTensor { shape, ty, start, len }).is_some() {
                bail!("tensor {} appears twice", t.name);
            }
        }
        ranges.sort();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                bail!("tensors {} and {} overlap: the tensor sizes disagree with their offsets", w[0].2, w[1].2);
            }
        }
        Ok((h.version, h.metadata, tensors))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// `general.architecture` (`flux`, `llama`, `t5encoder`, …).
    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get("general.architecture").and_then(Value::as_str)
    }

    pub fn tensors(&self) -> &HashMap<String, GgufTensor> {
        &self.tensors
    }

    pub fn len(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    /// The tensor `name` dequantized to f32, in PyTorch's shape.
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let t = self.tensors.get(name).ok_or_else(|| anyhow!("tensor {name} not in {}", self.path.display()))?;
        let data = dequantize(t.ty, &self.mmap[t.start..t.start + t.len])
            .with_context(|| format!("tensor {name} in {}", self.path.display()))?;
        // As for safetensors: the values now live in `data`; hand the file pages back.
        // SAFETY: the mapping is private and read-only, so discarding pages loses nothing.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, t.start, t.len);
        }
        Ok(HostTensor { shape: t.shape.clone(), data })
    }

    /// The stored bytes of `name`, whatever its type (what a rewrite copies unchanged).
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensors.get(name).ok_or_else(|| anyhow!("tensor {name} not in {}", self.path.display()))?;
        Ok(&self.mmap[t.start..t.start + t.len])
    }

    /// The matrix `name` as its quant blocks (type, PyTorch shape, bytes), or None for
    /// F32/F16/BF16 tensors and other shapes (read those as floats).
    #[allow(clippy::type_complexity)]
    pub fn quantized(&self, name: &str) -> Result<Option<(GgmlType, Vec<usize>, Vec<u8>)>> {
        let t = self.tensors.get(name).ok_or_else(|| anyhow!("tensor {name} not in {}", self.path.display()))?;
        if matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) || t.shape.len() != 2 {
            return Ok(None);
        }
        let bytes = self.mmap[t.start..t.start + t.len].to_vec();
        // SAFETY: the mapping is private and read-only, so discarding pages loses nothing.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, t.start, t.len);
        }
        Ok(Some((t.ty, t.shape.clone(), bytes)))
    }

    /// The bytes of the matrix `name` as [`GgufFile::quantized`] would hand them over (None for
    /// the tensors read as floats), from the header alone.
    pub fn quantized_len(&self, name: &str) -> Option<u64> {
        let t = self.tensors.get(name)?;
        let floats = matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) || t.shape.len() != 2;
        (!floats).then_some(t.len as u64)
    }

    /// Bytes per block type, with tensor counts: (type, tensors, bytes), by type.
    pub fn bytes_per_type(&self) -> Vec<(GgmlType, usize, u64)> {
        let mut by: BTreeMap<GgmlType, (usize, u64)> = BTreeMap::new();
        for t in self.tensors.values() {
            let e = by.entry(t.ty).or_default();
            e.0 += 1;
            e.1 += t.len as u64;
        }
        by.into_iter().map(|(ty, (n, b))| (ty, n, b)).collect()
    }
}

/// Whether `path` looks like a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
