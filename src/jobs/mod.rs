//! The job queue and its worker: submission (validate → authorize and hold credits → persist →
//! enqueue, all or nothing), the order jobs start in, one worker per device running the
//! pipeline off the async threads, progress events, and settling each job's hold exactly once
//! (captured on success, released on failure or cancel), also across restarts.

mod conn;
pub mod gallery;
pub mod progress;
pub mod queue;
mod settle;
pub mod store;
pub mod trainer;
mod training;
pub mod training_spec;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde::Serialize;

use crate::config::QueueConfig;
use crate::jobs::progress::{JobEvent, ProgressHub};
use crate::jobs::queue::Scheduler;
use crate::jobs::store::{Job, JobSpec, JobStatus, NewJob};
use crate::ledger::{HoldStatus, JobAuthorization, JobParams, JobRequest, LedgerError, Refusal, UserId};
use crate::models::ModelRegistry;
use crate::spec::Limits;

pub use conn::{Conn, ConnConfig, Pool};
pub use worker::Worker;

/// Why a job was not accepted. The server maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// Bad parameters (400).
    #[error("{0}")]
    Invalid(String),
    /// No such model (404).
    #[error("unknown model {0:?}")]
    UnknownModel(String),
    /// The model is declared but its files are missing (503).
    #[error("model {id} is not available: {reason}")]
    ModelUnavailable { id: String, reason: String },
    /// Too many jobs waiting (429).
    #[error("you already have {max} jobs waiting; wait for one to start or cancel one")]
    QueueFull { max: u32 },
    /// The plan or the balance does not allow it (402 / 403).
    #[error("{0}")]
    Refused(Refusal),
    /// The Idempotency-Key was used before for a different request (422).
    #[error(
        "the Idempotency-Key {key:?} was already used for a different request (job {job_id}); send the same request again, or use a new key for a new one"
    )]
    KeyReused { key: String, job_id: String },
    /// The Idempotency-Key's first request has not made its job (409).
    #[error("a request with the Idempotency-Key {key:?} is still being processed; try again shortly")]
    KeyInProgress { key: String },
    /// A LoRA the caller may not use or that does not fit the model (404 / 400), or a
    /// training's LoRA name that is taken (409).
    #[error(transparent)]
    Lora(#[from] crate::loras::LibraryError),
    /// A training's dataset that is not the caller's or does not exist (404 / 400).
    #[error(transparent)]
    Dataset(#[from] crate::datasets::DatasetError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<LedgerError> for SubmitError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Refused(Refusal::InvalidParams { message }) => SubmitError::Invalid(message),
            LedgerError::Refused(Refusal::UnknownModel { model }) => SubmitError::UnknownModel(model),
            LedgerError::Refused(r) => SubmitError::Refused(r),
            LedgerError::Invalid(m) => SubmitError::Invalid(m),
            LedgerError::IdempotencyConflict { key, job_id, .. } => SubmitError::KeyReused { key, job_id },
            other => SubmitError::Internal(other.into()),
        }
    }
}

impl From<rusqlite::Error> for SubmitError {
    fn from(e: rusqlite::Error) -> Self {
        SubmitError::Internal(e.into())
    }
}

/// An Idempotency-Key must be 1 to 200 visible ASCII characters (as HTTP headers carry them
/// reliably); anything else is refused rather than ignored, so a retry never charges twice.
pub fn validate_idempotency_key(key: &str) -> Result<(), SubmitError> {
    if key.is_empty() || key.len() > 200 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SubmitError::Invalid(
            "Idempotency-Key must be 1 to 200 visible ASCII characters (letters, digits, punctuation; no spaces)"
                .into(),
        ));
    }
    Ok(())
}

