//! Training datasets: create, list, read, rename, delete; image uploads (multipart, all or
//! nothing), captions one by one or in bulk, thumbnails and files. The files and their checks
//! are `crate::datasets`'; how many images a LoRA trains on is the plan's.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use crate::datasets::captions::BulkEdit;
use crate::datasets::upload::{ImageAllowance, Part, Staging};
use crate::datasets::{DatasetError, Datasets, valid_image_id};
use crate::ledger::UserId;
use crate::server::auth::Caller;
use crate::server::error::ApiError;
use crate::server::multipart::{self, Multipart};
use crate::server::state::AppState;

type Data = web::Data<AppState>;
type Form = Multipart<web::Payload>;

/// Runs `f` on the datasets on a blocking thread (it reads, decodes and moves files).
async fn on_datasets<T: Send + 'static>(
    state: &Data,
    f: impl FnOnce(&Datasets) -> Result<T, DatasetError> + Send + 'static,
) -> Result<T, ApiError> {
    let datasets = state.jobs.datasets.clone();
    Ok(web::block(move || f(&datasets)).await.map_err(ApiError::internal)??)
}

/// How many images `user`'s plan trains on.
async fn allowance(state: &Data, user: UserId) -> Result<ImageAllowance, ApiError> {
    state
        .db(move |c| {
            c.ledger.catch_up_user(user)?;
            let sub = c.ledger.subscription(user)?;
            let plans = c.ledger.config_arc();
            let max = plans.plan(&sub.plan)?.training_images_per_lora;
            Ok(ImageAllowance { plan: sub.plan, max, plans })
        })
        .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// An admin: this user's datasets.
    user: Option<UserId>,
    /// An admin: everyone's.
    #[serde(default)]
    all: bool,
}

/// GET /api/datasets[?user=ID|?all=true]: the caller's datasets (an admin: a user's, or all),
/// with the caller's limits.
pub async fn list(state: Data, caller: Caller, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let owner = match (q.user, q.all) {
        (None, false) => Some(caller.user.id),
        (Some(u), false) if u == caller.user.id => Some(u),
        (Some(_), true) => return Err(ApiError::bad_request("give either user or all, not both")),
        (u, _) => {
            caller.require_admin()?;
            u
        }
    };
    let allow = allowance(&state, caller.user.id).await?;
    let datasets =
        on_datasets(&state, move |d| d.list(owner)?.into_iter().map(|ds| d.summary(ds)).collect::<Result<Vec<_>, _>>())
            .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "datasets": datasets,
        "plan": allow.plan,
        "max_images": allow.max,
        "max_datasets": state.config.datasets.max_datasets_per_user,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDataset {
    name: String,
    #[serde(default)]
    trigger: String,
}

/// POST /api/datasets {name, trigger?}: an empty dataset of the caller's; 201.
pub async fn create(state: Data, caller: Caller, body: web::Json<NewDataset>) -> Result<HttpResponse, ApiError> {
    let b = body.into_inner();
    let user = caller.user.id;
    let max = state.config.datasets.max_datasets_per_user;
    let ds = on_datasets(&state, move |d| {
        let ds = d.create_limited(user, &b.name, &b.trigger, max)?;
        d.summary(ds)
    })
    .await?;
    Ok(HttpResponse::Created().json(serde_json::json!({ "dataset": ds })))
}

/// GET /api/datasets/{id}: the dataset with its images, the owner's plan's image limit and the
/// upload limits.
pub async fn get(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let (user, admin) = (caller.user.id, caller.is_admin());
    let (summary, images) = on_datasets(&state, move |d| {
        let ds = d.get(user, admin, &id)?;
        let images = d.images(&ds.id)?;
        Ok((d.summary(ds)?, images))
    })
    .await?;
    let allow = allowance(&state, summary.dataset.owner).await?;
    let limits = &state.config.datasets;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "dataset": summary,
        "images": images,
        "plan": allow.plan,
        "max_images": allow.max,
        "limits": {
            "max_image_mib": limits.max_image_mib,
            "max_dataset_mib": limits.max_dataset_mib,
            "max_image_megapixels": limits.max_image_megapixels,
            "max_caption_chars": limits.max_caption_chars,
        },
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetChange {
    name: Option<String>,
    trigger: Option<String>,
}

/// PATCH /api/datasets/{id} {name?, trigger?}: renames or changes the trigger word.
pub async fn update(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<DatasetChange>,
) -> Result<HttpResponse, ApiError> {
    let (id, b) = (path.into_inner(), body.into_inner());
    let user = caller.user.id;
    let ds = on_datasets(&state, move |d| {
        let ds = d.update(user, &id, b.name.as_deref(), b.trigger.as_deref())?;
        d.summary(ds)
    })
    .await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "dataset": ds })))
}

