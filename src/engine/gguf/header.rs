//! The GGUF header (v2/v3): magic, version, metadata key/values, tensor infos, alignment.
//!
//! Every read is bounds-checked, so a cut-short or corrupt header is an error, never a panic
//! or a huge allocation.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};

/// A metadata value. Arrays keep their element count and, for strings, their items.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        if let Value::Str(s) = self { Some(s) } else { None }
    }

    pub fn as_int(&self) -> Option<i128> {
        if let Value::Int(n) = self { Some(*n) } else { None }
    }

    /// A float, or an integer read as one.
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(x) => Some(*x),
            Value::Int(n) => Some(*n as f64),
            _ => None,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Array(items) => write!(f, "[{} items]", items.len()),
        }
    }
}

/// One tensor as the header describes it. `dims` are ggml's order (innermost first).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

/// A parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<RawTensorInfo>,
    pub alignment: u64,
    /// Where the data section starts in the file.
    pub data_start: u64,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            anyhow!(
                "the header is cut short (needs {n} more bytes at offset {}, the file has {})",
                self.pos,
                self.bytes.len()
            )
        })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let len = usize::try_from(len).map_err(|_| anyhow!("string length {len} is too large"))?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("a string at offset {} is not UTF-8", self.pos - len))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::Int(self.take(1)?[0].into()),
            1 => Value::Int((self.take(1)?[0] as i8).into()),
            2 => Value::Int(u16::from_le_bytes(self.take(2)?.try_into().unwrap()).into()),
            3 => Value::Int(i16::from_le_bytes(self.take(2)?.try_into().unwrap()).into()),
            4 => Value::Int(self.u32()?.into()),
            5 => Value::Int((self.u32()? as i32).into()),
            6 => Value::Float(f32::from_le_bytes(self.take(4)?.try_into().unwrap()).into()),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 4 {
                    bail!("metadata arrays nested too deeply");
                }
                let item_ty = self.u32()?;
                let count = self.u64()?;
                // Each item takes at least one byte: a count beyond the file is corrupt.
                if count > (self.bytes.len() - self.pos) as u64 {
                    bail!("an array of {count} items runs past the end of the file");
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::Int(self.u64()?.into()),
            11 => Value::Int((self.u64()? as i64).into()),
            12 => Value::Float(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            other => bail!("unknown metadata value type {other}"),
        })
    }
}

/// Parses the header at the start of `bytes` (the whole file).
pub fn parse(bytes: &[u8]) -> Result<Header> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.take(4).map_err(|_| anyhow!("the file is shorter than a GGUF header"))?;
    if magic != b"GGUF" {
        bail!("not a GGUF file (it starts with {magic:02x?}, not \"GGUF\")");
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        bail!("GGUF version {version} is not supported (2 or 3)");
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    let left = (bytes.len() - r.pos) as u64;
    if n_tensors > left || n_kv > left {
        bail!("the header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file can hold");
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty, 0).map_err(|e| anyhow!("metadata {key}: {e}"))?;
        metadata.insert(key, value);
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > 8 {
            bail!("tensor {name} has {n_dims} dimensions (at most 8)");
        }
        let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
        let ty = r.u32()?;
        let offset = r.u64()?;
        tensors.push(RawTensorInfo { name, dims, ty, offset });
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_int() {
            Some(a) if a > 0 && (a as u64).is_power_of_two() => a as u64,
            _ => bail!("general.alignment = {v} is not a power of two"),
        },
    };
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    Ok(Header { version, metadata, tensors, alignment, data_start })
}
