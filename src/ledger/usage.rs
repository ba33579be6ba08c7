//! Usage history: per user, per UTC day, per kind (images, video, training), written when a
//! hold is captured.

use std::fmt;

use chrono::NaiveDate;
use rusqlite::params;
use serde::Serialize;

use crate::ledger::clock::from_unix;
use crate::ledger::{Ledger, LedgerError, Tx, UserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageKind {
    Images,
    Video,
    Training,
}

impl UsageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::Images => "images",
            UsageKind::Video => "video",
            UsageKind::Training => "training",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<UsageKind, LedgerError> {
        Ok(match s {
            "images" => UsageKind::Images,
            "video" => UsageKind::Video,
            "training" => UsageKind::Training,
            other => return Err(LedgerError::Corrupt(format!("unknown usage kind {other:?}"))),
        })
    }
}

impl fmt::Display for UsageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of the history: what a user used on one day of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageDay {
    pub day: NaiveDate,
    pub kind: UsageKind,
    /// Jobs captured.
    pub jobs: i64,
    /// Images (image jobs), jobs (video), trainings.
    pub units: i64,
    pub credits: i64,
}

pub(crate) fn record(t: &Tx<'_>, user: UserId, kind: UsageKind, units: u32, credits: i64) -> Result<(), LedgerError> {
    let day = from_unix(t.now).date_naive().to_string();
    t.execute(
        "INSERT INTO usage_daily (user_id, day, kind, jobs, units, credits) VALUES (?1, ?2, ?3, 1, ?4, ?5)
         ON CONFLICT (user_id, day, kind) DO UPDATE SET
            jobs = jobs + 1, units = units + excluded.units, credits = credits + excluded.credits",
        params![user, day, kind.as_str(), units, credits],
    )?;
    Ok(())
}

impl Ledger {
    /// A user's usage from `from` to `to` (both included), by day then kind.
    pub fn usage(&mut self, user: UserId, from: NaiveDate, to: NaiveDate) -> Result<Vec<UsageDay>, LedgerError> {
        self.read(|t| {
            let mut st = t.prepare(
                "SELECT day, kind, jobs, units, credits FROM usage_daily
                 WHERE user_id = ?1 AND day >= ?2 AND day <= ?3 ORDER BY day, kind",
            )?;
            let mut rows = st.query(params![user, from.to_string(), to.to_string()])?;
            let mut out = Vec::new();
            while let Some(r) = rows.next()? {
                let day: String = r.get(0)?;
                let kind: String = r.get(1)?;
                out.push(UsageDay {
                    day: day.parse().map_err(|_| LedgerError::Corrupt(format!("usage day {day:?}")))?,
                    kind: UsageKind::parse(&kind)?,
                    jobs: r.get(2)?,
                    units: r.get(3)?,
                    credits: r.get(4)?,
                });
            }
            Ok(out)
        })
    }
}
