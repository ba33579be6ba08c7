//! Linear weights kept in their file's packed form (GGUF quant blocks, fp8) and dequantized
//! one layer at a time, when that layer runs.
//!
//! A FLUX-dev transformer is 48 GB in f32 but 12 GB as Q8_0 and 6.4 GB as Q4_K: dequantizing
//! at load (what atelier did first) throws the point of those files away. Here a packed weight
//! is its file bytes, unchanged, in a device tensor of 32-bit words (every backend has those;
//! WGSL has no byte type); a forward turns them into the [in, out] matrix in the compute dtype,
//! multiplies, and drops it, so at most one layer's dense weight exists at a time.
//!
//! On the CPU backend the dequantization runs over the bytes in place (`gguf::quant`,
//! bit-equal to the `gguf` package, rows split over the CPU's cores): there the "device" is
//! host memory. On a GPU every packing (the ggml blocks and fp8) is expanded on the device by
//! tensor ops over the words (`engine::dequant_device`), bit-equal to the host kernel: no
//! readback per use.

use anyhow::{Result, bail};
use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::engine::fp8;
use crate::engine::gguf::quant::{GgmlType, dequantize_into};
use crate::engine::{cpu, dequant_device};

/// How a packed weight's bytes encode its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// ggml blocks along each row (Q8_0 … Q6_K; also F16/BF16 when kept as stored).
    Gguf(GgmlType),
    /// One float8_e4m3fn per value, times the layer's scale.
    F8E4M3,
    /// One float8_e5m2 per value, times the layer's scale.
    F8E5M2,
    /// bf16 in AMX's tile layout (`engine::cpu::amx`): `--dtype bf16` on a CPU with AMX.
    Bf16Tiles,
}

impl Packing {
    pub fn name(self) -> &'static str {
        match self {
            Packing::Gguf(t) => t.name(),
            Packing::F8E4M3 => "F8_E4M3",
            Packing::F8E5M2 => "F8_E5M2",
            Packing::Bf16Tiles => "BF16 (AMX tiles)",
        }
    }

    /// Bytes of one row of `inputs` values; None when the row is not whole blocks.
    pub fn row_bytes(self, inputs: usize) -> Option<usize> {
        match self {
            Packing::Gguf(t) => {
                let (values, bytes) = t.block();
                inputs.is_multiple_of(values).then(|| inputs / values * bytes)
            }
            Packing::F8E4M3 | Packing::F8E5M2 => Some(inputs),
            Packing::Bf16Tiles => Some(inputs * 2),
        }
    }
}

/// A packed [out, in] weight (PyTorch's layout) on the host, as a checkpoint reader hands it
/// over: the stored bytes and, for scaled fp8, the scale (one value, or one per output row).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedHost {
    pub packing: Packing,
    pub outputs: usize,
    pub inputs: usize,
    pub bytes: Vec<u8>,
    pub scale: Vec<f32>,
}

impl PackedHost {
    /// Checks that the bytes and the scale fit the shape.
    pub fn new(packing: Packing, shape: &[usize], bytes: Vec<u8>, scale: Vec<f32>) -> Result<Self> {
        let [outputs, inputs] = shape[..] else {
            bail!("a packed weight must be a matrix, not shape {shape:?}");
        };
        match packing.row_bytes(inputs) {
            Some(row) if row * outputs == bytes.len() => {}
            _ => bail!("{} bytes do not hold a {} matrix of shape {shape:?}", bytes.len(), packing.name()),
        }
        if !(scale.is_empty() || scale.len() == 1 || scale.len() == outputs) {
            bail!("{} scale values for a weight of shape {shape:?} (expected 1 or one per row)", scale.len());
        }
        Ok(PackedHost { packing, outputs, inputs, bytes, scale })
    }

    /// PyTorch's [out, in] f32 rows as bf16 tiles for the AMX product; None where the shape
    /// is not whole 32×32 blocks.
    pub fn bf16_tiles(rows: &[f32], outputs: usize, inputs: usize) -> Option<Self> {
        let bytes = cpu::amx::fits(outputs, inputs).then(|| cpu::amx::pack(rows, outputs, inputs))?;
        Some(PackedHost { packing: Packing::Bf16Tiles, outputs, inputs, bytes, scale: Vec::new() })
    }

    /// The values [out, in], row-major, in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        if self.packing == Packing::Bf16Tiles {
            let columns = cpu::amx::unpack(&self.bytes, self.outputs, self.inputs);
            return transpose(&columns, self.inputs, self.outputs);
        }
        dequantize_rows(self.packing, &self.bytes, self.outputs, self.inputs, &self.scale)
    }

    /// Onto `device` as a [`PackedWeight`] that computes in `dtype`.
    pub fn upload(self, device: &Device, dtype: DType) -> PackedWeight {
        let len = self.bytes.len();
        let mut bytes = self.bytes;
        bytes.resize(len.div_ceil(4) * 4, 0);
        let words = bytes.len() / 4;
        let data = TensorData::from_bytes_vec(bytes, [words], DType::I32);
        PackedWeight {
            words: Tensor::from_data(data, (device, DType::I32)),
            packing: self.packing,
            outputs: self.outputs,
            inputs: self.inputs,
            len,
            scale: self.scale,
            dtype,
        }
    }
}

