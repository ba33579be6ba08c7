//! Events the ledger records for users and admins: low balance (once per period), renewals,
//! plan changes, cancellations, holds released by the sweeper. The bottom of the ledger with
//! [`crate::ledger::users`]: the other modules record here; the rules that decide when
//! (e.g. the low-balance threshold, in [`crate::ledger::authorize`]) live above.

use chrono::{DateTime, Utc};
use rusqlite::params;
use serde::Serialize;

use crate::ledger::clock::from_unix;
use crate::ledger::{Ledger, LedgerError, Tx, UserId};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub id: i64,
    pub user_id: Option<UserId>,
    pub kind: String,
    pub at: DateTime<Utc>,
    pub data: serde_json::Value,
}

/// Appends an event; with a `dedupe_key` seen before, records nothing and returns false.
pub(crate) fn record(
    t: &Tx<'_>,
    user: Option<UserId>,
    kind: &str,
    data: serde_json::Value,
    dedupe_key: Option<&str>,
) -> Result<bool, LedgerError> {
    let n = t.execute(
        "INSERT INTO events (user_id, kind, at, data, dedupe_key) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (dedupe_key) DO NOTHING",
        params![user, kind, t.now, data.to_string(), dedupe_key],
    )?;
    Ok(n == 1)
}

impl Ledger {
    /// A user's events, newest first, at most `limit`.
    pub fn events(&mut self, user: UserId, limit: usize) -> Result<Vec<Event>, LedgerError> {
        self.read(|t| {
            let mut st = t.prepare(
                "SELECT id, user_id, kind, at, data FROM events WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let mut rows = st.query(params![user, limit as i64])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let data: String = r.get(4)?;
                out.push(Event {
                    id: r.get(0)?,
                    user_id: r.get(1)?,
                    kind: r.get(2)?,
                    at: from_unix(r.get(3)?),
                    data: serde_json::from_str(&data).map_err(|e| LedgerError::Corrupt(format!("event data: {e}")))?,
                });
            }
            Ok(out)
        })
    }
}
