//! The private gallery: a user's own images (an admin may open anyone's).

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use crate::jobs::gallery;
use crate::jobs::store::{self, ImageMeta};
use crate::server::auth::Caller;
use crate::server::error::ApiError;
use crate::server::state::AppState;
use crate::server::views::{ImageDeleted, ImagePage, OneImage};

type Data = web::Data<AppState>;

#[derive(Deserialize)]
pub struct Page {
    page: Option<u32>,
    per_page: Option<u32>,
}

/// GET /api/images?page=1&per_page=24: the caller's images, newest first.
pub async fn list(state: Data, caller: Caller, q: web::Query<Page>) -> Result<HttpResponse, ApiError> {
    let per_page = q.per_page.unwrap_or(24).clamp(1, 200);
    let page = q.page.unwrap_or(1).clamp(1, 1_000_000);
    let user = caller.user.id;
    let (images, total) =
        state.db(move |c| Ok(store::list_images(&c.app, user, (page - 1) * per_page, per_page)?)).await?;
    Ok(HttpResponse::Ok().json(ImagePage { images, page, per_page, total, pages: total.div_ceil(per_page) }))
}

async fn own_image(state: &Data, caller: &Caller, id: String) -> Result<ImageMeta, ApiError> {
    let meta = state.db(move |c| Ok(store::get_image(&c.app, &id)?)).await?;
    match meta {
        Some(m) if caller.may_see(m.user_id) => Ok(m),
        _ => Err(ApiError::not_found("image")),
    }
}

/// GET /api/images/{id}: the image's metadata.
pub async fn get(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let m = own_image(&state, &caller, path.into_inner()).await?;
    Ok(HttpResponse::Ok().json(OneImage { image: m }))
}

#[derive(Deserialize)]
pub struct FileQuery {
    download: Option<bool>,
}

/// GET /api/images/{id}/file[?download=true]: the PNG (with its A1111 parameters).
pub async fn file(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<FileQuery>,
) -> Result<HttpResponse, ApiError> {
    let m = own_image(&state, &caller, path.into_inner()).await?;
    let bytes = read_png(&state, &m.id).await?;
    let mut r = HttpResponse::Ok();
    r.insert_header(("Content-Type", "image/png"))
        .insert_header(("Cache-Control", "private, max-age=31536000, immutable"));
    if q.download.unwrap_or(false) {
        r.insert_header((
            "Content-Disposition",
            format!("attachment; filename=\"atelier-{}-{}.png\"", m.seed, &m.id[..8]),
        ));
    }
    Ok(r.body(bytes))
}

/// The PNG file of gallery image `id` (whose access the caller has checked).
pub async fn read_png(state: &Data, id: &str) -> Result<Vec<u8>, ApiError> {
    let p = gallery::image_path(state.jobs.images_dir(), id).ok_or_else(|| ApiError::not_found("image"))?;
    let id = id.to_string();
    web::block(move || std::fs::read(p)).await.map_err(ApiError::internal)?.map_err(|e| {
        log::error!("image {id} is in the gallery but its file is unreadable: {e}");
        ApiError::not_found("image file")
    })
}

/// DELETE /api/images/{id}
pub async fn delete(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let m = own_image(&state, &caller, path.into_inner()).await?;
    let id = m.id.clone();
    let dir = state.jobs.images_dir().to_path_buf();
    state
        .db(move |c| {
            if store::delete_image(&c.app, &id)? {
                gallery::remove(&dir, &id);
            }
            Ok(())
        })
        .await?;
    Ok(HttpResponse::Ok().json(ImageDeleted { deleted: m.id }))
}
