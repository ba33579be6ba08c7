//! The one call a server makes before it queues a job: catch up the subscription, check the
//! plan's entitlements and quotas, price the job and place the hold, all in one transaction.
//! The top of the ledger: what [`credits`] answers bare (a shortfall, a used-up quota) gets the
//! policy here: the plans that would allow it, the next renewal, and the low-balance event.

use rusqlite::Connection;
use serde::Serialize;

use crate::ledger::credits::{self, Hold, HoldOutcome, HoldRequest, Shortfall};
use crate::ledger::plans::{JobParams, ModelKind, ParamLevel, Price, QueueClass, Refusal};
use crate::ledger::usage::UsageKind;
use crate::ledger::{Ledger, LedgerError, Resource, Tx, UserId, events, subscriptions};

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
    /// The settings the request sets beyond the plan's preset (steps, rank, lr, …): they need
    /// the "advanced" parameter level.
    pub custom: Vec<String>,
    /// What the key is bound to (see [`JobRequest::request_hash`]).
    pub request_hash: Option<String>,
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
        Refusal::OutOfCredits { resource, needed, available, next_renewal_at, .. } => {
            Refusal::OutOfCredits { resource, needed, available, next_renewal_at, plans_allowing: allowing }
        }
        Refusal::QuotaExhausted { tag, limit, used, requested, resets_at, .. } => {
            Refusal::QuotaExhausted { tag, limit, used, requested, resets_at, plans_allowing: allowing }
        }
        other => other,
    }
}

/// The refusal for a shortfall: when the next renewal comes and which plans' period grant
/// would cover the amount.
fn out_of_credits(t: &Tx<'_>, user: UserId, short: Shortfall) -> Result<Refusal, LedgerError> {
    let sub = subscriptions::load(t, user)?;
    let plans_allowing = t
        .cfg
        .plan_ids_by_rank()
        .into_iter()
        .filter(|id| {
            let p = &t.cfg.plans[id];
            let per = match short.resource {
                Resource::Credits => p.credits_weekly.max(p.credits_yearly),
                Resource::Training => p.training_weekly.max(p.training_yearly),
            };
            per >= short.needed
        })
        .collect();
    Ok(Refusal::OutOfCredits {
        resource: short.resource.as_str().to_string(),
        needed: short.needed,
        available: short.available,
        next_renewal_at: sub.next_renewal_at(),
        plans_allowing,
    })
}

/// Records a `low_balance` event (once per period) when the credits available fall below the
/// plan's threshold: `low_balance_pct` of one period's credits (Free: of its sign-up credits).
pub(crate) fn check_low_balance(t: &Tx<'_>, user: UserId) -> Result<(), LedgerError> {
    let sub = subscriptions::load(t, user)?;
    let Ok(plan) = t.cfg.plan(&sub.plan) else {
        return Ok(()); // a plan removed from the config has no threshold
    };
    let per_period = match sub.period {
        Some(p) => plan.credits_per(Some(p)),
        None => plan.signup_credits,
    };
    let threshold = per_period * t.cfg.low_balance_pct(plan) as i64 / 100;
    if threshold <= 0 {
        return Ok(());
    }
    let available = credits::available(t, user, Resource::Credits)?;
    if available < threshold {
        let key = format!("low_balance:{user}:{}:{}", sub.plan, crate::ledger::clock::unix(sub.period_start));
        events::record(
            t,
            Some(user),
            "low_balance",
            serde_json::json!({"available": available, "threshold": threshold, "plan": sub.plan,
                               "next_renewal_at": sub.next_renewal_at()}),
            Some(&key),
        )?;
    }
    Ok(())
}

/// Places a hold with the policy [`credits::place_hold`] leaves out: a shortfall is refused
/// with the next renewal and the plans that would cover it; a new credits hold checks the
/// low-balance threshold.
fn place_hold(t: &Tx<'_>, req: &HoldRequest) -> Result<HoldOutcome, LedgerError> {
    match credits::place_hold(t, req)? {
        Ok(out) => {
            if !out.replayed && req.resource == Resource::Credits {
                check_low_balance(t, req.user_id)?;
            }
            Ok(out)
        }
        Err(short) => Err(out_of_credits(t, req.user_id, short)?.into()),
    }
}

/// The hold an earlier request with idempotency key `key` placed, and the caller's queue class
/// now: a retry is answered with that hold, under the job id it was placed for (the retry's own
/// id is new); the plan check and the price ran for that request. A different request under
/// the key (another request hash, or a hold of another resource than `resource`) is a
/// conflict.
fn replayed_hold(
    t: &Tx<'_>,
    user: UserId,
    key: &str,
    request_hash: &Option<String>,
    resource: Option<Resource>,
) -> Result<Option<(Hold, QueueClass)>, LedgerError> {
    let Some(h) = credits::hold_by_key(t, user, key)? else { return Ok(None) };
    if resource.is_some_and(|r| h.resource != r) || (request_hash.is_some() && h.request_hash != *request_hash) {
        return Err(LedgerError::IdempotencyConflict {
            key: key.to_string(),
            job_id: h.job_id,
            resource: h.resource,
            amount: h.amount,
        });
    }
    let sub = subscriptions::load(t, user)?;
    let queue = t.cfg.plan(&sub.plan).map(|p| p.queue_for(sub.period)).unwrap_or(QueueClass::Standard);
    Ok(Some((h, queue)))
}

