//! `atelier bench --model DIR|ID`: what a user waits for on a real pipeline — one `generate`
//! timed by stage (prompt encoding, transformer load and sampling, decoding) with the peak RSS of
//! each, every sampling step, then a VAE encode of the image made (what training caches).

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Tensor, TensorData};

use super::{mib, reset_peak_rss, rss_bytes};
use crate::engine::device::SelectedDevice;
use crate::engine::pipeline::{self, GenerateRequest, ModelFiles, Placement, Progress, Resident};
use crate::engine::vae;

/// What to generate (one image).
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    pub files: ModelFiles,
    pub name: String,
    pub request: GenerateRequest,
    pub dtype: burn::tensor::DType,
}

/// One stage of the generation: wall time and the peak RSS while it ran.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub seconds: f64,
    pub peak_rss: u64,
}

#[derive(Debug, Clone)]
pub struct PipelineReport {
    pub stages: Vec<Stage>,
    /// Seconds of each sampling step.
    pub steps: Vec<f64>,
    pub total_seconds: f64,
    pub rss_before: u64,
    pub vae_load_seconds: f64,
    pub vae_encode_seconds: f64,
    pub vae_encode_peak_rss: u64,
    pub is_dev: bool,
    pub width: usize,
    pub height: usize,
}

/// Splits the run into stages at the pipeline's progress events. The first step's event closes
/// the transformer's load: it is timed from the stage's start to the moment that step began
/// (its peak RSS, read when the event comes, includes that first step).
struct Stages {
    open: Option<(String, Instant)>,
    done: Vec<Stage>,
}

impl Stages {
    fn start(&mut self, name: &str, at: Instant) {
        self.close(at);
        reset_peak_rss();
        self.open = Some((name.to_string(), at));
    }

    fn close(&mut self, at: Instant) {
        if let Some((name, t0)) = self.open.take() {
            let seconds = at.saturating_duration_since(t0).as_secs_f64();
            self.done.push(Stage { name, seconds, peak_rss: rss_bytes().1 });
        }
    }
}

pub fn run_pipeline(spec: &PipelineSpec, device: &SelectedDevice) -> Result<PipelineReport> {
    let prepared = pipeline::prepare(&spec.files, &spec.request)?;
    let mut resident = Resident::placed(Placement { keep_resident: false, ..Placement::staged(spec.dtype) });
    let (rss_before, _) = rss_bytes();
    let mut stages = Stages { open: None, done: Vec::new() };
    let mut steps = Vec::new();
    let t0 = Instant::now();
    let mut last_step_total = 0.0;
    let out =
        pipeline::generate_prepared(
            &spec.files,
            &spec.request,
            &prepared,
            &device.device,
            &mut resident,
            |p| match p {
                Progress::Stage(s) => stages.start(s, Instant::now()),
                Progress::Step { step, seconds, .. } => {
                    // `seconds` is the time since sampling began; the first step's start ends the load.
                    let now = Instant::now();
                    if step == 1 {
                        let began = now - std::time::Duration::from_secs_f64(seconds);
                        stages.start("sampling", began);
                    }
                    steps.push(seconds - last_step_total);
                    last_step_total = seconds;
                }
                Progress::Preview { .. } => {}
            },
        )?;
    stages.close(Instant::now());
    let total_seconds = t0.elapsed().as_secs_f64();
    drop(resident);

    // The image back through the VAE's encoder, as training's cache does.
    let img = &out.images[0];
    let (w, h) = (img.width() as usize, img.height() as usize);
    let x = crate::train::dataset::to_chw(img);
    reset_peak_rss();
    let t = Instant::now();
    let vae = vae::load_vae(&spec.files.vae, &device.device, spec.dtype, None)?;
    let vae_load_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let dtype = crate::engine::cpu::activation_dtype(&device.device, spec.dtype);
    let z = vae.encode(Tensor::<4>::from_data(TensorData::new(x, [1, 3, h, w]), &device.device).cast(dtype));
    let _ = z.into_data(); // waits for a GPU backend
    let vae_encode_seconds = t.elapsed().as_secs_f64();
    Ok(PipelineReport {
        stages: stages.done,
        steps,
        total_seconds,
        rss_before,
        vae_load_seconds,
        vae_encode_seconds,
        vae_encode_peak_rss: rss_bytes().1,
        is_dev: prepared.is_dev,
        width: w,
        height: h,
    })
}

impl PipelineReport {
    fn median_step(&self) -> f64 {
        super::median(&self.steps)
    }

    pub fn print(&self, spec: &PipelineSpec, device: &SelectedDevice) {
        let kind = if self.is_dev { "dev" } else { "schnell" };
        println!(
            "model: {} ({kind}), {}x{}, {} steps, {:?} on {}",
            spec.name,
            self.width,
            self.height,
            self.steps.len(),
            spec.dtype,
            device.description
        );
        for s in &self.stages {
            println!("stage {}: {:.3} s, peak RSS {:.1} MiB", s.name, s.seconds, mib(s.peak_rss));
        }
        let (min, max) = self.steps.iter().fold((f64::MAX, 0f64), |(a, b), &s| (a.min(s), b.max(s)));
        println!("step: median {:.4} s (min {min:.4}, max {max:.4}, {} steps)", self.median_step(), self.steps.len());
        println!(
            "vae encode: {:.3} s (after a {:.3} s load), peak RSS {:.1} MiB",
            self.vae_encode_seconds,
            self.vae_load_seconds,
            mib(self.vae_encode_peak_rss)
        );
        println!("total generate: {:.3} s (RSS before {:.1} MiB)", self.total_seconds, mib(self.rss_before));
    }

    pub fn json(&self, spec: &PipelineSpec) -> serde_json::Value {
        serde_json::json!({
            "model": spec.name,
            "kind": if self.is_dev { "dev" } else { "schnell" },
            "width": self.width,
            "height": self.height,
            "dtype": format!("{:?}", spec.dtype),
            "stages": self.stages.iter().map(|s| serde_json::json!({
                "name": s.name, "seconds": s.seconds, "peak_rss_bytes": s.peak_rss,
            })).collect::<Vec<_>>(),
            "step_seconds": self.steps,
            "median_step_seconds": self.median_step(),
            "vae_encode": {"load_seconds": self.vae_load_seconds, "seconds": self.vae_encode_seconds, "peak_rss_bytes": self.vae_encode_peak_rss},
            "total_seconds": self.total_seconds,
            "rss_before_bytes": self.rss_before,
        })
    }
}
