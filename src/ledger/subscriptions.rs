//! Subscriptions: sign-up (a user row from [`users`], the default plan and its one-time
//! credits), plan changes, cancellation and renewals. Above [`credits`] and [`events`]; below
//! [`crate::ledger::authorize`].
//!
//! - Periods run from the subscription's anchor: week `k` is `anchor + 7k days`, year `k` is
//!   `anchor + 12k calendar months` (always counted from the anchor, so no drift).
//! - An upgrade takes effect at once: a new period starts now with the new plan's grant;
//!   grants already made keep their own expiry. A downgrade or a cancel takes effect at the
//!   end of the current period.
//! - Renewals are caught up by [`Ledger::catch_up`] (at start-up and by the sweeper) and by
//!   every plan change: each missed boundary is processed once, in order, with the
//!   subscription row and the period grant (unique `grant_key`) written in one transaction, so
//!   running it twice never grants twice. Periods that ended while the server was down get
//!   their grant and its expiry entry, so the history shows each renewal exactly once; only the
//!   current period's credits are usable.

use std::fmt;

use chrono::{DateTime, Months, Utc};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

use crate::ledger::clock::{from_unix, unix};
use crate::ledger::credits::{self, GrantSource, NewGrant};
use crate::ledger::plans::{Entitlements, Period};
use crate::ledger::users::{self, User};
use crate::ledger::{GrantId, Ledger, LedgerError, Resource, Tx, UserId, events};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    CancelAtPeriodEnd,
    Canceled,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::CancelAtPeriodEnd => "cancel_at_period_end",
            SubscriptionStatus::Canceled => "canceled",
        }
    }

    fn parse(s: &str) -> Result<SubscriptionStatus, LedgerError> {
        Ok(match s {
            "active" => SubscriptionStatus::Active,
            "cancel_at_period_end" => SubscriptionStatus::CancelAtPeriodEnd,
            "canceled" => SubscriptionStatus::Canceled,
            other => return Err(LedgerError::Corrupt(format!("subscription status {other:?}"))),
        })
    }
}

impl fmt::Display for SubscriptionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The plan in force for a user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Subscription {
    pub user_id: UserId,
    pub plan: String,
    /// `None` on a plan without periods (Free).
    pub period: Option<Period>,
    pub status: SubscriptionStatus,
    pub anchor_at: DateTime<Utc>,
    pub period_index: i64,
    pub period_start: DateTime<Utc>,
    /// Exclusive; `None` without a period.
    pub period_end: Option<DateTime<Utc>>,
    /// A downgrade waiting for the period end.
    pub pending_plan: Option<String>,
    pub pending_period: Option<Period>,
}

impl Subscription {
    /// When credits next arrive: the period end, unless the subscription ends there (cancel,
    /// or a downgrade to a plan without periods).
    pub fn next_renewal_at(&self) -> Option<DateTime<Utc>> {
        match self.status {
            SubscriptionStatus::Active if self.pending_plan.is_some() && self.pending_period.is_none() => None,
            SubscriptionStatus::Active => self.period_end,
            _ => None,
        }
    }
}

/// What `set_plan` or `cancel` did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum PlanChange {
    /// Took effect now with a new period (and its grant).
    Upgraded {
        from: String,
        to: String,
        period: Option<Period>,
        period_end: Option<DateTime<Utc>>,
        grant_id: Option<GrantId>,
    },
    /// A downgrade, taking effect at `at`.
    Scheduled { to: String, period: Option<Period>, at: DateTime<Utc> },
    /// The subscription ends at `at`; the user then falls back to the default plan.
    CancelScheduled { at: DateTime<Utc> },
    /// A scheduled cancel or downgrade was undone.
    Resumed { plan: String, period: Option<Period> },
    /// Nothing to do.
    Unchanged { plan: String, period: Option<Period>, note: String },
}

