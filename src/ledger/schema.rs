//! The ledger's SQLite schema, its migrations (tracked in `PRAGMA user_version`) and the
//! connection settings every connection gets: WAL, foreign keys, a busy timeout long enough for
//! many writers to queue on `BEGIN IMMEDIATE`, and `synchronous = FULL` (the default) so that a
//! committed change survives a crash of the process or of the machine; `NORMAL` (an admin's
//! choice in `[metering] synchronous`) still survives a crash of the process, not a power cut.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::ledger::LedgerError;
use crate::ledger::plans::Synchronous;

/// Each entry moves the schema from version `i` to `i + 1`. Append only; never edit a
/// migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE users (
        id             INTEGER PRIMARY KEY,
        name           TEXT    NOT NULL UNIQUE,
        is_admin       INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
        password_hash  TEXT,
        created_at     INTEGER NOT NULL
    );

    -- One row per user: the plan now in force. Free has no period and no period end.
    CREATE TABLE subscriptions (
        user_id        INTEGER PRIMARY KEY REFERENCES users(id),
        plan           TEXT    NOT NULL,
        period         TEXT    CHECK (period IN ('weekly', 'yearly')),
        status         TEXT    NOT NULL CHECK (status IN ('active', 'cancel_at_period_end', 'canceled')),
        anchor_at      INTEGER NOT NULL,   -- periods are counted from here
        period_index   INTEGER NOT NULL,   -- the current period is number period_index
        period_start   INTEGER NOT NULL,
        period_end     INTEGER,            -- exclusive; NULL without a period
        pending_plan   TEXT,               -- a downgrade that takes effect at period_end
        pending_period TEXT CHECK (pending_period IN ('weekly', 'yearly')),
        updated_at     INTEGER NOT NULL,
        CHECK ((period IS NULL) = (period_end IS NULL))
    );

    -- Immutable grants of credits or of training allowance. The four buckets always add up to
    -- the amount; only the ledger's credits module writes them.
    CREATE TABLE grants (
        id            INTEGER PRIMARY KEY,
        user_id       INTEGER NOT NULL REFERENCES users(id),
        resource      TEXT    NOT NULL CHECK (resource IN ('credits', 'training')),
        amount        INTEGER NOT NULL CHECK (amount > 0),
        remaining     INTEGER NOT NULL CHECK (remaining >= 0),
        held          INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0),
        spent         INTEGER NOT NULL DEFAULT 0 CHECK (spent >= 0),
        expired       INTEGER NOT NULL DEFAULT 0 CHECK (expired >= 0),
        source        TEXT    NOT NULL CHECK (source IN ('signup', 'period', 'top-up', 'refund', 'admin')),
        period_kind   TEXT    CHECK (period_kind IN ('weekly', 'yearly')),
        effective_at  INTEGER NOT NULL,
        expires_at    INTEGER,              -- exclusive; NULL never expires
        priority      INTEGER NOT NULL DEFAULT 0,
        grant_key     TEXT    UNIQUE,       -- makes period grants happen once
        created_at    INTEGER NOT NULL,
        CHECK (remaining + held + spent + expired = amount)
    );
    CREATE INDEX grants_spend_order ON grants (user_id, resource, expires_at, priority, id);
    CREATE UNIQUE INDEX grants_one_signup ON grants (user_id, resource) WHERE source = 'signup';

    CREATE TABLE holds (
        id               INTEGER PRIMARY KEY,
        user_id          INTEGER NOT NULL REFERENCES users(id),
        resource         TEXT    NOT NULL CHECK (resource IN ('credits', 'training')),
        job_id           TEXT    NOT NULL,
        idempotency_key  TEXT    NOT NULL,
        amount           INTEGER NOT NULL CHECK (amount > 0),
        captured         INTEGER NOT NULL DEFAULT 0 CHECK (captured >= 0 AND captured <= amount),
        status           TEXT    NOT NULL CHECK (status IN ('held', 'captured', 'released')),
        usage_kind       TEXT    NOT NULL CHECK (usage_kind IN ('images', 'video', 'training')),
        units            INTEGER NOT NULL CHECK (units >= 0),
        quota_tags       TEXT,               -- ",dev,video," : weekly quotas it counts against
        created_at       INTEGER NOT NULL,
        settled_at       INTEGER,
        settled_by       TEXT CHECK (settled_by IN ('capture', 'release', 'sweeper')),
        UNIQUE (user_id, idempotency_key)
    );
    CREATE INDEX holds_open ON holds (status, created_at);
    CREATE INDEX holds_user ON holds (user_id, created_at);

    -- Which grants back a hold, and by how much.
    CREATE TABLE hold_allocations (
        hold_id   INTEGER NOT NULL REFERENCES holds(id),
        grant_id  INTEGER NOT NULL REFERENCES grants(id),
        amount    INTEGER NOT NULL CHECK (amount > 0),
        PRIMARY KEY (hold_id, grant_id)
    );

    -- Append-only: every change of a grant's buckets is one row here.
    --   grant:   +remaining        hold:    remaining -> held
    --   capture: held -> spent     release: held -> remaining
    --   expire:  remaining -> expired
    CREATE TABLE ledger_entries (
        id        INTEGER PRIMARY KEY,
        user_id   INTEGER NOT NULL REFERENCES users(id),
        grant_id  INTEGER NOT NULL REFERENCES grants(id),
        hold_id   INTEGER REFERENCES holds(id),
        kind      TEXT    NOT NULL CHECK (kind IN ('grant', 'hold', 'capture', 'release', 'expire')),
        amount    INTEGER NOT NULL CHECK (amount > 0),
        at        INTEGER NOT NULL
    );
    CREATE INDEX ledger_entries_grant ON ledger_entries (grant_id, kind);
    CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
        BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END;
    CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
        BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only'); END;

    CREATE TABLE usage_daily (
        user_id  INTEGER NOT NULL REFERENCES users(id),
        day      TEXT    NOT NULL,   -- YYYY-MM-DD, UTC
        kind     TEXT    NOT NULL CHECK (kind IN ('images', 'video', 'training')),
        jobs     INTEGER NOT NULL DEFAULT 0,
        units    INTEGER NOT NULL DEFAULT 0,
        credits  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user_id, day, kind)
    );

    CREATE TABLE events (
        id          INTEGER PRIMARY KEY,
        user_id     INTEGER REFERENCES users(id),
        kind        TEXT    NOT NULL,
        at          INTEGER NOT NULL,
        data        TEXT    NOT NULL,   -- JSON
        dedupe_key  TEXT    UNIQUE
    );
    CREATE INDEX events_user ON events (user_id, at);
    "#,
    // 2: a hold whose job is still working is renewed, so the sweeper only releases holds
    // that nothing has touched for `hold_max_age_secs`.
    r#"
    ALTER TABLE holds ADD COLUMN renewed_at INTEGER;
    "#,
    // 3: an idempotency key is bound to the request it was first used for (a hash of the job
    // spec with its defaults filled in): the same key with another request is refused.
    r#"
    ALTER TABLE holds ADD COLUMN request_hash TEXT;
    "#,
];

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How many busy-handler attempts make the busy timeout: about one per millisecond past the
/// first 200 (≈ 50 ms) attempts. About a minute, or `ATELIER_DB_BUSY_TIMEOUT_MS` (for
/// operators, and for tests of what a request answers when the database stays locked).
fn busy_attempts() -> i32 {
    static ATTEMPTS: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *ATTEMPTS.get_or_init(|| {
        let ms = std::env::var("ATELIER_DB_BUSY_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .unwrap_or(60_000);
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

/// Opens (creating if needed) the database at `path` with `synchronous = FULL` and brings its
/// schema up to date.
pub fn open_connection(path: &Path) -> Result<Connection, LedgerError> {
    open_connection_with(path, Synchronous::Full)
}

/// [`open_connection`] with a chosen `synchronous` level.
pub fn open_connection_with(path: &Path, sync: Synchronous) -> Result<Connection, LedgerError> {
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
        return Err(LedgerError::Invalid(format!(
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
    migrate(&conn)?;
    Ok(conn)
}

/// Creates a new database file readable by its owner only, before SQLite opens it: SQLite
/// gives the `-wal` and `-shm` files the database's own mode, so they are private too. An
/// existing file keeps its mode; `:memory:` and `file:` URIs are left to SQLite.
fn create_private(path: &Path) -> Result<(), LedgerError> {
    if path.to_str().is_some_and(|p| p.is_empty() || p == ":memory:" || p.starts_with("file:")) {
        return Ok(());
    }
    match crate::private_files::open_options().write(true).create_new(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(LedgerError::Io { context: format!("creating the database {}", path.display()), source }),
    }
}

/// Applies the migrations this database has not seen, each in its own `BEGIN IMMEDIATE`
/// transaction together with the new `user_version`, so concurrent openers apply each once.
pub fn migrate(conn: &Connection) -> Result<(), LedgerError> {
    loop {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let step = (|| -> Result<bool, LedgerError> {
            let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            if version > SCHEMA_VERSION {
                return Err(LedgerError::Invalid(format!(
                    "the database has schema version {version}, newer than this program's {SCHEMA_VERSION}"
                )));
            }
            if version == SCHEMA_VERSION {
                return Ok(false);
            }
            conn.execute_batch(MIGRATIONS[version as usize])?;
            conn.execute_batch(&format!("PRAGMA user_version = {}", version + 1))?;
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
