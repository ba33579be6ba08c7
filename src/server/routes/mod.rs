//! The HTTP routes. Handlers are thin: parse, authorize, call the ledger or the jobs, answer.

pub mod account;
pub mod admin;
pub mod datasets;
pub mod gallery;
pub mod jobs;
pub mod limits;
pub mod loras;
pub mod openai;
pub mod ops;
pub mod trainings;
pub mod ui;
pub mod usage;

use actix_web::web;

use crate::server::error::ApiError;

/// Mounts every route on an app.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::JsonConfig::default().limit(256 * 1024).error_handler(|e, _| {
        match e {
            actix_web::error::JsonPayloadError::Overflow { .. }
            | actix_web::error::JsonPayloadError::OverflowKnownLength { .. } => ApiError::new(
                actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "the JSON body is larger than 256 KiB",
            )
            .into(),
            e => ApiError::bad_request(format!("invalid JSON body: {e}")).into(),
        }
    }))
    .app_data(
        web::QueryConfig::default().error_handler(|e, _| ApiError::bad_request(format!("invalid query: {e}")).into()),
    )
    .app_data(
        web::PathConfig::default().error_handler(|e, _| ApiError::bad_request(format!("invalid path: {e}")).into()),
    )
    .route("/healthz", web::get().to(ops::healthz))
    .route("/metrics", web::get().to(ops::metrics))
    .route("/v1/models", web::get().to(openai::models))
    .route("/v1/images/generations", web::post().to(openai::generations))
    .service(
        web::scope("/api")
            .route("/login", web::post().to(account::login))
            .route("/logout", web::post().to(account::logout))
            .route("/session", web::get().to(account::session))
            .route("/password", web::post().to(account::change_password))
            .route("/keys", web::get().to(account::list_keys))
            .route("/keys", web::post().to(account::create_key))
            .route("/keys/{id}", web::delete().to(account::revoke_key))
            .route("/plans", web::get().to(account::plans))
            .route("/subscription/cancel", web::post().to(account::cancel_subscription))
            .route("/usage", web::get().to(usage::usage))
            .route("/models", web::get().to(usage::models))
            .route("/price", web::get().to(usage::price))
            .route("/limits", web::get().to(limits::limits))
            .route("/jobs", web::post().to(jobs::create))
            .route("/jobs", web::get().to(jobs::list))
            .route("/jobs/{id}", web::get().to(jobs::get))
            .route("/jobs/{id}/cancel", web::post().to(jobs::cancel))
            .route("/jobs/{id}/events", web::get().to(jobs::job_events))
            .route("/events", web::get().to(jobs::user_events))
            .route("/loras", web::get().to(loras::list))
            .route("/loras", web::post().to(loras::upload))
            .route("/loras/{name}", web::patch().to(loras::update))
            .route("/loras/{name}", web::delete().to(loras::delete))
            .route("/loras/{name}/preview", web::get().to(loras::preview))
            .route("/loras/{name}/download", web::get().to(trainings::download))
            .route("/trainings", web::post().to(trainings::create))
            .route("/trainings", web::get().to(trainings::list))
            .route("/trainings/{id}", web::get().to(trainings::get))
            .route("/trainings/{id}/cancel", web::post().to(jobs::cancel))
            .route("/trainings/{id}/samples/{file}", web::get().to(trainings::sample))
            .route("/admin/loras/publish", web::post().to(loras::publish))
            .route("/datasets", web::get().to(datasets::list))
            .route("/datasets", web::post().to(datasets::create))
            .route("/datasets/{id}", web::get().to(datasets::get))
            .route("/datasets/{id}", web::patch().to(datasets::update))
            .route("/datasets/{id}", web::delete().to(datasets::delete))
            .route("/datasets/{id}/images", web::post().to(datasets::upload))
            .route("/datasets/{id}/captions", web::patch().to(datasets::edit_captions))
            .route("/datasets/{id}/images/{img}", web::patch().to(datasets::set_caption))
            .route("/datasets/{id}/images/{img}", web::delete().to(datasets::delete_image))
            .route("/datasets/{id}/images/{img}/file", web::get().to(datasets::file))
            .route("/datasets/{id}/images/{img}/thumb", web::get().to(datasets::thumb))
            .route("/images", web::get().to(gallery::list))
            .route("/images/{id}", web::get().to(gallery::get))
            .route("/images/{id}", web::delete().to(gallery::delete))
            .route("/images/{id}/file", web::get().to(gallery::file))
            .route("/admin/users", web::get().to(admin::users))
            .route("/admin/users", web::post().to(admin::create_user))
            .route("/admin/users/{id}", web::get().to(admin::user))
            .route("/admin/users/{id}/plan", web::post().to(admin::set_plan))
            .route("/admin/users/{id}/grant", web::post().to(admin::grant))
            .route("/admin/users/{id}/disable", web::post().to(admin::disable))
            .route("/admin/queue", web::get().to(admin::queue))
            .route("/admin/models", web::get().to(admin::models))
            .default_service(web::to(|| async { Err::<actix_web::HttpResponse, _>(ApiError::not_found("API route")) })),
    )
    .default_service(web::get().to(ui::asset));
}
