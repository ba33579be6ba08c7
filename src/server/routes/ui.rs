//! The browser UI: the files of `web/`, built into the binary.

use actix_web::{HttpRequest, HttpResponse};

mod assets {
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// GET / and GET /{file}: an embedded file, or 404.
pub async fn asset(req: HttpRequest) -> HttpResponse {
    let path = req.path().trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    match assets::ASSETS.iter().find(|(p, _)| *p == path) {
        Some((p, bytes)) => HttpResponse::Ok()
            .content_type(content_type(p))
            // Everything the page loads comes from this server; images may be data: URLs.
            .insert_header(("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"))
            .insert_header(("X-Content-Type-Options", "nosniff"))
            .insert_header(("Cache-Control", "no-cache"))
            .body(*bytes),
        None => HttpResponse::NotFound()
            .json(serde_json::json!({"error": {"message": format!("no such page: /{path}"), "type": "invalid_request_error", "code": "not_found"}})),
    }
}
