//! Credit grants, holds and training allowances. This module is the only code that writes the
//! `grants`, `holds`, `hold_allocations` and `ledger_entries` tables; every function that
//! writes runs inside a [`Tx`] (`BEGIN IMMEDIATE`) and appends one ledger entry per change of a
//! grant's buckets:
//!
//! | entry     | moves                 |
//! |-----------|-----------------------|
//! | `grant`   | → remaining           |
//! | `hold`    | remaining → held      |
//! | `capture` | held → spent          |
//! | `release` | held → remaining      |
//! | `expire`  | remaining → expired   |
//!
//! Spending (placing a hold) takes the soonest-expiring live grant first; ties go to the lower
//! `priority` number, then the older grant. A grant is live while
//! `effective_at <= now < expires_at` (`expires_at` is exclusive; `NULL` never expires).
//!
//! Settling a hold happens once. Repeating the same settlement (capture after capture, release
//! after release) does nothing and returns the original outcome with `replayed = true`; the
//! other settlement (capture after release, release after capture) is
//! [`LedgerError::HoldSettled`]. A capture replay returns the first capture's amount whatever
//! amount it asks for.

use std::fmt;

use chrono::{DateTime, Datelike, Duration, Utc};
use rusqlite::{Row, params};
use serde::Serialize;

use crate::ledger::clock::{from_unix, unix};
use crate::ledger::plans::{Period, Quota, Refusal};
use crate::ledger::usage::UsageKind;
use crate::ledger::{GrantId, HoldId, Ledger, LedgerError, Resource, Tx, UserId, events, usage, users};

/// Where a grant came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum GrantSource {
    #[serde(rename = "signup")]
    Signup,
    #[serde(rename = "period")]
    Period,
    #[serde(rename = "top-up")]
    TopUp,
    #[serde(rename = "refund")]
    Refund,
    #[serde(rename = "admin")]
    Admin,
}

impl GrantSource {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantSource::Signup => "signup",
            GrantSource::Period => "period",
            GrantSource::TopUp => "top-up",
            GrantSource::Refund => "refund",
            GrantSource::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Result<GrantSource, LedgerError> {
        Ok(match s {
            "signup" => GrantSource::Signup,
            "period" => GrantSource::Period,
            "top-up" => GrantSource::TopUp,
            "refund" => GrantSource::Refund,
            "admin" => GrantSource::Admin,
            other => return Err(LedgerError::Corrupt(format!("unknown grant source {other:?}"))),
        })
    }
}

/// A grant as stored. `amount = remaining + held + spent + expired` always.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Grant {
    pub id: GrantId,
    pub user_id: UserId,
    pub resource: Resource,
    pub amount: i64,
    pub remaining: i64,
    pub held: i64,
    pub spent: i64,
    pub expired: i64,
    pub source: GrantSource,
    /// The subscription period a period grant belongs to.
    pub period: Option<Period>,
    pub effective_at: DateTime<Utc>,
    /// Exclusive; `None` never expires.
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: i64,
}

impl Grant {
    /// Usable at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.effective_at <= now && self.expires_at.is_none_or(|e| now < e)
    }
}

/// An admin's or a payment's grant.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantRequest {
    pub resource: Resource,
    pub amount: i64,
    pub source: GrantSource,
    /// Exclusive; `None` never expires. Must be in the future.
    pub expires_at: Option<DateTime<Utc>>,
    /// Lower is spent first among grants that expire at the same time.
    pub priority: i64,
}

impl GrantRequest {
    pub fn credits(amount: i64, source: GrantSource, expires_at: Option<DateTime<Utc>>) -> GrantRequest {
        GrantRequest { resource: Resource::Credits, amount, source, expires_at, priority: 0 }
    }
}

/// A user's totals for one resource at one moment:
/// `granted = available + held + spent + expired`, exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Balance {
    pub granted: i64,
    /// In live grants, not held.
    pub available: i64,
    pub held: i64,
    pub spent: i64,
    /// Written off at expiry (including what is past its expiry and not yet swept).
    pub expired: i64,
}

impl Balance {
    pub fn is_consistent(&self) -> bool {
        self.granted == self.available + self.held + self.spent + self.expired
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldStatus {
    Held,
    Captured,
    Released,
}

impl HoldStatus {
    fn parse(s: &str) -> Result<HoldStatus, LedgerError> {
        Ok(match s {
            "held" => HoldStatus::Held,
            "captured" => HoldStatus::Captured,
            "released" => HoldStatus::Released,
            other => return Err(LedgerError::Corrupt(format!("unknown hold status {other:?}"))),
        })
    }
}

impl fmt::Display for HoldStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HoldStatus::Held => "held",
            HoldStatus::Captured => "captured",
            HoldStatus::Released => "released",
        })
    }
}

