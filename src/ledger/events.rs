//! Events the ledger records for users and admins: low balance (once per period), renewals,
//! plan changes, cancellations, holds released by the sweeper.

use chrono::{DateTime, Utc};
use rusqlite::params;
use serde::Serialize;

use crate::ledger::clock::from_unix;
use crate::ledger::{Ledger, LedgerError, Resource, Tx, UserId, credits, subscriptions};

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

/// Records a `low_balance` event (once per period) when the credits available fall below the
/// plan's threshold: `low_balance_pct` of one period's credits (Free: of its sign-up credits).
pub(crate) fn check_low_balance(t: &Tx<'_>, user: UserId) -> Result<(), LedgerError> {
    let sub = subscriptions::load(t, user)?;
    let Ok(plan) = t.cfg.plan(&sub.plan) else {
        return Ok(()); // a plan removed from the config has no threshold
    };
    let per_period = match sub.period {
        Some(p) => plan.credits_per(Some(p)),
        None => plan.signup_credits,
    };
    let threshold = per_period * t.cfg.low_balance_pct(plan) as i64 / 100;
    if threshold <= 0 {
        return Ok(());
    }
    let available = credits::available(t, user, Resource::Credits)?;
    if available < threshold {
        let key = format!("low_balance:{user}:{}:{}", sub.plan, crate::ledger::clock::unix(sub.period_start));
        record(
            t,
            Some(user),
            "low_balance",
            serde_json::json!({"available": available, "threshold": threshold, "plan": sub.plan,
                               "next_renewal_at": sub.next_renewal_at()}),
            Some(&key),
        )?;
    }
    Ok(())
}

impl Ledger {
    /// A user's events, newest first, at most `limit`.
    pub fn events(&mut self, user: UserId, limit: usize) -> Result<Vec<Event>, LedgerError> {
        self.read(|t| {
            let mut st =
                t.prepare("SELECT id, user_id, kind, at, data FROM events WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2")?;
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
