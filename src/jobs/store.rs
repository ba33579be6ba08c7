//! The jobs and gallery tables. They live in the ledger's SQLite file (one file to back up)
//! but only this module writes them; credits stay the ledger's alone. The queue is the
//! `jobs` table itself: a job is `queued` until a worker marks it `running`.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use crate::db::{Migrations, VersionSlot};
use crate::ledger::{HoldId, QueueClass, UserId};

/// Each entry moves the app schema from version `i` to `i + 1` (kept in `app_meta`).
const MIGRATIONS: &[&str] = &[
    // 1: jobs and images.
    r#"
    CREATE TABLE jobs (
        seq              INTEGER PRIMARY KEY,           -- submission order (FIFO)
        id               TEXT    NOT NULL UNIQUE,
        user_id          INTEGER NOT NULL REFERENCES users(id),
        model            TEXT    NOT NULL,
        spec             TEXT    NOT NULL,              -- JobSpec as JSON
        seed             INTEGER NOT NULL,              -- the seed used (u64 bits)
        queue_class      TEXT    NOT NULL,
        hold_id          INTEGER NOT NULL,
        price            INTEGER NOT NULL,
        idempotency_key  TEXT    NOT NULL,
        status           TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')),
        start_seq        INTEGER,                       -- order in which jobs started
        created_at       INTEGER NOT NULL,
        started_at       INTEGER,
        finished_at      INTEGER,
        error            TEXT,
        UNIQUE (user_id, idempotency_key)
    );
    CREATE INDEX jobs_status ON jobs (status, seq);
    CREATE INDEX jobs_user ON jobs (user_id, seq);

    CREATE TABLE images (
        id          TEXT    PRIMARY KEY,                -- 128 random bits: the file name too
        user_id     INTEGER NOT NULL REFERENCES users(id),
        job_id      TEXT    NOT NULL REFERENCES jobs(id),
        idx         INTEGER NOT NULL,                   -- position in the job's batch
        width       INTEGER NOT NULL,
        height      INTEGER NOT NULL,
        seed        INTEGER NOT NULL,
        model       TEXT    NOT NULL,
        prompt      TEXT    NOT NULL,
        steps       INTEGER NOT NULL,
        guidance    REAL,
        parameters  TEXT    NOT NULL,                   -- the PNG's A1111 text
        created_at  INTEGER NOT NULL
    );
    CREATE INDEX images_user ON images (user_id, created_at DESC, id);
"#,
    // 2: what went wrong inside a failed job, for admins (users see `error`, which names no
    // server paths).
    r#"
    ALTER TABLE jobs ADD COLUMN error_detail TEXT;
"#,
    // 3: LoRA training jobs in the same queue: the kind, the training's settings (JSON), and
    // the name of the LoRA it made.
    r#"
    ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'image' CHECK (kind IN ('image', 'training'));
    ALTER TABLE jobs ADD COLUMN training TEXT;
    ALTER TABLE jobs ADD COLUMN result TEXT;
"#,
];

/// The jobs and gallery tables' part of the database; its version is `app_meta`'s
/// `jobs_schema`.
pub const JOBS_MIGRATIONS: Migrations =
    Migrations { part: "jobs", slot: VersionSlot::AppMeta("jobs_schema"), steps: MIGRATIONS };

pub use crate::jobs::training_spec::TrainingSpec;
pub use crate::spec::JobSpec;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Image,
    Training,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "canceled" => JobStatus::Canceled,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled)
    }

    pub const ALL: [JobStatus; 5] =
        [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Canceled];
}

/// The queue class stored in column `col`; a name that is no class is an error (a database
/// written by something else, or damaged), never a silent `standard`.
pub fn parse_class(s: &str, col: usize) -> rusqlite::Result<QueueClass> {
    Ok(match s {
        "standard" => QueueClass::Standard,
        "priority" => QueueClass::Priority,
        "fastest" => QueueClass::Fastest,
        "instant" => QueueClass::Instant,
        other => {
            return Err(rusqlite::Error::FromSqlConversionFailure(
                col,
                rusqlite::types::Type::Text,
                format!("unknown queue class {other:?} (expected standard, priority, fastest or instant)").into(),
            ));
        }
    })
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: String,
    pub seq: i64,
    pub user_id: UserId,
    pub model: String,
    pub spec: JobSpec,
    /// The seed of the first image (image i uses seed + i).
    pub seed: u64,
    pub queue: QueueClass,
    #[serde(skip)]
    pub hold_id: HoldId,
    /// Credits held at submission (captured on success, released otherwise).
    pub price: i64,
    pub status: JobStatus,
    /// The order in which jobs started (1 = the first job this database ever ran).
    pub start_order: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// The internal cause of a failure (paths, engine messages): for admins only.
    #[serde(skip)]
    pub error_detail: Option<String>,
    /// Gallery ids of the job's images (filled in on success).
    pub images: Vec<String>,
    pub kind: JobKind,
    /// A training job's settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingSpec>,
    /// A training job that succeeded: the name of the LoRA it added to the owner's library.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,
}

