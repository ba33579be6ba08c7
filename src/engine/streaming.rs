//! The transformer and the T5 encoder streamed block by block, for jobs whose memory plan does
//! not fit the whole component on the device (as ComfyUI's lowvram and stable-diffusion.cpp's
//! layer streaming).
//!
//! The non-block layers (embedders, final layer) are loaded as usual. The blocks stay in the
//! memory-mapped checkpoint (host memory: the page cache, not this process's allocations):
//! each is built, from the file's bytes, just before it runs and dropped right after, so the
//! device never holds more than one block's weights. On the CPU backend device and host are the
//! same RAM, and the streaming is as real: a block not running has no tensors at all, and the
//! file pages a block was read from are handed back to the kernel once read (`engine::weights`).
//! A packed block (GGUF, fp8) is uploaded packed, as when resident.

use std::borrow::Cow;
use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::{DType, Device, Tensor};

use crate::engine::flux::model::{BlockSource, DoubleStreamBlock, SingleStreamBlock};
use crate::engine::flux::{self, Flux, TransformerWeights};
use crate::engine::layers::{Embedding, Linear};
use crate::engine::loader::{Prefixed, Walk};
use crate::engine::lora::{LoraSet, set_block_loras, set_stem_loras};
use crate::engine::t5::{T5Block, T5Encoder};
use crate::engine::weights::WeightSet;

pub struct StreamedFlux {
    /// The non-block layers, on the device for the whole stage.
    pub stem: Flux,
    weights: TransformerWeights,
    device: Device,
    dtype: DType,
    /// Applied to each block as it is built (unmerged side paths, as when resident).
    loras: Vec<LoraSet>,
}

impl StreamedFlux {
    /// Checks the whole checkpoint (as a resident load does), then loads the non-block layers.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let (weights, config) = flux::open_checked(path, None)?;
        let walk = Walk::load(&weights, device, dtype);
        let stem = crate::engine::weights::low_peak_load(|| Flux::build_stem(&walk.root(), config))
            .with_context(|| format!("loading the transformer {}", path.display()))?;
        Ok(StreamedFlux { stem, weights, device: device.clone(), dtype, loras: Vec::new() })
    }

    /// Sets the LoRAs of the next forward passes: on the stem now, on each block as it is built.
    /// Returns the warnings of the whole model (keys no Linear has, parts skipped).
    pub fn set_loras(&mut self, sets: &[LoraSet]) -> Result<Vec<String>> {
        let c = self.stem.config.clone();
        // The blocks' Linear paths, from blocks of placeholders (no tensor data).
        let plan = Walk::plan();
        let mut paths = Vec::new();
        for i in 0..c.depth {
            let mut b = DoubleStreamBlock::load(&plan.root().pp("double_blocks").pp(i), &c)?;
            paths.extend(b.linears_mut(i).into_iter().map(|(p, _)| p));
        }
        for i in 0..c.depth_single_blocks {
            let mut b = SingleStreamBlock::load(&plan.root().pp("single_blocks").pp(i), &c)?;
            paths.extend(b.linears_mut(i).into_iter().map(|(p, _)| p));
        }
        let warnings = set_stem_loras(&mut self.stem, &paths, sets)?;
        self.loras = sets.to_vec();
        Ok(warnings)
    }

    fn adapted<T>(&self, mut block: T, linears: impl FnOnce(&mut T) -> Vec<(String, &mut Linear)>) -> Result<T> {
        if !self.loras.is_empty() {
            set_block_loras(linears(&mut block), &self.loras)?;
        }
        Ok(block)
    }
}

impl BlockSource for StreamedFlux {
    fn double(&self, index: usize) -> Result<Cow<'_, DoubleStreamBlock>> {
        let walk = Walk::load(&self.weights, &self.device, self.dtype);
        let block = DoubleStreamBlock::load(&walk.root().pp("double_blocks").pp(index), &self.stem.config)?;
        Ok(Cow::Owned(self.adapted(block, |b| b.linears_mut(index))?))
    }

    fn single(&self, index: usize) -> Result<Cow<'_, SingleStreamBlock>> {
        let walk = Walk::load(&self.weights, &self.device, self.dtype);
        let block = SingleStreamBlock::load(&walk.root().pp("single_blocks").pp(index), &self.stem.config)?;
        Ok(Cow::Owned(self.adapted(block, |b| b.linears_mut(index))?))
    }
}

