//! The ledger's SQLite schema and its migrations (tracked in `PRAGMA user_version`); the
//! connection settings and the migration runner are [`crate::db`]'s.

use std::path::Path;

use rusqlite::Connection;

use crate::db::{self, Synchronous};
use crate::ledger::LedgerError;

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

/// The ledger's part of the database; its version is `PRAGMA user_version`.
pub const LEDGER_MIGRATIONS: db::Migrations =
    db::Migrations { part: "ledger", slot: db::VersionSlot::UserVersion, steps: MIGRATIONS };

/// The schema version this code writes.
pub const SCHEMA_VERSION: i64 = LEDGER_MIGRATIONS.version();

/// Opens (creating if needed) the database at `path` with `synchronous = FULL` and brings the
/// ledger's schema up to date.
pub fn open_connection(path: &Path) -> Result<Connection, LedgerError> {
    open_connection_with(path, Synchronous::Full)
}

/// [`open_connection`] with a chosen `synchronous` level.
pub fn open_connection_with(path: &Path, sync: Synchronous) -> Result<Connection, LedgerError> {
    let conn = db::open(path, sync)?;
    migrate(&conn)?;
    Ok(conn)
}

/// Applies the ledger migrations this database has not seen (see [`db::migrate`]).
pub fn migrate(conn: &Connection) -> Result<(), LedgerError> {
    Ok(db::migrate(conn, &LEDGER_MIGRATIONS)?)
}
