//! LoRA trainings: submit (allowance held), list, look at (with the loss history and the
//! samples), sample images, and downloading a library LoRA as kohya or PEFT. Cancel and the
//! progress stream are the jobs' routes (`/api/jobs/{id}/cancel`, `/api/jobs/{id}/events`;
//! `/api/trainings/{id}/cancel` is the same handler).

use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};

use crate::jobs::store::{self, Job, JobKind};
use crate::jobs::trainer::{self, LossPoint};
use crate::jobs::training_spec::TrainingOrder;
use crate::ledger::Resource;
use crate::server::auth::Caller;
use crate::server::error::ApiError;
use crate::server::routes::jobs::idempotency_key;
use crate::server::state::AppState;
use crate::server::views::JobView;
use crate::train::export::Format;

type Data = web::Data<AppState>;

/// A training job with its loss history and samples.
#[derive(Serialize)]
pub struct TrainingView<'a> {
    #[serde(flatten)]
    pub job: JobView<'a>,
    /// Every logged step (`GET` of a running job draws the whole curve).
    pub loss: Vec<LossPoint>,
    /// URLs of the sample images, oldest first.
    pub samples: Vec<String>,
}

fn sample_urls(state: &Data, id: &str) -> Vec<String> {
    let n = trainer::samples(&state.jobs.training_dir(id)).len();
    (0..n).map(|i| format!("/api/trainings/{id}/samples/{i}.png")).collect()
}

/// POST /api/trainings (TrainingOrder; optional Idempotency-Key): 201 with the job and the
/// allowance held and left.
pub async fn create(
    req: HttpRequest,
    state: Data,
    caller: Caller,
    body: web::Json<TrainingOrder>,
) -> Result<HttpResponse, ApiError> {
    let key = idempotency_key(&req)?;
    let jobs = state.jobs.clone();
    let user = caller.user.id;
    let order = body.into_inner();
    let (s, left) = state
        .db(move |c| {
            let s = jobs.submit_training(c, user, order, key)?;
            let left = c.ledger.balance(user, Resource::Training)?.available;
            Ok((s, left))
        })
        .await?;
    let mut r = if s.replayed { HttpResponse::Ok() } else { HttpResponse::Created() };
    Ok(r.json(serde_json::json!({
        "job": &s.job,
        "replayed": s.replayed,
        "allowance_held": s.job.price,
        "allowance_remaining": left,
    })))
}

/// The caller's training `id` (404 for anyone else's, unless an admin; and for image jobs).
async fn own_training(state: &Data, caller: &Caller, id: String) -> Result<Job, ApiError> {
    let job = state.db(move |c| Ok(store::get_job(&c.app, &id)?)).await?;
    match job {
        Some(j) if j.kind == JobKind::Training && caller.may_see(j.user_id) => Ok(j),
        _ => Err(ApiError::not_found("training")),
    }
}

/// GET /api/trainings: the caller's trainings, newest first (without loss histories), the
/// allowance left, and what a training form offers: the preset and the limits of custom
/// settings (which need the "advanced" parameter level).
pub async fn list(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    let user = caller.user.id;
    let jobs = state.jobs.clone();
    let (list, positions, allowance) = state
        .db(move |c| {
            let list = store::list_trainings(&c.app, user, 500)?;
            Ok((list, jobs.positions(c)?, c.ledger.balance(user, Resource::Training)?))
        })
        .await?;
    let views: Vec<_> = list
        .iter()
        .filter(|j| j.kind == JobKind::Training)
        .map(|j| TrainingView {
            job: JobView::new(j, &positions),
            loss: Vec::new(),
            samples: sample_urls(&state, &j.id),
        })
        .collect();
    let t = &state.config.training;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "trainings": views,
        "allowance_available": allowance.available,
        "allowance_held": allowance.held,
        "preset": {
            "steps": t.preset_steps,
            "rank": t.preset_rank,
            "lr": t.preset_lr,
            "resolution": t.preset_resolution,
        },
        "limits": { "max_steps": t.max_steps, "max_rank": t.max_rank, "resolutions": t.resolutions },
    })))
}

/// GET /api/trainings/{id}
pub async fn get(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let job = own_training(&state, &caller, path.into_inner()).await?;
    let jobs = state.jobs.clone();
    let positions = state.db(move |c| Ok(jobs.positions(c)?)).await?;
    let dir = state.jobs.training_dir(&job.id);
    let loss = web::block(move || trainer::loss_history(&dir)).await.map_err(ApiError::internal)?;
    let view = TrainingView { job: JobView::new(&job, &positions), loss, samples: sample_urls(&state, &job.id) };
    Ok(HttpResponse::Ok().json(serde_json::json!({ "training": view })))
}

/// GET /api/trainings/{id}/samples/{n}.png
pub async fn sample(state: Data, caller: Caller, path: web::Path<(String, String)>) -> Result<HttpResponse, ApiError> {
    let (id, file) = path.into_inner();
    let job = own_training(&state, &caller, id).await?;
    let n: usize =
        file.strip_suffix(".png").and_then(|n| n.parse().ok()).ok_or_else(|| ApiError::not_found("sample"))?;
    let dir = state.jobs.training_dir(&job.id);
    let bytes = web::block(move || trainer::samples(&dir).get(n).map(std::fs::read))
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("sample"))?
        .map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok()
        .content_type("image/png")
        .insert_header(("Cache-Control", "private, max-age=300"))
        .body(bytes))
}

#[derive(Deserialize)]
pub struct DownloadQuery {
    format: Option<Format>,
}

/// GET /api/loras/{name}/download[?format=kohya|peft]: the caller's own LoRA or a studio one,
/// as stored, or converted to the format asked for.
pub async fn download(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<DownloadQuery>,
) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    let user = caller.user.id;
    let library = state.jobs.loras.clone();
    let want = q.format;
    let tmp_dir = state.jobs.training_dir(".downloads");
    let n = name.clone();
    let bytes = web::block(move || -> Result<Vec<u8>, ApiError> {
        let (_, file) = library.resolve(user, &n)?;
        let format = library.summary(&file)?.format;
        let same = match want {
            None => true,
            Some(Format::Kohya) => format == "kohya",
            Some(Format::Peft) => format == "diffusers/PEFT",
        };
        if same {
            return std::fs::read(&file).map_err(ApiError::internal);
        }
        let want = want.expect("None is the same format");
        std::fs::create_dir_all(&tmp_dir).map_err(ApiError::internal)?;
        let out = tmp_dir.join(format!("{}.safetensors", crate::secret::random_hex(8)));
        let converted = crate::train::convert::convert(&file, want, &out)
            .map_err(|e| ApiError::bad_request(format!("this LoRA cannot be converted: {e:#}")))
            .and_then(|_| std::fs::read(&out).map_err(ApiError::internal));
        let _ = std::fs::remove_file(&out);
        converted
    })
    .await
    .map_err(ApiError::internal)??;
    let suffix = match q.format {
        Some(Format::Peft) => "-peft",
        _ => "",
    };
    let file_name: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header(("Content-Disposition", format!("attachment; filename=\"{file_name}{suffix}.safetensors\"")))
        .body(bytes))
}
