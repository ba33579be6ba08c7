//! User rows and their passwords (argon2id hashes). The bottom of the ledger with
//! [`crate::ledger::events`]: everything else may look a user up here.

use argon2::password_hash::SaltString;
use argon2::password_hash::rand_core::OsRng;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::ledger::clock::from_unix;
use crate::ledger::{Ledger, LedgerError, Tx, UserId};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct User {
    pub id: UserId,
    pub name: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
}

/// `UnknownUser` unless the user exists.
pub(crate) fn require_user(t: &Tx<'_>, user: UserId) -> Result<(), LedgerError> {
    let found: Option<i64> =
        t.query_row("SELECT id FROM users WHERE id = ?1", params![user], |r| r.get(0)).optional()?;
    found.map(|_| ()).ok_or_else(|| LedgerError::UnknownUser(format!("#{user}")))
}

/// Inserts a user row (no subscription: see [`Ledger::add_user`]); returns its id.
pub(crate) fn insert(
    t: &Tx<'_>,
    name: &str,
    is_admin: bool,
    password_hash: Option<&str>,
) -> Result<UserId, LedgerError> {
    // Names that differ only in case read as one person (in lists, on the admin page): refused
    // like the same name. Compared here, not by SQLite's lower(), which folds ASCII only (this
    // is lower-casing, not full Unicode case folding or normalisation). Log-in stays exact.
    let folded = name.to_lowercase();
    let mut st = t.prepare("SELECT name FROM users")?;
    let names = st.query_map([], |r| r.get::<_, String>(0))?;
    for existing in names {
        let existing = existing?;
        if existing.to_lowercase() == folded {
            return Err(LedgerError::UserExists(existing));
        }
    }
    t.execute(
        "INSERT INTO users (name, is_admin, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
        params![name, is_admin, password_hash, t.now],
    )?;
    Ok(t.last_insert_rowid())
}

pub(crate) fn validate_name(name: &str) -> Result<(), LedgerError> {
    if name.is_empty() || name.chars().count() > 64 {
        return Err(LedgerError::Invalid("a user name has 1 to 64 characters".into()));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) || name.starts_with('-') {
        return Err(LedgerError::Invalid(format!(
            "user name {name:?}: no spaces or control characters, and no leading '-'"
        )));
    }
    Ok(())
}

/// A hash made once to verify against when there is no real one (the result is ignored).
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("no such account").unwrap_or_default())
}

/// The longest password accepted, in bytes, wherever one is set or checked (login refuses
/// longer ones without hashing them, so a huge body cannot cost an argon2 run).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// An argon2id hash of `password` with a fresh salt.
pub(crate) fn hash_password(password: &str) -> Result<String, LedgerError> {
    if password.is_empty() {
        return Err(LedgerError::Invalid("the password is empty".into()));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(LedgerError::Invalid(format!("a password has at most {MAX_PASSWORD_BYTES} bytes")));
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| LedgerError::Invalid(format!("hashing the password: {e}")))
}

pub(crate) fn user_row(t: &Tx<'_>, name: &str) -> Result<User, LedgerError> {
    t.query_row("SELECT id, name, is_admin, created_at FROM users WHERE name = ?1", params![name], |r| {
        Ok(User { id: r.get(0)?, name: r.get(1)?, is_admin: r.get(2)?, created_at: from_unix(r.get(3)?) })
    })
    .optional()?
    .ok_or_else(|| LedgerError::UnknownUser(name.to_string()))
}

impl Ledger {
    /// Replaces a user's password (stored as an argon2id hash).
    pub fn set_password(&mut self, user: UserId, password: &str) -> Result<(), LedgerError> {
        let hash = hash_password(password)?;
        self.write(|t| {
            let n = t.execute("UPDATE users SET password_hash = ?2 WHERE id = ?1", params![user, hash])?;
            if n == 0 {
                return Err(LedgerError::UnknownUser(format!("#{user}")));
            }
            Ok(())
        })
    }

    pub fn user_by_name(&mut self, name: &str) -> Result<User, LedgerError> {
        self.read(|t| user_row(t, name))
    }

    pub fn user_by_id(&mut self, id: UserId) -> Result<User, LedgerError> {
        self.read(|t| {
            t.query_row("SELECT id, name, is_admin, created_at FROM users WHERE id = ?1", params![id], |r| {
                Ok(User { id: r.get(0)?, name: r.get(1)?, is_admin: r.get(2)?, created_at: from_unix(r.get(3)?) })
            })
            .optional()?
            .ok_or_else(|| LedgerError::UnknownUser(format!("#{id}")))
        })
    }

    pub fn users(&mut self) -> Result<Vec<User>, LedgerError> {
        self.read(|t| {
            let mut st = t.prepare("SELECT id, name, is_admin, created_at FROM users ORDER BY id")?;
            let rows = st.query_map([], |r| {
                Ok(User { id: r.get(0)?, name: r.get(1)?, is_admin: r.get(2)?, created_at: from_unix(r.get(3)?) })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Whether `password` matches the user's stored argon2 hash (false without one).
    pub fn verify_password(&mut self, name: &str, password: &str) -> Result<bool, LedgerError> {
        let row: Option<Option<String>> = self.read(|t| {
            Ok(t.query_row("SELECT password_hash FROM users WHERE name = ?1", params![name], |r| r.get(0))
                .optional()?)
        })?;
        let Some(Some(stored)) = row else {
            // Unknown user or no password: spend the time of a real check anyway, so response
            // times do not tell which names exist.
            let dummy =
                PasswordHash::new(dummy_hash()).map_err(|e| LedgerError::Corrupt(format!("dummy hash: {e}")))?;
            let _ = Argon2::default().verify_password(password.as_bytes(), &dummy);
            return match row {
                None => Err(LedgerError::UnknownUser(name.to_string())),
                Some(_) => Ok(false),
            };
        };
        let parsed = PasswordHash::new(&stored).map_err(|e| LedgerError::Corrupt(format!("password hash: {e}")))?;
        Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
    }
}