impl fmt::Display for PlanChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = |p: &Option<Period>| p.map(|p| format!(" ({p})")).unwrap_or_default();
        match self {
            PlanChange::Upgraded { from, to, period, period_end, .. } => {
                write!(f, "plan changed from {from} to {to}{} now", p(period))?;
                if let Some(e) = period_end {
                    write!(f, "; the period ends at {}", e.to_rfc3339())?;
                }
                Ok(())
            }
            PlanChange::Scheduled { to, period, at } => {
                write!(f, "plan changes to {to}{} at the period end, {}", p(period), at.to_rfc3339())
            }
            PlanChange::CancelScheduled { at } => write!(f, "subscription ends at the period end, {}", at.to_rfc3339()),
            PlanChange::Resumed { plan, period } => write!(f, "subscription to {plan}{} continues", p(period)),
            PlanChange::Unchanged { plan, period, note } => write!(f, "plan stays {plan}{}: {note}", p(period)),
        }
    }
}

/// The boundary `index` periods after `anchor`.
pub(crate) fn period_bound(anchor: i64, period: Period, index: i64) -> Result<i64, LedgerError> {
    match period {
        Period::Weekly => index
            .checked_mul(7 * 86_400)
            .and_then(|d| anchor.checked_add(d))
            .ok_or_else(|| LedgerError::Invalid("period out of range".into())),
        Period::Yearly => u32::try_from(index)
            .ok()
            .and_then(|i| i.checked_mul(12))
            .and_then(|m| from_unix(anchor).checked_add_months(Months::new(m)))
            .map(unix)
            .ok_or_else(|| LedgerError::Invalid("period out of range".into())),
    }
}

pub(crate) fn load(t: &Tx<'_>, user: UserId) -> Result<Subscription, LedgerError> {
    let row = t
        .query_row(
            "SELECT plan, period, status, anchor_at, period_index, period_start, period_end, pending_plan, pending_period
             FROM subscriptions WHERE user_id = ?1",
            params![user],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<String>>(8)?,
                ))
            },
        )
        .optional()?;
    let Some((plan, period, status, anchor, index, start, end, pending_plan, pending_period)) = row else {
        return Err(LedgerError::UnknownUser(format!("#{user}")));
    };
    let parse_period = |p: Option<String>| p.map(|p| p.parse::<Period>()).transpose();
    Ok(Subscription {
        user_id: user,
        plan,
        period: parse_period(period)?,
        status: SubscriptionStatus::parse(&status)?,
        anchor_at: from_unix(anchor),
        period_index: index,
        period_start: from_unix(start),
        period_end: end.map(from_unix),
        pending_plan,
        pending_period: parse_period(pending_period)?,
    })
}

#[allow(clippy::too_many_arguments)]
fn store(
    t: &Tx<'_>,
    user: UserId,
    plan: &str,
    period: Option<Period>,
    status: SubscriptionStatus,
    anchor: i64,
    index: i64,
    start: i64,
    end: Option<i64>,
    pending: Option<(&str, Option<Period>)>,
) -> Result<(), LedgerError> {
    t.execute(
        "INSERT INTO subscriptions (user_id, plan, period, status, anchor_at, period_index, period_start, period_end,
                                    pending_plan, pending_period, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (user_id) DO UPDATE SET plan = excluded.plan, period = excluded.period, status = excluded.status,
            anchor_at = excluded.anchor_at, period_index = excluded.period_index, period_start = excluded.period_start,
            period_end = excluded.period_end, pending_plan = excluded.pending_plan,
            pending_period = excluded.pending_period, updated_at = excluded.updated_at",
        params![
            user,
            plan,
            period.map(Period::as_str),
            status.as_str(),
            anchor,
            index,
            start,
            end,
            pending.map(|p| p.0),
            pending.and_then(|p| p.1).map(Period::as_str),
            t.now
        ],
    )?;
    Ok(())
}

