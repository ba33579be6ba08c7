//! Login sessions, API keys and disabled accounts (users and passwords are the ledger's).
//! Tokens are stored only as SHA-256 hashes. No HTTP here: the server and the CLI both call it.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::db::{DbError, Migrations, VersionSlot};
use crate::ledger::UserId;
use crate::secret::{random_hex, token_hash};

const MIGRATIONS: &[&str] = &[r#"
    CREATE TABLE sessions (
        token_hash  TEXT    PRIMARY KEY,
        user_id     INTEGER NOT NULL REFERENCES users(id),
        csrf        TEXT    NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL,
        revoked_at  INTEGER
    );
    CREATE INDEX sessions_user ON sessions (user_id);

    CREATE TABLE api_keys (
        id            INTEGER PRIMARY KEY,
        user_id       INTEGER NOT NULL REFERENCES users(id),
        label         TEXT    NOT NULL,
        key_hash      TEXT    NOT NULL UNIQUE,
        prefix        TEXT    NOT NULL,            -- the first characters, to tell keys apart
        created_at    INTEGER NOT NULL,
        last_used_at  INTEGER,
        revoked_at    INTEGER
    );
    CREATE INDEX api_keys_user ON api_keys (user_id);

    CREATE TABLE account_flags (
        user_id   INTEGER PRIMARY KEY REFERENCES users(id),
        disabled  INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1))
    );
"#];

/// The account tables' part of the database; its version is `app_meta`'s `accounts_schema`.
pub const ACCOUNTS_MIGRATIONS: Migrations =
    Migrations { part: "accounts", slot: VersionSlot::AppMeta("accounts_schema"), steps: MIGRATIONS };

/// Brings the account tables up to date.
pub fn migrate(conn: &Connection) -> Result<(), DbError> {
    crate::db::migrate(conn, &ACCOUNTS_MIGRATIONS)
}

fn ts(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(v, 0).unwrap_or_default()
}

/// A live login session.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub user_id: UserId,
    /// Sent back in `X-CSRF-Token` with every change made with the session cookie.
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
}

/// Creates a session; returns the cookie token (shown once) and the session.
pub fn create_session(conn: &Connection, user: UserId, days: u32, now: i64) -> rusqlite::Result<(String, Session)> {
    let token = random_hex(32);
    let csrf = random_hex(24);
    let expires = now + days as i64 * 86_400;
    conn.execute(
        "INSERT INTO sessions (token_hash, user_id, csrf, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![token_hash(&token), user, csrf, now, expires],
    )?;
    Ok((token, Session { user_id: user, csrf, expires_at: ts(expires) }))
}

/// The session of a cookie token, if it is live.
pub fn session(conn: &Connection, token: &str, now: i64) -> rusqlite::Result<Option<Session>> {
    conn.prepare_cached(
        "SELECT user_id, csrf, expires_at FROM sessions WHERE token_hash = ?1 AND revoked_at IS NULL AND expires_at > ?2",
    )?
    .query_row(params![token_hash(token), now], |r| {
        Ok(Session { user_id: r.get(0)?, csrf: r.get(1)?, expires_at: ts(r.get(2)?) })
    })
    .optional()
}

pub fn revoke_session(conn: &Connection, token: &str, now: i64) -> rusqlite::Result<bool> {
    Ok(conn.execute(
        "UPDATE sessions SET revoked_at = ?2 WHERE token_hash = ?1 AND revoked_at IS NULL",
        params![token_hash(token), now],
    )? == 1)
}

pub fn revoke_user_sessions(conn: &Connection, user: UserId, now: i64) -> rusqlite::Result<usize> {
    revoke_user_sessions_except(conn, user, None, now)
}

/// Ends all of a user's sessions but the one with cookie token `keep`.
pub fn revoke_user_sessions_except(
    conn: &Connection,
    user: UserId,
    keep: Option<&str>,
    now: i64,
) -> rusqlite::Result<usize> {
    let keep = keep.map(token_hash).unwrap_or_default();
    conn.execute(
        "UPDATE sessions SET revoked_at = ?2 WHERE user_id = ?1 AND revoked_at IS NULL AND token_hash != ?3",
        params![user, now, keep],
    )
}

/// An API key as listed (never the key itself).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKeyInfo {
    pub id: i64,
    pub label: String,
    /// The first characters of the key, to tell keys apart.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked: bool,
}

