//! LoRAs: the studio's and the caller's own (list, upload, rename, edit, delete, preview), and
//! an admin publishing a user's LoRA to the studio library. The files and their checks are the
//! library's (`crate::loras`); how many a job may use is the plan's.

use std::io::Write;

use actix_web::{HttpResponse, web};
use futures_util::StreamExt;
use serde::Deserialize;

use crate::loras::{Library, LibraryError, Sidecar};
use crate::server::auth::Caller;
use crate::server::error::ApiError;
use crate::server::state::AppState;
use crate::server::views::{LoraList, LoraPlan, LoraUploaded};

type Data = web::Data<AppState>;

/// Runs `f` on the LoRA library on a blocking thread (it reads, parses and moves files).
async fn on_library<T: Send + 'static>(
    state: &Data,
    f: impl FnOnce(&Library) -> Result<T, LibraryError> + Send + 'static,
) -> Result<T, ApiError> {
    let library = state.jobs.loras.clone();
    Ok(web::block(move || f(&library)).await.map_err(ApiError::internal)??)
}

/// GET /api/loras: the studio's LoRAs and the caller's own, with how many a job may use on
/// the caller's plan and on each plan (for "needs the X plan").
pub async fn list(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    let library = state.jobs.loras.clone();
    let user = caller.user.id;
    let v = state
        .db(move |c| {
            c.ledger.catch_up_user(user)?;
            let sub = c.ledger.subscription(user)?;
            let cfg = c.ledger.config_arc();
            let ent = cfg.entitlements(&sub.plan, sub.period)?;
            let plans = cfg
                .plan_ids_by_rank()
                .into_iter()
                .map(|id| {
                    let p = &cfg.plans[&id];
                    LoraPlan { name: p.name.clone(), max_loras: p.loras.max(), plan: id }
                })
                .collect();
            Ok(LoraList { loras: library.list(user)?, plan: sub.plan, max_loras: ent.max_loras, plans })
        })
        .await?;
    Ok(HttpResponse::Ok().json(v))
}

/// Deletes an upload's file when the request is over, whatever happened.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[derive(Deserialize)]
pub struct UploadQuery {
    name: String,
}

/// POST /api/loras?name=NAME with the file as the body: stored in the caller's library after
/// it is checked (size, a FLUX LoRA atelier applies, for a transformer served here); 201.
pub async fn upload(
    state: Data,
    caller: Caller,
    q: web::Query<UploadQuery>,
    mut body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let name = q.into_inner().name;
    // Before any byte is written.
    Library::check_name(&name)?;
    let user = caller.user.id;
    let max_mib = state.config.server.max_lora_upload_mib;
    let tmp = state.jobs.loras.upload_path(user)?;
    // Removed however the request ends (a client that goes away drops this handler mid-body).
    let _upload = RemoveOnDrop(tmp.clone());
    // Streamed to disk: a 700 MB LoRA never sits in memory.
    let mut file = std::fs::File::create(&tmp).map_err(ApiError::internal)?;
    let mut size: u64 = 0;
    while let Some(chunk) = body.next().await {
        let written = chunk.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}"))).and_then(|c| {
            size += c.len() as u64;
            if size > max_mib << 20 {
                return Err(ApiError::new(
                    actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "lora_too_large",
                    format!("LoRA files are limited to {max_mib} MiB here ([server] max_lora_upload_mib)"),
                ));
            }
            file.write_all(&c).map_err(ApiError::internal)
        });
        written?;
    }
    drop(file);
    if size == 0 {
        return Err(ApiError::bad_request("the upload is empty: send the LoRA file as the request body"));
    }
    let mut widths: Vec<usize> = state.jobs.models.models.values().filter_map(|m| m.hidden_size).collect();
    widths.sort_unstable();
    widths.dedup();
    let max_per_user = state.config.server.max_loras_per_user;
    let (lora, summary) =
        on_library(&state, move |library| library.store_upload(user, &name, &tmp, &widths, max_per_user)).await?;
    Ok(HttpResponse::Created().json(LoraUploaded {
        lora,
        format: summary.format,
        hash: summary.hash.clone(),
        warnings: summary.warnings.clone(),
    }))
}

/// What `PATCH /api/loras/{name}` changes: a new name and sidecar fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraChange {
    name: Option<String>,
    label: Option<String>,
    triggers: Option<Vec<String>>,
    default_weight: Option<f32>,
    licence: Option<String>,
    description: Option<String>,
}

/// PATCH /api/loras/{name}: renames or describes one of the caller's own LoRAs.
pub async fn update(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<LoraChange>,
) -> Result<HttpResponse, ApiError> {
    let (name, change) = (path.into_inner(), body.into_inner());
    let user = caller.user.id;
    let list = on_library(&state, move |library| {
        let side = Sidecar {
            label: change.label,
            triggers: change.triggers.unwrap_or_default(),
            default_weight: change.default_weight,
            licence: change.licence,
            description: change.description,
            ..Sidecar::default()
        };
        // Renamed first: a refused name changes nothing.
        let name = match &change.name {
            Some(to) => {
                library.rename(user, &name, to)?;
                to.clone()
            }
            None => name,
        };
        library.update(user, &name, &side)?;
        library.list(user)
    })
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "loras": list })))
}

/// DELETE /api/loras/{name}: one of the caller's own.
pub async fn delete(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    let user = caller.user.id;
    on_library(&state, move |library| library.delete(user, &name)).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// GET /api/loras/{name}/preview: the preview image of a LoRA the caller may use.
pub async fn preview(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    let user = caller.user.id;
    let (file, bytes) = on_library(&state, move |library| {
        let file = library.preview(user, &name)?;
        let bytes = std::fs::read(&file)?;
        Ok((file, bytes))
    })
    .await?;
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mime = match ext {
        "jpg" => "image/jpeg",
        "webp" => "image/webp",
        _ => "image/png",
    };
    Ok(HttpResponse::Ok().content_type(mime).insert_header(("Cache-Control", "private, max-age=300")).body(bytes))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// The owner's user name.
    user: String,
    name: String,
    /// The studio name; default: the same.
    #[serde(rename = "as")]
    as_name: Option<String>,
}

/// POST /api/admin/loras/publish {user, name, as?}: copies a user's LoRA into the studio
/// library (every user can then use it); 201.
pub async fn publish(state: Data, caller: Caller, body: web::Json<Publish>) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let p = body.into_inner();
    let owner_name = p.user.clone();
    let owner = state.db(move |c| Ok(c.ledger.user_by_name(&owner_name)?.id)).await?;
    let as_name = p.as_name.unwrap_or_else(|| p.name.clone());
    let name = p.name.clone();
    let entry = on_library(&state, move |library| library.publish(owner, &name, &as_name)).await?;
    log::info!("admin {} published LoRA {} of {} as {}", caller.user.name, p.name, p.user, entry.name);
    Ok(HttpResponse::Created().json(serde_json::json!({ "lora": entry })))
}
