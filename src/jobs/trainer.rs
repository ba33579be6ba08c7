//! The worker's side of a LoRA training job: `train::run` on the job's copy of the dataset,
//! progress events, checkpoints by steps or time, the device shared with image jobs between
//! steps (`[queue] training_share`), and the result stored in the owner's LoRA library.
//!
//! Sharing: at each step boundary, when image jobs wait and the training has had its share,
//! the waiting image jobs run right there, inside the boundary, while the training's model,
//! LoRA and optimizer stay in memory; when the memory budget says both do not fit, the training
//! checkpoints and returns, the images run, and the training is loaded again from that
//! checkpoint. Cancel stops at the next boundary; a server stop checkpoints and queues the job
//! again (its allowance hold kept) so the next start resumes it.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::Device;

use crate::jobs::progress::JobEvent;
use crate::jobs::settle::{end_without_images, fail_internal};
use crate::jobs::store::{self, Job, JobKind, JobStatus};
use crate::jobs::{Conn, Jobs};
use crate::ledger::HoldStatus;
use crate::loras::Sidecar;
use crate::train::run::{self, Control, Event};

/// The LoRA file a training job writes in its folder; `lora_train/` beside it has the loss
/// log, checkpoints and samples.
pub fn lora_file(dir: &Path) -> PathBuf {
    dir.join("lora.safetensors")
}

/// The run folder (loss.csv, checkpoints/, samples/) of the training in `dir`.
pub fn run_dir(dir: &Path) -> PathBuf {
    run::run_dir(&lora_file(dir))
}