const JOB_COLS: &str = "id, seq, user_id, model, spec, seed, queue_class, hold_id, price, status, created_at, started_at, finished_at, error, start_seq, error_detail, kind, training, result";

fn ts(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(v, 0).unwrap_or_default()
}

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<Job> {
    let spec: String = r.get(4)?;
    let status: String = r.get(9)?;
    Ok(Job {
        id: r.get(0)?,
        seq: r.get(1)?,
        user_id: r.get(2)?,
        model: r.get(3)?,
        spec: serde_json::from_str(&spec)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e)))?,
        seed: r.get::<_, i64>(5)? as u64,
        queue: parse_class(&r.get::<_, String>(6)?, 6)?,
        hold_id: r.get(7)?,
        price: r.get(8)?,
        status: JobStatus::parse(&status).unwrap_or(JobStatus::Failed),
        created_at: ts(r.get(10)?),
        started_at: r.get::<_, Option<i64>>(11)?.map(ts),
        finished_at: r.get::<_, Option<i64>>(12)?.map(ts),
        error: r.get(13)?,
        start_order: r.get(14)?,
        error_detail: r.get(15)?,
        images: Vec::new(),
        kind: if r.get::<_, String>(16)? == "training" { JobKind::Training } else { JobKind::Image },
        training: match r.get::<_, Option<String>>(17)? {
            Some(t) => Some(serde_json::from_str(&t).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(17, rusqlite::types::Type::Text, Box::new(e))
            })?),
            None => None,
        },
        lora: r.get(18)?,
    })
}

/// A job about to be queued.
pub struct NewJob<'a> {
    pub id: &'a str,
    pub user_id: UserId,
    pub spec: &'a JobSpec,
    pub seed: u64,
    pub queue: QueueClass,
    pub hold_id: HoldId,
    pub price: i64,
    pub idempotency_key: &'a str,
    pub now: i64,
    /// A training job's settings (None: an image job).
    pub training: Option<&'a TrainingSpec>,
}

pub fn insert_job(conn: &Connection, j: &NewJob<'_>) -> rusqlite::Result<()> {
    let (kind, training) = match j.training {
        Some(t) => ("training", Some(serde_json::to_string(t).expect("a TrainingSpec serializes"))),
        None => ("image", None),
    };
    conn.execute(
        "INSERT INTO jobs (id, user_id, model, spec, seed, queue_class, hold_id, price, idempotency_key, status, created_at, kind, training)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'queued', ?10, ?11, ?12)",
        params![
            j.id,
            j.user_id,
            j.spec.model,
            serde_json::to_string(j.spec).expect("a JobSpec serializes"),
            j.seed as i64,
            j.queue.to_string(),
            j.hold_id,
            j.price,
            j.idempotency_key,
            j.now,
            kind,
            training
        ],
    )?;
    Ok(())
}

