//! A GGUF v3 writer: the header (metadata, tensor infos) first, then each tensor's bytes as
//! a callback produces them, so a large model is written one tensor at a time.
//!
//! The byte layout is the `gguf` package's `GGUFWriter`: key/values in the order given,
//! tensor infos with ggml dims (innermost first) and offsets aligned to 32, data padded to 32.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::quant::GgmlType;

const ALIGNMENT: u64 = 32;

/// A metadata value atelier writes.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Arrays, typed as the `gguf` package types them (a token list, scores, token types, a
    /// byte string).
    Strings(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
    U8s(Vec<u8>),
}

/// GGUF's value type numbers.
const U8: u32 = 0;
const U32: u32 = 4;
const I32: u32 = 5;
const F32: u32 = 6;
const BOOL: u32 = 7;
const STRING: u32 = 8;
const ARRAY: u32 = 9;

impl MetaValue {
    fn put(&self, out: &mut Vec<u8>) {
        fn array<T>(out: &mut Vec<u8>, ty: u32, items: &[T], mut each: impl FnMut(&mut Vec<u8>, &T)) {
            out.extend(ARRAY.to_le_bytes());
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                each(out, item);
            }
        }
        match self {
            MetaValue::U32(v) => {
                out.extend(U32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            MetaValue::F32(v) => {
                out.extend(F32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            MetaValue::Bool(v) => {
                out.extend(BOOL.to_le_bytes());
                out.push(*v as u8);
            }
            MetaValue::Str(s) => {
                out.extend(STRING.to_le_bytes());
                string(out, s);
            }
            MetaValue::Strings(v) => array(out, STRING, v, |o, s| string(o, s)),
            MetaValue::F32s(v) => array(out, F32, v, |o, x| o.extend(x.to_le_bytes())),
            MetaValue::I32s(v) => array(out, I32, v, |o, x| o.extend(x.to_le_bytes())),
            MetaValue::U8s(v) => array(out, U8, v, |o, x| o.push(*x)),
        }
    }
}

/// One tensor to write: its name, PyTorch shape (outermost first) and block type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorPlan {
    /// Bytes of its data; an error when its rows are not whole blocks.
    pub fn bytes(&self) -> Result<usize> {
        let numel: usize = self.shape.iter().product();
        let row = self.shape.last().copied().unwrap_or(1);
        match self.ty.bytes_for(numel) {
            Some(n) if row.is_multiple_of(self.ty.block().0) => Ok(n),
            _ => bail!("{}: shape {:?} is not whole {} blocks along its rows", self.name, self.shape, self.ty.name()),
        }
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn ggml_number(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q5_0 => 6,
        GgmlType::Q5_1 => 7,
        GgmlType::Q8_0 => 8,
        GgmlType::Q2K => 10,
        GgmlType::Q3K => 11,
        GgmlType::Q4K => 12,
        GgmlType::Q5K => 13,
        GgmlType::Q6K => 14,
        GgmlType::BF16 => 30,
    }
}

/// Writes `path`: `metadata` in order, then `tensors`, whose bytes `data(i)` gives for the
/// i-th tensor (checked against its plan's size).
pub fn write(
    path: &Path,
    metadata: &[(&str, MetaValue)],
    tensors: &[TensorPlan],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut head = b"GGUF".to_vec();
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut head, key);
        value.put(&mut head);
    }
    let mut offset = 0u64;
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in tensors {
        let bytes = t.bytes()?;
        string(&mut head, &t.name);
        head.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            head.extend((*d as u64).to_le_bytes());
        }
        head.extend(ggml_number(t.ty).to_le_bytes());
        head.extend(offset.to_le_bytes());
        offset += (bytes as u64).div_ceil(ALIGNMENT) * ALIGNMENT;
        sizes.push(bytes);
    }
    // Tensor data starts aligned; a file without tensors (a vocabulary) ends unpadded, as the
    // `gguf` package writes it.
    if !tensors.is_empty() {
        pad(&mut head, 0);
    }
    // Written beside `path` and renamed into place: a failure halfway leaves no partial GGUF.
    crate::engine::outfile::write_replacing(path, |file| {
        let mut out = BufWriter::new(file);
        out.write_all(&head)?;
        for (i, (t, size)) in tensors.iter().zip(sizes).enumerate() {
            let mut bytes = data(i)?;
            if bytes.len() != size {
                bail!(
                    "{}: {} bytes for a {} tensor of shape {:?} ({size} expected)",
                    t.name,
                    bytes.len(),
                    t.ty.name(),
                    t.shape
                );
            }
            pad(&mut bytes, 0);
            out.write_all(&bytes)?;
        }
        out.flush().with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    })
}

/// Zero bytes up to the next multiple of the alignment (counted from `base`).
fn pad(bytes: &mut Vec<u8>, base: usize) {
    while !(base + bytes.len()).is_multiple_of(ALIGNMENT as usize) {
        bytes.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::super::GgufFile;
    use super::*;

    #[test]
    fn what_it_writes_the_reader_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let a: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
        let tensors = vec![
            TensorPlan { name: "a.weight".into(), shape: vec![2, 32], ty: GgmlType::Q8_0 },
            TensorPlan { name: "a.bias".into(), shape: vec![3], ty: GgmlType::F32 },
        ];
        let meta = [("general.architecture", MetaValue::Str("flux".into())), ("general.file_type", MetaValue::U32(7))];
        write(&path, &meta, &tensors, |i| match i {
            0 => super::super::quantize::quantize(GgmlType::Q8_0, &a),
            _ => Ok([1f32, 2., 3.].iter().flat_map(|v| v.to_le_bytes()).collect()),
        })
        .unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.architecture(), Some("flux"));
        assert_eq!(f.metadata()["general.file_type"].as_int(), Some(7));
        assert_eq!(f.tensors()["a.weight"].shape, vec![2, 32]);
        let back = f.read("a.weight").unwrap().data;
        assert!(back.iter().zip(&a).all(|(x, y)| (x - y).abs() <= 4.0 / 127.0), "{back:?}");
        assert_eq!(f.read("a.bias").unwrap().data, vec![1., 2., 3.]);
        let bad = write(&path, &meta, &tensors, |_| Ok(vec![0; 3]));
        assert!(bad.unwrap_err().to_string().contains("expected"));
    }
}
