//! Admin endpoints: users (create, plan, credits, disable), the queue, the models.

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::accounts;
use crate::jobs::store::{self, JobStatus};
use crate::ledger::{GrantRequest, GrantSource, Period, Resource};
use crate::server::auth::Caller;
use crate::server::error::ApiError;
use crate::server::routes::usage::usage_view;
use crate::server::state::AppState;
use crate::server::views::{
    AdminJob, AdminModels, AdminQueue, AdminUsage, AdminUserRow, AdminUsers, Disabled, GrantCreated, UserCreated,
};

type Data = web::Data<AppState>;

/// GET /api/admin/users: every user with plan, balance and whether disabled.
pub async fn users(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let v = state
        .db(|c| {
            let mut out = Vec::new();
            for u in c.ledger.users()? {
                c.ledger.catch_up_user(u.id)?;
                let sub = c.ledger.subscription(u.id)?;
                let bal = c.ledger.balance(u.id, Resource::Credits)?;
                out.push(AdminUserRow {
                    disabled: accounts::is_disabled(&c.app, u.id)?,
                    id: u.id,
                    name: u.name,
                    admin: u.is_admin,
                    created_at: u.created_at,
                    plan: sub.plan,
                    period: sub.period,
                    status: sub.status,
                    credits_available: bal.available,
                    credits_held: bal.held,
                    credits_spent: bal.spent,
                });
            }
            Ok(AdminUsers { users: out })
        })
        .await?;
    Ok(HttpResponse::Ok().json(v))
}

#[derive(Deserialize)]
pub struct NewUser {
    name: String,
    password: String,
    #[serde(default)]
    admin: bool,
    plan: Option<String>,
    #[serde(default)]
    yearly: bool,
}

fn period(yearly: bool) -> Period {
    if yearly { Period::Yearly } else { Period::Weekly }
}

/// POST /api/admin/users {name, password, admin?, plan?, yearly?}
pub async fn create_user(state: Data, caller: Caller, body: web::Json<NewUser>) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let b = body.into_inner();
    if b.password.chars().count() < 8 {
        return Err(ApiError::bad_request("the password must have at least 8 characters"));
    }
    let v = state
        .db(move |c| {
            if let Some(plan) = &b.plan {
                c.ledger.config().plan(plan)?;
            }
            let u = c.ledger.add_user(&b.name, b.admin, Some(&b.password))?;
            if let Some(plan) = &b.plan {
                let p = c.ledger.config().plan(plan)?.clone();
                if plan != &c.ledger.config().metering.default_plan {
                    let per = (!p.periods.is_empty()).then(|| period(b.yearly));
                    c.ledger.set_plan(u.id, plan, per)?;
                }
            }
            Ok(UserCreated { user: u })
        })
        .await?;
    Ok(HttpResponse::Created().json(v))
}

fn user_id(path: &str) -> Result<i64, ApiError> {
    path.parse().map_err(|_| ApiError::not_found("user"))
}

/// GET /api/admin/users/{id}: the user's usage document.
pub async fn user(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let id = user_id(&path)?;
    let v = state
        .db(move |c| {
            let u = c.ledger.user_by_id(id)?;
            let usage = usage_view(c, &u, 30)?;
            Ok(AdminUsage { usage, disabled: accounts::is_disabled(&c.app, id)? })
        })
        .await?;
    Ok(HttpResponse::Ok().json(v))
}

#[derive(Deserialize)]
pub struct SetPlan {
    plan: String,
    #[serde(default)]
    yearly: bool,
}

/// POST /api/admin/users/{id}/plan {plan, yearly?}: upgrades now, downgrades at period end.
pub async fn set_plan(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<SetPlan>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let id = user_id(&path)?;
    let b = body.into_inner();
    let change = state
        .db(move |c| {
            c.ledger.user_by_id(id)?;
            let p = c.ledger.config().plan(&b.plan)?.clone();
            let per = (!p.periods.is_empty()).then(|| period(b.yearly));
            Ok(c.ledger.set_plan(id, &b.plan, per)?)
        })
        .await?;
    Ok(HttpResponse::Ok().json(change))
}

#[derive(Deserialize)]
pub struct Grant {
    credits: i64,
    expires_at: Option<DateTime<Utc>>,
}

/// POST /api/admin/users/{id}/grant {credits, expires_at?}
pub async fn grant(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<Grant>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let id = user_id(&path)?;
    let b = body.into_inner();
    if b.credits <= 0 || b.credits > 1_000_000_000 {
        return Err(ApiError::bad_request("credits must be a whole number from 1 to 1000000000"));
    }
    let g = state
        .db(move |c| {
            c.ledger.user_by_id(id)?;
            Ok(c.ledger.grant(id, &GrantRequest::credits(b.credits, GrantSource::Admin, b.expires_at))?)
        })
        .await?;
    Ok(HttpResponse::Created().json(GrantCreated { grant: g }))
}

#[derive(Deserialize)]
pub struct Disable {
    disabled: bool,
}

/// POST /api/admin/users/{id}/disable {disabled}: a disabled user cannot log in or use keys,
/// and their queued and running jobs are canceled.
pub async fn disable(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<Disable>,
) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let id = user_id(&path)?;
    if id == caller.user.id && body.disabled {
        return Err(ApiError::bad_request("you cannot disable your own account"));
    }
    let disabled = body.disabled;
    let jobs = state.jobs.clone();
    let canceled = state
        .db(move |c| {
            c.ledger.user_by_id(id)?;
            accounts::set_disabled(&c.app, id, disabled, c.now())?;
            // A disabled account's waiting and running jobs stop, their credits released.
            Ok(if disabled { jobs.cancel_all_of(c, id)? } else { 0 })
        })
        .await?;
    state.credentials_changed();
    Ok(HttpResponse::Ok().json(Disabled { id, disabled, jobs_canceled: canceled }))
}

/// GET /api/admin/queue: running and queued jobs of everyone, in start order, with user names.
pub async fn queue(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let jobs = state.jobs.clone();
    let v = state
        .db(move |c| {
            let positions = jobs.positions(c)?;
            let names: std::collections::HashMap<i64, String> =
                c.ledger.users()?.into_iter().map(|u| (u.id, u.name)).collect();
            let mut queue = Vec::new();
            for j in store::list_jobs(&c.app, None, &[JobStatus::Running, JobStatus::Queued], 1000)? {
                let pos = positions.iter().find(|(id, _)| id == &j.id).map(|(_, p)| *p);
                let user = names.get(&j.user_id).cloned();
                queue.push(AdminJob { job: j, position: Some(pos), user, error_detail: None });
            }
            queue.sort_by_key(|v| v.position.flatten().unwrap_or(0));
            let recent =
                store::list_jobs(&c.app, None, &[JobStatus::Succeeded, JobStatus::Failed, JobStatus::Canceled], 50)?;
            let recent = recent
                .into_iter()
                .map(|j| {
                    let user = names.get(&j.user_id).cloned();
                    let detail = j.error_detail.clone();
                    AdminJob { job: j, position: None, user, error_detail: Some(detail) }
                })
                .collect();
            let counts = store::count_by_status(&c.app)?.into_iter().map(|(s, n)| (s.as_str(), n)).collect();
            Ok(AdminQueue { queue, recent, counts })
        })
        .await?;
    Ok(HttpResponse::Ok().json(v))
}

/// GET /api/admin/models: every declared model and its state.
pub async fn models(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let models = state.jobs.models.models.values().collect();
    let memory = state.jobs.memory.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(HttpResponse::Ok().json(AdminModels { models, device: &state.device, dtype: &state.dtype, memory }))
}