/// Who settled a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SettledBy {
    Capture,
    Release,
    Sweeper,
}

impl SettledBy {
    fn as_str(self) -> &'static str {
        match self {
            SettledBy::Capture => "capture",
            SettledBy::Release => "release",
            SettledBy::Sweeper => "sweeper",
        }
    }
}

impl fmt::Display for SettledBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to reserve for a job.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldRequest {
    pub user_id: UserId,
    pub resource: Resource,
    pub job_id: String,
    /// The same key again returns the same hold; it never reserves twice.
    pub idempotency_key: String,
    pub amount: i64,
    /// How the job shows in the usage history when captured.
    pub usage_kind: UsageKind,
    /// Images (or 1 per video job / training) for usage and quotas.
    pub units: u32,
    /// Weekly quotas ("limited" access) this job counts against; checked in the same
    /// transaction that places the hold.
    pub quotas: Vec<Quota>,
    /// What the idempotency key is bound to (a hash of the request); `None`: only the job
    /// id, resource and amount are compared on a retry.
    pub request_hash: Option<String>,
}

impl HoldRequest {
    /// A credits hold for an image job of `units` images, with no quota.
    pub fn credits(user_id: UserId, job_id: &str, idempotency_key: &str, amount: i64) -> HoldRequest {
        HoldRequest {
            user_id,
            resource: Resource::Credits,
            job_id: job_id.to_string(),
            idempotency_key: idempotency_key.to_string(),
            amount,
            usage_kind: UsageKind::Images,
            units: 1,
            quotas: Vec::new(),
            request_hash: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hold {
    pub id: HoldId,
    pub user_id: UserId,
    pub resource: Resource,
    pub job_id: String,
    pub idempotency_key: String,
    pub amount: i64,
    pub captured: i64,
    pub status: HoldStatus,
    pub usage_kind: UsageKind,
    pub units: u32,
    pub created_at: DateTime<Utc>,
    pub settled_at: Option<DateTime<Utc>>,
    pub settled_by: Option<SettledBy>,
    /// The hash of the request the idempotency key was first used for.
    #[serde(skip)]
    pub request_hash: Option<String>,
}

/// The result of place, capture or release. `replayed`: the call repeated one already done
/// (same idempotency key, or a second capture/release) and changed nothing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HoldOutcome {
    pub hold: Hold,
    pub replayed: bool,
}

/// What [`Ledger::audit`] checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    pub grants: usize,
    pub holds: usize,
    pub entries: usize,
}

const GRANT_COLS: &str = "id, user_id, resource, amount, remaining, held, spent, expired, source, period_kind, effective_at, expires_at, priority";

fn grant_from_row(r: &Row<'_>) -> Result<Grant, LedgerError> {
    let resource: String = r.get(2)?;
    let source: String = r.get(8)?;
    let period: Option<String> = r.get(9)?;
    Ok(Grant {
        id: r.get(0)?,
        user_id: r.get(1)?,
        resource: resource.parse()?,
        amount: r.get(3)?,
        remaining: r.get(4)?,
        held: r.get(5)?,
        spent: r.get(6)?,
        expired: r.get(7)?,
        source: GrantSource::parse(&source)?,
        period: period.map(|p| p.parse().map_err(|_| LedgerError::Corrupt(format!("period {p:?}")))).transpose()?,
        effective_at: from_unix(r.get(10)?),
        expires_at: r.get::<_, Option<i64>>(11)?.map(from_unix),
        priority: r.get(12)?,
    })
}

const HOLD_COLS: &str = "id, user_id, resource, job_id, idempotency_key, amount, captured, status, usage_kind, units, created_at, settled_at, settled_by, request_hash";

fn hold_from_row(r: &Row<'_>) -> Result<Hold, LedgerError> {
    let resource: String = r.get(2)?;
    let status: String = r.get(7)?;
    let kind: String = r.get(8)?;
    let by: Option<String> = r.get(12)?;
    Ok(Hold {
        id: r.get(0)?,
        user_id: r.get(1)?,
        resource: resource.parse()?,
        job_id: r.get(3)?,
        idempotency_key: r.get(4)?,
        amount: r.get(5)?,
        captured: r.get(6)?,
        status: HoldStatus::parse(&status)?,
        usage_kind: UsageKind::parse(&kind)?,
        units: r.get(9)?,
        created_at: from_unix(r.get(10)?),
        settled_at: r.get::<_, Option<i64>>(11)?.map(from_unix),
        settled_by: match by.as_deref() {
            None => None,
            Some("capture") => Some(SettledBy::Capture),
            Some("release") => Some(SettledBy::Release),
            Some("sweeper") => Some(SettledBy::Sweeper),
            Some(other) => return Err(LedgerError::Corrupt(format!("settled_by {other:?}"))),
        },
        request_hash: r.get(13)?,
    })
}

fn entry(
    t: &Tx<'_>,
    user: UserId,
    grant: GrantId,
    hold: Option<HoldId>,
    kind: &str,
    amount: i64,
) -> Result<(), LedgerError> {
    t.execute(
        "INSERT INTO ledger_entries (user_id, grant_id, hold_id, kind, amount, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![user, grant, hold, kind, amount, t.now],
    )?;
    Ok(())
}

/// A grant to insert (see [`insert_grant`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewGrant<'a> {
    pub user: UserId,
    pub resource: Resource,
    pub amount: i64,
    pub source: GrantSource,
    /// The subscription period a period grant belongs to.
    pub period: Option<Period>,
    pub effective_at: i64,
    /// Exclusive; `None` never expires.
    pub expires_at: Option<i64>,
    pub priority: i64,
    /// Makes the grant happen once (period and sign-up grants).
    pub grant_key: Option<&'a str>,
}

