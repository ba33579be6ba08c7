//! Who is calling: a session cookie (browser) or `Authorization: Bearer <API key>`.
//! Changes made with the cookie must carry the session's CSRF token in `X-CSRF-Token`
//! (a cross-site page can make the browser send the cookie, but cannot read the token).
//! Bearer keys are not sent by browsers on their own, so they need no CSRF token.

use actix_web::dev::Payload;
use actix_web::http::Method;
use actix_web::{FromRequest, HttpRequest, web};
use futures_util::future::LocalBoxFuture;

use crate::accounts;
use crate::ledger::User;
use crate::server::error::ApiError;
use crate::server::state::AppState;

pub const SESSION_COOKIE: &str = "atelier_session";

#[derive(Clone, PartialEq)]
pub enum Via {
    Session { token: String, csrf: String },
    ApiKey { key: String },
}

impl std::fmt::Debug for Via {
    // Never the secrets themselves (tokens end up in logs otherwise).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Via::Session { .. } => "Session",
            Via::ApiKey { .. } => "ApiKey",
        })
    }
}

/// A live credential: whose it is, and for a session its expiry and CSRF token.
pub struct Live {
    pub user_id: crate::ledger::UserId,
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    pub csrf: Option<String>,
}

/// The credential's owner, if the credential is still live and the account is not disabled:
/// what every request is checked against, and what an open event stream is checked against
/// again while it lasts.
pub fn live(c: &mut crate::jobs::Conn, via: &Via) -> Result<Option<Live>, ApiError> {
    let now = c.now();
    let found = match via {
        Via::ApiKey { key } => {
            accounts::api_key_user(&c.app, key, now)?.map(|user_id| Live { user_id, expires_at: None, csrf: None })
        }
        Via::Session { token, .. } => accounts::session(&c.app, token, now)?.map(|s| Live {
            user_id: s.user_id,
            expires_at: Some(s.expires_at),
            csrf: Some(s.csrf),
        }),
    };
    match found {
        Some(l) if accounts::is_disabled(&c.app, l.user_id)? => Ok(None),
        other => Ok(other),
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
    pub via: Via,
    /// When the session ends (None with an API key).
    pub session_expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.user.is_admin
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.user.is_admin { Ok(()) } else { Err(ApiError::forbidden("this needs an admin account")) }
    }

    /// Whether the caller may see something owned by `owner`: its owner or an admin.
    pub fn may_see(&self, owner: crate::ledger::UserId) -> bool {
        self.user.id == owner || self.user.is_admin
    }
}

fn bearer(req: &HttpRequest) -> Option<String> {
    let h = req.headers().get("authorization")?.to_str().ok()?;
    let (scheme, token) = h.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let key = bearer(req);
        let cookie = req.cookie(SESSION_COOKIE).map(|c| c.value().to_string());
        let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        let csrf_sent = req.headers().get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::to_string);
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::internal("no app state"))?;
            let via = match (key, cookie) {
                (Some(key), _) => Via::ApiKey { key },
                (None, Some(token)) => Via::Session { token, csrf: String::new() },
                (None, None) => {
                    return Err(ApiError::unauthorized("log in, or send an API key as Authorization: Bearer <key>"));
                }
            };
            let caller = state
                .db(move |c| {
                    let Some(live) = live(c, &via)? else {
                        return Err(ApiError::unauthorized(match via {
                            Via::ApiKey { .. } => {
                                "the API key is not valid (revoked, mistyped, or its account is disabled)"
                            }
                            Via::Session { .. } => "your session has ended; log in again",
                        }));
                    };
                    let via = match via {
                        Via::Session { token, .. } => Via::Session { token, csrf: live.csrf.unwrap_or_default() },
                        v => v,
                    };
                    let user = c.ledger.user_by_id(live.user_id)?;
                    Ok(Caller { user, via, session_expires_at: live.expires_at })
                })
                .await?;
            if let Via::Session { csrf, .. } = &caller.via
                && !safe
                && !csrf_sent.is_some_and(|sent| crate::secret::constant_time_eq(&sent, csrf))
            {
                return Err(ApiError::new(
                    actix_web::http::StatusCode::FORBIDDEN,
                    "csrf",
                    "missing or wrong CSRF token (send X-CSRF-Token)",
                ));
            }
            Ok(caller)
        })
    }
}
