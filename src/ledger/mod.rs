//! The metering ledger: plans, subscriptions, credit grants with expiry, holds, training
//! allowances, entitlements, prices, usage history and events, kept in SQLite.
//!
//! Rules this module keeps:
//! Layers, each using only those below it: [`users`] and [`events`] at the bottom, then
//! [`credits`] (grants and holds; a hold it cannot place is a bare shortfall), then
//! [`subscriptions`] (sign-up, plans, renewals), then [`authorize`] (the policy on top: plans
//! that would allow a refused job, the next renewal, the low-balance event).
//!
//! - [`credits`] is the only code that writes grants, holds and ledger entries. Every change
//!   of a balance is one `BEGIN IMMEDIATE` transaction that appends rows to the append-only
//!   `ledger_entries` table; [`Ledger::audit`] checks every grant and hold against them.
//! - A grant's buckets always add up: `amount = remaining + held + spent + expired`, so for a
//!   user `granted = available + held + spent + expired` exactly (see [`Balance`]).
//! - Time comes only from the [`Clock`] the ledger was opened with.
//!
//! Open one [`Ledger`] per thread (each is one SQLite connection); any number of them may
//! share a database file.

pub mod authorize;
pub mod clock;
pub mod credits;
pub mod events;
pub mod plans;
pub mod schema;
pub mod subscriptions;
pub mod summary;
pub mod sweeper;
pub mod usage;
pub mod users;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rusqlite::{Connection, Transaction, TransactionBehavior};
use serde::Serialize;

pub use authorize::{JobAuthorization, JobRequest, TrainingRequest};
pub use clock::{Clock, SystemClock, TestClock};
pub use credits::{
    AuditReport, Balance, Grant, GrantRequest, GrantSource, Hold, HoldOutcome, HoldRequest, HoldStatus, MAX_GRANT,
    MAX_OPEN, SettledBy,
};
pub use events::Event;
pub use plans::{
    Clearance, CountLimit, Entitlements, JobParams, MeteringConfig, ModelAccess, ModelKind, ModelPricing, ParamLevel,
    Period, PlanConfig, PlansConfig, Price, PricingConfig, QueueClass, Quota, Refusal, Synchronous, price,
};
pub use subscriptions::{PlanChange, Subscription, SubscriptionStatus};
pub use summary::AccountSummary;
pub use sweeper::{SweepReport, Sweeper};
pub use usage::{UsageDay, UsageKind};
pub use users::{MAX_PASSWORD_BYTES, User};

/// The database file inside a data directory.
pub const DB_FILE: &str = "atelier.db";

pub type UserId = i64;
pub type GrantId = i64;
pub type HoldId = i64;

/// What a grant or hold counts: credits, or LoRA trainings (the training allowance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    Credits,
    Training,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Credits => "credits",
            Resource::Training => "training",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Resource {
    type Err = LedgerError;
    fn from_str(s: &str) -> Result<Resource, LedgerError> {
        match s {
            "credits" => Ok(Resource::Credits),
            "training" => Ok(Resource::Training),
            other => Err(LedgerError::Corrupt(format!("unknown resource {other:?}"))),
        }
    }
}