/// Inside a submission's ledger transaction, once the hold is placed or found: the job an
/// earlier request with the same key made (its row was written with its hold; without one,
/// that request has not finished), or the new job's row written beside its hold.
pub(crate) fn replay_or_insert<'a>(
    tx: &rusqlite::Connection,
    auth: &JobAuthorization,
    key: &str,
    new: impl FnOnce(&JobAuthorization) -> NewJob<'a>,
) -> Result<Submitted, SubmitError> {
    if auth.replayed {
        return match store::get_job(tx, &auth.hold.job_id)? {
            Some(job) => Ok(Submitted { job, replayed: true }),
            None => Err(SubmitError::KeyInProgress { key: key.to_string() }),
        };
    }
    let new = new(auth);
    store::insert_job(tx, &new)?;
    let id = new.id;
    let job = store::get_job(tx, id)?.ok_or_else(|| anyhow::anyhow!("job {id} vanished"))?;
    Ok(Submitted { job, replayed: false })
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub steps: AtomicU64,
    /// Sum of step times, in microseconds.
    pub step_micros: AtomicU64,
    pub last_step_micros: AtomicU64,
    pub images: AtomicU64,
    /// Components loaded from disk (with `keep_resident`, a change of LoRAs loads none).
    pub transformer_loads: AtomicU64,
    pub text_encoder_loads: AtomicU64,
    pub vae_loads: AtomicU64,
    /// Training steps done (all trainings of this process).
    pub training_steps: AtomicU64,
    /// Times a training yielded the device to waiting image jobs.
    pub training_yields: AtomicU64,
    /// The most training steps an image job waited for (submitted while a training ran, from
    /// its submission to its start): 1 when trainings yield at every step boundary.
    pub image_wait_training_steps_max: AtomicU64,
}

/// A submitted job and what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct Submitted {
    pub job: Job,
    /// The same request was submitted before (same idempotency key): this is that job.
    pub replayed: bool,
}

/// The queue, shared by the HTTP handlers and the worker.
pub struct Jobs {
    pub hub: ProgressHub,
    pub models: Arc<ModelRegistry>,
    /// The LoRA libraries jobs name LoRAs from.
    pub loras: Arc<crate::loras::Library>,
    /// The training datasets training jobs read.
    pub datasets: Arc<crate::datasets::Datasets>,
    pub metrics: Metrics,
    limits: Limits,
    queue: QueueConfig,
    images_dir: std::path::PathBuf,
    scheduler: Mutex<Scheduler>,
    wake: (Mutex<bool>, Condvar),
    /// The jobs the worker runs now, each with the flag that cancels it (two while an image
    /// job runs inside a training's pause).
    running: Mutex<Vec<(String, Arc<AtomicBool>)>>,
    /// Running jobs a user canceled (a stop sets every running job's flag too: this tells the
    /// two apart, so a training canceled before a stop is not resumed at the next start).
    user_canceled: Mutex<std::collections::HashSet<String>>,
    stopping: AtomicBool,
    /// The device-memory budget and the last job's memory plan per model (admin view).
    pub memory: Mutex<MemoryState>,
    /// `[training]` and where training runs keep their files (`<data>/trainings/<job id>/`).
    training: crate::config::TrainingConfig,
    trainings_dir: std::path::PathBuf,
    /// Whether a training runs now, and for image jobs submitted meanwhile the training steps
    /// done then (`metrics.training_steps`), to measure their wait in steps.
    training_active: AtomicBool,
    submitted_at_step: Mutex<std::collections::HashMap<String, u64>>,
}

/// What `/api/admin/models` shows of memory: the budget jobs are planned against and the
/// plan each model's last job ran (or was refused) with.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MemoryState {
    /// Bytes; None: no budget (every job planned and logged, none refused).
    pub memory_budget: Option<u64>,
    /// How the budget was found (`auto` on the CPU, as configured, …).
    pub memory_budget_source: String,
    /// Model id → the memory plan of its last job.
    pub memory_plans: std::collections::BTreeMap<String, crate::engine::memory::MemoryPlan>,
}

impl Jobs {
    pub fn new(
        models: Arc<ModelRegistry>,
        limits: crate::spec::ConfiguredLimits,
        queue: QueueConfig,
        images_dir: std::path::PathBuf,
        loras: Arc<crate::loras::Library>,
        datasets: Arc<crate::datasets::Datasets>,
    ) -> Jobs {
        let trainings_dir = images_dir.parent().unwrap_or(std::path::Path::new(".")).join("trainings");
        Jobs {
            training: crate::config::TrainingConfig::default(),
            trainings_dir,
            training_active: AtomicBool::new(false),
            submitted_at_step: Mutex::new(Default::default()),
            hub: ProgressHub::new(),
            models,
            loras,
            datasets,
            metrics: Metrics::default(),
            limits: Limits::server(&limits),
            scheduler: Mutex::new(Scheduler::new(&queue.weights)),
            queue,
            images_dir,
            wake: (Mutex::new(false), Condvar::new()),
            running: Mutex::new(Vec::new()),
            user_canceled: Mutex::new(Default::default()),
            stopping: AtomicBool::new(false),
            memory: Mutex::new(MemoryState::default()),
        }
    }

