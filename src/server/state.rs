//! What every handler shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::web;

use crate::config::Config;
use crate::jobs::Jobs;
use crate::jobs::db::{Conn, Pool};
use crate::server::error::ApiError;

pub struct AppState {
    pub pool: Arc<Pool>,
    pub jobs: Arc<Jobs>,
    pub config: Arc<Config>,
    pub limiter: LoginLimiter,
    /// The compute device, in words (for the admin page and /healthz).
    pub device: String,
}

impl AppState {
    /// Runs `f` with a database connection on a blocking thread.
    pub async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let pool = self.pool.clone();
        web::block(move || pool.with(f)).await.map_err(ApiError::internal)?.map_err(ApiError::from)?
    }
}

/// Failed logins per account and per client address in a sliding window.
pub struct LoginLimiter {
    max: u32,
    window: Duration,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

impl LoginLimiter {
    pub fn new(max: u32, window: Duration) -> LoginLimiter {
        LoginLimiter { max, window, failures: Mutex::new(HashMap::new()) }
    }

    /// Seconds until `keys` may try again, or None when they may now.
    pub fn blocked(&self, keys: &[String]) -> Option<u64> {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = None;
        for k in keys {
            if let Some(v) = f.get_mut(k) {
                v.retain(|t| now.duration_since(*t) < self.window);
                // A whole studio may share one address (NAT, a proxy): allow it more.
                let max = if k.starts_with("ip:") { self.max * 4 } else { self.max };
                if v.len() as u32 >= max
                    && let Some(&oldest) = v.first()
                {
                    let secs = (self.window - now.duration_since(oldest)).as_secs() + 1;
                    wait = Some(wait.map_or(secs, |w: u64| w.max(secs)));
                }
            }
        }
        wait
    }

    pub fn fail(&self, keys: &[String]) {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() > 100_000 {
            // Bounded memory under a flood of made-up names: forget windows that ended.
            f.retain(|_, v| v.last().is_some_and(|t| now.duration_since(*t) < self.window));
        }
        for k in keys {
            f.entry(k.clone()).or_default().push(now);
        }
    }

    /// Takes back the attempt `fail` recorded for `keys` (it succeeded) and forgets the
    /// account's earlier failures.
    pub fn succeed(&self, keys: &[String]) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(account) = keys.first() {
            f.remove(account);
        }
        for k in &keys[1.min(keys.len())..] {
            if let Some(v) = f.get_mut(k) {
                v.pop();
            }
        }
    }
}