/// Everything the ledger can answer instead of doing what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("unknown plan {plan:?} (plans: {known})")]
    UnknownPlan { plan: String, known: String },
    #[error("unknown hold {0}")]
    UnknownHold(HoldId),
    #[error("{0}")]
    Invalid(String),
    /// The job or training may not run; the refusal says why and what would allow it.
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// Capture after release (or the other way round). Repeating the same settlement is not an
    /// error: it returns the original outcome.
    #[error("hold {id} is already {status} (by {by}); it cannot be {wanted}")]
    HoldSettled { id: HoldId, status: HoldStatus, by: SettledBy, wanted: &'static str },
    /// The idempotency key was used before for a different request.
    #[error(
        "idempotency key {key:?} was already used for job {job_id:?} ({resource} {amount}); not placing a second hold"
    )]
    IdempotencyConflict { key: String, job_id: String, resource: Resource, amount: i64 },
    #[error("configuration: {0}")]
    Config(String),
    /// An audit found rows that do not match the ledger entries.
    #[error("ledger audit failed: {0}")]
    Audit(String),
    #[error("database content is not what this program wrote: {0}")]
    Corrupt(String),
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl From<crate::db::DbError> for LedgerError {
    fn from(e: crate::db::DbError) -> LedgerError {
        use crate::db::DbError;
        match e {
            DbError::Sqlite(e) => LedgerError::Sqlite(e),
            DbError::Io { context, source } => LedgerError::Io { context, source },
            e @ (DbError::Unusable(_) | DbError::TooNew { .. }) => LedgerError::Invalid(e.to_string()),
        }
    }
}

/// One connection to the ledger database, with the plans config and the clock.
pub struct Ledger {
    conn: Connection,
    cfg: Arc<PlansConfig>,
    clock: Arc<dyn Clock>,
    path: PathBuf,
}

/// A write transaction (`BEGIN IMMEDIATE`) and the time it runs at.
pub(crate) struct Tx<'a> {
    pub(crate) tx: Transaction<'a>,
    pub(crate) now: i64,
    pub(crate) cfg: &'a PlansConfig,
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.tx
    }
}

impl Ledger {
    /// Opens (creating and migrating as needed) the ledger database at `db_path`.
    pub fn open(db_path: &Path, cfg: Arc<PlansConfig>, clock: Arc<dyn Clock>) -> Result<Ledger, LedgerError> {
        cfg.validate()?;
        let conn = schema::open_connection_with(db_path, cfg.metering.synchronous)?;
        Ok(Ledger { conn, cfg, clock, path: db_path.to_path_buf() })
    }

    /// Opens `<data_dir>/atelier.db`, creating the directory (owner only) if needed.
    pub fn open_data_dir(data_dir: &Path, cfg: Arc<PlansConfig>, clock: Arc<dyn Clock>) -> Result<Ledger, LedgerError> {
        crate::private_files::create_dir_all(data_dir).map_err(|source| LedgerError::Io {
            context: format!("creating the data directory {}", data_dir.display()),
            source,
        })?;
        Ledger::open(&data_dir.join(DB_FILE), cfg, clock)
    }

    /// Another connection to the same database (for another thread).
    pub fn reopen(&self) -> Result<Ledger, LedgerError> {
        Ledger::open(&self.path, self.cfg.clone(), self.clock.clone())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &PlansConfig {
        &self.cfg
    }

    pub fn config_arc(&self) -> Arc<PlansConfig> {
        self.cfg.clone()
    }

    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction; commits on `Ok`, rolls back on `Err`. The
    /// clock is read after the write lock is held.
    pub(crate) fn write<T>(&mut self, f: impl FnOnce(&Tx<'_>) -> Result<T, LedgerError>) -> Result<T, LedgerError> {
        self.write_with(f)
    }

    /// [`Ledger::write`] for callers with their own error type.
    pub(crate) fn write_with<T, E: From<LedgerError>>(
        &mut self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(LedgerError::from)?;
        let now = clock::unix(self.clock.now());
        let t = Tx { tx, now, cfg: &self.cfg };
        let out = f(&t)?;
        t.tx.commit().map_err(LedgerError::from)?;
        Ok(out)
    }

    /// Runs `f` in a read transaction: one consistent snapshot.
    pub(crate) fn read<T>(&mut self, f: impl FnOnce(&Tx<'_>) -> Result<T, LedgerError>) -> Result<T, LedgerError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let now = clock::unix(self.clock.now());
        let t = Tx { tx, now, cfg: &self.cfg };
        let out = f(&t)?;
        t.tx.commit()?;
        Ok(out)
    }
}