/// DELETE /api/datasets/{id}: the whole dataset.
pub async fn delete(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let user = caller.user.id;
    on_datasets(&state, move |d| d.delete(user, &id)).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// POST /api/datasets/{id}/images (multipart/form-data): image files (PNG, JPEG, WebP, sent
/// as image/*), optional captions as `caption:<file name>` fields or `<stem>.txt` files. All
/// or nothing: one bad file stores none; 201 with the new images.
pub async fn upload(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let user = caller.user.id;
    let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut form = Multipart::new(body, &multipart::boundary(ct)?);
    let allow = allowance(&state, user).await?;
    let limits = state.config.datasets.clone();
    let ds_id = id.clone();
    let staging = on_datasets(&state, move |d| Staging::new(d, user, &ds_id, limits, allow)).await;
    // Dropped (its folder removed) however this ends, a client gone mid-body included.
    let mut staging = match staging {
        Ok(s) => s,
        Err(e) => return Err(drained(form, e).await),
    };
    if let Err(e) = receive(&mut staging, &mut form).await {
        return Err(drained(form, e).await);
    }
    let images = on_datasets(&state, move |d| staging.finish(d)).await?;
    Ok(HttpResponse::Created().json(serde_json::json!({ "images": images })))
}

/// Streams every part of `form` into `staging`.
async fn receive(staging: &mut Staging, form: &mut Form) -> Result<(), ApiError> {
    while let Some(head) = form.next_part().await? {
        let kind =
            crate::datasets::upload::classify(&head.name, head.filename.as_deref(), head.content_type.as_deref())?;
        match kind {
            Part::Image(file) => {
                staging.start_image(&file)?;
                while let Some(chunk) = form.chunk().await? {
                    staging.write(&chunk)?;
                }
                staging.end_image()?;
            }
            Part::CaptionFile(source) | Part::CaptionField(source) => {
                let max = staging.max_caption_bytes();
                let mut text = Vec::new();
                while let Some(chunk) = form.chunk().await? {
                    text.extend_from_slice(&chunk);
                    if text.len() > max {
                        return Err(ApiError::bad_request(format!("{source}: the caption is too long")));
                    }
                }
                staging.add_caption(&source, &text, &source)?;
            }
        }
    }
    Ok(())
}

/// `e`, after reading (and dropping) what is left of the request up to a bound, so the client
/// gets the answer instead of a reset connection while it is still sending.
async fn drained(mut form: Form, e: impl Into<ApiError>) -> ApiError {
    let mut left: usize = 64 << 20;
    loop {
        while let Ok(Some(chunk)) = form.chunk().await {
            match left.checked_sub(chunk.len()) {
                Some(l) => left = l,
                None => return e.into(),
            }
        }
        if !matches!(form.next_part().await, Ok(Some(_))) {
            break;
        }
    }
    e.into()
}

/// PATCH /api/datasets/{id}/captions: a [`BulkEdit`]; answers the images.
pub async fn edit_captions(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<BulkEdit>,
) -> Result<HttpResponse, ApiError> {
    let (id, edit) = (path.into_inner(), body.into_inner());
    let user = caller.user.id;
    let max = state.config.datasets.max_caption_chars;
    let images = on_datasets(&state, move |d| d.edit_captions(user, &id, &edit, max)).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "images": images })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionChange {
    caption: String,
}

/// The dataset and image ids of an image path; a malformed image id is as unknown as a
/// missing one.
fn image_path(path: web::Path<(String, String)>) -> Result<(String, String), ApiError> {
    let (id, img) = path.into_inner();
    if !valid_image_id(&img) {
        return Err(DatasetError::NotFound(format!("image {img:?}")).into());
    }
    Ok((id, img))
}

/// PATCH /api/datasets/{id}/images/{img} {caption}: answers the image.
pub async fn set_caption(
    state: Data,
    caller: Caller,
    path: web::Path<(String, String)>,
    body: web::Json<CaptionChange>,
) -> Result<HttpResponse, ApiError> {
    let (id, img) = image_path(path)?;
    let caption = body.into_inner().caption;
    let user = caller.user.id;
    let max = state.config.datasets.max_caption_chars;
    let image = on_datasets(&state, move |d| d.set_caption(user, &id, &img, &caption, max)).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "image": image })))
}

/// DELETE /api/datasets/{id}/images/{img}.
pub async fn delete_image(
    state: Data,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, img) = image_path(path)?;
    let user = caller.user.id;
    on_datasets(&state, move |d| d.delete_image(user, &id, &img)).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Reads the file of an image the caller may see (`thumb`: its thumbnail).
async fn image_bytes(
    state: Data,
    caller: Caller,
    path: web::Path<(String, String)>,
    thumb: bool,
) -> Result<HttpResponse, ApiError> {
    let (id, img) = image_path(path)?;
    let (user, admin) = (caller.user.id, caller.is_admin());
    let bytes = on_datasets(&state, move |d| {
        d.get(user, admin, &id)?;
        let file = if thumb { d.thumb_file(&id, &img)? } else { d.image_file(&id, &img)? };
        Ok(std::fs::read(file).map_err(anyhow::Error::new)?)
    })
    .await?;
    Ok(HttpResponse::Ok()
        .content_type(if thumb { "image/jpeg" } else { "image/png" })
        .insert_header(("Cache-Control", "private, max-age=300"))
        .body(bytes))
}

/// GET /api/datasets/{id}/images/{img}/file: the stored PNG.
pub async fn file(state: Data, caller: Caller, path: web::Path<(String, String)>) -> Result<HttpResponse, ApiError> {
    image_bytes(state, caller, path, false).await
}

/// GET /api/datasets/{id}/images/{img}/thumb: the JPEG thumbnail.
pub async fn thumb(state: Data, caller: Caller, path: web::Path<(String, String)>) -> Result<HttpResponse, ApiError> {
    image_bytes(state, caller, path, true).await
}