/// T5 with only its embedding, final norm and position-bias table loaded; each block is built
/// from the file as the forward reaches it (T5-XXL in f32 is 19 GB, its blocks 0.8 GB each).
pub struct StreamedT5 {
    stem: T5Encoder,
    table: Embedding,
    weights: WeightSet,
    prefix: String,
    device: Device,
}

impl StreamedT5 {
    /// Checks the whole checkpoint (as a resident load does), then loads the stem.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let (weights, prefix, config) = T5Encoder::open_checked(path, None)?;
        let source = Prefixed { set: &weights, prefix: prefix.clone(), ignored: |_| false };
        let walk = Walk::load(&source, device, DType::F32);
        let (stem, table) = T5Encoder::build_stem(&walk.root(), config)
            .with_context(|| format!("loading the T5 encoder {}", path.display()))?;
        Ok(StreamedT5 { stem, table, weights, prefix, device: device.clone() })
    }

    /// [`T5Encoder::forward`], one block on the device at a time.
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor<3>> {
        let c = &self.stem.config;
        self.stem.forward_blocks(ids, device, &self.table, |i| {
            let source = Prefixed { set: &self.weights, prefix: self.prefix.clone(), ignored: |_| false };
            let walk = Walk::load(&source, &self.device, DType::F32);
            Ok(Cow::Owned(T5Block::load(&walk.root().pp("encoder.block").pp(i), c, i == 0)?))
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device, Tensor, TensorData};

    use super::*;
    use crate::engine::flux::{FluxConfig, FluxInput};
    use crate::engine::memory::{JobSize, plan};

    /// A transformer whose weights dwarf its activations at a tiny image, as FLUX's do at
    /// real sizes: hidden 256, 6 double and 12 single blocks.
    fn config() -> FluxConfig {
        let mut c = FluxConfig::schnell();
        c.hidden_size = 256;
        c.num_heads = 2;
        c.axes_dim = vec![16, 56, 56];
        c.mlp_hidden_dim = 1024;
        c.depth = 6;
        c.depth_single_blocks = 12;
        c.context_in_dim = 64;
        c.vec_in_dim = 32;
        c
    }

    #[test]
    fn a_streamed_transformer_with_a_quarter_of_its_size_predicts_what_the_resident_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let c = config();
        flux::write_random_checkpoint(&c, &path, 5).unwrap();
        let device = Device::flex();

        // The plan at a quarter of the transformer's size streams it.
        let t = crate::engine::footprint::transformer_sizes(&path, DType::F32).unwrap();
        let sizes = crate::engine::memory::ModelSizes::of_transformer(t, 4);
        let job = JobSize { width: 64, height: 64, batch: 1, text_tokens: 8 };
        let quarter = sizes.transformer() / 4;
        let p = plan(&sizes, job, Some(quarter), false, false).unwrap();
        assert!(p.transformer_streamed(), "{}", p.summary());
        assert!(p.peak <= quarter, "{}", p.summary());

        let resident = flux::load_transformer(&path, &device, DType::F32, None).unwrap();
        let streamed = StreamedFlux::load(&path, &device, DType::F32).unwrap();
        assert!(streamed.stem.double_blocks.is_empty() && streamed.stem.single_blocks.is_empty());
        let rand = |seed: u64, shape: [usize; 3]| {
            Tensor::<3>::from_data(TensorData::new(crate::engine::noise::torch_randn(seed, &shape), shape), &device)
        };
        let (rows, cols) = (job.height / 16, job.width / 16);
        let img = rand(1, [1, rows * cols, c.in_channels]);
        let txt = rand(2, [1, job.text_tokens, c.context_in_dim]);
        let y = Tensor::<2>::from_data(
            TensorData::new(crate::engine::noise::torch_randn(3, &[1, c.vec_in_dim]), [1, c.vec_in_dim]),
            &device,
        );
        let rope = resident.rope(job.text_tokens, rows, cols, &device);
        let input = || FluxInput {
            img: img.clone(),
            txt: txt.clone(),
            y: y.clone(),
            timesteps: &[0.7],
            guidance: None,
            rope: &rope,
        };
        let a = resident.forward(input()).unwrap().into_data().try_to_vec::<f32>().unwrap();
        let b = streamed.stem.forward_with(input(), &streamed).unwrap().into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(a, b, "the same blocks in the same order give the same numbers");
    }
}