/// The newest checkpoint of the training in `dir`.
pub fn latest_checkpoint(dir: &Path) -> Option<PathBuf> {
    let read = std::fs::read_dir(run_dir(dir).join("checkpoints")).ok()?;
    read.flatten()
        .filter(|e| e.path().join("state.safetensors").is_file())
        .filter_map(|e| {
            let n = e.file_name().to_str()?.strip_prefix("step_")?.parse::<usize>().ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// The sample images of the training in `dir`, in the order they were made.
pub fn samples(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run_dir(dir).join("samples"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    v.sort();
    v
}

/// One row of the loss log.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LossPoint {
    pub step: usize,
    pub loss: f32,
    pub mean: f32,
}

/// The loss log of the training in `dir` (a step logged twice, before and after a resume,
/// counts once: the later row).
pub fn loss_history(dir: &Path) -> Vec<LossPoint> {
    let text = std::fs::read_to_string(run_dir(dir).join("loss.csv")).unwrap_or_default();
    let mut by_step = std::collections::BTreeMap::new();
    for line in text.lines().skip(1) {
        let mut f = line.split(',');
        let (Some(step), Some(loss), Some(mean)) = (f.next(), f.next(), f.next()) else { continue };
        if let (Ok(step), Ok(loss), Ok(mean)) = (step.parse(), loss.parse(), mean.parse()) {
            by_step.insert(step, LossPoint { step, loss, mean });
        }
    }
    by_step.into_values().collect()
}

/// Bytes of the transformer's weight file(s).
fn transformer_bytes(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }
}

/// Whether the waiting image jobs fit in device memory beside a training that keeps its
/// state: with a budget, the training's estimate (the transformer's weights twice over: the
/// base, and its activations and LoRA/optimizer state) plus the largest memory plan image jobs
/// had must fit. Without a budget, always.
fn images_fit_beside(jobs: &Jobs, training_bytes: u64) -> bool {
    let memory = jobs.memory.lock().unwrap_or_else(|p| p.into_inner());
    let Some(budget) = memory.memory_budget else { return true };
    let images = memory.memory_plans.values().map(|p| p.peak).max().unwrap_or(training_bytes);
    training_bytes.saturating_mul(2).saturating_add(images) <= budget
}

fn images_waiting(db: &Conn) -> bool {
    store::waiting(&db.app).map(|w| w.iter().any(|w| w.kind == JobKind::Image)).unwrap_or(false)
}

/// When a training yields: it has run at least `share / (1 - share)` times as long as the
/// images took at its last yield.
struct Share {
    share: f64,
    since: Instant,
    images_took: Duration,
}

impl Share {
    fn due(&self) -> bool {
        self.share <= 0.0
            || self.since.elapsed().as_secs_f64() >= self.images_took.as_secs_f64() * self.share / (1.0 - self.share)
    }
}

/// Why a run returned early.
#[derive(Clone, Copy, PartialEq)]
enum Why {
    Running,
    Canceled,
    Stopping,
    ImagesNeedTheMemory,
    /// The allowance hold was released under the training (the sweeper): it may not go on.
    HoldLost,
}

/// Runs the image jobs waiting now (the worker's loop over them); how many ran.
pub type RunImages<'a> = dyn FnMut(&mut Conn) -> usize + 'a;

/// Runs training `job` on `device` in `dtype`; `run_images` runs the waiting image jobs when
/// the training yields.
pub(super) fn execute(
    jobs: &Jobs,
    db: &mut Conn,
    device: &Device,
    dtype: burn::tensor::DType,
    run_images: &mut RunImages<'_>,
    job: &Job,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    jobs.training_active.store(true, Ordering::Relaxed);
    let out = execute_training(jobs, db, device, dtype, run_images, job, cancel);
    jobs.training_active.store(false, Ordering::Relaxed);
    jobs.submitted_at_step.lock().unwrap_or_else(|p| p.into_inner()).clear();
    out
}

fn execute_training(
    jobs: &Jobs,
    db: &mut Conn,
    device: &Device,
    dtype: burn::tensor::DType,
    run_images: &mut RunImages<'_>,
    job: &Job,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let hold_ok = db.ledger.renew_hold(job.hold_id)? && db.ledger.hold(job.hold_id)?.status == HoldStatus::Held;
    if !hold_ok {
        let why = "the training's allowance hold expired before it could run".to_string();
        return end_without_images(jobs, db, job, JobStatus::Failed, Some(why));
    }
    let Some(spec) = job.training.clone() else {
        return fail_internal(jobs, db, job, "a training job without its settings".into());
    };
    let files = match jobs.models.get(&job.model) {
        Some(m) if m.is_ready() && m.files.is_some() => m.files.clone().expect("checked"),
        _ => {
            let why = format!("model {} is not available; the allowance was released", job.model);
            return end_without_images(jobs, db, job, JobStatus::Failed, Some(why));
        }
    };
    let dir = jobs.training_dir(&job.id);
    let settings = spec.settings(&jobs.training);
    let training_bytes = transformer_bytes(&files.transformer);
    let every = Duration::from_secs(jobs.training.checkpoint_every_secs);
    let mut share = Share { share: jobs.queue.training_share, since: Instant::now(), images_took: Duration::ZERO };
    let mut renewed = Instant::now();
    let publish = |e: JobEvent| jobs.hub.publish(&job.id, job.user_id, e);
    // The server stopping pauses the run (it resumes at the next start); the user's cancel ends it.
    let interrupted = || {
        if jobs.stopping.load(Ordering::Relaxed) {
            Some((Why::Stopping, Control::Pause))
        } else if cancel.load(Ordering::Relaxed) {
            Some((Why::Canceled, Control::Stop))
        } else {
            None
        }
    };
    loop {
        let tjob = run::Job {
            files: files.clone(),
            images: dir.join("images"),
            out: lora_file(&dir),
            resume: latest_checkpoint(&dir),
            init: None,
            dtype,
            stop_after: None,
        };
        if let Some(c) = &tjob.resume {
            let stage = format!("resuming from {}", c.file_name().unwrap_or_default().display());
            log::info!("training {}: {stage}", job.id);
            publish(JobEvent::Stage { stage });
        }
        let mut why = Why::Running;
        let mut saved = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run::train_with(&tjob, &settings, device, |e| match e {
                Event::Stage(s) => {
                    publish(JobEvent::Stage { stage: s });
                    Control::Continue
                }
                Event::Warning(w) => {
                    log::warn!("training {}: {w}", job.id);
                    Control::Continue
                }
                Event::Step { step, steps, loss, mean, its, eta_s, .. } => {
                    jobs.metrics.training_steps.fetch_add(1, Ordering::Relaxed);
                    publish(JobEvent::TrainingStep { step, steps, loss, mean, it_per_s: its, eta_s });
                    Control::Continue
                }
                Event::Sample(p) => {
                    let index = samples(&dir).iter().position(|s| *s == p).unwrap_or(0);
                    let step = p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix("step_"))
                        .and_then(|n| n.split('_').next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let url = format!("/api/trainings/{}/samples/{index}.png", job.id);
                    publish(JobEvent::Sample { index, step, url });
                    Control::Continue
                }
                Event::Saved(path) => {
                    saved = Instant::now();
                    keep_only_latest(&path);
                    Control::Continue
                }
                Event::Boundary { .. } => {
                    if renewed.elapsed() > Duration::from_secs(60) {
                        renewed = Instant::now();
                        match db.ledger.renew_hold(job.hold_id) {
                            Ok(true) => {}
                            // Released by the sweeper: the training may not go on unpaid.
                            Ok(false) => {
                                why = Why::HoldLost;
                                return Control::Stop;
                            }
                            Err(e) => log::warn!("training {}: renewing its hold: {e}", job.id),
                        }
                    }
                    if let Some((reason, control)) = interrupted() {
                        why = reason;
                        return control;
                    }
                    if share.due() && images_waiting(db) {
                        if !images_fit_beside(jobs, training_bytes) {
                            why = Why::ImagesNeedTheMemory;
                            return Control::Pause;
                        }
                        publish(JobEvent::Stage { stage: "paused: image jobs run first".into() });
                        jobs.metrics.training_yields.fetch_add(1, Ordering::Relaxed);
                        let t0 = Instant::now();
                        run_images(db);
                        share.images_took = t0.elapsed();
                        share.since = Instant::now();
                        // A stop or a cancel that came while the images ran is seen now, not
                        // after another step.
                        if let Some((reason, control)) = interrupted() {
                            why = reason;
                            return control;
                        }
                        publish(JobEvent::Stage { stage: "training".into() });
                    }
                    if !every.is_zero() && saved.elapsed() >= every { Control::Checkpoint } else { Control::Continue }
                }
            })
        }));
        let trained = match result {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                cleanup(&dir);
                return fail_internal(jobs, db, job, format!("training: {e:#}"));
            }
            Err(panic) => {
                cleanup(&dir);
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                return fail_internal(jobs, db, job, format!("the trainer panicked: {}", msg.unwrap_or_default()));
            }
        };
        if let Some(out) = trained.out {
            // A cancel after the last step boundary still wins: nothing is stored or charged.
            if jobs.canceled_by_user(&job.id) {
                cleanup(&dir);
                return end_without_images(jobs, db, job, JobStatus::Canceled, None);
            }
            return finish(jobs, db, job, &spec, &out);
        }
        match why {
            Why::HoldLost => {
                cleanup(&dir);
                return fail_internal(jobs, db, job, "the training's allowance hold was released (expired)".into());
            }
            Why::Canceled => {
                cleanup(&dir);
                return end_without_images(jobs, db, job, JobStatus::Canceled, None);
            }
            Why::Stopping if jobs.canceled_by_user(&job.id) => {
                cleanup(&dir);
                return end_without_images(jobs, db, job, JobStatus::Canceled, None);
            }
            Why::Stopping => {
                // Checkpointed: the next start resumes it, with the hold it has.
                store::requeue(&db.app, &job.id)?;
                publish(JobEvent::Stage {
                    stage: "paused: the server is stopping; it resumes at the next start".into(),
                });
                return Ok(());
            }
            Why::ImagesNeedTheMemory | Why::Running => {
                publish(JobEvent::Stage { stage: "paused: image jobs run first (checkpointed)".into() });
                jobs.metrics.training_yields.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                run_images(db);
                share.images_took = t0.elapsed();
                share.since = Instant::now();
                if jobs.canceled_by_user(&job.id) {
                    cleanup(&dir);
                    return end_without_images(jobs, db, job, JobStatus::Canceled, None);
                }
            }
        }
    }
}