    /// With `[training]` settings and the folder of training runs.
    pub fn with_training(mut self, cfg: crate::config::TrainingConfig, dir: std::path::PathBuf) -> Jobs {
        self.training = cfg;
        self.trainings_dir = dir;
        self
    }

    /// The folder of training job `id` (its dataset copy, loss log, checkpoints, samples).
    pub fn training_dir(&self, id: &str) -> std::path::PathBuf {
        self.trainings_dir.join(id)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn images_dir(&self) -> &std::path::Path {
        &self.images_dir
    }

    /// Checks what the ledger does not: that the model exists and can run, then the request
    /// against the server's limits ([`JobSpec::validate`]).
    pub fn validate(&self, spec: &JobSpec) -> Result<(), SubmitError> {
        let model = self.models.get(&spec.model).ok_or_else(|| SubmitError::UnknownModel(spec.model.clone()))?;
        if let crate::models::ModelState::Missing { reason } = &model.state {
            return Err(SubmitError::ModelUnavailable { id: spec.model.clone(), reason: reason.clone() });
        }
        spec.validate(&self.limits).map_err(|e| SubmitError::Invalid(e.0))?;
        Ok(())
    }

    /// Each LoRA of `spec` is one `user` may use (their own or the studio's; anyone else's is
    /// as unknown as a missing one) and fits the model's transformer.
    pub fn check_loras(&self, user: UserId, spec: &JobSpec) -> Result<(), SubmitError> {
        let hidden = self.models.get(&spec.model).and_then(|m| m.hidden_size);
        for l in &spec.loras {
            let (_, path) = self.loras.resolve(user, &l.name)?;
            if let Some(h) = hidden {
                self.loras.check_fits(&path, &l.name, &spec.model, h)?;
            }
        }
        Ok(())
    }

    /// The ledger's view of a job's parameters.
    pub fn params(spec: &JobSpec) -> JobParams {
        JobParams {
            width: spec.width,
            height: spec.height,
            batch: spec.batch,
            steps: spec.steps,
            seed: spec.seed,
            guidance: spec.guidance,
            loras: spec.loras.len() as u32,
            ..JobParams::default()
        }
    }

    /// What an idempotency key is bound to: the spec with the model's defaults filled in,
    /// hashed. (A missing seed stays missing: each attempt would pick another.)
    fn request_hash(&self, spec: &JobSpec) -> String {
        use sha2::Digest;
        let mut full = spec.clone();
        if let Some(m) = self.models.get(&spec.model) {
            full.steps = Some(spec.steps.unwrap_or(m.default_steps));
            if m.kind == Some(crate::config::FluxKind::Dev) {
                full.guidance = Some(spec.guidance.unwrap_or(crate::engine::pipeline::DEFAULT_GUIDANCE as f64));
            }
        }
        let json = serde_json::to_string(&full).expect("a JobSpec serializes");
        format!("{:x}", sha2::Sha256::digest(json.as_bytes()))
    }

    /// Submits a job for `user`, all or nothing: validated, then in one transaction the
    /// per-user queue limit counted, the ledger's authorization (plan, quota, price, hold) and
    /// the job row. The same `idempotency_key` with the same request returns the job made the
    /// first time and charges nothing more; with another request it is refused.
    pub fn submit(
        &self,
        db: &mut Conn,
        user: UserId,
        mut spec: JobSpec,
        idempotency_key: Option<String>,
    ) -> Result<Submitted, SubmitError> {
        // `<lora:name:w>` tags select LoRAs and never reach the encoders.
        spec.take_prompt_tags().map_err(|e| SubmitError::Invalid(e.0))?;
        self.validate(&spec)?;
        self.check_loras(user, &spec)?;
        if let Some(key) = &idempotency_key {
            validate_idempotency_key(key)?;
        }
        let job_id = crate::secret::random_hex(16);
        let key = idempotency_key.unwrap_or_else(|| job_id.clone());
        let request = JobRequest {
            job_id: job_id.clone(),
            idempotency_key: key.clone(),
            model_id: spec.model.clone(),
            params: Self::params(&spec),
            request_hash: Some(self.request_hash(&spec)),
        };
        let seed = spec.seed.unwrap_or_else(|| crate::secret::random_u32() as u64);
        let now = db.now();
        let max = self.queue.max_queued_per_user;
        let submitted = db.ledger.authorize_job_with(
            user,
            &request,
            |tx| {
                if store::count_queued(tx, user)? >= max {
                    return Err(SubmitError::QueueFull { max });
                }
                Ok(())
            },
            |tx, auth| {
                let new = |auth: &JobAuthorization| NewJob {
                    id: &job_id,
                    user_id: user,
                    spec: &spec,
                    seed,
                    queue: auth.queue,
                    hold_id: auth.hold.id,
                    price: auth.hold.amount,
                    idempotency_key: &key,
                    now,
                    training: None,
                };
                replay_or_insert(tx, auth, &key, new)
            },
        )?;
        if !submitted.replayed {
            if self.training_active.load(Ordering::Relaxed) {
                let at = self.metrics.training_steps.load(Ordering::Relaxed);
                self.submitted_at_step.lock().unwrap_or_else(|p| p.into_inner()).insert(job_id, at);
            }
            self.publish_positions(db);
            self.wake();
        }
        Ok(submitted)
    }

    /// Cancels a queued job (its hold is released now) or asks the worker to stop a running
    /// one (released when it stops). Returns the job's status after the request: when another
    /// cancel or the worker changed it first, the status it has now.
    pub fn cancel(&self, db: &mut Conn, job: &Job) -> anyhow::Result<JobStatus> {
        if job.status == JobStatus::Queued
            && store::finish(&db.app, &job.id, &[JobStatus::Queued], JobStatus::Canceled, None, db.now())?
        {
            db.ledger.release(job.hold_id)?;
            if job.kind == store::JobKind::Training {
                // The dataset copy it would have trained on.
                let _ = std::fs::remove_dir_all(self.training_dir(&job.id));
            }
            self.hub.publish(&job.id, job.user_id, JobEvent::Canceled);
            self.publish_positions(db);
            return Ok(JobStatus::Canceled);
        }
        // Lost a race (or it was running): act on what the job is now.
        let now = store::get_job(&db.app, &job.id)?.map_or(job.status, |j| j.status);
        if now == JobStatus::Running {
            self.cancel_running(&job.id);
        }
        Ok(now)
    }

    /// Cancels every queued or running job of `user` (an account being disabled); returns how
    /// many.
    pub fn cancel_all_of(&self, db: &mut Conn, user: UserId) -> anyhow::Result<usize> {
        let live = store::list_jobs(&db.app, Some(user), &[JobStatus::Queued, JobStatus::Running], u32::MAX)?;
        for job in &live {
            self.cancel(db, job)?;
        }
        Ok(live.len())
    }

    /// Whether a user canceled running job `job_id` (not just the server stopping).
    pub fn canceled_by_user(&self, job_id: &str) -> bool {
        self.user_canceled.lock().unwrap_or_else(|p| p.into_inner()).contains(job_id)
    }

    fn cancel_running(&self, job_id: &str) {
        // The worker registers a job here before it marks it running, so a job seen running
        // is always found.
        for (id, flag) in self.running.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if id == job_id {
                self.user_canceled.lock().unwrap_or_else(|p| p.into_inner()).insert(job_id.to_string());
                flag.store(true, Ordering::Relaxed);
            }
        }
    }

