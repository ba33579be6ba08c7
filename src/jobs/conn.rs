//! The connections the server and the workers work with: a ledger connection plus a plain one
//! for the jobs, gallery and account tables, both on `<data>/atelier.db` (settings, migration
//! runner and pool are [`crate::db`]'s).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rusqlite::Connection;

use crate::accounts::ACCOUNTS_MIGRATIONS;
use crate::db;
use crate::jobs::store::JOBS_MIGRATIONS;
use crate::ledger::{Clock, Ledger, PlansConfig};

pub struct Conn {
    pub ledger: Ledger,
    pub app: Connection,
}

/// What every [`Conn`] is opened with.
pub struct ConnConfig {
    pub data_dir: PathBuf,
    pub plans: Arc<PlansConfig>,
    pub clock: Arc<dyn Clock>,
}

impl Conn {
    /// Opens both connections, creating and migrating the database as needed.
    pub fn open(data_dir: &Path, plans: Arc<PlansConfig>, clock: Arc<dyn Clock>) -> Result<Conn> {
        let sync = plans.metering.synchronous;
        let ledger = Ledger::open_data_dir(data_dir, plans, clock)?;
        let app = db::open(ledger.path(), sync)?;
        db::migrate(&app, &JOBS_MIGRATIONS).context("migrating the jobs tables")?;
        db::migrate(&app, &ACCOUNTS_MIGRATIONS).context("migrating the account tables")?;
        Ok(Conn { ledger, app })
    }

    /// The ledger clock's now, as unix seconds.
    pub fn now(&self) -> i64 {
        self.ledger.clock().now().timestamp()
    }
}

impl db::Open for Conn {
    type Config = ConnConfig;
    fn open(c: &ConnConfig) -> Result<Conn> {
        Conn::open(&c.data_dir, c.plans.clone(), c.clock.clone())
    }
}

/// The server's pool of [`Conn`]s.
pub type Pool = db::Pool<Conn>;

impl ConnConfig {
    pub fn new(data_dir: &Path, plans: Arc<PlansConfig>, clock: Arc<dyn Clock>) -> ConnConfig {
        ConnConfig { data_dir: data_dir.to_path_buf(), plans, clock }
    }
}
