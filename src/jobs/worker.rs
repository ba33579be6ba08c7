//! The worker: one thread per device that takes the next job, runs the pipeline on it and
//! settles its hold. It never runs on the async threads.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;

use burn::tensor::Device;

use crate::engine::lora::LoraChoice;
use crate::engine::memory::OutOfBudget;
use crate::engine::pipeline::{self, Canceled, GenerateRequest, Placement, Progress, Resident};
use crate::engine::pngfile::PngText;
use crate::jobs::Conn;
use crate::jobs::progress::JobEvent;
use crate::jobs::settle::{end_without_images, fail_internal};
use crate::jobs::store::{self, ImageMeta, Job, JobKind, JobStatus};
use crate::jobs::{Jobs, gallery, trainer};
use crate::ledger::HoldStatus;

pub struct Worker {
    handle: Option<std::thread::JoinHandle<()>>,
    jobs: Arc<Jobs>,
}

impl Worker {
    /// Starts the worker for `device`. `placement` says whether the last model's components
    /// stay loaded between jobs, and the compute dtype of transformer and VAE.
    pub fn spawn(jobs: Arc<Jobs>, db: Conn, device: Device, placement: Placement) -> Worker {
        let j = jobs.clone();
        let handle = std::thread::Builder::new()
            .name("atelier-worker".into())
            .spawn(move || run(&j, db, &device, placement))
            .expect("spawning the worker thread");
        Worker { handle: Some(handle), jobs }
    }

