//! Submitting a LoRA training job: checked (model, dataset, LoRA name, settings), the dataset
//! copied into the job's folder, then in one ledger transaction the per-user queue limit, the
//! plan's training checks and the allowance hold, and the job row: all or nothing, with
//! Idempotency-Key replays as image jobs have.

use std::path::Path;

use anyhow::Context;

use crate::jobs::store::{self, JobSpec, NewJob};
use crate::jobs::training_spec::TrainingOrder;
use crate::jobs::{Conn, Jobs, SubmitError, Submitted, validate_idempotency_key};
use crate::ledger::{JobAuthorization, TrainingRequest, UserId};
use crate::loras::Library;

/// The files a training reads from a dataset's `images/`.
fn is_training_file(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg" | "webp" | "txt"))
}

/// Copies the dataset's images and captions into `dest` (created).
fn snapshot(src: &Path, dest: &Path) -> anyhow::Result<()> {
    crate::private_files::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let p = e?.path();
        if p.is_file() && is_training_file(&p) {
            let name = p.file_name().expect("a file has a name");
            std::fs::copy(&p, dest.join(name)).with_context(|| format!("copying {}", p.display()))?;
        }
    }
    Ok(())
}

impl Jobs {
    /// Submits a LoRA training for `user`. The same `idempotency_key` with the same order
    /// returns the job made the first time (and holds nothing more).
    pub fn submit_training(
        &self,
        db: &mut Conn,
        user: UserId,
        order: TrainingOrder,
        idempotency_key: Option<String>,
    ) -> Result<Submitted, SubmitError> {
        let model = self.models.get(&order.model).ok_or_else(|| SubmitError::UnknownModel(order.model.clone()))?;
        if let crate::models::ModelState::Missing { reason } = &model.state {
            return Err(SubmitError::ModelUnavailable { id: order.model.clone(), reason: reason.clone() });
        }
        // Only the owner trains on a dataset (an admin's own training, too).
        let dataset = self.datasets.get(user, false, &order.dataset)?;
        Library::check_name(&order.name)?;
        if let Some(key) = &idempotency_key {
            validate_idempotency_key(key)?;
        }
        let images = self.datasets.image_count(&dataset.id)?;
        let seed = order.seed.unwrap_or_else(|| crate::secret::random_u32() as u64);
        let spec = order.resolve(&self.training, &dataset.trigger, images, seed).map_err(SubmitError::Invalid)?;
        let request_hash = {
            use sha2::Digest;
            let json = serde_json::to_string(&order).expect("an order serializes");
            format!("{:x}", sha2::Sha256::digest(json.as_bytes()))
        };
        let job_id = crate::secret::random_hex(16);
        let key = idempotency_key.unwrap_or_else(|| job_id.clone());
        let request = TrainingRequest {
            job_id: job_id.clone(),
            idempotency_key: key.clone(),
            images,
            custom: order.custom(),
            request_hash: Some(request_hash),
        };
        // Copied first (no lock held while files are copied); removed again unless the job
        // is made.
        let dir = self.training_dir(&job_id);
        if images > 0 {
            let src = self.datasets.images_dir(&dataset.id)?;
            if let Err(e) = snapshot(&src, &dir.join("images")) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(SubmitError::Internal(e));
            }
            // An upload or a delete that landed between the count and the copy: the plan was
            // checked on the count, so the copy must be what was counted.
            let copied = crate::datasets::count_images(&dir.join("images")).unwrap_or(0);
            if copied != images {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(SubmitError::Invalid(format!(
                    "the dataset changed while this training was submitted ({images} images, then {copied}); submit it again"
                )));
            }
        }
        let job_spec = JobSpec {
            model: order.model.clone(),
            prompt: format!("LoRA training: {}", spec.name),
            width: spec.resolution as u32,
            height: spec.resolution as u32,
            steps: Some(spec.steps as u32),
            seed: Some(seed),
            guidance: None,
            batch: 1,
            loras: Vec::new(),
        };
        let now = db.now();
        let max = self.queue.max_queued_per_user;
        let submitted = db.ledger.authorize_training_with(
            user,
            &request,
            |tx| {
                // A new request (a replay returns its job even once the name is taken by it).
                self.loras.check_available(user, &order.name)?;
                if store::count_queued(tx, user)? >= max {
                    return Err(SubmitError::QueueFull { max });
                }
                Ok(())
            },
            |tx, auth| {
                let new = |auth: &JobAuthorization| NewJob {
                    id: &job_id,
                    user_id: user,
                    spec: &job_spec,
                    seed,
                    queue: auth.queue,
                    hold_id: auth.hold.id,
                    price: auth.hold.amount,
                    idempotency_key: &key,
                    now,
                    training: Some(&spec),
                };
                super::replay_or_insert(tx, auth, &key, new)
            },
        );
        match &submitted {
            Ok(s) if !s.replayed => {
                self.publish_positions(db);
                self.wake();
            }
            _ => {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        submitted
    }
}