    /// The waiting jobs in the order they would start (what queue positions are).
    fn queue_order(&self, db: &mut Conn) -> rusqlite::Result<Vec<store::Waiting>> {
        let mut waiting = store::waiting(&db.app)?;
        let order = self.scheduler.lock().unwrap_or_else(|p| p.into_inner()).order(&waiting);
        waiting.sort_by_key(|w| order.iter().position(|id| id == &w.job_id));
        Ok(waiting)
    }

    /// Sends every queued job its position.
    pub fn publish_positions(&self, db: &mut Conn) {
        match self.queue_order(db) {
            Ok(order) => {
                let n = order.len();
                for (i, w) in order.iter().enumerate() {
                    self.hub.publish(&w.job_id, w.user_id, JobEvent::Queued { position: i + 1, queue_length: n });
                }
            }
            Err(e) => log::warn!("reading the queue: {e}"),
        }
    }

    /// Queue positions of the waiting jobs (job id → 1-based position).
    pub fn positions(&self, db: &mut Conn) -> anyhow::Result<Vec<(String, usize)>> {
        Ok(self.queue_order(db)?.into_iter().enumerate().map(|(i, w)| (w.job_id, i + 1)).collect())
    }

    pub fn wake(&self) {
        let (lock, cv) = &self.wake;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    /// Stops the worker: the running job stops at its next step (failed, credits released);
    /// queued jobs stay queued for the next start.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        for (_, flag) in self.running.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            flag.store(true, Ordering::Relaxed);
        }
        self.wake();
    }

    /// Settles what a crash or restart left behind, before the worker starts:
    /// - jobs that were running failed (the process died under them): released; a training
    ///   with a checkpoint is queued again instead (it resumes from it, its hold kept);
    /// - holds with no job (the process died between placing the hold and saving the job): released;
    /// - holds of jobs that already ended: captured if the job succeeded, else released;
    /// - queued jobs whose hold is gone (released by the sweeper): failed.
    ///
    /// Returns how many holds were settled.
    pub fn reconcile(&self, db: &mut Conn) -> anyhow::Result<usize> {
        let now = db.now();
        for job in store::list_jobs(&db.app, None, &[JobStatus::Running], u32::MAX)? {
            if job.kind == store::JobKind::Training {
                // Its LoRA was stored but the job not yet marked: it succeeded (captured below).
                if let Some(lora) = self.loras.trained_by(job.user_id, &job.id) {
                    store::complete_training(&db.app, &job.id, &lora, now)?;
                    log::warn!("training {} had stored its LoRA {lora} before the stop; it succeeded", job.id);
                    continue;
                }
                // A training resumes from its last checkpoint, with the hold it has; without
                // one it fails now and its allowance comes back below.
                if trainer::latest_checkpoint(&self.training_dir(&job.id)).is_some() {
                    store::requeue(&db.app, &job.id)?;
                    log::warn!("training {} was interrupted; it resumes from its last checkpoint", job.id);
                } else {
                    store::finish(
                        &db.app,
                        &job.id,
                        &[JobStatus::Running],
                        JobStatus::Failed,
                        Some("the server stopped before this training's first checkpoint; the allowance was released"),
                        now,
                    )?;
                }
                continue;
            }
            store::finish(
                &db.app,
                &job.id,
                &[JobStatus::Running],
                JobStatus::Failed,
                Some("the server stopped while this job was running; its credits were released"),
                now,
            )?;
        }
        let mut settled = 0;
        for hold in db.ledger.all_open_holds()? {
            let job = store::get_job(&db.app, &hold.job_id)?;
            match job.map(|j| j.status) {
                Some(JobStatus::Queued) => continue,
                Some(JobStatus::Succeeded) => {
                    db.ledger.capture(hold.id, None)?;
                }
                _ => {
                    db.ledger.release(hold.id)?;
                }
            }
            settled += 1;
        }
        for job in store::list_jobs(&db.app, None, &[JobStatus::Queued], u32::MAX)? {
            if db.ledger.hold(job.hold_id)?.status != HoldStatus::Held {
                store::finish(
                    &db.app,
                    &job.id,
                    &[JobStatus::Queued],
                    JobStatus::Failed,
                    Some("the job waited longer than its credit hold lasts"),
                    now,
                )?;
            }
        }
        self.sweep_trainings(db);
        Ok(settled)
    }

    /// Removes training folders no job owns (a crash between the dataset copy and the ledger's
    /// commit) and half-written download conversions.
    fn sweep_trainings(&self, db: &mut Conn) {
        let Ok(entries) = std::fs::read_dir(&self.trainings_dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let orphan = name.starts_with('.') || matches!(store::get_job(&db.app, &name), Ok(None));
            if orphan && let Err(e) = std::fs::remove_dir_all(entry.path()) {
                log::warn!("removing {}: {e}", entry.path().display());
            }
        }
    }
}
