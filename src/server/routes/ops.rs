//! `GET /healthz` and Prometheus `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use actix_web::{HttpRequest, HttpResponse, web};

use crate::jobs::store;
use crate::server::auth::Caller;
use crate::server::error::ApiError;
use crate::server::state::AppState;
use crate::server::views::Health;

type Data = web::Data<AppState>;

fn models_ready(state: &AppState) -> usize {
    state.jobs.models.models.values().filter(|m| m.is_ready()).count()
}

pub async fn healthz(state: Data) -> Result<HttpResponse, ApiError> {
    let db_ok = state.db(|c| Ok(c.app.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?)).await.is_ok();
    let ready = models_ready(&state);
    let body = Health {
        status: if db_ok { "ok" } else { "degraded" },
        database: db_ok,
        models_ready: ready,
        device: &state.device,
    };
    Ok(if db_ok { HttpResponse::Ok().json(body) } else { HttpResponse::ServiceUnavailable().json(body) })
}

/// GET /metrics: for admins and for requests from this machine (where a Prometheus agent
/// usually runs), or for anyone with `[server] metrics_public = true`.
pub async fn metrics(req: HttpRequest, state: Data, caller: Option<Caller>) -> Result<HttpResponse, ApiError> {
    let local = state.client_ip(&req).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !(state.config.server.metrics_public || local || caller.as_ref().is_some_and(Caller::is_admin)) {
        return Err(ApiError::forbidden(
            "/metrics is for admins and this machine (set [server] metrics_public = true to open it)",
        ));
    }
    let counts = state.db(|c| Ok(store::count_by_status(&c.app)?)).await?;
    let m = &state.jobs.metrics;
    let mut out = String::new();
    let queued = counts.iter().find(|(s, _)| *s == store::JobStatus::Queued).map_or(0, |(_, n)| *n);
    let _ = writeln!(
        out,
        "# HELP atelier_queue_depth Jobs waiting to start.\n# TYPE atelier_queue_depth gauge\natelier_queue_depth {queued}"
    );
    let _ = writeln!(out, "# HELP atelier_jobs Jobs by state.\n# TYPE atelier_jobs gauge");
    for (s, n) in &counts {
        let _ = writeln!(out, "atelier_jobs{{state=\"{}\"}} {n}", s.as_str());
    }
    let steps = m.steps.load(Ordering::Relaxed);
    let sum = m.step_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let last = m.last_step_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let _ = writeln!(out, "# HELP atelier_step_seconds Time per sampling step.\n# TYPE atelier_step_seconds summary");
    let _ = writeln!(out, "atelier_step_seconds_sum {sum}\natelier_step_seconds_count {steps}");
    let _ = writeln!(
        out,
        "# HELP atelier_step_seconds_last The last step's time.\n# TYPE atelier_step_seconds_last gauge\natelier_step_seconds_last {last}"
    );
    let _ = writeln!(
        out,
        "# HELP atelier_images_total Images generated.\n# TYPE atelier_images_total counter\natelier_images_total {}",
        m.images.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP atelier_sse_clients Open progress streams.\n# TYPE atelier_sse_clients gauge\natelier_sse_clients {}",
        state.jobs.hub.watchers()
    );
    let _ = writeln!(
        out,
        "# HELP atelier_model_loads_total Model components loaded from disk.\n# TYPE atelier_model_loads_total counter"
    );
    for (component, n) in
        [("transformer", &m.transformer_loads), ("text_encoders", &m.text_encoder_loads), ("vae", &m.vae_loads)]
    {
        let _ = writeln!(out, "atelier_model_loads_total{{component=\"{component}\"}} {}", n.load(Ordering::Relaxed));
    }
    let _ = writeln!(
        out,
        "# HELP atelier_training_steps_total LoRA training steps done.\n# TYPE atelier_training_steps_total counter\natelier_training_steps_total {}",
        m.training_steps.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP atelier_training_yields_total Times a training gave the device to waiting image jobs.\n# TYPE atelier_training_yields_total counter\natelier_training_yields_total {}",
        m.training_yields.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP atelier_image_wait_training_steps_max The most training steps an image job waited behind.\n# TYPE atelier_image_wait_training_steps_max gauge\natelier_image_wait_training_steps_max {}",
        m.image_wait_training_steps_max.load(Ordering::Relaxed)
    );
    let ready = models_ready(&state);
    let _ = writeln!(
        out,
        "# HELP atelier_models_ready Models that can run.\n# TYPE atelier_models_ready gauge\natelier_models_ready {ready}"
    );
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(out))
}
