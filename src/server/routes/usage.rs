//! What a user has and may do: balance and grants, holds, daily history, warnings, plan,
//! entitlements, allowance; the models with the caller's access to each; the price of a job.

use actix_web::{HttpResponse, web};
use chrono::Duration;
use serde::Deserialize;

use crate::jobs::store::JobSpec;
use crate::jobs::{Conn, Jobs};
use crate::ledger::{JobParams, ModelAccess, Refusal, Resource, User};
use crate::models::ModelState;
use crate::server::auth::Caller;
use crate::server::error::ApiError;
use crate::server::state::AppState;
use crate::server::views::{ModelAccessView, ModelList, ModelQuota, PriceCheck, SizeLimits, Usage};

type Data = web::Data<AppState>;

/// The usage document of `user` (also what admins see for a user): the last `days` days.
pub fn usage_view(c: &mut Conn, user: &User, days: i64) -> Result<Usage, ApiError> {
    let account = c.ledger.account_summary(user)?;
    let today = c.ledger.clock().now().date_naive();
    Ok(Usage {
        low_balance: account.low_balance(),
        account,
        history: c.ledger.usage(user.id, today - Duration::days(days - 1), today)?,
        holds: c.ledger.open_holds(user.id)?,
        events: c.ledger.events(user.id, 50)?,
        training_available: c.ledger.balance(user.id, Resource::Training)?.available,
    })
}

/// GET /api/usage
pub async fn usage(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    let user = caller.user.clone();
    let v = state.db(move |c| usage_view(c, &user, 30)).await?;
    Ok(HttpResponse::Ok().json(v))
}

/// Each model with the caller's access: "yes", "limited" (with the weekly quota left) or
/// "locked" (with why and the plans that unlock it).
fn models_for(c: &mut Conn, jobs: &Jobs, user: &User) -> Result<ModelList, ApiError> {
    c.ledger.catch_up_user(user.id)?;
    let sub = c.ledger.subscription(user.id)?;
    let cfg = c.ledger.config_arc();
    let ent = cfg.entitlements(&sub.plan, sub.period)?;
    let mut out = Vec::new();
    for m in jobs.models.models.values() {
        let mut v = ModelAccessView::new(m);
        let (mut access, mut reason, mut allowing, mut quota) = ("yes", None, Vec::<String>::new(), None);
        if let Ok(pricing) = cfg.model(&m.id) {
            let params = crate::ledger::JobParams::new(m.default_width, m.default_height);
            match cfg.check_job(&sub.plan, sub.period, pricing, &params) {
                Err(r) => {
                    access = "locked";
                    reason = Some(r.to_string());
                    if let Refusal::ModelNotInPlan { plans_allowing, .. } = &r {
                        allowing = plans_allowing.clone();
                    }
                }
                Ok(cl) => {
                    for q in &cl.quotas {
                        let used = c.ledger.quota_used(user.id, &q.tag)?;
                        access = "limited";
                        quota = Some(ModelQuota {
                            tag: q.tag.clone(),
                            limit: q.limit,
                            used,
                            left: q.limit.saturating_sub(used),
                        });
                        if used >= q.limit {
                            access = "locked";
                            reason = Some(format!(
                                "the weekly quota of {} {} images is used up; it resets at {}",
                                q.limit,
                                q.tag,
                                c.ledger.quota_resets_at().format("%Y-%m-%d %H:%M UTC")
                            ));
                            allowing = plans_without_quota(&cfg, &q.tag);
                        }
                    }
                }
            }
        }
        // A missing model keeps the reason its state gives, unless the plan refuses it too.
        let mut state_reason = None;
        if let ModelState::Missing { reason } = &m.state {
            access = "unavailable";
            // The state's reason names server paths: admins see it (here and on the admin
            // page), users a plain sentence.
            state_reason = Some(if user.is_admin {
                reason.clone()
            } else {
                "this model is not available on this server right now; an admin can see why".to_string()
            });
        }
        v.access = access;
        v.reason = reason.or(state_reason);
        v.plans_allowing = allowing;
        v.quota = quota;
        out.push(v);
    }
    let limits = jobs.limits();
    Ok(ModelList {
        models: out,
        plan: sub.plan,
        parameters: ent.parameters,
        max_batch: ent.max_batch,
        size_presets: cfg.metering.size_presets.clone(),
        limits: SizeLimits { max_width: limits.max_width, max_height: limits.max_height, max_steps: limits.max_steps },
    })
}