    /// Stops after the current job.
    pub fn stop(mut self) {
        self.jobs.stop();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(jobs: &Jobs, mut db: Conn, device: &Device, placement: Placement) {
    let mut resident: Option<(String, Resident)> = None;
    while !jobs.stopping.load(Ordering::Relaxed) {
        let next = match store::waiting(&db.app) {
            Ok(waiting) => {
                let mut s = jobs.scheduler.lock().unwrap_or_else(|p| p.into_inner());
                s.pick(&waiting).map(|i| waiting[i].job_id.clone())
            }
            Err(e) => {
                log::error!("reading the queue: {e}");
                None
            }
        };
        match next {
            Some(id) => {
                if let Err(e) = run_one(jobs, &mut db, device, placement, &mut resident, &id) {
                    log::error!("job {id}: {e:#}");
                }
            }
            None => {
                let (lock, cv) = &jobs.wake;
                let mut woken = lock.lock().unwrap_or_else(|p| p.into_inner());
                if !*woken {
                    woken = cv.wait_timeout(woken, Duration::from_secs(2)).unwrap_or_else(|p| p.into_inner()).0;
                }
                *woken = false;
            }
        }
    }
}

fn run_one(
    jobs: &Jobs,
    db: &mut Conn,
    device: &Device,
    placement: Placement,
    resident: &mut Option<(String, Resident)>,
    id: &str,
) -> anyhow::Result<()> {
    // Registered before the job is marked running, so a cancel that sees it running finds it.
    let cancel = Arc::new(AtomicBool::new(false));
    jobs.running.lock().unwrap_or_else(|p| p.into_inner()).push((id.to_string(), cancel.clone()));
    let out = match store::mark_running(&db.app, id, db.now()) {
        Ok(false) => Ok(()), // canceled just now
        Ok(true) => match store::get_job(&db.app, id) {
            Ok(Some(job)) => {
                jobs.hub.publish(&job.id, job.user_id, JobEvent::Started);
                jobs.publish_positions(db);
                let out = match job.kind {
                    JobKind::Image => execute(jobs, db, device, placement, resident, &job, cancel),
                    JobKind::Training => {
                        let mut images = |db: &mut Conn| run_waiting_images(jobs, db, device, placement, resident);
                        trainer::execute(jobs, db, device, placement.dtype, &mut images, &job, cancel)
                    }
                };
                if let Err(e) = &out {
                    // Whatever went wrong, the job must not stay running with its hold open.
                    if let Err(e2) = fail_internal(jobs, db, &job, format!("internal error: {e:#}")) {
                        log::error!("job {}: could not record the failure: {e2:#}", job.id);
                    }
                }
                out
            }
            Ok(None) => Err(anyhow::anyhow!("job vanished")),
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    };
    jobs.running.lock().unwrap_or_else(|p| p.into_inner()).retain(|(j, _)| j != id);
    jobs.user_canceled.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    out
}

/// Runs the image jobs waiting now, in the scheduler's order (a training yields the device to
/// them between its steps). Only those waiting when the pause began: jobs that arrive meanwhile
/// wait for the next step boundary, so a steady stream of images cannot starve the training.
fn run_waiting_images(
    jobs: &Jobs,
    db: &mut Conn,
    device: &Device,
    placement: Placement,
    resident: &mut Option<(String, Resident)>,
) -> usize {
    let at_start: std::collections::HashSet<String> = match store::waiting(&db.app) {
        Ok(w) => w.into_iter().filter(|w| w.kind == JobKind::Image).map(|w| w.job_id).collect(),
        Err(e) => {
            log::error!("reading the queue: {e}");
            return 0;
        }
    };
    let mut ran = 0;
    while !jobs.stopping.load(Ordering::Relaxed) {
        let next = match store::waiting(&db.app) {
            Ok(mut waiting) => {
                waiting.retain(|w| w.kind == JobKind::Image && at_start.contains(&w.job_id));
                let mut s = jobs.scheduler.lock().unwrap_or_else(|p| p.into_inner());
                s.pick(&waiting).map(|i| waiting[i].job_id.clone())
            }
            Err(e) => {
                log::error!("reading the queue: {e}");
                None
            }
        };
        let Some(id) = next else { break };
        let at = jobs.submitted_at_step.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if let Some(at) = at {
            let waited = jobs.metrics.training_steps.load(Ordering::Relaxed).saturating_sub(at);
            jobs.metrics.image_wait_training_steps_max.fetch_max(waited, Ordering::Relaxed);
            log::info!("job {id} starts after waiting {waited} training steps");
        }
        if let Err(e) = run_one(jobs, db, device, placement, resident, &id) {
            log::error!("job {id}: {e:#}");
        }
        ran += 1;
    }
    ran
}

fn execute(
    jobs: &Jobs,
    db: &mut Conn,
    device: &Device,
    placement: Placement,
    resident: &mut Option<(String, Resident)>,
    job: &Job,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    // Renewed now and while it runs, so the sweeper (which releases holds nobody touched for
    // `hold_max_age_secs`) never releases the hold of a job that is working.
    if !db.ledger.renew_hold(job.hold_id)? || db.ledger.hold(job.hold_id)?.status != HoldStatus::Held {
        return end_without_images(
            jobs,
            db,
            job,
            JobStatus::Failed,
            Some("the job's credit hold expired before it could run".into()),
        );
    }
    let mut renewed = std::time::Instant::now();
    let model = match jobs.models.get(&job.model) {
        Some(m) if m.is_ready() && m.files.is_some() => m.clone(),
        _ => {
            return end_without_images(
                jobs,
                db,
                job,
                JobStatus::Failed,
                Some(format!("model {} is not available", job.model)),
            );
        }
    };
    let files = model.files.clone().expect("checked above");
    let spec = &job.spec;
    // LoRAs were checked at submission; one deleted since fails the job plainly (the user's
    // own doing), with the credits released.
    let mut loras = Vec::new();
    for l in &spec.loras {
        match jobs.loras.resolve(job.user_id, &l.name) {
            Ok((_, path)) => loras.push(LoraChoice { path, weight: l.weight }),
            Err(e) => {
                let why = format!("{e} (it was removed after the job was submitted); the credits were released");
                return end_without_images(jobs, db, job, JobStatus::Failed, Some(why));
            }
        }
    }
    let steps = spec.steps.unwrap_or(model.default_steps).max(1) as usize;
    let req = GenerateRequest {
        cancel: Some(cancel),
        preview_every: jobs.queue.preview_every as usize,
        prompt: spec.prompt.clone(),
        seed: job.seed,
        steps: Some(steps),
        width: spec.width as usize,
        height: spec.height as usize,
        guidance: spec.guidance.map(|g| g as f32),
        max_sequence_length: None,
        batch: spec.batch as usize,
        loras,
    };
    // Whatever would stop the images from being kept is checked before any compute (and any
    // progress event): every component's header, the settings, the PNG text of each image,
    // and the images folder.
    let dir = jobs.images_dir();
    if resident.as_ref().is_none_or(|(m, _)| m != &job.model) {
        *resident = Some((job.model.clone(), Resident::placed(placement)));
    }
    let res = &mut resident.as_mut().expect("set above").1;
    let ready = pipeline::prepare_with(&files, &req, &mut res.loras).and_then(|prepared| {
        let texts = prepared
            .seeds(&req)
            .into_iter()
            .map(|seed| {
                let parameters = prepared.parameters(&spec.prompt, seed, &job.model);
                PngText::parameters(&parameters).map(|text| (parameters, text))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        gallery::check_writable(dir).context("the images cannot be saved")?;
        Ok((prepared, texts))
    });
    let (prepared, texts) = match ready {
        Ok(r) => r,
        // Settings were validated at submission, so what fails here is the server's side (a
        // model file, the images folder): its paths stay in the admin's view.
        Err(e) => return fail_internal(jobs, db, job, format!("before the first step: {e:#}")),
    };
    let images = spec.batch as usize;
    let loads_before = res.loads();
    let mut last_seconds = 0.0;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        pipeline::generate_prepared(&files, &req, &prepared, device, res, |p| match p {
            Progress::Stage(s) => jobs.hub.publish(&job.id, job.user_id, JobEvent::Stage { stage: s.to_string() }),
            Progress::Step { image, step, steps, seconds } => {
                if renewed.elapsed() > Duration::from_secs(60) {
                    renewed = std::time::Instant::now();
                    if let Err(e) = db.ledger.renew_hold(job.hold_id) {
                        log::warn!("job {}: renewing its hold: {e}", job.id);
                    }
                }
                let dt = if step == 1 { seconds } else { seconds - last_seconds };
                last_seconds = seconds;
                let m = &jobs.metrics;
                m.steps.fetch_add(1, Ordering::Relaxed);
                m.step_micros.fetch_add((dt * 1e6) as u64, Ordering::Relaxed);
                m.last_step_micros.store((dt * 1e6) as u64, Ordering::Relaxed);
                let rate = step as f64 / seconds.max(1e-9);
                let left = (steps - step) + (images - image - 1) * steps;
                jobs.hub.publish(
                    &job.id,
                    job.user_id,
                    JobEvent::Step { image, images, step, steps, it_per_s: rate, eta_s: left as f64 / rate },
                );
            }
            Progress::Preview { image, step, rgb } => {
                let data_url = gallery::png_data_url(&rgb);
                jobs.hub.publish(&job.id, job.user_id, JobEvent::Preview { image, step, data_url });
            }
        })
    }));
    if let Some(plan) = res.last_plan() {
        log::info!("job {}: memory plan {}", job.id, plan.summary());
        let mut memory = jobs.memory.lock().unwrap_or_else(|p| p.into_inner());
        memory.memory_plans.insert(job.model.clone(), plan.clone());
    }
    let loads = res.loads();
    let m = &jobs.metrics;
    m.transformer_loads.fetch_add(loads.transformer - loads_before.transformer, Ordering::Relaxed);
    m.text_encoder_loads.fetch_add(loads.t5 + loads.clip - loads_before.t5 - loads_before.clip, Ordering::Relaxed);
    m.vae_loads.fetch_add(loads.vae - loads_before.vae, Ordering::Relaxed);
    let generated = match result {
        Ok(Ok(g)) => g,
        Ok(Err(e)) if e.is::<Canceled>() && jobs.stopping.load(Ordering::Relaxed) => {
            let why = "the server was stopped during this job; its credits were released".to_string();
            return end_without_images(jobs, db, job, JobStatus::Failed, Some(why));
        }
        Ok(Err(e)) if e.is::<Canceled>() => return end_without_images(jobs, db, job, JobStatus::Canceled, None),
        // Refused by its memory plan before any compute: the user's size is the cause, and
        // the message names only sizes.
        Ok(Err(e)) if e.is::<OutOfBudget>() => {
            log::warn!("job {}: refused by its memory plan: {e}", job.id);
            let why = format!("{e}; the credits were released");
            return end_without_images(jobs, db, job, JobStatus::Failed, Some(why));
        }
        Ok(Err(e)) => return fail_internal(jobs, db, job, format!("{e:#}")),
        Err(panic) => {
            // The components may be half-updated: load them afresh next time.
            *resident = None;
            let msg =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            return fail_internal(jobs, db, job, format!("the engine panicked: {}", msg.unwrap_or_default()));
        }
    };
    for w in &generated.warnings {
        log::warn!("job {}: {w}", job.id);
    }
    let now = db.now();
    // The gallery's prompt carries the LoRAs as A1111 writes them (`<lora:name:w>`), so
    // "Use these settings" and a copied prompt bring them back.
    let gallery_prompt = format!("{}{}", spec.prompt, crate::engine::lora::a1111_tags(&prepared.loras).0);
    let mut metas = Vec::new();
    for (i, ((img, seed), (parameters, text))) in generated.images.iter().zip(&generated.seeds).zip(texts).enumerate() {
        match gallery::save(dir, img, &text) {
            Ok(id) => metas.push(ImageMeta {
                id,
                user_id: job.user_id,
                job_id: job.id.clone(),
                index: i as u32,
                width: generated.width as u32,
                height: generated.height as u32,
                seed: *seed,
                model: job.model.clone(),
                prompt: gallery_prompt.clone(),
                steps: generated.steps as u32,
                guidance: generated.guidance.map(|g| g as f64),
                parameters,
                created_at: chrono::DateTime::from_timestamp(now, 0).unwrap_or_default(),
            }),
            Err(e) => {
                metas.iter().for_each(|m| gallery::remove(dir, &m.id));
                return fail_internal(jobs, db, job, format!("saving the image: {e:#}"));
            }
        }
    }
    // Images and `succeeded` in one transaction, then the capture. A crash in between leaves a
    // succeeded job with an open hold, which `reconcile` captures at the next start.
    if !store::complete_job(&db.app, &job.id, &metas, now)? {
        metas.iter().for_each(|m| gallery::remove(dir, &m.id));
        db.ledger.release(job.hold_id)?;
        jobs.hub.publish(&job.id, job.user_id, JobEvent::Canceled);
        return Ok(());
    }
    jobs.metrics.images.fetch_add(metas.len() as u64, Ordering::Relaxed);
    let captured = db.ledger.capture(job.hold_id, None)?;
    jobs.hub.publish(
        &job.id,
        job.user_id,
        JobEvent::Succeeded {
            images: metas.into_iter().map(|m| m.id).collect(),
            credits_charged: captured.hold.captured,
        },
    );
    Ok(())
}
