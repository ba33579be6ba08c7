//! Jobs: submit, list, look at, cancel, and watch (server-sent events).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::jobs::progress::{Envelope, JobEvent};
use crate::jobs::store::{self, Job, JobKind, JobSpec, JobStatus};
use crate::ledger::{Resource, UserId};
use crate::server::auth::{Caller, Via, live};
use crate::server::error::ApiError;
use crate::server::state::AppState;
use crate::server::views::{CancelStatus, JobList, JobView, OneJob, Submitted};

type Data = web::Data<AppState>;

/// The request's `Idempotency-Key`, checked: a key that is not plain ASCII is refused (400)
/// rather than dropped, which would make every retry a new, charged job.
pub fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(v) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let key = v.to_str().map_err(|_| ApiError::bad_request("Idempotency-Key must be visible ASCII characters"))?;
    crate::jobs::validate_idempotency_key(key)?;
    Ok(Some(key.to_string()))
}

/// Submits `spec` for the caller; the job and the credits left.
pub async fn submit_spec(
    state: &Data,
    caller: &Caller,
    spec: JobSpec,
    key: Option<String>,
) -> Result<(crate::jobs::Submitted, i64), ApiError> {
    let jobs = state.jobs.clone();
    let user = caller.user.id;
    state
        .db(move |c| {
            let s = jobs.submit(c, user, spec, key)?;
            let left = c.ledger.balance(user, Resource::Credits)?.available;
            Ok((s, left))
        })
        .await
}

/// POST /api/jobs (JobSpec; optional Idempotency-Key header): 201 with the job and its price.
pub async fn create(
    req: HttpRequest,
    state: Data,
    caller: Caller,
    body: web::Json<JobSpec>,
) -> Result<HttpResponse, ApiError> {
    let (s, left) = submit_spec(&state, &caller, body.into_inner(), idempotency_key(&req)?).await?;
    let mut r = if s.replayed { HttpResponse::Ok() } else { HttpResponse::Created() };
    Ok(r.insert_header(("X-Credits-Remaining", left.to_string())).json(Submitted {
        job: &s.job,
        replayed: s.replayed,
        credits_held: s.job.price,
        credits_remaining: left,
    }))
}

#[derive(Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
    /// Admins: everyone's jobs.
    all: Option<bool>,
}

/// GET /api/jobs?status=queued,running&limit=50[&all=true]
pub async fn list(state: Data, caller: Caller, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let mut statuses = Vec::new();
    for s in q.status.as_deref().unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        statuses.push(JobStatus::parse(s).ok_or_else(|| ApiError::bad_request(format!("unknown status {s:?}")))?);
    }
    let all = q.all.unwrap_or(false);
    if all {
        caller.require_admin()?;
    }
    let user = (!all).then_some(caller.user.id);
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let jobs = state.jobs.clone();
    let (list, positions) =
        state.db(move |c| Ok((store::list_jobs(&c.app, user, &statuses, limit)?, jobs.positions(c)?))).await?;
    let jobs = list.iter().map(|j| JobView::new(j, &positions)).collect();
    Ok(HttpResponse::Ok().json(JobList { jobs }))
}

/// The caller's job `id`, or 404 (also for someone else's job, unless the caller is an admin).
async fn own_job(state: &Data, caller: &Caller, id: String) -> Result<Job, ApiError> {
    let job = state.db(move |c| Ok(store::get_job(&c.app, &id)?)).await?;
    match job {
        Some(j) if caller.may_see(j.user_id) => Ok(j),
        _ => Err(ApiError::not_found("job")),
    }
}

/// GET /api/jobs/{id}
pub async fn get(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let job = own_job(&state, &caller, path.into_inner()).await?;
    let jobs = state.jobs.clone();
    let positions = state.db(move |c| Ok(jobs.positions(c)?)).await?;
    Ok(HttpResponse::Ok().json(OneJob { job: JobView::new(&job, &positions) }))
}

/// POST /api/jobs/{id}/cancel: a queued job is canceled now (credits released); a running one
/// stops at its next step (202).
pub async fn cancel(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let job = own_job(&state, &caller, path.into_inner()).await?;
    if job.status.is_final() {
        return Err(ApiError::conflict(format!("the job already {}", job.status.as_str())));
    }
    let jobs = state.jobs.clone();
    let status = state.db(move |c| Ok(jobs.cancel(c, &job)?)).await?;
    let body = CancelStatus { status };
    match status {
        JobStatus::Canceled => Ok(HttpResponse::Ok().json(body)),
        // A running job was asked to stop: it stops at its next step.
        JobStatus::Running | JobStatus::Queued => Ok(HttpResponse::Accepted().json(body)),
        done => Err(ApiError::conflict(format!("the job already {}", done.as_str()))),
    }
}

