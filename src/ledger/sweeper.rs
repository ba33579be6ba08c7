//! The sweeper: catches up renewals, releases stale holds and writes off expired grants. The
//! server runs [`Ledger::sweep`] at start-up and then every `metering.sweep_interval_secs`
//! ([`Sweeper::spawn`] does that on a thread of its own connection).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ledger::{Clock, Ledger, LedgerError, PlansConfig, credits};

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    pub renewals: usize,
    pub holds_released: usize,
    pub grants_expired: usize,
}

impl Ledger {
    /// One sweep: renewals due, holds older than `hold_max_age_secs`, grants past expiry.
    pub fn sweep(&mut self) -> Result<SweepReport, LedgerError> {
        // Each part runs even if an earlier one failed; the first error is returned.
        let renewals = self.catch_up();
        let holds_released = self.write(credits::release_stale);
        let grants_expired = self.write(|t| credits::expire_due(t, None));
        Ok(SweepReport { renewals: renewals?, holds_released: holds_released?, grants_expired: grants_expired? })
    }
}

/// A background thread that sweeps every `metering.sweep_interval_secs` until stopped.
pub struct Sweeper {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Sweeper {
    /// Opens its own connection to `db_path` and sweeps at once, then periodically. Errors
    /// are handed to `on_error` (e.g. a logger) and the loop goes on.
    pub fn spawn(
        db_path: PathBuf,
        cfg: Arc<PlansConfig>,
        clock: Arc<dyn Clock>,
        on_error: impl Fn(&LedgerError) + Send + 'static,
    ) -> Result<Sweeper, LedgerError> {
        let mut ledger = Ledger::open(&db_path, cfg.clone(), clock)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let every = Duration::from_secs(cfg.metering.sweep_interval_secs);
        let handle = std::thread::Builder::new()
            .name("ledger-sweeper".into())
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    if let Err(e) = ledger.sweep() {
                        on_error(&e);
                    }
                    let until = Instant::now() + every;
                    while !stop2.load(Ordering::Relaxed) && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(100).min(every));
                    }
                }
            })
            .map_err(|e| LedgerError::Io { context: "starting the sweeper thread".into(), source: e })?;
        Ok(Sweeper { stop, handle: Some(handle) })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.shutdown();
    }
}