fn with_images(conn: &Connection, mut job: Job) -> rusqlite::Result<Job> {
    let mut st = conn.prepare_cached("SELECT id FROM images WHERE job_id = ?1 ORDER BY idx")?;
    job.images = st.query_map(params![job.id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
    Ok(job)
}

pub fn get_job(conn: &Connection, id: &str) -> rusqlite::Result<Option<Job>> {
    let job =
        conn.query_row(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"), params![id], job_from_row).optional()?;
    job.map(|j| with_images(conn, j)).transpose()
}

/// Jobs newest first: one user's (or everyone's), optionally only some statuses.
pub fn list_jobs(
    conn: &Connection,
    user: Option<UserId>,
    statuses: &[JobStatus],
    limit: u32,
) -> rusqlite::Result<Vec<Job>> {
    let filter = if statuses.is_empty() {
        String::new()
    } else {
        format!(
            " AND status IN ({})",
            statuses.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(",")
        )
    };
    list_where(conn, user, &filter, limit)
}

/// The training jobs of `user`, newest first (however many image jobs came after them).
pub fn list_trainings(conn: &Connection, user: UserId, limit: u32) -> rusqlite::Result<Vec<Job>> {
    list_where(conn, Some(user), " AND kind = 'training'", limit)
}

fn list_where(conn: &Connection, user: Option<UserId>, filter: &str, limit: u32) -> rusqlite::Result<Vec<Job>> {
    let mut st = conn.prepare(&format!(
        "SELECT {JOB_COLS} FROM jobs WHERE (?1 IS NULL OR user_id = ?1){filter} ORDER BY seq DESC LIMIT ?2"
    ))?;
    let jobs: Vec<Job> = st.query_map(params![user, limit], job_from_row)?.collect::<rusqlite::Result<_>>()?;
    jobs.into_iter().map(|j| with_images(conn, j)).collect()
}

/// A queued job as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub job_id: String,
    pub user_id: UserId,
    pub queue: QueueClass,
    pub seq: i64,
    /// The `start_seq` of this user's most recently started job (None: never started one).
    pub user_last_start: Option<i64>,
    pub kind: JobKind,
}

pub fn waiting(conn: &Connection) -> rusqlite::Result<Vec<Waiting>> {
    let mut st = conn.prepare_cached(
        "SELECT j.id, j.user_id, j.queue_class, j.seq,
                (SELECT MAX(start_seq) FROM jobs s WHERE s.user_id = j.user_id), j.kind
         FROM jobs j WHERE j.status = 'queued' ORDER BY j.seq",
    )?;
    st.query_map([], |r| {
        Ok(Waiting {
            job_id: r.get(0)?,
            user_id: r.get(1)?,
            queue: parse_class(&r.get::<_, String>(2)?, 2)?,
            seq: r.get(3)?,
            user_last_start: r.get(4)?,
            kind: if r.get::<_, String>(5)? == "training" { JobKind::Training } else { JobKind::Image },
        })
    })?
    .collect()
}

pub fn count_queued(conn: &Connection, user: UserId) -> rusqlite::Result<u32> {
    conn.query_row("SELECT COUNT(*) FROM jobs WHERE user_id = ?1 AND status = 'queued'", params![user], |r| r.get(0))
}

pub fn count_by_status(conn: &Connection) -> rusqlite::Result<Vec<(JobStatus, i64)>> {
    let mut st = conn.prepare_cached("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out: Vec<(JobStatus, i64)> = JobStatus::ALL.iter().map(|s| (*s, 0)).collect();
    for row in rows {
        let (s, n) = row?;
        if let Some(slot) = out.iter_mut().find(|(st, _)| st.as_str() == s) {
            slot.1 = n;
        }
    }
    Ok(out)
}

/// Marks a queued job running; false when it is no longer queued (canceled meanwhile).
pub fn mark_running(conn: &Connection, id: &str, now: i64) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE jobs SET status = 'running', started_at = ?2,
                start_seq = (SELECT COALESCE(MAX(start_seq), 0) + 1 FROM jobs)
         WHERE id = ?1 AND status = 'queued'",
        params![id, now],
    )?;
    Ok(n == 1)
}

/// Moves a job from one of `from` to a final status; false when it was in none of them.
pub fn finish(
    conn: &Connection,
    id: &str,
    from: &[JobStatus],
    to: JobStatus,
    error: Option<&str>,
    now: i64,
) -> rusqlite::Result<bool> {
    let from = from.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(",");
    let n = conn.execute(
        &format!("UPDATE jobs SET status = ?2, error = ?3, finished_at = ?4 WHERE id = ?1 AND status IN ({from})"),
        params![id, to.as_str(), error, now],
    )?;
    Ok(n == 1)
}

/// Puts a running job back in the queue (a training paused by a shutdown or found with a
/// checkpoint after a crash); false when it was not running.
pub fn requeue(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    Ok(conn.execute("UPDATE jobs SET status = 'queued' WHERE id = ?1 AND status = 'running'", params![id])? == 1)
}

/// Marks a running training succeeded with the LoRA it made; false when it was not running
/// (canceled meanwhile).
pub fn complete_training(conn: &Connection, id: &str, lora: &str, now: i64) -> rusqlite::Result<bool> {
    let n = conn.execute(
        "UPDATE jobs SET status = 'succeeded', finished_at = ?2, result = ?3 WHERE id = ?1 AND status = 'running'",
        params![id, now, lora],
    )?;
    Ok(n == 1)
}

/// Records the internal cause of a job's failure (for admins).
pub fn set_error_detail(conn: &Connection, id: &str, detail: &str) -> rusqlite::Result<()> {
    conn.execute("UPDATE jobs SET error_detail = ?2 WHERE id = ?1", params![id, detail])?;
    Ok(())
}

/// One generated image's metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageMeta {
    pub id: String,
    pub user_id: UserId,
    pub job_id: String,
    pub index: u32,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub model: String,
    pub prompt: String,
    pub steps: u32,
    pub guidance: Option<f64>,
    pub parameters: String,
    pub created_at: DateTime<Utc>,
}

