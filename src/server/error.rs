//! Every error the API answers, as JSON in OpenAI's error shape (so OpenAI clients read it):
//! `{"error": {"message", "type", "code", "details"}}` with a matching HTTP status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::jobs::SubmitError;
use crate::ledger::{LedgerError, Refusal};
use crate::server::views::{ErrorBody, ErrorDetail};

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked))
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<serde_json::Value>,
    /// Seconds to wait (429), sent as Retry-After.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), details: None, retry_after: None }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m)
    }
    pub fn unauthorized(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", m)
    }
    pub fn forbidden(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", m)
    }
    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", m)
    }
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        log::error!("internal error: {e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
    }
    /// 429 with a Retry-After of `wait_secs`.
    pub fn too_many(code: &'static str, message: impl Into<String>, wait_secs: u64) -> ApiError {
        let mut e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message);
        e.retry_after = Some(wait_secs);
        e
    }
    /// 503 with a Retry-After: the database stayed locked past its busy timeout (a moment of
    /// heavy writing, a backup holding the lock); nothing was changed.
    pub fn busy() -> ApiError {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the server's database is busy; nothing was changed, try again in a moment",
        );
        e.retry_after = Some(2);
        e
    }

    /// An internal error, or [`ApiError::busy`] when it comes from a locked database.
    fn from_anyhow(e: &anyhow::Error) -> ApiError {
        let busy = e.chain().any(|c| {
            c.downcast_ref::<rusqlite::Error>().is_some_and(is_busy)
                || matches!(c.downcast_ref::<LedgerError>(), Some(LedgerError::Sqlite(s)) if is_busy(s))
        });
        if busy { ApiError::busy() } else { ApiError::internal(format!("{e:#}")) }
    }

    pub fn with_details(mut self, d: serde_json::Value) -> ApiError {
        self.details = Some(d);
        self
    }

    /// A plan or balance refusal: 402 when credits or a quota run out (with when they
    /// renew), 403 when the plan does not include the model, parameters or batch size.
    pub fn refusal(r: Refusal) -> ApiError {
        let (status, code) = match &r {
            Refusal::OutOfCredits { .. } => (StatusCode::PAYMENT_REQUIRED, "insufficient_credits"),
            Refusal::QuotaExhausted { .. } => (StatusCode::PAYMENT_REQUIRED, "quota_exhausted"),
            Refusal::InvalidParams { .. } => (StatusCode::BAD_REQUEST, "invalid_request"),
            Refusal::UnknownModel { .. } => (StatusCode::NOT_FOUND, "model_not_found"),
            _ => (StatusCode::FORBIDDEN, "not_in_plan"),
        };
        let details = serde_json::to_value(&r).unwrap_or_default();
        ApiError::new(status, code, r.to_string()).with_details(details)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let kind = match self.status.as_u16() {
            400 | 404 | 409 | 413 | 415 | 422 => "invalid_request_error",
            401 => "authentication_error",
            402 => "insufficient_quota",
            403 => "permission_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            _ => "server_error",
        };
        let mut r = HttpResponse::build(self.status);
        if let Some(s) = self.retry_after {
            r.insert_header(("Retry-After", s.to_string()));
        }
        r.json(ErrorBody {
            error: ErrorDetail { message: &self.message, kind, code: self.code, details: self.details.as_ref() },
        })
    }
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> ApiError {
        match e {
            LedgerError::Refused(r) => ApiError::refusal(r),
            LedgerError::UnknownUser(_) => ApiError::not_found("user"),
            LedgerError::UserExists(n) => ApiError::conflict(format!("user {n:?} already exists")),
            e @ (LedgerError::UnknownPlan { .. } | LedgerError::Invalid(_)) => ApiError::bad_request(e.to_string()),
            LedgerError::IdempotencyConflict { key, job_id, .. } => SubmitError::KeyReused { key, job_id }.into(),
            e @ LedgerError::HoldSettled { .. } => ApiError::conflict(e.to_string()),
            LedgerError::Sqlite(e) if is_busy(&e) => ApiError::busy(),
            other => ApiError::internal(other),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        match e {
            SubmitError::Invalid(m) => ApiError::bad_request(m),
            SubmitError::UnknownModel(m) => {
                ApiError::new(StatusCode::NOT_FOUND, "model_not_found", format!("unknown model {m:?}"))
            }
            SubmitError::ModelUnavailable { id, reason } => {
                // The reason names server paths: the log and the admin view have it.
                log::warn!("model {id} is not available: {reason}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "model_unavailable",
                    format!(
                        "model {id:?} is not available on this server right now; an admin can see why on the admin page"
                    ),
                )
            }
            e @ SubmitError::QueueFull { .. } => ApiError::too_many("queue_full", e.to_string(), 10),
            SubmitError::Refused(r) => ApiError::refusal(r),
            e @ SubmitError::KeyReused { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused", e.to_string())
            }
            e @ SubmitError::KeyInProgress { .. } => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_key_in_use", e.to_string())
            }
            SubmitError::Lora(e) => e.into(),
            SubmitError::Dataset(e) => e.into(),
            SubmitError::Internal(e) => ApiError::from_anyhow(&e),
        }
    }
}

impl From<crate::loras::LibraryError> for ApiError {
    fn from(e: crate::loras::LibraryError) -> ApiError {
        use crate::loras::LibraryError as L;
        match e {
            e @ L::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "lora_not_found", e.to_string()),
            L::Conflict(m) => ApiError::conflict(m),
            L::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_lora", m),
            L::Io(e) => ApiError::internal(e),
            L::Internal(e) => ApiError::from_anyhow(&e),
        }
    }
}

impl From<crate::datasets::DatasetError> for ApiError {
    fn from(e: crate::datasets::DatasetError) -> ApiError {
        use crate::datasets::DatasetError as D;
        match e {
            D::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "dataset_not_found", e.to_string()),
            D::Invalid(m) => ApiError::bad_request(m),
            D::TooLarge(m) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", m),
            D::Unsupported(m) => ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", m),
            D::Full(m) => ApiError::new(StatusCode::CONFLICT, "too_many_datasets", m),
            D::Refused(r) => {
                // The ledger words it for a training; here a dataset is being filled.
                let mut e = ApiError::refusal(r);
                e.message = e.message.replace("this training has", "this dataset would hold");
                e
            }
            D::Internal(e) => ApiError::from_anyhow(&e),
        }
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> ApiError {
        if is_busy(&e) { ApiError::busy() } else { ApiError::internal(e) }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        match e.downcast::<LedgerError>() {
            Ok(l) => l.into(),
            Err(e) => ApiError::from_anyhow(&e),
        }
    }
}
