//! `GET /api/limits`: the bounds a generation request must keep on this server, so that the
//! browser UI (and any client) reads them instead of repeating them.

use actix_web::{HttpResponse, web};

use crate::server::auth::Caller;
use crate::server::error::ApiError;
use crate::server::state::AppState;

/// GET /api/limits: the server's [`crate::spec::Limits`] (the plan's batch limit and the
/// parameter levels are in `/api/models`).
pub async fn limits(state: web::Data<AppState>, _caller: Caller) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.jobs.limits()))
}
