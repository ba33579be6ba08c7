//! The app's one SQLite database, `<data>/atelier.db`: the settings every connection gets, the
//! one migration runner, and a pool of reusable connections. Each part of the app (the ledger,
//! the jobs, the accounts) declares its own [`Migrations`] and runs them through [`migrate`];
//! this module knows none of them.
//!
//! Every connection gets WAL, foreign keys, a busy handler long enough for many writers to
//! queue on `BEGIN IMMEDIATE`, and `synchronous = FULL` (the default) so that a committed
//! change survives a crash of the process or of the machine; `NORMAL` (an admin's choice in
//! `[metering] synchronous`) still survives a crash of the process, not a power cut.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// How hard SQLite pushes each commit to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
}

/// What opening or migrating the database can answer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// The file cannot be used as this program needs (no WAL).
    #[error("{0}")]
    Unusable(String),
    /// The database was written by a newer program: opening it could lose what that one wrote.
    #[error("the database has {part} schema version {found}, newer than this program's {known}")]
    TooNew { part: &'static str, found: i64, known: i64 },
}

/// Where a part keeps its schema version. The ledger, the first part, keeps it in
/// `PRAGMA user_version`; the later parts in the `app_meta` table under their key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSlot {
    UserVersion,
    AppMeta(&'static str),
}

/// One part's schema: `steps[i]` moves it from version `i` to `i + 1`. Append only; never
/// edit a step that has shipped.
#[derive(Debug, Clone, Copy)]
pub struct Migrations {
    /// The part's name, for messages.
    pub part: &'static str,
    pub slot: VersionSlot,
    pub steps: &'static [&'static str],
}

impl Migrations {
    /// The schema version this program writes.
    pub const fn version(&self) -> i64 {
        self.steps.len() as i64
    }
}

/// How many busy-handler attempts make the busy timeout: about one per millisecond past the
/// first 200 (≈ 50 ms) attempts. About a minute, or `ATELIER_DB_BUSY_TIMEOUT_MS` (for
/// operators, and for tests of what a request answers when the database stays locked).
fn busy_attempts() -> i32 {
    static ATTEMPTS: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *ATTEMPTS.get_or_init(|| {
        let ms = std::env::var("ATELIER_DB_BUSY_TIMEOUT_MS").ok().and_then(|v| v.parse::<i32>().ok()).unwrap_or(60_000);
        200 + ms.clamp(0, 3_600_000)
    })
}

/// Waits for the write lock in short sleeps (SQLite's own busy timeout sleeps up to 100 ms at a
/// time, which starves a queue of 16 writers); gives up after about a minute.
fn busy_wait(attempt: i32) -> bool {
    if attempt >= busy_attempts() {
        return false;
    }
    let micros = match attempt {
        0..=19 => 50,
        20..=199 => 250,
        _ => 1_000,
    };
    std::thread::sleep(Duration::from_micros(micros));
    true
}

/// Opens (creating if needed, owner-only) the database at `path` with the settings every
/// connection gets. Migrates nothing: each part runs its own [`migrate`].
pub fn open(path: &Path, sync: Synchronous) -> Result<Connection, DbError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    create_private(path)?;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_handler(Some(busy_wait))?;
    // journal_mode answers with the mode now in force.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(DbError::Unusable(format!(
            "the database at {} cannot use WAL (journal_mode is {mode})",
            path.display()
        )));
    }
    conn.execute_batch(&format!(
        "PRAGMA foreign_keys = ON; PRAGMA synchronous = {};",
        match sync {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    ))?;
    Ok(conn)
}

/// Creates a new database file readable by its owner only, before SQLite opens it: SQLite
/// gives the `-wal` and `-shm` files the database's own mode, so they are private too. An
/// existing file keeps its mode; `:memory:` and `file:` URIs are left to SQLite.
fn create_private(path: &Path) -> Result<(), DbError> {
    if path.to_str().is_some_and(|p| p.is_empty() || p == ":memory:" || p.starts_with("file:")) {
        return Ok(());
    }
    match crate::private_files::open_options().write(true).create_new(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(DbError::Io { context: format!("creating the database {}", path.display()), source }),
    }
}

