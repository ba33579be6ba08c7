//! Ending a job that did not succeed, the same way for image and training jobs: status, hold
//! released, event; an internal failure told plainly to the user, with the cause for admins.

use crate::jobs::progress::JobEvent;
use crate::jobs::store::{self, Job, JobStatus};
use crate::jobs::{Conn, Jobs};

/// Ends a job that did not succeed: status, hold released, event.
pub fn end_without_images(
    jobs: &Jobs,
    db: &mut Conn,
    job: &Job,
    status: JobStatus,
    error: Option<String>,
) -> anyhow::Result<()> {
    if !store::finish(&db.app, &job.id, &[JobStatus::Running], status, error.as_deref(), db.now())? {
        // It ended otherwise meanwhile (succeeded, canceled): its hold is settled by that path,
        // or, if that path was cut short, by the start-up reconciliation from the job's status.
        log::warn!("job {} was no longer running; its hold is left to the job's own outcome", job.id);
        return Ok(());
    }
    db.ledger.release(job.hold_id)?;
    let event = match (status, error) {
        (JobStatus::Canceled, _) => JobEvent::Canceled,
        (_, e) => JobEvent::Failed { error: e.unwrap_or_else(|| "failed".into()) },
    };
    jobs.hub.publish(&job.id, job.user_id, event);
    Ok(())
}

/// Fails a job for a reason inside the server: users are told plainly (no server paths or
/// engine messages), the log and the admin view keep the cause.
pub fn fail_internal(jobs: &Jobs, db: &mut Conn, job: &Job, detail: String) -> anyhow::Result<()> {
    log::error!("job {} failed: {detail}", job.id);
    if let Err(e) = store::set_error_detail(&db.app, &job.id, &detail) {
        log::warn!("job {}: recording the failure's cause: {e}", job.id);
    }
    let what = if job.kind == store::JobKind::Training { "training" } else { "generation" };
    let message = format!("the {what} failed on the server (job {}); an admin can see why", job.id);
    end_without_images(jobs, db, job, JobStatus::Failed, Some(message))
}
