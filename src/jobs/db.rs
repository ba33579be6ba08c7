//! Database connections for the server and the worker: each is a ledger connection plus a
//! plain one for the jobs, gallery and account tables, both on `<data>/atelier.db`. SQLite
//! connections are not shared between threads, so the server keeps a small pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};

use crate::ledger::{Clock, Ledger, PlansConfig, schema};

pub struct Conn {
    pub ledger: Ledger,
    pub app: Connection,
}

impl Conn {
    pub fn open(data_dir: &Path, plans: Arc<PlansConfig>, clock: Arc<dyn Clock>) -> Result<Conn> {
        let sync = plans.metering.synchronous;
        let ledger = Ledger::open_data_dir(data_dir, plans, clock)?;
        let app = schema::open_connection_with(ledger.path(), sync)?;
        crate::jobs::store::migrate(&app).context("migrating the jobs tables")?;
        crate::accounts::migrate(&app).context("migrating the account tables")?;
        Ok(Conn { ledger, app })
    }

    /// The ledger clock's now, as unix seconds.
    pub fn now(&self) -> i64 {
        self.ledger.clock().now().timestamp()
    }
}

/// Connections reused across requests; a request takes one (opening a new one when none is
/// idle) and gives it back when done.
pub struct Pool {
    data_dir: PathBuf,
    plans: Arc<PlansConfig>,
    clock: Arc<dyn Clock>,
    idle: Mutex<Vec<Conn>>,
}

impl Pool {
    pub fn new(data_dir: &Path, plans: Arc<PlansConfig>, clock: Arc<dyn Clock>) -> Result<Pool> {
        let first = Conn::open(data_dir, plans.clone(), clock.clone())?;
        Ok(Pool { data_dir: data_dir.to_path_buf(), plans, clock, idle: Mutex::new(vec![first]) })
    }

    pub fn open(&self) -> Result<Conn> {
        Conn::open(&self.data_dir, self.plans.clone(), self.clock.clone())
    }

    /// Runs `f` with a connection (blocking: call from a blocking thread).
    pub fn with<T>(&self, f: impl FnOnce(&mut Conn) -> T) -> Result<T> {
        let conn = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match conn {
            Some(c) => c,
            None => self.open()?,
        };
        let out = f(&mut conn);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < 32 {
            idle.push(conn);
        }
        Ok(out)
    }

    pub fn plans(&self) -> &Arc<PlansConfig> {
        &self.plans
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

/// Brings one part of the app's tables (jobs, accounts) up to date: `migrations[i]` moves it
/// from version `i` to `i + 1`; the version is kept in `app_meta` under `key`. Append only;
/// never edit a migration that has shipped.
pub fn migrate_part(conn: &Connection, key: &str, migrations: &[&str]) -> rusqlite::Result<()> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS app_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")?;
    loop {
        // The write lock first, then the version: two processes opening at once apply each
        // migration once.
        let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
        let version: usize = tx
            .query_row("SELECT value FROM app_meta WHERE key = ?1", params![key], |r| r.get::<_, String>(0))
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let Some(sql) = migrations.get(version) else { return tx.commit() };
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO app_meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            params![key, (version + 1).to_string()],
        )?;
        tx.commit()?;
    }
}
