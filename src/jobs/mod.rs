//! The job queue and its worker: submission (validate → authorize and hold credits → persist →
//! enqueue, all or nothing), the order jobs start in, one worker per device running the
//! pipeline off the async threads, progress events, and settling each job's hold exactly once
//! (captured on success, released on failure or cancel), also across restarts.

pub mod db;
pub mod gallery;
pub mod progress;
pub mod queue;
pub mod store;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use serde::Serialize;

use crate::config::{Limits, QueueConfig};
use crate::jobs::db::Conn;
use crate::jobs::progress::{JobEvent, ProgressHub};
use crate::jobs::queue::Scheduler;
use crate::jobs::store::{Job, JobSpec, JobStatus, NewJob};
use crate::ledger::{HoldStatus, JobParams, JobRequest, LedgerError, Refusal, UserId};
use crate::models::ModelRegistry;

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
            e @ LedgerError::IdempotencyConflict { .. } => SubmitError::Invalid(e.to_string()),
            other => SubmitError::Internal(other.into()),
        }
    }
}

impl From<rusqlite::Error> for SubmitError {
    fn from(e: rusqlite::Error) -> Self {
        SubmitError::Internal(e.into())
    }
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub steps: AtomicU64,
    /// Sum of step times, in microseconds.
    pub step_micros: AtomicU64,
    pub last_step_micros: AtomicU64,
    pub images: AtomicU64,
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
    pub metrics: Metrics,
    limits: Limits,
    queue: QueueConfig,
    images_dir: std::path::PathBuf,
    scheduler: Mutex<Scheduler>,
    wake: (Mutex<bool>, Condvar),
    /// The job the worker runs now and the flag that cancels it.
    running: Mutex<Option<(String, Arc<AtomicBool>)>>,
    stopping: AtomicBool,
}