/// The largest single grant, and the most a user may hold open (remaining + held, in grants
/// not past their expiry) of one resource: a trillion and a quadrillion credits, beyond any
/// plan, and 9000× short of `i64::MAX`, so no sum the ledger takes overflows.
pub const MAX_GRANT: i64 = 1_000_000_000_000;
pub const MAX_OPEN: i64 = 1_000_000_000_000_000;

/// Inserts a grant and its `grant` entry. With a `grant_key` that exists already, inserts
/// nothing and returns `None` (period grants happen once).
pub(crate) fn insert_grant(t: &Tx<'_>, g: &NewGrant<'_>) -> Result<Option<GrantId>, LedgerError> {
    let NewGrant { user, resource, amount, source, period, effective_at, expires_at, priority, grant_key } = *g;
    if amount <= 0 {
        return Err(LedgerError::Invalid(format!("a grant must be > 0 (got {amount})")));
    }
    let n = t.execute(
        "INSERT INTO grants (user_id, resource, amount, remaining, source, period_kind, effective_at, expires_at, priority, grant_key, created_at)
         VALUES (?1, ?2, ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (grant_key) DO NOTHING",
        params![
            user,
            resource.as_str(),
            amount,
            source.as_str(),
            period.map(Period::as_str),
            effective_at,
            expires_at,
            priority,
            grant_key,
            t.now
        ],
    )?;
    if n == 0 {
        return Ok(None);
    }
    let id = t.last_insert_rowid();
    entry(t, user, id, None, "grant", amount)?;
    Ok(Some(id))
}

/// Writes off what is left of every grant past its expiry (for one user, or all): one
/// `expire` entry per grant. Returns how many grants it expired.
pub(crate) fn expire_due(t: &Tx<'_>, user: Option<UserId>) -> Result<usize, LedgerError> {
    let due: Vec<(GrantId, UserId, i64)> = {
        let mut st = t.prepare_cached(
            "SELECT id, user_id, remaining FROM grants
             WHERE remaining > 0 AND expires_at IS NOT NULL AND expires_at <= ?1
               AND (?2 IS NULL OR user_id = ?2)",
        )?;
        st.query_map(params![t.now, user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?
    };
    for (id, uid, rem) in &due {
        t.execute("UPDATE grants SET remaining = 0, expired = expired + ?2 WHERE id = ?1", params![id, rem])?;
        entry(t, *uid, *id, None, "expire", *rem)?;
    }
    Ok(due.len())
}

/// The live, unheld amount of a resource.
pub(crate) fn available(t: &Tx<'_>, user: UserId, resource: Resource) -> Result<i64, LedgerError> {
    Ok(t.query_row(
        "SELECT COALESCE(SUM(remaining), 0) FROM grants
         WHERE user_id = ?1 AND resource = ?2 AND effective_at <= ?3 AND (expires_at IS NULL OR expires_at > ?3)",
        params![user, resource.as_str(), t.now],
        |r| r.get(0),
    )?)
}

pub(crate) fn balance(t: &Tx<'_>, user: UserId, resource: Resource) -> Result<Balance, LedgerError> {
    Ok(t.query_row(
        "SELECT COALESCE(SUM(amount), 0),
                COALESCE(SUM(CASE WHEN live THEN remaining ELSE 0 END), 0),
                COALESCE(SUM(held), 0),
                COALESCE(SUM(spent), 0),
                COALESCE(SUM(expired + CASE WHEN live THEN 0 ELSE remaining END), 0)
         FROM (SELECT *, (effective_at <= ?3 AND (expires_at IS NULL OR expires_at > ?3)) AS live
               FROM grants WHERE user_id = ?1 AND resource = ?2)",
        params![user, resource.as_str(), t.now],
        |r| {
            Ok(Balance {
                granted: r.get(0)?,
                available: r.get(1)?,
                held: r.get(2)?,
                spent: r.get(3)?,
                expired: r.get(4)?,
            })
        },
    )?)
}

fn open_holds_where(t: &Tx<'_>, user: Option<UserId>) -> Result<Vec<Hold>, LedgerError> {
    let mut st = t.prepare_cached(&format!(
        "SELECT {HOLD_COLS} FROM holds WHERE status = 'held' AND (?1 IS NULL OR user_id = ?1) ORDER BY id"
    ))?;
    let mut rows = st.query(params![user])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(hold_from_row(r)?);
    }
    Ok(out)
}

fn load_hold(t: &Tx<'_>, id: HoldId) -> Result<Hold, LedgerError> {
    let mut st = t.prepare_cached(&format!("SELECT {HOLD_COLS} FROM holds WHERE id = ?1"))?;
    let mut rows = st.query(params![id])?;
    match rows.next()? {
        Some(r) => hold_from_row(r),
        None => Err(LedgerError::UnknownHold(id)),
    }
}

pub(crate) fn hold_by_key(t: &Tx<'_>, user: UserId, key: &str) -> Result<Option<Hold>, LedgerError> {
    let mut st =
        t.prepare_cached(&format!("SELECT {HOLD_COLS} FROM holds WHERE user_id = ?1 AND idempotency_key = ?2"))?;
    let mut rows = st.query(params![user, key])?;
    match rows.next()? {
        Some(r) => Ok(Some(hold_from_row(r)?)),
        None => Ok(None),
    }
}

/// Monday 00:00 UTC of the calendar week holding `now`.
pub(crate) fn week_start(now: i64) -> i64 {
    let d = from_unix(now).date_naive();
    let monday = d - Duration::days(d.weekday().num_days_from_monday() as i64);
    unix(monday.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc())
}

/// Units counted against a quota tag this calendar week (holds not released).
pub(crate) fn quota_used(t: &Tx<'_>, user: UserId, tag: &str) -> Result<u32, LedgerError> {
    let used: i64 = t.query_row(
        "SELECT COALESCE(SUM(units), 0) FROM holds
         WHERE user_id = ?1 AND status != 'released' AND created_at >= ?2
           AND quota_tags LIKE '%,' || ?3 || ',%'",
        params![user, week_start(t.now), tag],
        |r| r.get(0),
    )?;
    Ok(used.clamp(0, u32::MAX as i64) as u32)
}

/// Not enough of a resource for a hold: what [`place_hold`] answers instead of placing it.
/// Which plans or renewal would cover it is the caller's (policy) to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shortfall {
    pub resource: Resource,
    pub needed: i64,
    pub available: i64,
}

/// Places a hold (see [`Ledger::place_hold`]): `Ok(Err(shortfall))` when too little is
/// available. A used-up weekly quota is [`Refusal::QuotaExhausted`] without plans.
pub(crate) fn place_hold(t: &Tx<'_>, req: &HoldRequest) -> Result<Result<HoldOutcome, Shortfall>, LedgerError> {
    if req.amount <= 0 {
        return Err(LedgerError::Invalid(format!("a hold must be > 0 (got {})", req.amount)));
    }
    if req.idempotency_key.is_empty() {
        return Err(LedgerError::Invalid("a hold needs an idempotency key".into()));
    }
    if let Some(h) = hold_by_key(t, req.user_id, &req.idempotency_key)? {
        let other_request = req.request_hash.is_some() && h.request_hash != req.request_hash;
        if other_request || h.job_id != req.job_id || h.amount != req.amount || h.resource != req.resource {
            return Err(LedgerError::IdempotencyConflict {
                key: req.idempotency_key.clone(),
                job_id: h.job_id,
                resource: h.resource,
                amount: h.amount,
            });
        }
        return Ok(Ok(HoldOutcome { hold: h, replayed: true }));
    }
    users::require_user(t, req.user_id)?;
    expire_due(t, Some(req.user_id))?;
    for q in &req.quotas {
        let used = quota_used(t, req.user_id, &q.tag)?;
        if used.saturating_add(q.units) > q.limit {
            return Err(Refusal::QuotaExhausted {
                tag: q.tag.clone(),
                limit: q.limit,
                used,
                requested: q.units,
                resets_at: from_unix(week_start(t.now) + 7 * 86_400),
                plans_allowing: Vec::new(),
            }
            .into());
        }
    }
    let avail = available(t, req.user_id, req.resource)?;
    if avail < req.amount {
        return Ok(Err(Shortfall { resource: req.resource, needed: req.amount, available: avail }));
    }
    let quota_tags = if req.quotas.is_empty() {
        None
    } else {
        Some(format!(",{},", req.quotas.iter().map(|q| q.tag.as_str()).collect::<Vec<_>>().join(",")))
    };
    t.execute(
        "INSERT INTO holds (user_id, resource, job_id, idempotency_key, amount, status, usage_kind, units, quota_tags, created_at, request_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, 'held', ?6, ?7, ?8, ?9, ?10)",
        params![
            req.user_id,
            req.resource.as_str(),
            req.job_id,
            req.idempotency_key,
            req.amount,
            req.usage_kind.as_str(),
            req.units,
            quota_tags,
            t.now,
            req.request_hash
        ],
    )?;
    let hold_id = t.last_insert_rowid();
    let grants: Vec<(GrantId, i64)> = {
        let mut st = t.prepare_cached(
            "SELECT id, remaining FROM grants
             WHERE user_id = ?1 AND resource = ?2 AND remaining > 0
               AND effective_at <= ?3 AND (expires_at IS NULL OR expires_at > ?3)
             ORDER BY expires_at IS NULL, expires_at, priority, id",
        )?;
        st.query_map(params![req.user_id, req.resource.as_str(), t.now], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?
    };
    let mut left = req.amount;
    for (gid, rem) in grants {
        if left == 0 {
            break;
        }
        let take = rem.min(left);
        t.execute("UPDATE grants SET remaining = remaining - ?2, held = held + ?2 WHERE id = ?1", params![gid, take])?;
        t.execute(
            "INSERT INTO hold_allocations (hold_id, grant_id, amount) VALUES (?1, ?2, ?3)",
            params![hold_id, gid, take],
        )?;
        entry(t, req.user_id, gid, Some(hold_id), "hold", take)?;
        left -= take;
    }
    if left != 0 {
        // `available` said there was enough inside this same transaction.
        return Err(LedgerError::Corrupt(format!("hold {hold_id}: {left} could not be allocated")));
    }
    Ok(Ok(HoldOutcome { hold: load_hold(t, hold_id)?, replayed: false }))
}

/// How a hold is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Capture this much (`None`: all); the rest is released.
    Capture(Option<i64>),
    Release,
    /// The sweeper releases a stale hold.
    Sweep,
}

pub(crate) fn settle(t: &Tx<'_>, hold_id: HoldId, how: Settle) -> Result<HoldOutcome, LedgerError> {
    let hold = load_hold(t, hold_id)?;
    let wanted = match how {
        Settle::Capture(_) => "captured",
        Settle::Release | Settle::Sweep => "released",
    };
    match (hold.status, how) {
        (HoldStatus::Held, _) => {}
        (HoldStatus::Captured, Settle::Capture(_)) | (HoldStatus::Released, Settle::Release | Settle::Sweep) => {
            return Ok(HoldOutcome { hold, replayed: true });
        }
        (status, _) => {
            return Err(LedgerError::HoldSettled {
                id: hold_id,
                status,
                by: hold.settled_by.unwrap_or(SettledBy::Release),
                wanted,
            });
        }
    }
    let capture = match how {
        Settle::Capture(None) => hold.amount,
        Settle::Capture(Some(x)) if (0..=hold.amount).contains(&x) => x,
        Settle::Capture(Some(x)) => {
            return Err(LedgerError::Invalid(format!(
                "capture of {x} on hold {hold_id} of {}: must be 0..={}",
                hold.amount, hold.amount
            )));
        }
        Settle::Release | Settle::Sweep => 0,
    };
    // Capture from the soonest-expiring allocations first; release the rest.
    let allocs: Vec<(GrantId, i64)> = {
        let mut st = t.prepare_cached(
            "SELECT a.grant_id, a.amount FROM hold_allocations a JOIN grants g ON g.id = a.grant_id
             WHERE a.hold_id = ?1 ORDER BY g.expires_at IS NULL, g.expires_at, g.priority, g.id",
        )?;
        st.query_map(params![hold_id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?
    };
    let mut to_capture = capture;
    for (gid, amount) in allocs {
        let c = amount.min(to_capture);
        let r = amount - c;
        to_capture -= c;
        if c > 0 {
            t.execute("UPDATE grants SET held = held - ?2, spent = spent + ?2 WHERE id = ?1", params![gid, c])?;
            entry(t, hold.user_id, gid, Some(hold_id), "capture", c)?;
        }
        if r > 0 {
            t.execute("UPDATE grants SET held = held - ?2, remaining = remaining + ?2 WHERE id = ?1", params![gid, r])?;
            entry(t, hold.user_id, gid, Some(hold_id), "release", r)?;
        }
    }
    // What went back to a grant that expired meanwhile is written off now.
    expire_due(t, Some(hold.user_id))?;
    let (status, by) = match how {
        Settle::Capture(_) => (HoldStatus::Captured, SettledBy::Capture),
        Settle::Release => (HoldStatus::Released, SettledBy::Release),
        Settle::Sweep => (HoldStatus::Released, SettledBy::Sweeper),
    };
    t.execute(
        "UPDATE holds SET status = ?2, captured = ?3, settled_at = ?4, settled_by = ?5 WHERE id = ?1 AND status = 'held'",
        params![hold_id, status.to_string(), capture, t.now, by.as_str()],
    )?;
    if status == HoldStatus::Captured {
        let credits = if hold.resource == Resource::Credits { capture } else { 0 };
        usage::record(t, hold.user_id, hold.usage_kind, hold.units, credits)?;
    }
    if by == SettledBy::Sweeper {
        events::record(
            t,
            Some(hold.user_id),
            "hold_swept",
            serde_json::json!({"hold_id": hold_id, "job_id": hold.job_id, "amount": hold.amount,
                               "resource": hold.resource}),
            None,
        )?;
    }
    Ok(HoldOutcome { hold: load_hold(t, hold_id)?, replayed: false })
}

/// Releases every hold older than `metering.hold_max_age_secs`. Returns how many.
pub(crate) fn release_stale(t: &Tx<'_>) -> Result<usize, LedgerError> {
    let cutoff = t.now - t.cfg.metering.hold_max_age_secs;
    let ids: Vec<HoldId> = {
        let mut st = t.prepare_cached(
            "SELECT id FROM holds WHERE status = 'held' AND COALESCE(renewed_at, created_at) <= ?1 ORDER BY id",
        )?;
        st.query_map(params![cutoff], |r| r.get(0))?.collect::<Result<_, _>>()?
    };
    for id in &ids {
        settle(t, *id, Settle::Sweep)?;
    }
    Ok(ids.len())
}

pub(crate) fn grants_of(t: &Tx<'_>, user: UserId) -> Result<Vec<Grant>, LedgerError> {
    let mut st = t.prepare_cached(&format!("SELECT {GRANT_COLS} FROM grants WHERE user_id = ?1 ORDER BY id"))?;
    let mut rows = st.query(params![user])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(grant_from_row(r)?);
    }
    Ok(out)
}

/// Checks every grant and hold against the ledger entries.
pub(crate) fn audit(t: &Tx<'_>) -> Result<AuditReport, LedgerError> {
    let mut problems = Vec::new();
    let grants: usize = t.query_row("SELECT COUNT(*) FROM grants", [], |r| r.get(0))?;
    let holds: usize = t.query_row("SELECT COUNT(*) FROM holds", [], |r| r.get(0))?;
    let entries: usize = t.query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0))?;
    {
        // Each grant's buckets against the sums of its entries.
        let mut st = t.prepare(
            "SELECT g.id, g.amount, g.remaining, g.held, g.spent, g.expired,
                    COALESCE(SUM(CASE WHEN e.kind = 'grant'   THEN e.amount END), 0),
                    COALESCE(SUM(CASE WHEN e.kind = 'hold'    THEN e.amount END), 0),
                    COALESCE(SUM(CASE WHEN e.kind = 'capture' THEN e.amount END), 0),
                    COALESCE(SUM(CASE WHEN e.kind = 'release' THEN e.amount END), 0),
                    COALESCE(SUM(CASE WHEN e.kind = 'expire'  THEN e.amount END), 0),
                    (SELECT COALESCE(SUM(a.amount), 0) FROM hold_allocations a JOIN holds h ON h.id = a.hold_id
                      WHERE a.grant_id = g.id AND h.status = 'held')
             FROM grants g LEFT JOIN ledger_entries e ON e.grant_id = g.id
             GROUP BY g.id",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let v: Vec<i64> = (0..12).map(|i| r.get(i)).collect::<Result<_, _>>()?;
            let [id, amount, remaining, held, spent, expired, eg, eh, ec, er, ex, open] = v[..] else {
                unreachable!("12 columns")
            };
            let expect = [
                ("amount", amount, eg),
                ("remaining", remaining, eg - eh + er - ex),
                ("held", held, eh - ec - er),
                ("spent", spent, ec),
                ("expired", expired, ex),
                ("held by open holds", held, open),
            ];
            for (what, got, want) in expect {
                if got != want {
                    problems.push(format!("grant {id}: {what} is {got}, the entries say {want}"));
                }
            }
            if amount != remaining + held + spent + expired {
                problems.push(format!("grant {id}: buckets do not add up to {amount}"));
            }
        }
    }
    {
        // Each hold against its allocations and entries.
        let mut st = t.prepare(
            "SELECT h.id, h.amount, h.captured, h.status,
                    (SELECT COALESCE(SUM(amount), 0) FROM hold_allocations WHERE hold_id = h.id),
                    COALESCE(SUM(CASE WHEN e.kind = 'hold'    THEN e.amount END), 0),
                    COALESCE(SUM(CASE WHEN e.kind = 'capture' THEN e.amount END), 0),
                    COALESCE(SUM(CASE WHEN e.kind = 'release' THEN e.amount END), 0)
             FROM holds h LEFT JOIN ledger_entries e ON e.hold_id = h.id
             GROUP BY h.id",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let amount: i64 = r.get(1)?;
            let captured: i64 = r.get(2)?;
            let status: String = r.get(3)?;
            let alloc: i64 = r.get(4)?;
            let (eh, ec, er): (i64, i64, i64) = (r.get(5)?, r.get(6)?, r.get(7)?);
            if alloc != amount || eh != amount {
                problems.push(format!("hold {id}: amount {amount}, allocated {alloc}, hold entries {eh}"));
            }
            let ok = match status.as_str() {
                "held" => ec == 0 && er == 0 && captured == 0,
                "captured" => ec == captured && er == amount - captured,
                "released" => ec == 0 && er == amount && captured == 0,
                _ => false,
            };
            if !ok {
                problems.push(format!(
                    "hold {id} ({status}): captured {captured}, capture entries {ec}, release entries {er}"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(AuditReport { grants, holds, entries })
    } else {
        let n = problems.len();
        problems.truncate(20);
        Err(LedgerError::Audit(format!("{n} problem(s): {}", problems.join("; "))))
    }
}

impl Ledger {
    /// Grants credits (or training allowance) to a user: an admin grant, a top-up or a refund.
    /// Returns the grant.
    pub fn grant(&mut self, user: UserId, req: &GrantRequest) -> Result<Grant, LedgerError> {
        if req.amount <= 0 {
            return Err(LedgerError::Invalid(format!("a grant must be a positive amount (got {})", req.amount)));
        }
        if matches!(req.source, GrantSource::Signup | GrantSource::Period) {
            return Err(LedgerError::Invalid("signup and period grants come from the subscription".into()));
        }
        if req.amount > MAX_GRANT {
            return Err(LedgerError::Invalid(format!("a grant must be at most {MAX_GRANT} (got {})", req.amount)));
        }
        self.write(|t| {
            users::require_user(t, user)?;
            // Plans' own grants (sign-up, periods) are bounded by the plans' validation; an
            // admin's grant must not take the user's open credits past the cap either.
            let open: i64 = t.query_row(
                "SELECT COALESCE(SUM(remaining + held), 0) FROM grants
                 WHERE user_id = ?1 AND resource = ?2 AND (expires_at IS NULL OR expires_at > ?3)",
                params![user, req.resource.as_str(), t.now],
                |r| r.get(0),
            )?;
            if open.checked_add(req.amount).is_none_or(|total| total > MAX_OPEN) {
                return Err(LedgerError::Invalid(format!(
                    "this grant would give the user more than {MAX_OPEN} open {} ({open} now)",
                    req.resource.as_str()
                )));
            }
            let expires = req.expires_at.map(unix);
            if let Some(e) = expires
                && e <= t.now
            {
                return Err(LedgerError::Invalid(format!(
                    "the expiry {} is not in the future",
                    from_unix(e).to_rfc3339()
                )));
            }
            let new = NewGrant {
                user,
                resource: req.resource,
                amount: req.amount,
                source: req.source,
                period: None,
                effective_at: t.now,
                expires_at: expires,
                priority: req.priority,
                grant_key: None,
            };
            let id =
                insert_grant(t, &new)?.ok_or_else(|| LedgerError::Corrupt("grant without key not inserted".into()))?;
            let g = grants_of(t, user)?.into_iter().find(|g| g.id == id);
            g.ok_or_else(|| LedgerError::Corrupt(format!("grant {id} vanished")))
        })
    }

    pub fn capture(&mut self, hold: HoldId, amount: Option<i64>) -> Result<HoldOutcome, LedgerError> {
        self.write(|t| settle(t, hold, Settle::Capture(amount)))
    }

    /// Releases a hold in full (the job failed or was canceled). Once only, like `capture`.
    pub fn release(&mut self, hold: HoldId) -> Result<HoldOutcome, LedgerError> {
        self.write(|t| settle(t, hold, Settle::Release))
    }

    pub fn hold(&mut self, hold: HoldId) -> Result<Hold, LedgerError> {
        self.read(|t| load_hold(t, hold))
    }

    pub fn hold_by_key(&mut self, user: UserId, idempotency_key: &str) -> Result<Option<Hold>, LedgerError> {
        self.read(|t| hold_by_key(t, user, idempotency_key))
    }

    /// A user's holds not yet settled, oldest first.
    pub fn open_holds(&mut self, user: UserId) -> Result<Vec<Hold>, LedgerError> {
        self.read(|t| open_holds_where(t, Some(user)))
    }

    /// Everyone's holds not yet settled, oldest first (for reconciling jobs after a restart).
    pub fn all_open_holds(&mut self) -> Result<Vec<Hold>, LedgerError> {
        self.read(|t| open_holds_where(t, None))
    }

    /// A user's totals for one resource now.
    pub fn balance(&mut self, user: UserId, resource: Resource) -> Result<Balance, LedgerError> {
        self.read(|t| {
            users::require_user(t, user)?;
            balance(t, user, resource)
        })
    }

    /// All of a user's grants (both resources), oldest first.
    pub fn grants(&mut self, user: UserId) -> Result<Vec<Grant>, LedgerError> {
        self.read(|t| grants_of(t, user))
    }

    /// Units of a "limited" tag used this calendar week.
    /// When this week's "limited" quotas reset (next Monday 00:00 UTC).
    pub fn quota_resets_at(&self) -> DateTime<Utc> {
        from_unix(week_start(crate::ledger::clock::unix(self.clock.now())) + 7 * 86_400)
    }

    pub fn quota_used(&mut self, user: UserId, tag: &str) -> Result<u32, LedgerError> {
        self.read(|t| quota_used(t, user, tag))
    }

    /// Writes off every grant past its expiry now. Returns how many grants.
    pub fn expire_due(&mut self) -> Result<usize, LedgerError> {
        self.write(|t| expire_due(t, None))
    }

    /// Marks an open hold as still in use (its job is running), so the sweeper, which releases
    /// holds untouched for `metering.hold_max_age_secs`, leaves it alone. Returns false when
    /// the hold is no longer held.
    pub fn renew_hold(&mut self, hold: HoldId) -> Result<bool, LedgerError> {
        self.write(|t| {
            Ok(t.execute("UPDATE holds SET renewed_at = ?2 WHERE id = ?1 AND status = 'held'", params![hold, t.now])?
                == 1)
        })
    }

    /// Releases holds untouched (placed or renewed) for `metering.hold_max_age_secs`. Returns
    /// how many.
    pub fn release_stale_holds(&mut self) -> Result<usize, LedgerError> {
        self.write(release_stale)
    }

    /// Checks every grant's buckets and every hold against the append-only ledger entries.
    pub fn audit(&mut self) -> Result<AuditReport, LedgerError> {
        self.read(audit)
    }
}
