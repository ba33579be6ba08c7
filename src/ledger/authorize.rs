//! The one call a server makes before it queues a job: catch up the subscription, check the
//! plan's entitlements and quotas, price the job and place the hold, all in one transaction.

use rusqlite::Connection;
use serde::Serialize;

use crate::ledger::credits::{self, Hold, HoldRequest};
use crate::ledger::plans::{JobParams, ModelKind, Price, QueueClass, Refusal};
use crate::ledger::usage::UsageKind;
use crate::ledger::{Ledger, LedgerError, Resource, Tx, UserId, subscriptions};

/// A generation job to authorize.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRequest {
    pub job_id: String,
    /// The client's key for this request: retrying with it never charges twice.
    pub idempotency_key: String,
    pub model_id: String,
    pub params: JobParams,
    /// What the key is bound to: a hash of the whole request (the job spec with its defaults
    /// filled in). A retry with the key and another hash is refused
    /// ([`LedgerError::IdempotencyConflict`]); with `None` any retry under the key replays.
    pub request_hash: Option<String>,
}

/// A LoRA training to authorize (uses the training allowance, not credits).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingRequest {
    pub job_id: String,
    pub idempotency_key: String,
    /// Images in the training set.
    pub images: u32,
}

/// A job that may run: its hold (capture it on success, release it on failure).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobAuthorization {
    pub hold: Hold,
    /// The key was seen before: this is the hold placed then.
    pub replayed: bool,
    /// The price (for a training: 1 from the allowance).
    pub price: Price,
    pub queue: QueueClass,
}

fn with_plans(r: Refusal, allowing: Vec<String>) -> Refusal {
    match r {
        Refusal::OutOfCredits {
            resource,
            needed,
            available,
            next_renewal_at,
            ..
        } => Refusal::OutOfCredits {
            resource,
            needed,
            available,
            next_renewal_at,
            plans_allowing: allowing,
        },
        Refusal::QuotaExhausted {
            tag,
            limit,
            used,
            requested,
            resets_at,
            ..
        } => Refusal::QuotaExhausted {
            tag,
            limit,
            used,
            requested,
            resets_at,
            plans_allowing: allowing,
        },
        other => other,
    }
}

fn authorize_job(
    t: &Tx<'_>,
    user: UserId,
    req: &JobRequest,
) -> Result<JobAuthorization, LedgerError> {
    let cfg = t.cfg;
    let model = cfg.model(&req.model_id)?;
    let price = cfg.price_job(&req.model_id, &req.params)?;
    if let Some(h) = credits::hold_by_key(t, user, &req.idempotency_key)? {
        // A retry of the same request: answer with the hold placed then, under the job id it
        // was placed for (the retry's own id is new). The plan check and the price ran for
        // that request; a different request under the key never gets this far.
        if req.request_hash.is_some() && h.request_hash != req.request_hash {
            return Err(LedgerError::IdempotencyConflict {
                key: req.idempotency_key.clone(),
                job_id: h.job_id,
                resource: h.resource,
                amount: h.amount,
            });
        }
        let sub = subscriptions::load(t, user)?;
        let queue = cfg
            .plan(&sub.plan)
            .map(|p| p.queue_for(sub.period))
            .unwrap_or(QueueClass::Standard);
        let price = Price {
            per_item: h.amount / req.params.batch.max(1) as i64,
            batch: req.params.batch,
            total: h.amount,
        };
        return Ok(JobAuthorization {
            hold: h,
            replayed: true,
            price,
            queue,
        });
    }
    subscriptions::catch_up_user(t, user)?;
    let sub = subscriptions::load(t, user)?;
    let clearance = cfg.check_job(&sub.plan, sub.period, model, &req.params)?;
    let hold_req = HoldRequest {
        user_id: user,
        resource: Resource::Credits,
        job_id: req.job_id.clone(),
        idempotency_key: req.idempotency_key.clone(),
        amount: price.total,
        usage_kind: match model.kind {
            ModelKind::Image => UsageKind::Images,
            ModelKind::Video => UsageKind::Video,
        },
        units: match model.kind {
            ModelKind::Image => req.params.batch,
            ModelKind::Video => 1,
        },
        quotas: clearance.quotas,
        request_hash: req.request_hash.clone(),
    };
    match credits::place_hold(t, &hold_req) {
        Ok(out) => Ok(JobAuthorization {
            hold: out.hold,
            replayed: out.replayed,
            price,
            queue: clearance.queue,
        }),
        Err(LedgerError::Refused(r)) => {
            let allowing = match &r {
                Refusal::QuotaExhausted { .. } => cfg.plans_allowing(model, &req.params, true, 0),
                _ => cfg.plans_allowing(model, &req.params, false, price.total),
            };
            Err(with_plans(r, allowing).into())
        }
        Err(e) => Err(e),
    }
}

