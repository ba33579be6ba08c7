//! VAE training (`atelier train-vae`): an AutoencoderKL of the FLUX VAE architecture (16 latent
//! channels, 8× down-sampling, widths from its config), from random weights or from an
//! existing VAE, on a folder of images: L1 reconstruction plus a small KL term on the
//! reparameterized posterior, AdamW over every weight. At the end the latent shift and scale
//! are measured on the training images (so the transformer sees zero-mean, unit-variance
//! latents, as FLUX's 0.1159 / 0.3611 do for its VAE) and written with the weights as a
//! diffusers `vae/` folder; the PSNR on a hold-out folder is reported. `decoder_only` fine-tunes
//! the decoder of an existing VAE on its frozen encoder's latents: the latent space (and the
//! shift and scale) stay, so transformers trained on it keep working; `keep_latents` fine-tunes
//! the whole VAE while holding its encoder's latents near the init's (a penalty on their drift),
//! for the gains an encoder can add without a transformer trained on the init's latents retraining.
//!
//! Every random draw of step s comes from (seed, s), so a resumed run repeats the straight one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};

use super::adamw::{AdamW, AdamWConfig, LrSchedule, StepOutcome};
use super::dataset::{self, Item, pixels};
use super::full::FullParams;
use super::params::host;
use super::run::{Control, Event, pick, run_dir};
use crate::engine::noise::TorchGenerator;
use crate::engine::vae::{self, Vae, VaeConfig, layout::diffusers_name};
use crate::engine::weights::StoreDtype;

/// `atelier train-vae`'s settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VaeSettings {
    pub steps: usize,
    pub batch: usize,
    /// Images are scaled to cover `resolution`² and center-cropped (a multiple of 8).
    pub resolution: usize,
    pub adamw: AdamWConfig,
    /// Weight of the KL term (mean over latent elements) against the L1 term (mean over pixels).
    pub kl_weight: f64,
    /// Train the decoder only (the encoder, shift and scale stay the init's).
    #[serde(default)]
    pub decoder_only: bool,
    /// Fine-tune encoder and decoder with this weight times the mean squared drift of the
    /// posterior means from the init encoder's (in the scaled units a transformer sees) in the
    /// loss; the shift and scale stay the init's. 0: off.
    #[serde(default)]
    pub keep_latents: f64,
    pub seed: u64,
    pub save_every: usize,
    pub max_images: usize,
    pub save_dtype: StoreDtype,
    /// Warmup and decay of the learning rate (`adamw.lr` is its peak); left out of the settings
    /// when constant, so checkpoints from before schedules existed still resume.
    #[serde(default, skip_serializing_if = "LrSchedule::is_constant")]
    pub lr_schedule: LrSchedule,
}

impl Default for VaeSettings {
    fn default() -> Self {
        VaeSettings {
            steps: 1000,
            batch: 8,
            resolution: 64,
            adamw: AdamWConfig { lr: 1e-3, ..AdamWConfig::default() },
            kl_weight: 1e-4,
            decoder_only: false,
            keep_latents: 0.0,
            seed: 0,
            save_every: 0,
            max_images: 10_000,
            save_dtype: StoreDtype::F32,
            lr_schedule: LrSchedule::default(),
        }
    }
}

/// Where the VAE starts.
#[derive(Debug, Clone)]
pub enum VaeInit {
    /// Random weights of this configuration, drawn from the seed.
    Random(VaeConfig),
    /// An existing VAE (file or diffusers folder), fine-tuned.
    From(PathBuf),
}