const IMAGE_COLS: &str =
    "id, user_id, job_id, idx, width, height, seed, model, prompt, steps, guidance, parameters, created_at";

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<ImageMeta> {
    Ok(ImageMeta {
        id: r.get(0)?,
        user_id: r.get(1)?,
        job_id: r.get(2)?,
        index: r.get(3)?,
        width: r.get(4)?,
        height: r.get(5)?,
        seed: r.get::<_, i64>(6)? as u64,
        model: r.get(7)?,
        prompt: r.get(8)?,
        steps: r.get(9)?,
        guidance: r.get(10)?,
        parameters: r.get(11)?,
        created_at: ts(r.get(12)?),
    })
}

/// Records a finished job's images and marks it succeeded, in one transaction: a job is
/// never `succeeded` without its images, nor are images listed for a job that is not.
pub fn complete_job(conn: &Connection, job_id: &str, images: &[ImageMeta], now: i64) -> rusqlite::Result<bool> {
    let tx = conn.unchecked_transaction()?;
    for m in images {
        tx.execute(
            &format!(
                "INSERT INTO images ({IMAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ),
            params![
                m.id,
                m.user_id,
                m.job_id,
                m.index,
                m.width,
                m.height,
                m.seed as i64,
                m.model,
                m.prompt,
                m.steps,
                m.guidance,
                m.parameters,
                m.created_at.timestamp()
            ],
        )?;
    }
    let n = tx.execute(
        "UPDATE jobs SET status = 'succeeded', finished_at = ?2 WHERE id = ?1 AND status = 'running'",
        params![job_id, now],
    )?;
    if n != 1 {
        // Canceled meanwhile: keep neither.
        return Ok(false);
    }
    tx.commit()?;
    Ok(true)
}

pub fn get_image(conn: &Connection, id: &str) -> rusqlite::Result<Option<ImageMeta>> {
    conn.query_row(&format!("SELECT {IMAGE_COLS} FROM images WHERE id = ?1"), params![id], image_from_row).optional()
}

/// One page of a user's images, newest first, and the user's total.
pub fn list_images(
    conn: &Connection,
    user: UserId,
    offset: u32,
    limit: u32,
) -> rusqlite::Result<(Vec<ImageMeta>, u32)> {
    let total = conn.query_row("SELECT COUNT(*) FROM images WHERE user_id = ?1", params![user], |r| r.get(0))?;
    let mut st = conn.prepare_cached(&format!(
        "SELECT {IMAGE_COLS} FROM images WHERE user_id = ?1
         ORDER BY (SELECT seq FROM jobs WHERE jobs.id = images.job_id) DESC, idx LIMIT ?2 OFFSET ?3"
    ))?;
    let page = st.query_map(params![user, limit, offset], image_from_row)?.collect::<rusqlite::Result<_>>()?;
    Ok((page, total))
}

pub fn delete_image(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    Ok(conn.execute("DELETE FROM images WHERE id = ?1", params![id])? == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_queue_class_is_an_error_not_standard() {
        for c in [QueueClass::Standard, QueueClass::Priority, QueueClass::Fastest, QueueClass::Instant] {
            assert_eq!(parse_class(&c.to_string(), 6).unwrap(), c);
        }
        let e = parse_class("express", 6).unwrap_err().to_string();
        assert!(e.contains("unknown queue class \"express\""), "{e}");
    }
}