/// A packed weight on the device (see the module docs).
#[derive(Module, Debug)]
pub struct PackedWeight {
    /// The stored bytes, little-endian, zero-padded to whole words.
    pub words: Tensor<1, Int>,
    #[module(skip)]
    pub packing: Packing,
    #[module(skip)]
    pub outputs: usize,
    #[module(skip)]
    pub inputs: usize,
    /// Bytes in use (the words may hold up to three bytes of padding).
    #[module(skip)]
    pub len: usize,
    #[module(skip)]
    pub scale: Vec<f32>,
    /// The compute dtype the weight is dequantized into.
    #[module(skip)]
    pub dtype: DType,
}

impl PackedWeight {
    /// The dense [in, out] weight in the compute dtype, made for one use.
    pub fn dense(&self) -> Tensor<2> {
        let device = self.words.device();
        // On a GPU the blocks are expanded where they are (no readback); on the CPU the host
        // kernel below is the faster path over the same memory.
        if device != Device::flex() && dequant_device::supports(self.packing) {
            let w = self.device_rows().transpose();
            return if self.dtype == DType::F32 { w } else { w.cast(self.dtype) };
        }
        let data = self.words.clone().into_data();
        let bytes = &data.as_bytes()[..self.len];
        let t = if self.packing == Packing::Bf16Tiles {
            // Off the AMX product (autodiff inputs, a LoRA's merge): the tiles hold [in, out].
            cpu::amx::unpack(bytes, self.outputs, self.inputs)
        } else {
            let rows = dequantize_rows(self.packing, bytes, self.outputs, self.inputs, &self.scale);
            transpose(&rows, self.outputs, self.inputs)
        };
        let shape = [self.inputs, self.outputs];
        // Converted on the host so no f32 copy is made on the device for f16 / bf16.
        let data = match self.dtype {
            DType::F16 => TensorData::new(t.into_iter().map(half::f16::from_f32).collect::<Vec<_>>(), shape),
            DType::BF16 => TensorData::new(t.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>(), shape),
            _ => TensorData::new(t, shape),
        };
        let dtype = data.dtype();
        let w = Tensor::<2>::from_data(data, (&device, dtype));
        if dtype == self.dtype { w } else { w.cast(self.dtype) }
    }

    /// The [out, in] values in f32, dequantized by tensor ops where the words are, times the
    /// layer's scale as the host multiplies it (`dequantize_rows`).
    pub fn device_rows(&self) -> Tensor<2> {
        let rows =
            dequant_device::dequantize(self.packing, self.words.clone(), self.len).reshape([self.outputs, self.inputs]);
        match self.scale.len() {
            0 => rows,
            1 => rows.mul_scalar(self.scale[0]),
            n => {
                let scale = Tensor::<1>::from_data(TensorData::new(self.scale.clone(), [n]), &self.words.device());
                rows * scale.reshape([n, 1])
            }
        }
    }

    /// Bytes it holds on the device.
    pub fn bytes(&self) -> usize {
        self.len
    }
}

/// A Linear's weight: a dense [in, out] matrix, or packed bytes dequantized per use.
// One per Linear: the few hundred bytes of a device tensor handle next to megabytes of
// weights are not worth a Box (which burn's Module derive would not see through).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Weight {
    Dense(Param<Tensor<2>>),
    Packed(PackedWeight),
}

impl Weight {
    /// The [in, out] matrix in the compute dtype (for a packed weight, a fresh dequantization).
    pub fn val(&self) -> Tensor<2> {
        match self {
            Weight::Dense(p) => p.val(),
            Weight::Packed(p) => p.dense(),
        }
    }

    /// [in, out], without dequantizing.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Weight::Dense(p) => p.shape().dims(),
            Weight::Packed(p) => [p.inputs, p.outputs],
        }
    }

    /// The dtype forwards compute in.
    pub fn dtype(&self) -> DType {
        match self {
            Weight::Dense(p) => p.val().dtype(),
            Weight::Packed(p) => p.dtype,
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Weight::Dense(p) => p.val().device(),
            Weight::Packed(p) => p.words.device(),
        }
    }

    /// The packing, for packed weights.
    pub fn packing(&self) -> Option<Packing> {
        match self {
            Weight::Dense(_) => None,
            Weight::Packed(p) => Some(p.packing),
        }
    }
}