#[derive(Debug, Clone)]
pub struct VaeJob {
    pub images: PathBuf,
    /// The diffusers `vae/` folder written (`config.json`, `diffusion_pytorch_model.safetensors`);
    /// `<name>_train/` beside it gets loss.csv and checkpoints.
    pub out: PathBuf,
    pub init: VaeInit,
    pub resume: Option<PathBuf>,
    /// Images the VAE never trains on, for the reported PSNR.
    pub holdout: Option<PathBuf>,
    /// Stop after this many steps of this invocation (tests of `--resume`).
    pub stop_after: Option<usize>,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct VaeTrained {
    pub losses: Vec<f32>,
    /// The folder written; None when the run stopped early.
    pub out: Option<PathBuf>,
    /// Mean PSNR (dB) of the hold-out images' reconstructions, 8-bit, when a hold-out was given.
    pub holdout_psnr: Option<f64>,
    pub shift_factor: f64,
    pub scaling_factor: f64,
    /// With `keep_latents`: the root mean square drift of the hold-out images' scaled latents
    /// from the init encoder's (the posterior's own spread is ~0.02–0.03 on the demo VAE).
    pub latent_drift: Option<f64>,
}

/// Trains the VAE. Every input is checked before any compute.
pub fn train_vae(
    job: &VaeJob,
    s: &VaeSettings,
    device: &Device,
    mut on: impl FnMut(Event) -> Control,
) -> Result<VaeTrained> {
    if s.steps == 0 || s.batch == 0 {
        bail!("--steps and --batch must be at least 1");
    }
    if s.resolution < 8 || !s.resolution.is_multiple_of(8) {
        bail!("--resolution must be a positive multiple of 8, not {}", s.resolution);
    }
    if !(s.adamw.lr > 0.0 && s.adamw.lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    if !(s.kl_weight >= 0.0 && s.kl_weight.is_finite()) {
        bail!("--kl-weight must be a number at least 0");
    }
    if !(s.keep_latents >= 0.0 && s.keep_latents.is_finite()) {
        bail!("--keep-latents must be a number at least 0");
    }
    if s.keep_latents > 0.0 && s.decoder_only {
        bail!("--keep-latents trains the encoder too; --decoder-only keeps it exactly: give one of them");
    }
    if let Some(dir) = &job.holdout
        && let (Ok(a), Ok(b)) = (std::fs::canonicalize(dir), std::fs::canonicalize(&job.images))
        && a == b
    {
        bail!("--holdout is the training folder itself: its PSNR would not measure images the VAE never saw");
    }
    if job.out.exists() && !job.out.is_dir() {
        bail!("--out {} is a file: train-vae writes a diffusers vae/ folder there", job.out.display());
    }
    if let Some(parent) = job.out.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        bail!("cannot write {}: the folder {} does not exist", job.out.display(), parent.display());
    }
    let items = dataset::scan_square(&job.images, s.resolution, s.max_images)?;
    let holdout = match &job.holdout {
        Some(dir) => dataset::scan_square(dir, s.resolution, usize::MAX)?,
        None => Vec::new(),
    };
    if s.decoder_only && matches!(job.init, VaeInit::Random(_)) {
        bail!("--decoder-only fine-tunes the decoder of an existing VAE: give --vae, not --vae-config");
    }
    if s.keep_latents > 0.0 && matches!(job.init, VaeInit::Random(_)) {
        bail!("--keep-latents keeps the latent space of an existing VAE: give --vae, not --vae-config");
    }
    let (mut model, all) = match &job.init {
        VaeInit::Random(config) => {
            let (m, named, tensors) = Vae::random_named(config.clone(), device, s.seed)?;
            (m, FullParams::new(named, tensors)?)
        }
        VaeInit::From(path) => {
            let (weights, config) = vae::open_checked(path, None)?;
            let (m, named, tensors) = Vae::load_named(&weights, config, device, burn::tensor::DType::F32)
                .with_context(|| format!("loading the VAE {}", path.display()))?;
            (m, FullParams::new(named, tensors)?)
        }
    };
    // The trained parameters: all, or the decoder's (`all` still writes the whole VAE).
    let params = if s.decoder_only {
        FullParams { params: all.params.iter().filter(|p| p.name.starts_with("decoder.")).cloned().collect() }
    } else {
        all.clone()
    };
    // What a resume must match: everything but how often and in what the results are saved,
    // and the architecture (GroupNorm groups change no shape). `decoder_only` only when set, so
    // checkpoints from before it existed still resume.
    let mut settings = serde_json::json!({
        "steps": s.steps, "batch": s.batch, "resolution": s.resolution, "adamw": s.adamw,
        "kl_weight": s.kl_weight, "seed": s.seed, "max_images": s.max_images,
        "config": format!("{:?}", model.config),
    });
    if s.decoder_only {
        settings["decoder_only"] = true.into();
    }
    if s.keep_latents > 0.0 {
        settings["keep_latents"] = s.keep_latents.into();
    }
    let settings_json = serde_json::to_string(&settings)?;
    if let Some(dir) = &job.resume {
        super::checkpoint::check_settings(dir, &settings_json)?;
    }
    // The init, frozen: the latents `keep_latents` holds the training near (the latent space's
    // shift and scale with them).
    let anchor = (s.keep_latents > 0.0).then(|| model.clone());
    let out_dir = run_dir(&job.out);
    std::fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;

    on(Event::Stage(format!("reading {} images", items.len())));
    let side = s.resolution;
    let data: Vec<Vec<f32>> = items.iter().map(pixels).collect::<Result<_>>()?;
    let (mut opt, start) = match &job.resume {
        Some(dir) => {
            let (m, opt, step) = params.load_checkpoint(dir, model, device)?;
            model = m;
            (opt, step)
        }
        None => (AdamW::new(s.adamw, &params.values(&model)), 0),
    };
    let what = if s.decoder_only { "of the VAE's decoder" } else { "of the VAE" };
    on(Event::Stage(format!("training all {} values {what} ({} tensors)", params.numel(), params.params.len())));

    let csv = out_dir.join("loss.csv");
    let mut csv = super::run::open_log(&csv, start, "step,loss,l1,kl,grad_norm,seconds")?;
    let end = job.stop_after.map_or(s.steps, |n| (start + n).min(s.steps));
    let mut losses = Vec::new();
    // The running mean of the last 50 losses (this invocation's) for the progress line.
    let mut window = std::collections::VecDeque::new();
    let mut busy = std::time::Duration::ZERO;
    let save = |model: &Vae, opt: &AdamW, n: usize| -> Result<PathBuf> {
        let dir = out_dir.join("checkpoints").join(format!("step_{n}"));
        params.save_checkpoint(&dir, model, opt, (n, s.seed, &settings_json))?;
        Ok(dir)
    };
    for step in start..end {
        let t0 = Instant::now();
        let chosen = pick(&items, s.seed, s.batch, step);
        let b = chosen.len();
        let x: Vec<f32> = chosen.iter().flat_map(|&i| data[i].iter().copied()).collect();
        let x = Tensor::<4>::from_data(TensorData::new(x, [b, 3, side, side]), device);
        let mut rng = TorchGenerator::new(s.seed.wrapping_mul(1_000_003).wrapping_add(step as u64));
        let z = model.config.z_channels;
        let eps = rng.randn(b * z * (side / 8) * (side / 8));
        let eps = Tensor::<4>::from_data(TensorData::new(eps, [b, z, side / 8, side / 8]), device);

        opt.config.lr = s.lr_schedule.lr(s.adamw.lr, step, s.steps);
        let mut terms = (f32::NAN, f32::NAN);
        // A frozen encoder runs outside the autodiff graph: its moments are constants.
        let frozen = s.decoder_only.then(|| model.encode_moments(x.clone()));
        let target = anchor.as_ref().map(|a| (a.encode_mean(x.clone()), a.config.scaling_factor, s.keep_latents));
        let (loss, outcome) = params.step(&mut model, &mut opt, |leaves| {
            let [loss, l1, kl] = match frozen {
                Some(moments) => decoder_loss(leaves, moments, x, eps),
                None => vae_loss(leaves, x, eps, s.kl_weight, target),
            };
            terms = (host(l1)[0], host(kl)[0]);
            Ok(loss)
        })?;
        let (l1, kl) = terms;
        losses.push(loss);
        if loss.is_finite() {
            if window.len() == 50 {
                window.pop_front();
            }
            window.push_back(loss);
        }
        busy += t0.elapsed();
        let done = step + 1 - start;
        let its = done as f64 / busy.as_secs_f64();
        let norm = match outcome {
            StepOutcome::Applied { grad_norm } => grad_norm,
            StepOutcome::SkippedNonFinite => f64::NAN,
        };
        writeln!(csv, "{},{loss},{l1},{kl},{norm},{:.3}", step + 1, t0.elapsed().as_secs_f64())?;
        on(Event::Step {
            step: step + 1,
            steps: s.steps,
            loss,
            mean: window.iter().sum::<f32>() / window.len().max(1) as f32,
            its,
            eta_s: (s.steps - step - 1) as f64 / its,
            skipped: outcome == StepOutcome::SkippedNonFinite,
        });
        let n = step + 1;
        let saved = s.save_every > 0 && n % s.save_every == 0 && n < s.steps;
        if saved {
            on(Event::Saved(save(&model, &opt, n)?));
        }
        if n < end {
            match on(Event::Boundary { done: n }) {
                Control::Continue => {}
                Control::Checkpoint | Control::Pause if saved => {}
                c @ (Control::Checkpoint | Control::Pause) => {
                    on(Event::Saved(save(&model, &opt, n)?));
                    if c == Control::Pause {
                        return Ok(stopped(losses));
                    }
                }
                Control::Stop => return Ok(stopped(losses)),
            }
        }
    }
    if end < s.steps {
        on(Event::Saved(save(&model, &opt, end)?));
        return Ok(stopped(losses));
    }

    if !s.decoder_only && anchor.is_none() {
        on(Event::Stage("measuring the latent shift and scale".into()));
        let (shift, std) = latent_stats(&model, &data, side, device);
        if !(std > 0.0 && std.is_finite()) {
            bail!("the trained VAE's latents have no spread (std {std}): it did not learn; try a lower --lr");
        }
        model.config.shift_factor = shift;
        model.config.scaling_factor = 1.0 / std;
    }
    let (shift, scale) = (model.config.shift_factor, model.config.scaling_factor);
    write_folder(&model, &all, &job.out, s.save_dtype)?;
    on(Event::Saved(job.out.clone()));
    let (holdout_psnr, latent_drift) = if holdout.is_empty() {
        (None, None)
    } else {
        on(Event::Stage(format!("measuring {} hold-out images", holdout.len())));
        let psnr = mean_psnr(&model, &holdout, device)?;
        let drift = anchor.as_ref().map(|a| drift_rms(a, &model, &holdout, device)).transpose()?;
        let mut report = serde_json::json!({ "holdout_images": holdout.len(), "psnr_db": psnr, "shift_factor": shift, "scaling_factor": scale });
        if let Some(d) = drift {
            report["latent_drift_rms"] = d.into();
        }
        std::fs::write(out_dir.join("holdout.json"), serde_json::to_string_pretty(&report)?)?;
        (Some(psnr), drift)
    };
    Ok(VaeTrained {
        losses,
        out: Some(job.out.clone()),
        holdout_psnr,
        shift_factor: shift,
        scaling_factor: scale,
        latent_drift,
    })
}

/// The training loss of images `x` with posterior noise `eps` (the reparameterization
/// z = mean + σ·eps): [L1 + kl_weight·KL, L1, KL], each a one-element tensor. L1 is the mean over
/// pixels, KL the mean over latent values of KL(N(mean, σ²) ‖ N(0, 1)). With `anchor`
/// (the init encoder's posterior means, the latent scale, a weight) the loss adds weight × the
/// mean squared drift of the posterior means from them in scaled units.
pub fn vae_loss(
    model: &Vae,
    x: Tensor<4>,
    eps: Tensor<4>,
    kl_weight: f64,
    anchor: Option<(Tensor<4>, f64, f64)>,
) -> [Tensor<1>; 3] {
    let moments = model.encode_moments(x.clone());
    let drift = anchor.map(|(target, scale, weight)| ((moments.0.clone() - target) * scale).square().mean() * weight);
    let [l1, kl] = reconstruction_terms(model, moments, x, eps);
    let loss = l1.clone() + kl.clone() * kl_weight;
    [drift.map_or(loss.clone(), |d| loss + d), l1, kl]
}

/// Root mean square over `items` of the scaled posterior means' difference between `init` and
/// `model` (the latent drift `keep_latents` holds down).
fn drift_rms(init: &Vae, model: &Vae, items: &[Item], device: &Device) -> Result<f64> {
    let (mut n, mut sq) = (0usize, 0f64);
    for item in items {
        let t = Tensor::<4>::from_data(TensorData::new(pixels(item)?, [1, 3, item.height, item.width]), device);
        let (a, b) = (host(init.encode_mean(t.clone())), host(model.encode_mean(t)));
        n += a.len();
        sq += a.iter().zip(&b).map(|(a, b)| ((a - b) as f64 * init.config.scaling_factor).powi(2)).sum::<f64>();
    }
    Ok((sq / n.max(1) as f64).sqrt())
}

/// [`vae_loss`] with the encoder frozen: its posterior `moments` come from outside the autodiff
/// graph, so only the decoder is differentiated; the loss is L1 alone (KL, reported, has no
/// gradient here).
fn decoder_loss(model: &Vae, moments: (Tensor<4>, Tensor<4>), x: Tensor<4>, eps: Tensor<4>) -> [Tensor<1>; 3] {
    let [l1, kl] = reconstruction_terms(model, moments, x, eps);
    [l1.clone(), l1, kl]
}

/// [L1, KL] of the decoded reparameterized sample of posterior (mean, log-variance).
fn reconstruction_terms(model: &Vae, moments: (Tensor<4>, Tensor<4>), x: Tensor<4>, eps: Tensor<4>) -> [Tensor<1>; 2] {
    let (mean, logvar) = moments;
    let sample = mean.clone() + (logvar.clone() * 0.5).exp() * eps;
    let l1 = (model.decode_raw(sample) - x).abs().mean();
    let kl = (mean.square() + logvar.clone().exp() - logvar - 1.0).mean() * 0.5;
    [l1, kl]
}

fn stopped(losses: Vec<f32>) -> VaeTrained {
    VaeTrained { losses, out: None, holdout_psnr: None, shift_factor: 0.0, scaling_factor: 0.0, latent_drift: None }
}

/// Mean and standard deviation of every posterior-mean latent value of the images.
fn latent_stats(model: &Vae, data: &[Vec<f32>], side: usize, device: &Device) -> (f64, f64) {
    let (mut n, mut sum, mut sq) = (0f64, 0f64, 0f64);
    for chunk in data.chunks(16) {
        let x: Vec<f32> = chunk.iter().flatten().copied().collect();
        let x = Tensor::<4>::from_data(TensorData::new(x, [chunk.len(), 3, side, side]), device);
        for v in host(model.encode_mean(x)) {
            n += 1.0;
            sum += v as f64;
            sq += (v as f64) * (v as f64);
        }
    }
    let mean = sum / n;
    (mean, (sq / n - mean * mean).max(0.0).sqrt())
}

/// Writes `model` as a diffusers `vae/` folder: diffusers' key names and 2-D attention
/// projections, and a config.json with its sizes, shift and scale.
fn write_folder(model: &Vae, params: &FullParams, out: &Path, dtype: StoreDtype) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let levels = model.config.ch_mult.len();
    params.export_as(model, &out.join("diffusion_pytorch_model.safetensors"), dtype, &[("format", "pt")], |p| {
        let name = diffusers_name(&p.name, levels)?;
        // diffusers keeps the mid-block attention projections as Linear [C, C].
        let shape =
            if p.name.contains(".attn_1.") && p.shape.len() == 4 { p.shape[..2].to_vec() } else { p.shape.clone() };
        Some((name, shape))
    })?;
    let config = serde_json::to_string_pretty(&model.config.diffusers_json())?;
    std::fs::write(out.join("config.json"), config + "\n")
        .with_context(|| format!("writing {}/config.json", out.display()))
}