/// The final event of a job that has ended, from the database.
pub fn final_event(job: &Job) -> Option<JobEvent> {
    match job.status {
        JobStatus::Succeeded => Some(match job.kind {
            JobKind::Image => JobEvent::Succeeded { images: job.images.clone(), credits_charged: job.price },
            JobKind::Training => {
                JobEvent::Trained { lora: job.lora.clone().unwrap_or_default(), allowance_charged: job.price }
            }
        }),
        JobStatus::Failed => Some(JobEvent::Failed { error: job.error.clone().unwrap_or_default() }),
        JobStatus::Canceled => Some(JobEvent::Canceled),
        _ => None,
    }
}

fn sse_frame(e: &Envelope) -> Bytes {
    Bytes::from(format!("data: {}\n\n", serde_json::to_string(e).unwrap_or_default()))
}

/// Whether the credential a stream was opened with still holds (a database error counts as
/// yes: the stream is not cut for a busy moment).
async fn still_allowed(state: &Data, via: &Via) -> bool {
    let via = via.clone();
    state.db(move |c| Ok(live(c, &via)?.is_some())).await.unwrap_or(true)
}

/// A server-sent event stream of the events `keep` selects, starting with `first`; it ends
/// after a final event when `end_on_final`, and as soon as the session or API key it was
/// opened with ends (logout, password change, revoked key, disabled account): at once when
/// this server ended it, else by the next ping.
fn sse(
    state: Data,
    via: Via,
    rx: tokio::sync::broadcast::Receiver<Arc<Envelope>>,
    first: Vec<Envelope>,
    keep: impl Fn(&Envelope) -> bool + 'static,
    end_on_final: bool,
) -> HttpResponse {
    let (tx, out) = tokio::sync::mpsc::channel::<Bytes>(256);
    let mut credentials = state.credentials.subscribe();
    actix_web::rt::spawn(async move {
        let mut rx = rx;
        // Tells the browser how long to wait before reconnecting.
        if tx.send(Bytes::from_static(b"retry: 2000\n\n")).await.is_err() {
            return;
        }
        for e in &first {
            if tx.send(sse_frame(e)).await.is_err() || (end_on_final && e.event.is_final()) {
                return;
            }
        }
        let mut ping = tokio::time::interval(Duration::from_secs(15));
        ping.tick().await;
        loop {
            tokio::select! {
                got = rx.recv() => match got {
                    Ok(e) if keep(&e) => {
                        // A client that stops reading is dropped rather than left holding
                        // events (its channel is full), so it cannot pin the broadcast buffer.
                        if tx.try_send(sse_frame(&e)).is_err() || (end_on_final && e.event.is_final()) {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => {
                        let note = format!("data: {}\n\n", json!({"type": "lagged", "missed": n}));
                        if tx.try_send(Bytes::from(note)).is_err() { return; }
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = ping.tick() => {
                    if tx.try_send(Bytes::from_static(b": ping\n\n")).is_err() || !still_allowed(&state, &via).await {
                        return;
                    }
                }
                changed = credentials.changed() => {
                    if changed.is_err() || !still_allowed(&state, &via).await {
                        return;
                    }
                }
            }
        }
    });
    let body =
        futures_util::stream::unfold(
            out,
            |mut out| async move { out.recv().await.map(|b| (Ok::<_, Infallible>(b), out)) },
        );
    HttpResponse::Ok()
        .insert_header(("Content-Type", "text/event-stream"))
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

/// GET /api/jobs/{id}/events: the job's progress until it ends.
pub async fn job_events(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    // Subscribe before reading the state, so nothing falls between the two.
    let rx = state.jobs.hub.subscribe();
    let job = own_job(&state, &caller, path.into_inner()).await?;
    let first = match final_event(&job) {
        Some(e) => vec![Envelope { job_id: job.id.clone(), user_id: job.user_id, event: e }],
        None => state.jobs.hub.snapshot(Some(&job.id), None),
    };
    let id = job.id.clone();
    Ok(sse(state, caller.via, rx, first, move |e| e.job_id == id, true))
}

/// GET /api/events: progress of all the caller's jobs, for as long as the client listens.
pub async fn user_events(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    let rx = state.jobs.hub.subscribe();
    let user: UserId = caller.user.id;
    let first = state.jobs.hub.snapshot(None, Some(user));
    Ok(sse(state, caller.via, rx, first, move |e| e.user_id == user, false))
}
