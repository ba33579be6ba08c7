//! OpenAI-compatible image generation: `POST /v1/images/generations` and `GET /v1/models`,
//! with an API key, metered exactly like the UI (same submission path). Extensions: `seed`,
//! `steps`, `guidance`, `loras` (and `<lora:name:w>` tags in the prompt). The credits charged and left come back in headers and in `atelier`.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use serde::Deserialize;

use crate::jobs::progress::JobEvent;
use crate::jobs::store::JobSpec;
use crate::ledger::Resource;
use crate::server::auth::Caller;
use crate::server::error::ApiError;
use crate::server::routes::jobs::submit_spec;
use crate::server::state::AppState;
use crate::server::views::{AtelierExtra, OpenAiImage, OpenAiImages, OpenAiList, OpenAiModel};

type Data = web::Data<AppState>;

#[derive(Deserialize)]
pub struct ImagesRequest {
    prompt: String,
    model: Option<String>,
    n: Option<u32>,
    size: Option<String>,
    response_format: Option<String>,
    seed: Option<u64>,
    steps: Option<u32>,
    guidance: Option<f64>,
    /// LoRAs by library name, as in `POST /api/jobs`.
    #[serde(default)]
    loras: Vec<crate::spec::LoraRef>,
    // Accepted for compatibility and ignored.
    #[allow(dead_code)]
    user: Option<String>,
    #[allow(dead_code)]
    quality: Option<String>,
    #[allow(dead_code)]
    style: Option<String>,
}

fn parse_size(s: &str) -> Result<(u32, u32), ApiError> {
    let bad = || ApiError::bad_request(format!("size {s:?} is not WIDTHxHEIGHT, e.g. 1024x1024"));
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    Ok((w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?))
}

/// POST /v1/images/generations
pub async fn generations(
    req: HttpRequest,
    state: Data,
    caller: Caller,
    body: web::Json<ImagesRequest>,
) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let format = b.response_format.as_deref().unwrap_or("b64_json");
    if format != "b64_json" && format != "url" {
        return Err(ApiError::bad_request(format!("response_format must be b64_json or url, not {format:?}")));
    }
    let model = match b.model {
        Some(m) => m,
        // No model named: the first ready schnell model (the kind every plan may use without a
        // quota), else the first ready one.
        None => {
            let ready = || state.jobs.models.models.values().filter(|m| m.is_ready());
            let schnell = ready().find(|m| m.kind == Some(crate::config::FluxKind::Schnell));
            schnell.or_else(|| ready().next()).map(|m| m.id.clone()).ok_or_else(|| {
                ApiError::new(actix_web::http::StatusCode::SERVICE_UNAVAILABLE, "no_model", "no model is available")
            })?
        }
    };
    let (width, height) = match &b.size {
        Some(s) => parse_size(s)?,
        None => state.jobs.models.get(&model).map_or((1024, 1024), |m| (m.default_width, m.default_height)),
    };
    let spec = JobSpec {
        model,
        prompt: b.prompt,
        width,
        height,
        steps: b.steps,
        seed: b.seed,
        guidance: b.guidance,
        batch: b.n.unwrap_or(1),
        loras: b.loras,
    };
    let key = crate::server::routes::jobs::idempotency_key(&req)?;
    // Listen before submitting so the end of a fast job is not missed.
    let mut rx = state.jobs.hub.subscribe();
    let (sub, _) = submit_spec(&state, &caller, spec, key).await?;
    let job_id = sub.job.id.clone();
    let mut outcome = crate::server::routes::jobs::final_event(&sub.job);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    while outcome.is_none() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if e.job_id == job_id && e.event.is_final() => outcome = Some(e.event.clone()),
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                // Missed events: read the job's state instead.
                let id = job_id.clone();
                let job = state.db(move |c| Ok(crate::jobs::store::get_job(&c.app, &id)?)).await?;
                outcome = job.as_ref().and_then(crate::server::routes::jobs::final_event);
            }
            Ok(Err(_)) | Err(_) => {
                return Err(ApiError::internal("the job did not finish in time"));
            }
        }
    }
    let images = match outcome.expect("loop ends with an outcome") {
        JobEvent::Succeeded { images, .. } => images,
        // The job's own reason (a memory refusal, non-finite output, a LoRA that does not fit),
        // as /api/jobs reports it; its credits were released.
        JobEvent::Failed { error } => {
            return Err(ApiError::new(
                actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
                "generation_failed",
                format!("generation failed: {error}"),
            ));
        }
        _ => return Err(ApiError::conflict("the job was canceled")),
    };
    let user = caller.user.id;
    let hold = sub.job.hold_id;
    let (charged, left) = state
        .db(move |c| Ok((c.ledger.hold(hold)?.captured, c.ledger.balance(user, Resource::Credits)?.available)))
        .await?;
    let mut data = Vec::new();
    // Links are built on the configured address, never on the request's Host header.
    let base = state.public_url.get().cloned().flatten().unwrap_or_default();
    for id in &images {
        if format == "url" {
            data.push(OpenAiImage {
                url: Some(format!("{base}/api/images/{id}/file")),
                b64_json: None,
                revised_prompt: None,
            });
        } else {
            let bytes = crate::server::routes::gallery::read_png(&state, id).await?;
            data.push(OpenAiImage {
                url: None,
                b64_json: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                revised_prompt: None,
            });
        }
    }
    Ok(HttpResponse::Ok()
        .insert_header(("X-Credits-Charged", charged.to_string()))
        .insert_header(("X-Credits-Remaining", left.to_string()))
        .json(OpenAiImages {
            created: sub.job.created_at.timestamp(),
            data,
            atelier: AtelierExtra {
                job_id: &job_id,
                images: &images,
                seed: sub.job.seed,
                credits_charged: charged,
                credits_remaining: left,
            },
        }))
}

/// GET /v1/models: the models that can run.
pub async fn models(state: Data, _caller: Caller) -> Result<HttpResponse, ApiError> {
    let data: Vec<_> = state
        .jobs
        .models
        .models
        .values()
        .filter(|m| m.is_ready())
        .map(|m| OpenAiModel { id: &m.id, object: "model", created: 0, owned_by: "atelier" })
        .collect();
    Ok(HttpResponse::Ok().json(OpenAiList { object: "list", data }))
}