/// Mean over `items` of the PSNR (dB, 8-bit pixels) of decode(encode_mean(x)) against x.
pub fn mean_psnr(model: &Vae, items: &[Item], device: &Device) -> Result<f64> {
    let mut total = 0.0;
    for item in items {
        let x = pixels(item)?;
        let (w, h) = (item.width, item.height);
        let t = Tensor::<4>::from_data(TensorData::new(x.clone(), [1, 3, h, w]), device);
        let y = host(model.decode_raw(model.encode_mean(t)));
        let byte = |v: f32| ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round();
        let mse = x.iter().zip(&y).map(|(a, b)| ((byte(*a) - byte(*b)) as f64).powi(2)).sum::<f64>() / x.len() as f64;
        total += if mse == 0.0 { 100.0 } else { 10.0 * (255.0f64 * 255.0 / mse).log10() };
    }
    Ok(total / items.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::weights::WeightSet;
    use crate::train::full::tracked;

    fn fixture(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
    }

    fn tensor<const D: usize>(g: &WeightSet, name: &str) -> Tensor<D> {
        let t = g.read(name).unwrap();
        Tensor::from_data(TensorData::new(t.data, t.shape), &Device::flex())
    }

    /// The loss and every weight's gradient against diffusers' AutoencoderKL in torch
    /// (tests/reference/make_vae_train_golden.py).
    #[test]
    fn vae_loss_and_gradients_match_torch() {
        let device = Device::flex();
        let path = fixture("pipeline/schnell/diffusers/vae");
        let (weights, config) = vae::open_checked(&path, None).unwrap();
        let levels = config.ch_mult.len();
        let (model, named, tensors) = Vae::load_named(&weights, config, &device, burn::tensor::DType::F32).unwrap();
        let params = FullParams::new(named, tensors).unwrap();
        let golden = WeightSet::open(&fixture("train/vae.safetensors")).unwrap();
        let kl_weight: f64 = golden.metadata("kl_weight").unwrap().parse().unwrap();
        let leaves = tracked(&model);
        let [loss, l1, kl] = vae_loss(&leaves, tensor(&golden, "x"), tensor(&golden, "eps"), kl_weight, None);
        let grads = loss.clone().backward();
        for (what, t) in [("loss", loss), ("l1", l1), ("kl", kl)] {
            let (a, b) = (host(t)[0], golden.read(what).unwrap().data[0]);
            assert!(((a - b) / b).abs() < 1e-5, "{what}: {a} vs torch {b}");
        }
        let expected: Vec<Vec<f32>> = params
            .params
            .iter()
            .map(|p| golden.read(&format!("grad.{}", diffusers_name(&p.name, levels).unwrap())).unwrap().data)
            .collect();
        // The attention key bias's gradient is zero in exact arithmetic (softmax ignores a
        // constant added to every score of a row): rounding noise there is measured against a
        // floor of 1e-4 of the largest gradient instead of its own (zero) scale.
        let floor = expected.iter().flatten().fold(0f32, |m, v| m.max(v.abs())) * 1e-4;
        let mut worst = 0f32;
        for ((p, g), expected) in params.params.iter().zip(params.grads(&leaves, &grads).unwrap()).zip(expected) {
            let g = host(g);
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(floor);
            let err = g.iter().zip(&expected).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            worst = worst.max(err);
            assert!(err <= 5e-4, "gradient of {}: relative error {err:.2e}", p.name);
        }
        eprintln!("VAE: worst gradient error {worst:.2e} over {} tensors", params.params.len());
    }

    /// Images of four colours of one diagonal pattern (32×32) and two more for the hold-out.
    fn images(dir: &Path, name: &str, shift: u32) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..4u32 {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let on = (x + i + shift) % 8 == y % 8;
                if on { image::Rgb([200 - 40 * i as u8, 40 * i as u8, 90]) } else { image::Rgb([250, 250, 250]) }
            });
            img.save(d.join(format!("{i}.png"))).unwrap();
        }
        d
    }

    /// The fine-tuning tests' set-up in `d`: the fixture VAE as the init, a hold-out folder, and
    /// the job writing `out` (training on a folder beside it).
    fn fine_tuning(d: &Path) -> (PathBuf, PathBuf, impl Fn(&str) -> VaeJob) {
        let (train, holdout) = (images(d, "train", 0), images(d, "holdout", 3));
        let init = fixture("pipeline/schnell/diffusers/vae");
        let (d, i, h) = (d.to_path_buf(), init.clone(), holdout.clone());
        let job = move |out: &str| VaeJob {
            images: train.clone(),
            out: d.join(out),
            init: VaeInit::From(i.clone()),
            resume: None,
            holdout: Some(h.clone()),
            stop_after: None,
        };
        (init, holdout, job)
    }

    /// `job` from random weights of its init's configuration.
    fn random_init(job: VaeJob) -> VaeJob {
        let VaeInit::From(path) = &job.init else { return job };
        let config =
            VaeConfig::from_diffusers_json(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
        VaeJob { init: VaeInit::Random(config), ..job }
    }

    /// --decoder-only: the written folder keeps the init's encoder bit for bit and its shift and
    /// scale (the latent space a transformer was trained on), the decoder learns (hold-out PSNR
    /// rises), and it needs an existing VAE and its own checkpoints.
    #[test]
    fn decoder_only_training_keeps_the_latent_space_and_improves_reconstruction() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (init, holdout, job) = fine_tuning(d);
        let s = VaeSettings {
            steps: 30,
            batch: 2,
            resolution: 32,
            save_every: 10,
            decoder_only: true,
            save_dtype: StoreDtype::F32,
            ..VaeSettings::default()
        };
        let trained = train_vae(&job("a"), &s, &Device::flex(), |_| Control::Continue).unwrap();
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let (first, last) = (mean(&trained.losses[..5]), mean(&trained.losses[25..]));
        assert!(last < 0.8 * first, "the loss did not fall: {first} → {last}");

        let before = vae::load_vae(&init, &Device::flex(), burn::tensor::DType::F32, None).unwrap();
        let after = vae::load_vae(&d.join("a"), &Device::flex(), burn::tensor::DType::F32, None).unwrap();
        assert_eq!(
            (after.config.shift_factor, after.config.scaling_factor),
            (before.config.shift_factor, before.config.scaling_factor)
        );
        let file = |dir: &Path| WeightSet::open(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        let (old, new) = (file(&init), file(&d.join("a")));
        let (mut same, mut moved) = (0, 0);
        for name in old.keys() {
            let (a, b) = (old.read(name).unwrap().data, new.read(name).unwrap().data);
            if name.starts_with("encoder.") {
                assert!(a == b, "{name} changed");
                same += 1;
            } else if a != b {
                moved += 1;
            }
        }
        assert!(same > 0 && moved > 0, "{same} encoder tensors kept, {moved} decoder tensors moved");
        let held = dataset::scan_square(&holdout, 32, 10).unwrap();
        let (p0, p1) = (mean_psnr(&before, &held, &Device::flex()).unwrap(), trained.holdout_psnr.unwrap());
        assert!(p1 > p0 + 1.0, "hold-out PSNR {p0:.2} dB → {p1:.2} dB");
        eprintln!("decoder-only: loss {first:.4} → {last:.4}, hold-out PSNR {p0:.2} → {p1:.2} dB");

        // A random init has no encoder to keep; a full run's checkpoint is not this run's.
        let e = train_vae(&random_init(job("b")), &s, &Device::flex(), |_| Control::Continue);
        assert!(format!("{:#}", e.unwrap_err()).contains("--decoder-only fine-tunes"));
        let full = VaeSettings { decoder_only: false, ..s.clone() };
        train_vae(&VaeJob { stop_after: Some(10), ..job("c") }, &full, &Device::flex(), |_| Control::Continue).unwrap();
        let e = train_vae(
            &VaeJob { resume: Some(d.join("c_train/checkpoints/step_10")), ..job("d") },
            &s,
            &Device::flex(),
            |_| Control::Continue,
        );
        assert!(format!("{:#}", e.unwrap_err()).contains("other settings"));
    }

    /// --keep-latents: the whole VAE trains (encoder included), the shift and scale stay the
    /// init's, the hold-out PSNR rises, and the latents drift far less than without the penalty.
    #[test]
    fn keep_latents_training_holds_the_latent_space_near_the_init() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (init, holdout, job) = fine_tuning(d);
        let s = VaeSettings {
            steps: 30,
            batch: 2,
            resolution: 32,
            keep_latents: 10.0,
            save_dtype: StoreDtype::F32,
            ..VaeSettings::default()
        };
        let go = |out: &str, s: &VaeSettings| train_vae(&job(out), s, &Device::flex(), |_| Control::Continue);
        let kept = go("kept", &s).unwrap();
        let free = go("free", &VaeSettings { keep_latents: 0.0, ..s.clone() }).unwrap();

        let load = |dir: &Path| vae::load_vae(dir, &Device::flex(), burn::tensor::DType::F32, None).unwrap();
        let (before, after, unheld) = (load(&init), load(&d.join("kept")), load(&d.join("free")));
        assert_eq!(
            (after.config.shift_factor, after.config.scaling_factor),
            (before.config.shift_factor, before.config.scaling_factor)
        );
        let file = |dir: &Path| WeightSet::open(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        let (old, new) = (file(&init), file(&d.join("kept")));
        let moved = |part: &str| {
            old.keys()
                .filter(|k| k.starts_with(part))
                .filter(|k| old.read(k).unwrap().data != new.read(k).unwrap().data)
                .count()
        };
        assert!(moved("encoder.") > 0 && moved("decoder.") > 0, "the encoder and the decoder both train");

        let held = dataset::scan_square(&holdout, 32, 10).unwrap();
        let p0 = mean_psnr(&before, &held, &Device::flex()).unwrap();
        let p1 = kept.holdout_psnr.unwrap();
        assert!(p1 > p0 + 1.0, "hold-out PSNR {p0:.2} dB → {p1:.2} dB");
        let drift = kept.latent_drift.unwrap();
        let unheld_drift = drift_rms(&before, &unheld, &held, &Device::flex()).unwrap();
        assert!(free.latent_drift.is_none());
        assert!(drift < 0.5 * unheld_drift, "drift {drift:.4} with the penalty, {unheld_drift:.4} without");
        eprintln!("keep-latents: hold-out PSNR {p0:.2} → {p1:.2} dB, drift {drift:.4} (without: {unheld_drift:.4})");

        // Stopped at step 10 and resumed: the anchor is the init again (not the checkpoint), so
        // the losses and the file are the straight run's.
        let part = train_vae(&VaeJob { stop_after: Some(10), ..job("r") }, &s, &Device::flex(), |_| Control::Continue)
            .unwrap();
        let resumed = train_vae(
            &VaeJob { resume: Some(d.join("r_train/checkpoints/step_10")), ..job("r") },
            &s,
            &Device::flex(),
            |_| Control::Continue,
        )
        .unwrap();
        assert_eq!([part.losses, resumed.losses].concat(), kept.losses);
        let bytes = |f: &str| std::fs::read(d.join(f).join("diffusion_pytorch_model.safetensors")).unwrap();
        assert!(bytes("kept") == bytes("r"), "the resumed run wrote other weights");

        // It needs an existing VAE, and excludes --decoder-only.
        let e = train_vae(&random_init(job("b")), &s, &Device::flex(), |_| Control::Continue);
        assert!(format!("{:#}", e.unwrap_err()).contains("--keep-latents keeps"));
        let e = go("c", &VaeSettings { decoder_only: true, ..s.clone() });
        assert!(format!("{:#}", e.unwrap_err()).contains("give one of them"));
    }

    #[test]
    fn vae_training_learns_writes_a_loadable_folder_and_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (train, holdout) = (images(d, "train", 0), images(d, "holdout", 3));
        let text = std::fs::read_to_string(fixture("pipeline/schnell/diffusers/vae/config.json")).unwrap();
        let config = VaeConfig::from_diffusers_json(&text).unwrap();
        let s = VaeSettings { steps: 40, batch: 2, resolution: 32, save_every: 20, ..VaeSettings::default() };
        let job = |out: &str| VaeJob {
            images: train.clone(),
            out: d.join(out),
            init: VaeInit::Random(config.clone()),
            resume: None,
            holdout: Some(holdout.clone()),
            stop_after: None,
        };
        let go = |job: &VaeJob| train_vae(job, &s, &Device::flex(), |_| Control::Continue).unwrap();
        let straight = go(&job("a"));
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let (first, last) = (mean(&straight.losses[..5]), mean(&straight.losses[35..]));
        assert!(last < 0.6 * first, "the loss did not fall: {first} → {last}");

        // The folder loads as any diffusers VAE; its latents of the data are centred and unit.
        let vae = vae::load_vae(&d.join("a"), &Device::flex(), burn::tensor::DType::F32, None).unwrap();
        assert!((vae.config.shift_factor - straight.shift_factor).abs() < 1e-12);
        let items = dataset::scan_square(&train, 32, 10).unwrap();
        let x: Vec<f32> = items.iter().flat_map(|i| pixels(i).unwrap()).collect();
        let z = host(vae.encode(Tensor::<4>::from_data(TensorData::new(x, [4, 3, 32, 32]), &Device::flex())));
        let m = z.iter().sum::<f32>() / z.len() as f32;
        let sd = (z.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / z.len() as f32).sqrt();
        assert!(m.abs() < 1e-3 && (sd - 1.0).abs() < 1e-3, "scaled latents: mean {m}, std {sd}");
        // Trained beats the random start on images it never saw.
        let (random, _, _) = Vae::random_named(config.clone(), &Device::flex(), s.seed).unwrap();
        let held = dataset::scan_square(&holdout, 32, 10).unwrap();
        let before = mean_psnr(&random, &held, &Device::flex()).unwrap();
        let after = straight.holdout_psnr.unwrap();
        assert!(after > before + 3.0, "hold-out PSNR {before:.2} dB → {after:.2} dB");

        // Stopped at step 20 and resumed: the same losses and the same file.
        let part = train_vae(&VaeJob { stop_after: Some(20), ..job("b") }, &s, &Device::flex(), |_| Control::Continue)
            .unwrap();
        assert!(part.out.is_none());
        let resumed = go(&VaeJob { resume: Some(d.join("b_train/checkpoints/step_20")), ..job("b") });
        assert_eq!([part.losses, resumed.losses].concat(), straight.losses);
        let file = |f: &str| std::fs::read(d.join(f).join("diffusion_pytorch_model.safetensors")).unwrap();
        assert!(file("a") == file("b"), "the resumed run wrote other weights");

        // Bad input fails before any work.
        let fail = |job: &VaeJob, s: &VaeSettings| -> String {
            let mut events = 0;
            let e = train_vae(job, s, &Device::flex(), |_| {
                events += 1;
                Control::Continue
            });
            assert_eq!(events, 0);
            format!("{:#}", e.err().unwrap())
        };
        assert!(fail(&job("c"), &VaeSettings { resolution: 30, ..s.clone() }).contains("multiple of 8"));
        let e = fail(&VaeJob { images: d.join("none"), ..job("c") }, &s);
        assert!(e.contains("cannot read the image folder"), "{e}");
        let e = fail(
            &VaeJob { resume: Some(d.join("b_train/checkpoints/step_20")), ..job("c") },
            &VaeSettings { kl_weight: 0.5, ..s.clone() },
        );
        assert!(e.contains("other settings"), "{e}");
        assert!(VaeConfig::from_diffusers_json(r#"{"in_channels": 3}"#).is_err());
        let e = VaeConfig::from_diffusers_json(&text.replace("\"norm_num_groups\": 4", "\"norm_num_groups\": 3"));
        assert!(format!("{:#}", e.unwrap_err()).contains("norm_num_groups"));
    }
}
