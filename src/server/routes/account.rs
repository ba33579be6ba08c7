//! Log in and out, the session, API keys, plans and the user's own subscription.

use actix_web::cookie::{Cookie, SameSite};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;

use crate::accounts;
use crate::ledger::MAX_PASSWORD_BYTES;
use crate::server::auth::{Caller, SESSION_COOKIE, Via};
use crate::server::error::ApiError;
use crate::server::state::{AppState, Attempt};
use crate::server::views::{self, KeyCreated, KeyList, KeyRevoked, PasswordChanged, PlanList, SessionView};

type Data = web::Data<AppState>;

#[derive(Deserialize)]
pub struct Login {
    name: String,
    password: String,
}

fn secure(req: &HttpRequest, state: &AppState) -> bool {
    use crate::config::SecureCookies;
    match state.config.server.secure_cookies {
        SecureCookies::Always => true,
        SecureCookies::Never => false,
        SecureCookies::Auto => state.client_scheme(req) == "https",
    }
}

fn session_cookie(req: &HttpRequest, state: &AppState, value: String, max_age_days: i64) -> Cookie<'static> {
    Cookie::build(SESSION_COOKIE, value)
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure(req, state))
        .max_age(actix_web::cookie::time::Duration::days(max_age_days))
        .finish()
}

/// The one answer to every failed login: a wrong name, a wrong password and a disabled
/// account look alike, so a guess learns nothing.
fn login_refused() -> ApiError {
    ApiError::unauthorized("wrong name or password")
}

/// POST /api/login {name, password}: a session cookie and the CSRF token.
pub async fn login(req: HttpRequest, state: Data, body: web::Json<Login>) -> Result<HttpResponse, ApiError> {
    let Login { name, password } = body.into_inner();
    if name.len() > 64 || password.len() > MAX_PASSWORD_BYTES {
        return Err(login_refused());
    }
    let attempt = Attempt::new(&name, &state.client_ip(&req));
    if let Some(wait) = state.limiter.blocked(&attempt) {
        return Err(ApiError::too_many(
            "too_many_logins",
            format!("too many failed logins; try again in {wait} s"),
            wait,
        ));
    }
    // Counted before checking, so a burst of parallel guesses cannot all slip past the limit;
    // a success takes its attempt back.
    state.limiter.fail(&attempt);
    let days = state.config.server.session_days;
    let n = name.clone();
    let result = state
        .db(move |c| {
            let ok = match c.ledger.verify_password(&n, &password) {
                Ok(ok) => ok,
                Err(crate::ledger::LedgerError::UnknownUser(_)) => false,
                Err(e) => return Err(e.into()),
            };
            if !ok {
                return Ok(None);
            }
            let user = c.ledger.user_by_name(&n)?;
            if accounts::is_disabled(&c.app, user.id)? {
                log::info!("login refused: account {n:?} is disabled");
                return Ok(None);
            }
            let (token, session) = accounts::create_session(&c.app, user.id, days, c.now())?;
            Ok(Some((user, token, session)))
        })
        .await?;
    let Some((user, token, session)) = result else {
        return Err(login_refused());
    };
    state.limiter.succeed(&attempt);
    Ok(HttpResponse::Ok().cookie(session_cookie(&req, &state, token, days as i64)).json(SessionView {
        user: &user,
        csrf_token: Some(&session.csrf),
        expires_at: Some(session.expires_at),
    }))
}

/// POST /api/logout: revokes the session.
pub async fn logout(req: HttpRequest, state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    if let Via::Session { token, .. } = caller.via {
        state.db(move |c| Ok(accounts::revoke_session(&c.app, &token, c.now())?)).await?;
        state.credentials_changed();
    }
    let mut gone = session_cookie(&req, &state, String::new(), 0);
    gone.make_removal();
    Ok(HttpResponse::Ok().cookie(gone).json(views::DONE))
}

/// GET /api/session: who is logged in, and the CSRF token for changes.
pub async fn session(caller: Caller) -> Result<HttpResponse, ApiError> {
    let csrf = match &caller.via {
        Via::Session { csrf, .. } => Some(csrf.as_str()),
        Via::ApiKey { .. } => None,
    };
    Ok(HttpResponse::Ok().json(SessionView {
        user: &caller.user,
        csrf_token: csrf,
        expires_at: caller.session_expires_at,
    }))
}

/// GET /api/keys
pub async fn list_keys(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    let id = caller.user.id;
    let keys = state.db(move |c| Ok(accounts::list_api_keys(&c.app, id)?)).await?;
    Ok(HttpResponse::Ok().json(KeyList { keys }))
}