fn authorize_job(t: &Tx<'_>, user: UserId, req: &JobRequest) -> Result<JobAuthorization, LedgerError> {
    let cfg = t.cfg;
    let model = cfg.model(&req.model_id)?;
    let price = cfg.price_job(&req.model_id, &req.params)?;
    if let Some((h, queue)) = replayed_hold(t, user, &req.idempotency_key, &req.request_hash, None)? {
        let price =
            Price { per_item: h.amount / req.params.batch.max(1) as i64, batch: req.params.batch, total: h.amount };
        return Ok(JobAuthorization { hold: h, replayed: true, price, queue });
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
    match place_hold(t, &hold_req) {
        Ok(out) => Ok(JobAuthorization { hold: out.hold, replayed: out.replayed, price, queue: clearance.queue }),
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
        request_hash: req.request_hash.clone(),
    };
    let replay = replayed_hold(t, user, &req.idempotency_key, &req.request_hash, Some(Resource::Training))?;
    if let Some((h, queue)) = replay {
        return Ok(JobAuthorization { hold: h, replayed: true, price: one, queue });
    }
    subscriptions::catch_up_user(t, user)?;
    let sub = subscriptions::load(t, user)?;
    let plan = cfg.plan(&sub.plan)?;
    let queue = plan.queue_for(sub.period);
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
    if !req.custom.is_empty() && plan.parameters < ParamLevel::Advanced {
        let plans_allowing = cfg
            .plans_allowing_training(req.images)
            .into_iter()
            .filter(|id| cfg.plans[id].parameters >= ParamLevel::Advanced)
            .collect();
        return Err(Refusal::ParameterLevel {
            plan: sub.plan.clone(),
            has: plan.parameters,
            needs: ParamLevel::Advanced,
            params: req.custom.clone(),
            plans_allowing,
        }
        .into());
    }
    if plan.training_per(sub.period) == 0 && credits::available(t, user, Resource::Training)? < 1 {
        // A plan that trains only on another period (Starter: yearly).
        let other = match sub.period {
            Some(p) if plan.training_weekly.max(plan.training_yearly) > 0 => {
                format!(" on a {} subscription (it trains on the other period only)", p.as_str())
            }
            _ => String::new(),
        };
        return Err(LedgerError::Refused(Refusal::TrainingNotInPlan {
            plan: format!("{}{other}", sub.plan),
            plans_allowing: cfg
                .plans_allowing_training(req.images)
                .into_iter()
                .filter(|id| cfg.plans[id].training_per(sub.period) > 0)
                .collect(),
        }));
    }
    match place_hold(t, &hold_req) {
        Ok(out) => Ok(JobAuthorization { hold: out.hold, replayed: out.replayed, price: one, queue }),
        Err(LedgerError::Refused(r)) => Err(with_plans(r, cfg.plans_allowing_training(req.images)).into()),
        Err(e) => Err(e),
    }
}

impl Ledger {
    /// Reserves `req.amount` if at least that much is available now, taking the
    /// soonest-expiring grants first. The same idempotency key again returns the hold it
    /// placed (whatever its status now) with `replayed = true`; with a different job, amount
    /// or resource it is [`LedgerError::IdempotencyConflict`]. Not enough available, or a
    /// weekly quota used up, is [`LedgerError::Refused`].
    pub fn place_hold(&mut self, req: &HoldRequest) -> Result<HoldOutcome, LedgerError> {
        self.write(|t| place_hold(t, req))
    }

    /// Authorizes a generation job for `user`: renewals caught up, entitlements checked (model
    /// tags, parameter level, batch), "limited" weekly quotas counted, the price computed and
    /// held, in one `BEGIN IMMEDIATE` transaction. A refusal is [`LedgerError::Refused`] and
    /// says why and which plans would allow the job (and, out of credits, when the next
    /// renewal comes). The same idempotency key again returns the same hold.
    pub fn authorize_job(&mut self, user: UserId, req: &JobRequest) -> Result<JobAuthorization, LedgerError> {
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
        self.hold_with(user, &req.idempotency_key, |t| authorize_job(t, user, req), admit, record)
    }

    /// One write transaction: `admit` (for a key not seen before), the hold `authorize` places
    /// or finds, then `record`.
    fn hold_with<T, E: From<LedgerError>>(
        &mut self,
        user: UserId,
        key: &str,
        authorize: impl FnOnce(&Tx<'_>) -> Result<JobAuthorization, LedgerError>,
        admit: impl FnOnce(&Connection) -> Result<(), E>,
        record: impl FnOnce(&Connection, &JobAuthorization) -> Result<T, E>,
    ) -> Result<T, E> {
        self.write_with(|t| {
            if credits::hold_by_key(t, user, key)?.is_none() {
                admit(t)?;
            }
            let auth = authorize(t)?;
            record(t, &auth)
        })
    }

    /// Authorizes a LoRA training: one unit of the training allowance is held. Capture it when
    /// the training succeeds; release it when it fails, and the allowance comes back.
    pub fn authorize_training(&mut self, user: UserId, req: &TrainingRequest) -> Result<JobAuthorization, LedgerError> {
        self.write(|t| authorize_training(t, user, req))
    }

    /// [`Ledger::authorize_training`] with the caller's rows in the same transaction (as
    /// [`Ledger::authorize_job_with`]): the training job and its allowance hold exist together
    /// or not at all.
    pub fn authorize_training_with<T, E: From<LedgerError>>(
        &mut self,
        user: UserId,
        req: &TrainingRequest,
        admit: impl FnOnce(&Connection) -> Result<(), E>,
        record: impl FnOnce(&Connection, &JobAuthorization) -> Result<T, E>,
    ) -> Result<T, E> {
        self.hold_with(user, &req.idempotency_key, |t| authorize_training(t, user, req), admit, record)
    }
}
