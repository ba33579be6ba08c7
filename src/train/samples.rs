//! Sample images during training, generated with the LoRA as trained so far (installed on the
//! model as plain adapters), from the cached prompt encodings and fixed seeds.

use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::engine::flux::{Flux, FluxInput};
use crate::engine::noise::torch_randn;
use crate::engine::pipeline::{DEFAULT_GUIDANCE, ModelFiles, pack, to_rgb, unpack};
use crate::engine::sampler::{ScheduleConfig, denoise};
use crate::engine::vae;

use super::cache::CachedText;
use super::params::{TrainableLora, host};

/// Final latents of a square `size`² generation with `lora` active (None: the base), unpacked
/// [channels, rows, cols] on the host; seed `seed`, the kind's default steps.
pub fn generate_latents(
    files: &ModelFiles,
    model: &mut Flux,
    lora: Option<&TrainableLora>,
    text: &CachedText,
    size: usize,
    seed: u64,
    device: &Device,
) -> Result<(Vec<f32>, [usize; 3])> {
    let is_dev = model.config.guidance_embed;
    let schedule = match &files.scheduler {
        Some(path) => ScheduleConfig::from_file(path)?,
        None if is_dev => ScheduleConfig::dev(),
        None => ScheduleConfig::schnell(),
    };
    let steps = if is_dev { 20 } else { 4 };
    let (channels, rows, cols) = (model.config.in_channels / 4, 2 * (size / 16), 2 * (size / 16));
    let tokens = (rows / 2) * (cols / 2);
    let sigmas = schedule.sigmas(steps, tokens);
    let timesteps = schedule.timesteps(&sigmas);
    let dtype = model.img_in.weight.dtype();
    let (txt, y) = text.upload(device, dtype);
    let rope = model.rope(txt.dims()[1], rows / 2, cols / 2, device);
    match lora {
        Some(l) => {
            l.install(model, "", false);
        }
        None => crate::engine::lora::clear_loras(model),
    }
    let guidance = is_dev.then_some([DEFAULT_GUIDANCE]);
    let noise = pack(&torch_randn(seed, &[1, channels, rows, cols]), channels, rows, cols);
    let x = Tensor::<3>::from_data(TensorData::new(noise, [1, tokens, channels * 4]), device).cast(dtype);
    let model_ref = &*model;
    let x = denoise(
        x,
        &sigmas,
        |x, i| {
            model_ref.forward(FluxInput {
                img: x.clone(),
                txt: txt.clone(),
                y: y.clone(),
                timesteps: &[timesteps[i] / 1000.0],
                guidance: guidance.as_ref().map(|g| &g[..]),
                rope: &rope,
            })
        },
        |_| Ok(()),
    );
    crate::engine::lora::clear_loras(model);
    Ok((unpack(&host(x?), channels, rows, cols), [channels, rows, cols]))
}

/// Generates a `size`² sample with `seed` and writes it as a PNG.
#[allow(clippy::too_many_arguments)]
pub fn render(
    files: &ModelFiles,
    model: &mut Flux,
    lora: Option<&TrainableLora>,
    text: &CachedText,
    size: usize,
    seed: u64,
    path: &Path,
    device: &Device,
) -> Result<()> {
    let (z, [c, rows, cols]) = generate_latents(files, model, lora, text, size, seed, device)?;
    // The VAE is loaded for the decode only: training keeps just the transformer resident.
    let vae = vae::load_vae(&files.vae, device, DType::F32, None)?;
    let pixels = vae.decode_tiled(Tensor::<4>::from_data(TensorData::new(z, [1, c, rows, cols]), device), 128, 16);
    let img = to_rgb(&pixels, cols * 8, rows * 8);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    img.save(path).with_context(|| format!("cannot write {}", path.display()))
}