#[derive(Deserialize)]
pub struct NewKey {
    #[serde(default)]
    label: String,
}

/// POST /api/keys {label}: the new key, shown only in this answer. Only from a logged-in
/// session: a key must not be able to mint more keys (revoking a leaked key would not end it).
pub async fn create_key(state: Data, caller: Caller, body: web::Json<NewKey>) -> Result<HttpResponse, ApiError> {
    if !matches!(caller.via, Via::Session { .. }) {
        return Err(ApiError::forbidden("create API keys from a logged-in browser session, not with an API key"));
    }
    let label = body.into_inner().label.trim().to_string();
    if label.chars().count() > 100 {
        return Err(ApiError::bad_request("the label is longer than 100 characters"));
    }
    let id = caller.user.id;
    let (key, info) = state.db(move |c| Ok(accounts::create_api_key(&c.app, id, &label, c.now())?)).await?;
    Ok(HttpResponse::Created().json(KeyCreated { key, info }))
}

/// DELETE /api/keys/{id}
pub async fn revoke_key(state: Data, caller: Caller, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let key_id: i64 = path.parse().map_err(|_| ApiError::not_found("API key"))?;
    let user = caller.user.id;
    let ok = state.db(move |c| Ok(accounts::revoke_api_key(&c.app, user, key_id, c.now())?)).await?;
    if !ok {
        return Err(ApiError::not_found("API key"));
    }
    state.credentials_changed();
    Ok(HttpResponse::Ok().json(KeyRevoked { revoked: key_id }))
}

/// GET /api/plans: the plan comparison, from the config.
pub async fn plans(state: Data) -> Result<HttpResponse, ApiError> {
    let cfg = state.pool.config().plans.clone();
    let mut out = Vec::new();
    for id in cfg.plan_ids_by_rank() {
        out.push(cfg.entitlements(&id, None)?);
    }
    Ok(HttpResponse::Ok().json(PlanList { plans: out, limited_per_week: &cfg.metering.limited_per_week }))
}

/// POST /api/subscription/cancel: cancels at the end of the period.
pub async fn cancel_subscription(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    let user = caller.user.id;
    let change = state.db(move |c| Ok(c.ledger.cancel(user)?)).await?;
    Ok(HttpResponse::Ok().json(change))
}

#[derive(Deserialize)]
pub struct NewPassword {
    current: String,
    new: String,
}

/// POST /api/password {current, new}: changes the caller's password, ends their other
/// sessions (this one stays) and revokes their API keys. Only from a logged-in session (not
/// with an API key), and wrong current passwords count against the login rate limit.
pub async fn change_password(
    req: HttpRequest,
    state: Data,
    caller: Caller,
    body: web::Json<NewPassword>,
) -> Result<HttpResponse, ApiError> {
    let NewPassword { current, new } = body.into_inner();
    let Via::Session { token, .. } = &caller.via else {
        return Err(ApiError::forbidden("change the password from a logged-in browser session, not with an API key"));
    };
    let attempt = Attempt::new(&caller.user.name, &state.client_ip(&req));
    if let Some(wait) = state.limiter.blocked(&attempt) {
        return Err(ApiError::too_many(
            "too_many_attempts",
            format!("too many wrong passwords; try again in {wait} s"),
            wait,
        ));
    }
    if new.chars().count() < 8 {
        return Err(ApiError::bad_request("the new password must have at least 8 characters"));
    }
    if new.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::bad_request(format!("the new password must have at most {MAX_PASSWORD_BYTES} bytes")));
    }
    state.limiter.fail(&attempt);
    let user = caller.user.clone();
    let keep = token.clone();
    let changed = state
        .db(move |c| {
            if current.len() > MAX_PASSWORD_BYTES || !c.ledger.verify_password(&user.name, &current)? {
                return Ok(None);
            }
            c.ledger.set_password(user.id, &new)?;
            let now = c.now();
            Ok(Some(accounts::end_credentials_after_password_change(&c.app, user.id, Some(&keep), now)?))
        })
        .await?;
    let Some((sessions, keys)) = changed else {
        return Err(ApiError::new(
            actix_web::http::StatusCode::FORBIDDEN,
            "wrong_password",
            "the current password is wrong",
        ));
    };
    state.limiter.succeed(&attempt);
    state.credentials_changed();
    Ok(HttpResponse::Ok().json(PasswordChanged { ok: true, sessions_ended: sessions, api_keys_revoked: keys }))
}