/// Creates an API key; the key itself is returned only here.
pub fn create_api_key(
    conn: &Connection,
    user: UserId,
    label: &str,
    now: i64,
) -> rusqlite::Result<(String, ApiKeyInfo)> {
    let key = format!("atk_{}", random_hex(24));
    let prefix = key[..12].to_string();
    conn.execute(
        "INSERT INTO api_keys (user_id, label, key_hash, prefix, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![user, label, token_hash(&key), prefix, now],
    )?;
    let id = conn.last_insert_rowid();
    Ok((
        key,
        ApiKeyInfo { id, label: label.to_string(), prefix, created_at: ts(now), last_used_at: None, revoked: false },
    ))
}

/// The user of a live API key (and notes its use).
pub fn api_key_user(conn: &Connection, key: &str, now: i64) -> rusqlite::Result<Option<UserId>> {
    let hash = token_hash(key);
    let row: Option<(i64, UserId, Option<i64>)> = conn
        .prepare_cached("SELECT id, user_id, last_used_at FROM api_keys WHERE key_hash = ?1 AND revoked_at IS NULL")?
        .query_row(params![hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((id, user, last)) = row else { return Ok(None) };
    // One write a minute at most: a busy API client should not serialize on the database.
    if last.is_none_or(|l| now - l >= 60) {
        conn.execute("UPDATE api_keys SET last_used_at = ?2 WHERE id = ?1", params![id, now])?;
    }
    Ok(Some(user))
}

pub fn list_api_keys(conn: &Connection, user: UserId) -> rusqlite::Result<Vec<ApiKeyInfo>> {
    conn.prepare_cached(
        "SELECT id, label, prefix, created_at, last_used_at, revoked_at FROM api_keys WHERE user_id = ?1 ORDER BY id",
    )?
    .query_map(params![user], |r| {
        Ok(ApiKeyInfo {
            id: r.get(0)?,
            label: r.get(1)?,
            prefix: r.get(2)?,
            created_at: ts(r.get(3)?),
            last_used_at: r.get::<_, Option<i64>>(4)?.map(ts),
            revoked: r.get::<_, Option<i64>>(5)?.is_some(),
        })
    })?
    .collect()
}

/// Revokes `user`'s key `id`; false when the user has no such live key.
pub fn revoke_api_key(conn: &Connection, user: UserId, id: i64, now: i64) -> rusqlite::Result<bool> {
    Ok(conn.execute(
        "UPDATE api_keys SET revoked_at = ?3 WHERE id = ?1 AND user_id = ?2 AND revoked_at IS NULL",
        params![id, user, now],
    )? == 1)
}

/// Revokes every live API key of `user`; returns how many.
pub fn revoke_user_api_keys(conn: &Connection, user: UserId, now: i64) -> rusqlite::Result<usize> {
    conn.execute("UPDATE api_keys SET revoked_at = ?2 WHERE user_id = ?1 AND revoked_at IS NULL", params![user, now])
}

/// What a password change ends: every session but `keep` (the one that made the change, if
/// any) and every API key, since a change is often made because something leaked. Returns
/// (sessions ended, keys revoked). Every way of changing a password calls this.
pub fn end_credentials_after_password_change(
    conn: &Connection,
    user: UserId,
    keep: Option<&str>,
    now: i64,
) -> rusqlite::Result<(usize, usize)> {
    let tx = conn.unchecked_transaction()?;
    let sessions = revoke_user_sessions_except(&tx, user, keep, now)?;
    let keys = revoke_user_api_keys(&tx, user, now)?;
    tx.commit()?;
    Ok((sessions, keys))
}

pub fn is_disabled(conn: &Connection, user: UserId) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("SELECT disabled FROM account_flags WHERE user_id = ?1")?
        .query_row(params![user], |r| r.get::<_, i64>(0))
        .optional()?
        .unwrap_or(0)
        == 1)
}

/// Disables (or enables) an account; disabling also ends its sessions.
pub fn set_disabled(conn: &Connection, user: UserId, disabled: bool, now: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO account_flags (user_id, disabled) VALUES (?1, ?2) ON CONFLICT(user_id) DO UPDATE SET disabled = ?2",
        params![user, disabled as i64],
    )?;
    if disabled {
        revoke_user_sessions(conn, user, now)?;
    }
    Ok(())
}