/// The credits and training of period `index` of a subscription, once (keyed).
fn grant_period(
    t: &Tx<'_>,
    user: UserId,
    plan_id: &str,
    period: Period,
    anchor: i64,
    index: i64,
) -> Result<Option<GrantId>, LedgerError> {
    let plan = t.cfg.plan(plan_id)?;
    let start = period_bound(anchor, period, index)?;
    let end = period_bound(anchor, period, index + 1)?;
    let mut first = None;
    for (resource, amount) in
        [(Resource::Credits, plan.credits_per(Some(period))), (Resource::Training, plan.training_per(Some(period)))]
    {
        if amount > 0 {
            let key = format!("period:{user}:{plan_id}:{period}:{anchor}:{index}:{resource}");
            let id = credits::insert_grant(
                t,
                &NewGrant {
                    user,
                    resource,
                    amount,
                    source: GrantSource::Period,
                    period: Some(period),
                    effective_at: start,
                    expires_at: Some(end),
                    priority: 0,
                    grant_key: Some(&key),
                },
            )?;
            if resource == Resource::Credits {
                first = id;
            }
        }
    }
    Ok(first)
}

/// Processes every period boundary of `user` at or before now, in order. Returns how many
/// renewals it made.
pub(crate) fn catch_up_user(t: &Tx<'_>, user: UserId) -> Result<usize, LedgerError> {
    let mut renewals = 0;
    loop {
        let sub = load(t, user)?;
        let (Some(period), Some(end)) = (sub.period, sub.period_end) else { break };
        let boundary = unix(end);
        if boundary > t.now {
            break;
        }
        let default_plan = t.cfg.metering.default_plan.as_str();
        if sub.status == SubscriptionStatus::CancelAtPeriodEnd {
            store(t, user, default_plan, None, SubscriptionStatus::Canceled, boundary, 0, boundary, None, None)?;
            events::record(t, Some(user), "canceled", serde_json::json!({"plan": sub.plan, "at": end}), None)?;
            break;
        }
        if let Some(next) = sub.pending_plan.as_deref() {
            match sub.pending_period {
                None => {
                    store(t, user, next, None, SubscriptionStatus::Active, boundary, 0, boundary, None, None)?;
                }
                Some(np) => {
                    let new_end = period_bound(boundary, np, 1)?;
                    store(
                        t,
                        user,
                        next,
                        Some(np),
                        SubscriptionStatus::Active,
                        boundary,
                        0,
                        boundary,
                        Some(new_end),
                        None,
                    )?;
                    grant_period(t, user, next, np, boundary, 0)?;
                    renewals += 1;
                }
            }
            events::record(
                t,
                Some(user),
                "plan_changed",
                serde_json::json!({"from": sub.plan, "to": next, "period": sub.pending_period, "at": end}),
                None,
            )?;
            continue;
        }
        let anchor = unix(sub.anchor_at);
        let index = sub.period_index + 1;
        let new_end = period_bound(anchor, period, index + 1)?;
        store(
            t,
            user,
            &sub.plan,
            Some(period),
            SubscriptionStatus::Active,
            anchor,
            index,
            boundary,
            Some(new_end),
            None,
        )?;
        grant_period(t, user, &sub.plan, period, anchor, index)?;
        events::record(
            t,
            Some(user),
            "renewal",
            serde_json::json!({"plan": sub.plan, "period": period, "index": index, "start": end,
                               "end": from_unix(new_end)}),
            Some(&format!("renewal:{user}:{}:{anchor}:{index}", sub.plan)),
        )?;
        renewals += 1;
    }
    credits::expire_due(t, Some(user))?;
    Ok(renewals)
}

impl Ledger {
    /// Creates a user on the default plan and gives its sign-up credits (once per account).
    /// The password, if any, is stored as an argon2id hash.
    pub fn add_user(&mut self, name: &str, is_admin: bool, password: Option<&str>) -> Result<User, LedgerError> {
        users::validate_name(name)?;
        let hash = password.map(users::hash_password).transpose()?;
        self.write(|t| {
            let id = users::insert(t, name, is_admin, hash.as_deref())?;
            let plan_id = t.cfg.metering.default_plan.clone();
            store(t, id, &plan_id, None, SubscriptionStatus::Active, t.now, 0, t.now, None, None)?;
            let signup = t.cfg.plan(&plan_id)?.signup_credits;
            if signup > 0 {
                let key = format!("signup:{id}");
                credits::insert_grant(
                    t,
                    &NewGrant {
                        user: id,
                        resource: Resource::Credits,
                        amount: signup,
                        source: GrantSource::Signup,
                        period: None,
                        effective_at: t.now,
                        expires_at: None,
                        priority: 0,
                        grant_key: Some(&key),
                    },
                )?;
            }
            users::user_row(t, name)
        })
    }