fn read_version(conn: &Connection, slot: VersionSlot) -> rusqlite::Result<i64> {
    match slot {
        VersionSlot::UserVersion => conn.query_row("PRAGMA user_version", [], |r| r.get(0)),
        VersionSlot::AppMeta(key) => Ok(conn
            .query_row("SELECT value FROM app_meta WHERE key = ?1", params![key], |r| r.get::<_, String>(0))
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)),
    }
}

fn write_version(conn: &Connection, slot: VersionSlot, version: i64) -> rusqlite::Result<()> {
    match slot {
        VersionSlot::UserVersion => conn.execute_batch(&format!("PRAGMA user_version = {version}")),
        VersionSlot::AppMeta(key) => conn
            .execute(
                "INSERT INTO app_meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
                params![key, version.to_string()],
            )
            .map(drop),
    }
}

/// Applies the steps of `m` this database has not seen, each in its own `BEGIN IMMEDIATE`
/// transaction together with the new version (the write lock first, then the version: two
/// processes opening at once apply each step once). A database whose version of the part is
/// newer than this program's is refused.
pub fn migrate(conn: &Connection, m: &Migrations) -> Result<(), DbError> {
    if matches!(m.slot, VersionSlot::AppMeta(_)) {
        conn.execute_batch("CREATE TABLE IF NOT EXISTS app_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")?;
    }
    loop {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let step = (|| -> Result<bool, DbError> {
            let version = read_version(conn, m.slot)?;
            if version > m.version() {
                return Err(DbError::TooNew { part: m.part, found: version, known: m.version() });
            }
            let Some(sql) = m.steps.get(version as usize) else { return Ok(false) };
            conn.execute_batch(sql)?;
            write_version(conn, m.slot, version + 1)?;
            Ok(true)
        })();
        match step {
            Ok(true) => conn.execute_batch("COMMIT")?,
            Ok(false) => {
                conn.execute_batch("COMMIT")?;
                return Ok(());
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
}

/// What a [`Pool`] keeps: something that opens itself from a shared configuration.
pub trait Open: Sized + Send {
    type Config: Send + Sync;
    fn open(config: &Self::Config) -> anyhow::Result<Self>;
}

/// Connections reused across requests; a request takes one (opening a new one when none is
/// idle) and gives it back when done. SQLite connections are not shared between threads.
pub struct Pool<C: Open> {
    config: C::Config,
    idle: Mutex<Vec<C>>,
}

impl<C: Open> Pool<C> {
    /// Opens the first connection (which migrates the database) and keeps it.
    pub fn new(config: C::Config) -> anyhow::Result<Pool<C>> {
        let first = C::open(&config)?;
        Ok(Pool { config, idle: Mutex::new(vec![first]) })
    }

    pub fn open(&self) -> anyhow::Result<C> {
        C::open(&self.config)
    }

    pub fn config(&self) -> &C::Config {
        &self.config
    }

    /// Runs `f` with a connection (blocking: call from a blocking thread).
    pub fn with<T>(&self, f: impl FnOnce(&mut C) -> T) -> anyhow::Result<T> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: Migrations = Migrations {
        part: "test",
        slot: VersionSlot::AppMeta("test_schema"),
        steps: &["CREATE TABLE t (a INTEGER)", "ALTER TABLE t ADD COLUMN b INTEGER"],
    };

    #[test]
    fn migrations_apply_once_and_a_newer_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.db");
        let conn = open(&path, Synchronous::Full).unwrap();
        migrate(&conn, &TWO).unwrap();
        migrate(&conn, &TWO).unwrap();
        conn.execute("INSERT INTO t (a, b) VALUES (1, 2)", []).unwrap();
        assert_eq!(read_version(&conn, TWO.slot).unwrap(), 2);
        // The program that knows one step meets a database at two: refused, nothing changed.
        let one = Migrations { steps: &TWO.steps[..1], ..TWO };
        match migrate(&conn, &one) {
            Err(DbError::TooNew { part: "test", found: 2, known: 1 }) => {}
            other => panic!("{other:?}"),
        }
        let user = Migrations { part: "user", slot: VersionSlot::UserVersion, steps: &["CREATE TABLE u (a INTEGER)"] };
        migrate(&conn, &user).unwrap();
        conn.execute_batch("PRAGMA user_version = 5").unwrap();
        assert!(matches!(migrate(&conn, &user), Err(DbError::TooNew { found: 5, known: 1, .. })));
        assert_eq!(read_version(&conn, TWO.slot).unwrap(), 2);
    }
}