fn authorize_training(t: &Tx<'_>, user: UserId, req: &TrainingRequest) -> Result<JobAuthorization, LedgerError> {
    let cfg = t.cfg;
    let one = Price { per_item: 1, batch: 1, total: 1 };
    let hold_req = HoldRequest {
        user_id: user,
        resource: Resource::Training,
        job_id: req.job_id.clone(),
        idempotency_key: req.idempotency_key.clone(),
        amount: 1,
        usage_kind: UsageKind::Training,
        units: 1,
        quotas: Vec::new(),
        request_hash: None,
    };
    let replay = credits::hold_by_key(t, user, &req.idempotency_key)?.is_some();
    if !replay {
        subscriptions::catch_up_user(t, user)?;
    }
    let sub = subscriptions::load(t, user)?;
    let plan = cfg.plan(&sub.plan)?;
    let queue = plan.queue_for(sub.period);
    if !replay {
        if plan.training_images_per_lora == 0 {
            return Err(Refusal::TrainingNotInPlan {
                plan: sub.plan.clone(),
                plans_allowing: cfg.plans_allowing_training(req.images),
            }
            .into());
        }
        if req.images > plan.training_images_per_lora {
            return Err(Refusal::TooManyTrainingImages {
                plan: sub.plan.clone(),
                images: req.images,
                max: plan.training_images_per_lora,
                plans_allowing: cfg.plans_allowing_training(req.images),
            }
            .into());
        }
        if req.images == 0 {
            return Err(LedgerError::Invalid("a training needs at least one image".into()));
        }
    }
    match credits::place_hold(t, &hold_req) {
        Ok(out) => Ok(JobAuthorization { hold: out.hold, replayed: out.replayed, price: one, queue }),
        Err(LedgerError::Refused(r)) => Err(with_plans(r, cfg.plans_allowing_training(req.images)).into()),
        Err(e) => Err(e),
    }
}

impl Ledger {
    /// Authorizes a generation job for `user`: renewals caught up, entitlements checked (model
    /// tags, parameter level, batch), "limited" weekly quotas counted, the price computed and
    /// held, in one `BEGIN IMMEDIATE` transaction. A refusal is [`LedgerError::Refused`] and
    /// says why and which plans would allow the job (and, out of credits, when the next
    /// renewal comes). The same idempotency key again returns the same hold.
    pub fn authorize_job(
        &mut self,
        user: UserId,
        req: &JobRequest,
    ) -> Result<JobAuthorization, LedgerError> {
        self.write(|t| authorize_job(t, user, req))
    }

    /// [`Ledger::authorize_job`] with the caller's own rows in the same transaction, so a job
    /// and its hold exist together or not at all. `admit` runs first, only for a key not seen
    /// before (e.g. a per-user queue limit, counted inside the write lock); `record` runs after
    /// the hold is placed or found (e.g. inserting the job row, or finding the one made then).
    /// An error from either rolls everything back.
    pub fn authorize_job_with<T, E: From<LedgerError>>(
        &mut self,
        user: UserId,
        req: &JobRequest,
        admit: impl FnOnce(&Connection) -> Result<(), E>,
        record: impl FnOnce(&Connection, &JobAuthorization) -> Result<T, E>,
    ) -> Result<T, E> {
        self.write_with(|t| {
            if credits::hold_by_key(t, user, &req.idempotency_key)?.is_none() {
                admit(t)?;
            }
            let auth = authorize_job(t, user, req)?;
            record(t, &auth)
        })
    }

    /// Authorizes a LoRA training: one unit of the training allowance is held. Capture it when
    /// the training succeeds; release it when it fails, and the allowance comes back.
    pub fn authorize_training(
        &mut self,
        user: UserId,
        req: &TrainingRequest,
    ) -> Result<JobAuthorization, LedgerError> {
        self.write(|t| authorize_training(t, user, req))
    }
}