    /// The subscription as stored (call `catch_up_user` first for one that is current).
    pub fn subscription(&mut self, user: UserId) -> Result<Subscription, LedgerError> {
        self.read(|t| load(t, user))
    }

    /// What the user's plan entitles now.
    pub fn entitlements(&mut self, user: UserId) -> Result<Entitlements, LedgerError> {
        let sub = self.subscription(user)?;
        self.cfg.entitlements(&sub.plan, sub.period)
    }

    /// Changes a user's plan: an upgrade (higher rank, or weekly → yearly of the same plan, or
    /// any paid plan from one without periods) now, with a new period and its grant; a
    /// downgrade at the end of the current period. `period = None` keeps the current period if
    /// the new plan has it, else takes the new plan's first. Asking for the plan in force
    /// undoes a scheduled cancel or downgrade.
    pub fn set_plan(&mut self, user: UserId, plan_id: &str, period: Option<Period>) -> Result<PlanChange, LedgerError> {
        let cfg = self.cfg.clone();
        let new_plan = cfg.plan(plan_id)?;
        self.write(|t| {
            catch_up_user(t, user)?;
            let sub = load(t, user)?;
            let period = match (new_plan.periods.is_empty(), period) {
                (true, Some(p)) => {
                    return Err(LedgerError::Invalid(format!("plan {plan_id} has no billing period, so no --{p}")));
                }
                (true, None) => None,
                (false, Some(p)) if !new_plan.periods.contains(&p) => {
                    return Err(LedgerError::Invalid(format!("plan {plan_id} is not offered {p}")));
                }
                (false, Some(p)) => Some(p),
                (false, None) => {
                    Some(sub.period.filter(|p| new_plan.periods.contains(p)).unwrap_or(new_plan.periods[0]))
                }
            };
            if sub.plan == plan_id && sub.period == period {
                if sub.status == SubscriptionStatus::CancelAtPeriodEnd || sub.pending_plan.is_some() {
                    t.execute(
                        "UPDATE subscriptions SET status = 'active', pending_plan = NULL, pending_period = NULL,
                         updated_at = ?2 WHERE user_id = ?1",
                        params![user, t.now],
                    )?;
                    events::record(
                        t,
                        Some(user),
                        "resumed",
                        serde_json::json!({"plan": plan_id, "period": period}),
                        None,
                    )?;
                    return Ok(PlanChange::Resumed { plan: plan_id.to_string(), period });
                }
                return Ok(PlanChange::Unchanged {
                    plan: plan_id.to_string(),
                    period,
                    note: "already on this plan".into(),
                });
            }
            let old_rank = cfg.plans.get(&sub.plan).map(|p| p.rank);
            let upgrade = match (sub.period, period) {
                (_, None) => false, // to a plan without periods: never an upgrade
                (None, Some(_)) => true,
                (Some(old_p), Some(new_p)) => match old_rank {
                    None => true,
                    Some(r) => {
                        new_plan.rank > r || (new_plan.rank == r && old_p == Period::Weekly && new_p == Period::Yearly)
                    }
                },
            };
            if !upgrade {
                if sub.period.is_none() {
                    // Between two plans without periods there is no period end to wait for.
                    store(
                        t,
                        user,
                        plan_id,
                        None,
                        SubscriptionStatus::Active,
                        unix(sub.anchor_at),
                        0,
                        t.now,
                        None,
                        None,
                    )?;
                    events::record(
                        t,
                        Some(user),
                        "plan_changed",
                        serde_json::json!({"from": sub.plan, "to": plan_id}),
                        None,
                    )?;
                    return Ok(PlanChange::Upgraded {
                        from: sub.plan,
                        to: plan_id.to_string(),
                        period: None,
                        period_end: None,
                        grant_id: None,
                    });
                }
                t.execute(
                    "UPDATE subscriptions SET status = 'active', pending_plan = ?2, pending_period = ?3, updated_at = ?4
                     WHERE user_id = ?1",
                    params![user, plan_id, period.map(Period::as_str), t.now],
                )?;
                let at = sub.period_end.ok_or_else(|| LedgerError::Corrupt("paid plan without period end".into()))?;
                events::record(
                    t,
                    Some(user),
                    "downgrade_scheduled",
                    serde_json::json!({"from": sub.plan, "to": plan_id, "period": period, "at": at}),
                    None,
                )?;
                return Ok(PlanChange::Scheduled { to: plan_id.to_string(), period, at });
            }
            let p = period.ok_or_else(|| LedgerError::Corrupt("upgrade without period".into()))?;
            let end = period_bound(t.now, p, 1)?;
            store(t, user, plan_id, Some(p), SubscriptionStatus::Active, t.now, 0, t.now, Some(end), None)?;
            let grant_id = grant_period(t, user, plan_id, p, t.now, 0)?;
            events::record(
                t,
                Some(user),
                "plan_changed",
                serde_json::json!({"from": sub.plan, "to": plan_id, "period": p, "at": from_unix(t.now)}),
                None,
            )?;
            Ok(PlanChange::Upgraded {
                from: sub.plan,
                to: plan_id.to_string(),
                period: Some(p),
                period_end: Some(from_unix(end)),
                grant_id,
            })
        })
    }

