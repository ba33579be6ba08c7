//! What a user has: plan, credits (each grant with its expiry), training allowance, weekly
//! quotas and entitlements. `user show --json` and the server's usage document are this.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::ledger::credits::GrantSource;
use crate::ledger::plans::{Entitlements, Period};
use crate::ledger::users::User;
use crate::ledger::{GrantId, Ledger, LedgerError, Resource, SubscriptionStatus, UserId};

/// A user's account, with renewals caught up (see [`Ledger::account_summary`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccountSummary {
    pub name: String,
    pub id: UserId,
    pub admin: bool,
    pub plan: String,
    pub period: Option<Period>,
    pub status: SubscriptionStatus,
    pub period_start: DateTime<Utc>,
    pub period_end: Option<DateTime<Utc>>,
    pub next_renewal_at: Option<DateTime<Utc>>,
    pub pending_plan: Option<String>,
    pub pending_period: Option<Period>,
    pub credits_available: i64,
    pub credits_held: i64,
    pub credits_spent: i64,
    pub credits_expired: i64,
    pub credits_granted: i64,
    /// The credit grants (not the training ones), oldest first.
    pub grants: Vec<GrantSummary>,
    pub allowance: Allowance,
    /// Tag -> this week's use of a "limited" quota.
    pub quotas: BTreeMap<String, QuotaUse>,
    /// `None` when the plan is no longer in the config.
    pub entitlements: Option<Entitlements>,
}

/// One credit grant as a user sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrantSummary {
    pub id: GrantId,
    pub source: GrantSource,
    pub amount: i64,
    pub remaining: i64,
    pub held: i64,
    pub spent: i64,
    pub expired: i64,
    pub effective_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: i64,
    pub live: bool,
}

/// The training allowance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Allowance {
    pub week_left: i64,
    pub year_left: i64,
    pub held: i64,
    pub used: i64,
    pub images_per_lora: Option<u32>,
}

/// A weekly quota's use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuotaUse {
    pub limit: u32,
    pub used: u32,
    pub left: u32,
}

impl AccountSummary {
    /// Whether the credits available are below the plan's low-balance share
    /// (`low_balance_pct`) of one period's credits (Free: of its sign-up credits).
    pub fn low_balance(&self) -> bool {
        let Some(e) = &self.entitlements else { return false };
        let base = if e.credits_per_period > 0 { e.credits_per_period } else { e.signup_credits };
        base > 0 && self.credits_available * 100 < base * e.low_balance_pct as i64
    }
}

impl Ledger {
    /// `user`'s account, with renewals caught up first.
    pub fn account_summary(&mut self, user: &User) -> Result<AccountSummary, LedgerError> {
        self.catch_up_user(user.id)?;
        let sub = self.subscription(user.id)?;
        let credits = self.balance(user.id, Resource::Credits)?;
        let training = self.balance(user.id, Resource::Training)?;
        let now = self.clock().now();
        let grants = self.grants(user.id)?;
        let ent = self.config().entitlements(&sub.plan, sub.period).ok();
        let (mut week_left, mut year_left) = (0, 0);
        for g in grants.iter().filter(|g| g.resource == Resource::Training && g.is_live(now)) {
            match g.period {
                Some(Period::Weekly) => week_left += g.remaining,
                _ => year_left += g.remaining,
            }
        }
        let mut quotas = BTreeMap::new();
        if let Some(e) = &ent {
            for (tag, &limit) in &e.limited_per_week {
                let used = self.quota_used(user.id, tag)?;
                quotas.insert(tag.clone(), QuotaUse { limit, used, left: limit.saturating_sub(used) });
            }
        }
        let credit_grants = grants
            .iter()
            .filter(|g| g.resource == Resource::Credits)
            .map(|g| GrantSummary {
                id: g.id,
                source: g.source,
                amount: g.amount,
                remaining: g.remaining,
                held: g.held,
                spent: g.spent,
                expired: g.expired,
                effective_at: g.effective_at,
                expires_at: g.expires_at,
                priority: g.priority,
                live: g.is_live(now),
            })
            .collect();
        Ok(AccountSummary {
            name: user.name.clone(),
            id: user.id,
            admin: user.is_admin,
            next_renewal_at: sub.next_renewal_at(),
            plan: sub.plan,
            period: sub.period,
            status: sub.status,
            period_start: sub.period_start,
            period_end: sub.period_end,
            pending_plan: sub.pending_plan,
            pending_period: sub.pending_period,
            credits_available: credits.available,
            credits_held: credits.held,
            credits_spent: credits.spent,
            credits_expired: credits.expired,
            credits_granted: credits.granted,
            grants: credit_grants,
            allowance: Allowance {
                week_left,
                year_left,
                held: training.held,
                used: training.spent,
                images_per_lora: ent.as_ref().map(|e| e.training_images_per_lora),
            },
            quotas,
            entitlements: ent,
        })
    }
}