/// Plans (lowest rank first) with full access to `tag`: what lifts a weekly quota.
fn plans_without_quota(cfg: &crate::ledger::PlansConfig, tag: &str) -> Vec<String> {
    cfg.plan_ids_by_rank().into_iter().filter(|p| cfg.plans[p].models.get(tag) == Some(&ModelAccess::Yes)).collect()
}

/// GET /api/models
pub async fn models(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    let jobs = state.jobs.clone();
    let user = caller.user.clone();
    let v = state.db(move |c| models_for(c, &jobs, &user)).await?;
    Ok(HttpResponse::Ok().json(v))
}

#[derive(Deserialize)]
pub struct PriceQuery {
    model: String,
    width: u32,
    height: u32,
    steps: Option<u32>,
    seed: Option<u64>,
    guidance: Option<f64>,
    batch: Option<u32>,
    /// How many LoRAs the job would apply.
    loras: Option<u32>,
}

/// GET /api/price?model=&width=&height=[&steps=&seed=&guidance=&batch=]: the price of that
/// job and whether the caller's plan and balance allow it (nothing is held).
pub async fn price(state: Data, caller: Caller, q: web::Query<PriceQuery>) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let spec = JobSpec {
        model: q.model,
        prompt: "price".into(),
        width: q.width,
        height: q.height,
        steps: q.steps,
        seed: q.seed,
        guidance: q.guidance,
        batch: q.batch.unwrap_or(1),
        loras: Vec::new(),
    };
    let lora_count = q.loras.unwrap_or(0);
    let jobs = state.jobs.clone();
    let user = caller.user.id;
    let v = state
        .db(move |c| {
            jobs.validate(&spec)?;
            let cfg = c.ledger.config_arc();
            let params = JobParams { loras: lora_count, ..Jobs::params(&spec) };
            let price = cfg.price_job(&spec.model, &params).map_err(ApiError::refusal)?;
            c.ledger.catch_up_user(user)?;
            let sub = c.ledger.subscription(user)?;
            let available = c.ledger.balance(user, Resource::Credits)?.available;
            let mut quota_refusal = None;
            if let Ok(cl) = cfg.check_job_by_id(&sub.plan, sub.period, &spec.model, &params) {
                for q in &cl.quotas {
                    let used = c.ledger.quota_used(user, &q.tag)?;
                    if used + q.units > q.limit {
                        let resets_at = c.ledger.quota_resets_at();
                        quota_refusal = Some(Refusal::QuotaExhausted {
                            tag: q.tag.clone(),
                            limit: q.limit,
                            used,
                            requested: q.units,
                            resets_at,
                            plans_allowing: plans_without_quota(&cfg, &q.tag),
                        });
                    }
                }
            }
            let refusal = match cfg.check_job_by_id(&sub.plan, sub.period, &spec.model, &params) {
                Err(r) => Some(ApiError::refusal(r)),
                Ok(_) if quota_refusal.is_some() => quota_refusal.map(ApiError::refusal),
                Ok(_) if price.total > available => Some(ApiError::refusal(Refusal::OutOfCredits {
                    resource: "credits".into(),
                    needed: price.total,
                    available,
                    next_renewal_at: sub.next_renewal_at(),
                    plans_allowing: Vec::new(),
                })),
                Ok(_) => None,
            };
            let (level, why) = params.required_level(&cfg.metering.size_presets);
            Ok(PriceCheck {
                price,
                credits_available: available,
                allowed: refusal.is_none(),
                status: refusal.as_ref().map(|r| r.status.as_u16()),
                message: refusal.as_ref().map(|r| r.message.clone()),
                details: refusal.and_then(|r| r.details),
                parameter_level: level,
                parameters_needing_level: why,
            })
        })
        .await?;
    Ok(HttpResponse::Ok().json(v))
}