    /// Cancels at the end of the current period; the user then falls back to the default plan
    /// (without its sign-up credits, which come once per account).
    pub fn cancel(&mut self, user: UserId) -> Result<PlanChange, LedgerError> {
        self.write(|t| {
            catch_up_user(t, user)?;
            let sub = load(t, user)?;
            let Some(end) = sub.period_end else {
                return Ok(PlanChange::Unchanged {
                    plan: sub.plan,
                    period: None,
                    note: "no paid subscription, nothing to cancel".into(),
                });
            };
            if sub.status == SubscriptionStatus::CancelAtPeriodEnd {
                return Ok(PlanChange::CancelScheduled { at: end });
            }
            t.execute(
                "UPDATE subscriptions SET status = 'cancel_at_period_end', pending_plan = NULL, pending_period = NULL,
                 updated_at = ?2 WHERE user_id = ?1",
                params![user, t.now],
            )?;
            events::record(t, Some(user), "cancel_scheduled", serde_json::json!({"plan": sub.plan, "at": end}), None)?;
            Ok(PlanChange::CancelScheduled { at: end })
        })
    }

    /// Processes the renewals (and scheduled downgrades/cancels) of one user due by now.
    pub fn catch_up_user(&mut self, user: UserId) -> Result<usize, LedgerError> {
        self.write(|t| catch_up_user(t, user))
    }

    /// Processes every user's due renewals, one transaction per user; safe to run any number
    /// of times and from several processes. Returns the number of renewals made; if a user
    /// fails, the others are still processed and the first error is returned.
    pub fn catch_up(&mut self) -> Result<usize, LedgerError> {
        let due: Vec<UserId> = self.read(|t| {
            let mut st =
                t.prepare("SELECT user_id FROM subscriptions WHERE period_end IS NOT NULL AND period_end <= ?1")?;
            let rows = st.query_map(params![t.now], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })?;
        // One user's failure (say, a plan removed from the config) must not hold back the others.
        let mut total = 0;
        let mut first_err = None;
        for user in due {
            match self.catch_up_user(user) {
                Ok(n) => total += n,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            None => Ok(total),
            Some(e) => Err(e),
        }
    }
}