impl Jobs {
    pub fn new(models: Arc<ModelRegistry>, limits: Limits, queue: QueueConfig, images_dir: std::path::PathBuf) -> Jobs {
        Jobs {
            hub: ProgressHub::new(),
            models,
            metrics: Metrics::default(),
            limits,
            scheduler: Mutex::new(Scheduler::new(&queue.weights)),
            queue,
            images_dir,
            wake: (Mutex::new(false), Condvar::new()),
            running: Mutex::new(None),
            stopping: AtomicBool::new(false),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn images_dir(&self) -> &std::path::Path {
        &self.images_dir
    }

    /// Checks what the ledger does not: the prompt, the size against the configured limits,
    /// steps, guidance, and that the model exists and can run.
    pub fn validate(&self, spec: &JobSpec) -> Result<(), SubmitError> {
        let model = self.models.get(&spec.model).ok_or_else(|| SubmitError::UnknownModel(spec.model.clone()))?;
        if let crate::models::ModelState::Missing { reason } = &model.state {
            return Err(SubmitError::ModelUnavailable { id: spec.model.clone(), reason: reason.clone() });
        }
        if spec.prompt.trim().is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if spec.prompt.len() > 10_000 {
            return Err(SubmitError::Invalid("the prompt is longer than 10000 bytes".into()));
        }
        let l = &self.limits;
        if spec.width < 64 || spec.height < 64 || spec.width > l.max_width || spec.height > l.max_height {
            return Err(SubmitError::Invalid(format!(
                "size {}x{} is outside 64x64 to {}x{}",
                spec.width, spec.height, l.max_width, l.max_height
            )));
        }
        if spec.width % 16 != 0 || spec.height % 16 != 0 {
            return Err(SubmitError::Invalid(format!("width and height must be multiples of 16 (got {}x{})", spec.width, spec.height)));
        }
        if let Some(s) = spec.steps {
            if s == 0 || s > l.max_steps {
                return Err(SubmitError::Invalid(format!("steps must be between 1 and {}", l.max_steps)));
            }
        }
        if let Some(g) = spec.guidance {
            let max = crate::engine::pipeline::MAX_GUIDANCE;
            if !(0.0..=f64::from(max)).contains(&g) || !g.is_finite() {
                return Err(SubmitError::Invalid(format!("guidance must be between 0 and {max}")));
            }
        }
        if spec.batch == 0 || spec.batch > 64 {
            return Err(SubmitError::Invalid("batch must be between 1 and 64".into()));
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
            ..JobParams::default()
        }
    }

    /// Submits a job for `user`, all or nothing: validated, authorized by the ledger (plan,
    /// quota, price, hold), persisted, then queued. The same `idempotency_key` again returns
    /// the job made the first time and charges nothing more.
    pub fn submit(&self, db: &mut Conn, user: UserId, spec: JobSpec, idempotency_key: Option<String>) -> Result<Submitted, SubmitError> {
        self.validate(&spec)?;
        if let Some(key) = &idempotency_key {
            if key.is_empty() || key.len() > 200 {
                return Err(SubmitError::Invalid("Idempotency-Key must be 1 to 200 characters".into()));
            }
            if let Some(job) = store::job_by_key(&db.app, user, key)? {
                return Ok(Submitted { job, replayed: true });
            }
        }
        let max = self.queue.max_queued_per_user;
        if store::count_queued(&db.app, user)? >= max {
            return Err(SubmitError::QueueFull { max });
        }
        let job_id = crate::secret::random_hex(16);
        let key = idempotency_key.unwrap_or_else(|| job_id.clone());
        let auth = db.ledger.authorize_job(
            user,
            &JobRequest { job_id: job_id.clone(), idempotency_key: key.clone(), model_id: spec.model.clone(), params: Self::params(&spec) },
        )?;
        // The key was used before: its hold is answered with the job id it was placed for.
        let job_id = auth.hold.job_id.clone();
        if auth.replayed {
            if let Some(job) = store::get_job(&db.app, &job_id)? {
                return Ok(Submitted { job, replayed: true });
            }
            // Else the process died between the hold and the job row: make the row now.
        }
        let seed = spec.seed.unwrap_or_else(|| crate::secret::random_u32() as u64);
        let now = db.now();
        let new = NewJob {
            id: &job_id,
            user_id: user,
            spec: &spec,
            seed,
            queue: auth.queue,
            hold_id: auth.hold.id,
            price: auth.hold.amount,
            idempotency_key: &key,
            now,
        };
        if let Err(e) = store::insert_job(&db.app, &new) {
            // A concurrent retry with the same key saved it first: that is this job.
            if let Some(job) = store::get_job(&db.app, &job_id)? {
                return Ok(Submitted { job, replayed: true });
            }
            // Not queued, so not charged. (A replayed hold is left to `reconcile`: the request
            // that placed it may still be saving its job.)
            if !auth.replayed {
                if let Err(r) = db.ledger.release(auth.hold.id) {
                    log::error!("releasing hold {} after a failed insert: {r}", auth.hold.id);
                }
            }
            return Err(e.into());
        }
        let job = store::get_job(&db.app, &job_id)?.ok_or_else(|| anyhow::anyhow!("job {job_id} vanished"))?;
        self.publish_positions(db);
        self.wake();
        Ok(Submitted { job, replayed: false })
    }

    /// Cancels a queued job (its hold is released now) or asks the worker to stop a running
    /// one (released when it stops). Returns the job's status after the request.
    pub fn cancel(&self, db: &mut Conn, job: &Job) -> anyhow::Result<JobStatus> {
        match job.status {
            JobStatus::Queued => {
                if store::finish(&db.app, &job.id, &[JobStatus::Queued], JobStatus::Canceled, None, db.now())? {
                    db.ledger.release(job.hold_id)?;
                    self.hub.publish(&job.id, job.user_id, JobEvent::Canceled);
                    self.publish_positions(db);
                    return Ok(JobStatus::Canceled);
                }
                // It started meanwhile: cancel it as a running job.
                self.cancel_running(&job.id);
                Ok(JobStatus::Running)
            }
            JobStatus::Running => {
                self.cancel_running(&job.id);
                Ok(JobStatus::Running)
            }
            done => Ok(done),
        }
    }

    fn cancel_running(&self, job_id: &str) {
        // The worker registers a job here before it marks it running, so a job seen running
        // is always found.
        if let Some((id, flag)) = self.running.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            if id == job_id {
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
        if let Some((_, flag)) = self.running.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            flag.store(true, Ordering::Relaxed);
        }
        self.wake();
    }

    /// Settles what a crash or restart left behind, before the worker starts:
    /// - jobs that were running failed (the process died under them): released;
    /// - holds with no job (the process died between placing the hold and saving the job): released;
    /// - holds of jobs that already ended: captured if the job succeeded, else released;
    /// - queued jobs whose hold is gone (released by the sweeper): failed.
    ///
    /// Returns how many holds were settled.
    pub fn reconcile(&self, db: &mut Conn) -> anyhow::Result<usize> {
        let now = db.now();
        for job in store::list_jobs(&db.app, None, &[JobStatus::Running], u32::MAX)? {
            store::finish(&db.app, &job.id, &[JobStatus::Running], JobStatus::Failed, Some("the server stopped while this job was running; its credits were released"), now)?;
        }
        let mut settled = 0;
        for hold in db.ledger.all_open_holds()? {
            if hold.resource != crate::ledger::Resource::Credits {
                continue;
            }
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
                store::finish(&db.app, &job.id, &[JobStatus::Queued], JobStatus::Failed, Some("the job waited longer than its credit hold lasts"), now)?;
            }
        }
        Ok(settled)
    }
}
