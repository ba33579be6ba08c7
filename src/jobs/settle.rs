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
    store::finish(&db.app, &job.id, &[JobStatus::Running], status, error.as_deref(), db.now())?;
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
    let message = format!("the generation failed on the server (job {}); an admin can see why", job.id);
    end_without_images(jobs, db, job, JobStatus::Failed, Some(message))
}
