//! Live progress: every job event goes to one broadcast channel that SSE streams filter by job
//! or user, and the latest state of each live job is kept so a stream opened late starts from
//! where the job is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::ledger::UserId;

/// What happened to a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JobEvent {
    /// Waiting; `position` 1 is next.
    Queued {
        position: usize,
        queue_length: usize,
    },
    Started,
    /// A stage of the pipeline (encoding the prompt, loading, decoding).
    Stage {
        stage: String,
    },
    Step {
        image: usize,
        images: usize,
        step: usize,
        steps: usize,
        it_per_s: f64,
        eta_s: f64,
    },
    /// A PNG data URL of the current estimate, at 1/8 size.
    Preview {
        image: usize,
        step: usize,
        data_url: String,
    },
    /// A training step done: the loss, its running mean (last 50 steps), speed and time left.
    TrainingStep {
        step: usize,
        steps: usize,
        loss: f32,
        mean: f32,
        it_per_s: f64,
        eta_s: f64,
    },
    /// A training's sample image (`GET url`, owner only): sample `index` of the job, made
    /// after `step` steps.
    Sample {
        index: usize,
        step: usize,
        url: String,
    },
    Succeeded {
        images: Vec<String>,
        credits_charged: i64,
    },
    /// A training ended well: its LoRA is in the owner's library as `lora`.
    Trained {
        lora: String,
        allowance_charged: i64,
    },
    Failed {
        error: String,
    },
    Canceled,
}

impl JobEvent {
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobEvent::Succeeded { .. } | JobEvent::Trained { .. } | JobEvent::Failed { .. } | JobEvent::Canceled
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::Queued { .. } => "queued",
            JobEvent::Started => "started",
            JobEvent::Stage { .. } => "stage",
            JobEvent::Step { .. } => "step",
            JobEvent::Preview { .. } => "preview",
            JobEvent::TrainingStep { .. } => "training_step",
            JobEvent::Sample { .. } => "sample",
            JobEvent::Trained { .. } => "trained",
            JobEvent::Succeeded { .. } => "succeeded",
            JobEvent::Failed { .. } => "failed",
            JobEvent::Canceled => "canceled",
        }
    }
}

/// An event with the job and user it belongs to.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    pub job_id: String,
    pub user_id: UserId,
    #[serde(flatten)]
    pub event: JobEvent,
}

/// The latest of each kind of event of a job still queued or running.
#[derive(Debug, Clone, Default)]
struct Live {
    user_id: UserId,
    status: Option<JobEvent>,
    stage: Option<JobEvent>,
    step: Option<JobEvent>,
    preview: Option<JobEvent>,
}

pub struct ProgressHub {
    tx: broadcast::Sender<Arc<Envelope>>,
    live: Mutex<HashMap<String, Live>>,
    /// Jobs that ended recently: a late non-final event (a queue position computed just
    /// before a cancel) must not bring them back.
    ended: Mutex<(std::collections::HashSet<String>, std::collections::VecDeque<String>)>,
}

impl Default for ProgressHub {
    fn default() -> Self {
        ProgressHub::new()
    }
}

impl ProgressHub {
    pub fn new() -> ProgressHub {
        // A slow client that falls this far behind skips events (it is told so and resyncs).
        let (tx, _) = broadcast::channel(4096);
        ProgressHub { tx, live: Mutex::new(HashMap::new()), ended: Mutex::new(Default::default()) }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Envelope>> {
        self.tx.subscribe()
    }

    pub fn publish(&self, job_id: &str, user_id: UserId, event: JobEvent) {
        {
            let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
            if event.is_final() {
                if ended.0.insert(job_id.to_string()) {
                    ended.1.push_back(job_id.to_string());
                    if ended.1.len() > 10_000 {
                        let old = ended.1.pop_front().expect("not empty");
                        ended.0.remove(&old);
                    }
                }
            } else if ended.0.contains(job_id) {
                return;
            }
        }
        {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            if event.is_final() {
                live.remove(job_id);
            } else {
                let l = live.entry(job_id.to_string()).or_insert_with(|| Live { user_id, ..Default::default() });
                match &event {
                    JobEvent::Queued { .. } | JobEvent::Started => l.status = Some(event.clone()),
                    JobEvent::Stage { .. } => l.stage = Some(event.clone()),
                    JobEvent::Step { .. } | JobEvent::TrainingStep { .. } => l.step = Some(event.clone()),
                    JobEvent::Preview { .. } | JobEvent::Sample { .. } => l.preview = Some(event.clone()),
                    _ => {}
                }
            }
        }
        // No receiver is fine: nobody is watching.
        let _ = self.tx.send(Arc::new(Envelope { job_id: job_id.to_string(), user_id, event }));
    }

    /// The events that bring a new watcher of `job_id` (or of all of `user`'s jobs) up to date.
    pub fn snapshot(&self, job_id: Option<&str>, user: Option<UserId>) -> Vec<Envelope> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (id, l) in live.iter() {
            if job_id.is_some_and(|j| j != id) || user.is_some_and(|u| u != l.user_id) {
                continue;
            }
            for e in [&l.status, &l.stage, &l.step, &l.preview].into_iter().flatten() {
                out.push(Envelope { job_id: id.clone(), user_id: l.user_id, event: e.clone() });
            }
        }
        out
    }

    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }
}