/// Rows [out, in] in f32 from packed bytes, split over the CPU's cores for large weights.
fn dequantize_rows(packing: Packing, bytes: &[u8], outputs: usize, inputs: usize, scale: &[f32]) -> Vec<f32> {
    let row_bytes = packing.row_bytes(inputs).expect("checked when packed");
    let rows_of = |first: usize, chunk: &[u8]| -> Vec<f32> {
        let mut out = Vec::with_capacity(chunk.len() / row_bytes * inputs);
        match packing {
            Packing::Gguf(ty) => dequantize_into(ty, chunk, &mut out),
            Packing::F8E4M3 => out.extend(chunk.iter().map(|&b| fp8::e4m3fn(b))),
            Packing::F8E5M2 => out.extend(chunk.iter().map(|&b| fp8::e5m2(b))),
            Packing::Bf16Tiles => unreachable!("tiles are not rows: `cpu::amx::unpack` reads them"),
        }
        // w = fp8 · scale, as the dense reader computes it (the same f32 products).
        match scale.len() {
            0 => {}
            1 => out.iter_mut().for_each(|w| *w *= scale[0]),
            _ => {
                for (r, row) in out.chunks_mut(inputs).enumerate() {
                    row.iter_mut().for_each(|w| *w *= scale[first + r]);
                }
            }
        }
        out
    };
    let threads = if outputs * inputs < 1 << 16 { 1 } else { workers().min(outputs) };
    if threads <= 1 {
        return rows_of(0, bytes);
    }
    let per = outputs.div_ceil(threads);
    let parts: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = bytes
            .chunks(per * row_bytes)
            .enumerate()
            .map(|(i, chunk)| s.spawn(move || rows_of(i * per, chunk)))
            .collect();
        handles.into_iter().map(|h| h.join().expect("dequantization thread")).collect()
    });
    parts.concat()
}

fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Row-major [rows, cols] → [cols, rows], destination rows split over the cores.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let threads = if rows * cols < 1 << 16 { 1 } else { workers().min(cols) };
    let per = cols.div_ceil(threads.max(1)).max(1);
    let mut dst = vec![0f32; src.len()];
    if threads <= 1 {
        transpose_columns(src, rows, cols, 0, &mut dst);
        return dst;
    }
    std::thread::scope(|s| {
        for (i, out) in dst.chunks_mut(per * rows).enumerate() {
            s.spawn(move || transpose_columns(src, rows, cols, i * per, out));
        }
    });
    dst
}

/// Columns `first..` of `src` [rows, cols] into `out` (whole rows of the transpose), in tiles
/// of 32 source rows so reads stay in cache.
fn transpose_columns(src: &[f32], rows: usize, cols: usize, first: usize, out: &mut [f32]) {
    const TILE: usize = 32;
    let end = first + out.len() / rows;
    for r0 in (0..rows).step_by(TILE) {
        for c in first..end {
            for r in r0..(r0 + TILE).min(rows) {
                out[(c - first) * rows + r] = src[r * cols + c];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gguf::dequantize;
    use crate::engine::gguf::quantize::quantize;

    #[test]
    fn a_packed_weight_is_its_dequantized_matrix_transposed() {
        let device = Device::flex();
        // Large enough for the threaded paths (≥ 2^16 values), rows of whole Q4_K blocks.
        let (outputs, inputs) = (96, 768);
        let values: Vec<f32> = (0..outputs * inputs).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        for ty in [GgmlType::Q8_0, GgmlType::Q4K] {
            let host =
                PackedHost::new(Packing::Gguf(ty), &[outputs, inputs], quantize(ty, &values).unwrap(), vec![]).unwrap();
            let expected = dequantize(ty, &host.bytes).unwrap();
            assert_eq!(host.dequantize(), expected);
            let w = Weight::Packed(host.upload(&device, DType::F32));
            assert_eq!(w.dims(), [inputs, outputs]);
            let dense = w.val().into_data().try_to_vec::<f32>().unwrap();
            for o in [0, 17, outputs - 1] {
                for i in [0, 300, inputs - 1] {
                    assert_eq!(dense[i * outputs + o], expected[o * inputs + i], "{} ({o}, {i})", ty.name());
                }
            }
        }
        // fp8 with a scale per row.
        let host = PackedHost::new(Packing::F8E4M3, &[2, 3], vec![0x38, 0xB8, 0x40, 0x38, 0, 0x30], vec![0.5, 2.0]);
        assert_eq!(host.unwrap().dequantize(), vec![0.5, -0.5, 1.0, 2.0, 0.0, 1.0]);
        assert!(PackedHost::new(Packing::Gguf(GgmlType::Q8_0), &[2, 33], vec![0; 68], vec![]).is_err());
        assert!(PackedHost::new(Packing::F8E5M2, &[2, 2], vec![0; 4], vec![1.0; 3]).is_err());
    }
}