/// After checkpoint `saved` (`…/checkpoints/step_N`), the older ones go: a resume needs only
/// the latest, and each holds the LoRA and two optimizer moments.
fn keep_only_latest(saved: &Path) {
    let Some(dir) = saved.parent().filter(|d| d.file_name().is_some_and(|n| n == "checkpoints")) else { return };
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p != saved && entry.file_name().to_string_lossy().starts_with("step_") {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

/// Frees what a finished training no longer needs: the dataset copy and the checkpoints (the
/// loss log and samples stay for the job's page).
fn cleanup(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir.join("images"));
    let _ = std::fs::remove_dir_all(run_dir(dir).join("checkpoints"));
}

/// Stores the LoRA in the owner's library, marks the job succeeded and captures the allowance.
fn finish(
    jobs: &Jobs,
    db: &mut Conn,
    job: &Job,
    spec: &crate::jobs::training_spec::TrainingSpec,
    out: &Path,
) -> anyhow::Result<()> {
    let dir = jobs.training_dir(&job.id);
    let sidecar = Sidecar {
        label: Some(spec.name.clone()),
        triggers: vec![spec.trigger.clone()],
        description: Some(format!(
            "Trained on {} images for {} steps (rank {}, lr {}, {}²)",
            spec.images, spec.steps, spec.rank, spec.lr, spec.resolution
        )),
        base_model: Some(job.model.clone()),
        training_job: Some(job.id.clone()),
        created_at: Some(chrono::Utc::now().to_rfc3339()),
        ..Sidecar::default()
    };
    let preview = samples(&dir).pop();
    // Stored by an earlier run of this job that crashed before marking it succeeded: that copy
    // is the result (never a second `name-2`).
    let name = match jobs.loras.trained_by(job.user_id, &job.id) {
        Some(n) => n,
        None => match jobs.loras.store_trained(job.user_id, &spec.name, out, &sidecar, preview.as_deref()) {
            Ok(n) => n,
            Err(e) => return fail_internal(jobs, db, job, format!("storing the trained LoRA: {e:#}")),
        },
    };
    // The job is marked succeeded before its checkpoints go: a crash in between resumes (and
    // finds the stored LoRA above) rather than failing a training whose LoRA was delivered.
    let completed = match store::complete_training(&db.app, &job.id, &name, db.now()) {
        Ok(c) => c,
        Err(e) => {
            let _ = jobs.loras.delete(job.user_id, &name);
            return Err(e.into());
        }
    };
    if !completed {
        // No longer running (ended by another path meanwhile): the LoRA goes, the allowance
        // comes back (a hold that path already settled stays as it is).
        let _ = jobs.loras.delete(job.user_id, &name);
        if let Err(e) = db.ledger.release(job.hold_id) {
            log::info!("training {}: its hold was already settled: {e}", job.id);
        }
        jobs.hub.publish(&job.id, job.user_id, JobEvent::Canceled);
        return Ok(());
    }
    // A capture that fails here leaves the hold open on a succeeded job: the start-up
    // reconciliation captures it (never a release: the LoRA was delivered).
    let captured = db.ledger.capture(job.hold_id, None)?;
    cleanup(&dir);
    let _ = std::fs::remove_file(out);
    jobs.hub.publish(&job.id, job.user_id, JobEvent::Trained { lora: name, allowance_charged: captured.hold.captured });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_decides_when_a_training_yields() {
        let took = Duration::from_secs(10);
        let now = Instant::now();
        assert!(Share { share: 0.0, since: now, images_took: took }.due(), "0: images always first");
        assert!(!Share { share: 0.5, since: now, images_took: took }.due(), "0.5: as long again first");
        let long_ago = now - Duration::from_secs(11);
        assert!(Share { share: 0.5, since: long_ago, images_took: took }.due());
        assert!(!Share { share: 0.75, since: long_ago, images_took: took }.due(), "0.75: 3× the images' time");
        assert!(Share { share: 0.9, since: now, images_took: Duration::ZERO }.due(), "nothing to make up for");
    }

    #[test]
    fn a_step_logged_again_after_a_resume_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(run_dir(dir.path())).unwrap();
        let csv = "step,loss,mean,grad_norm,seconds\n1,0.5,0.5,1,0.1\n2,0.4,0.45,1,0.1\n3,0.9,0.6,1,0.1\n3,0.3,0.3,1,0.1\n4,0.2,0.25,1,0.1\n";
        std::fs::write(run_dir(dir.path()).join("loss.csv"), csv).unwrap();
        let h = loss_history(dir.path());
        assert_eq!(h.iter().map(|p| p.step).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(h[2].loss, 0.3);
    }
}
