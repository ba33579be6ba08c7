//! What every handler shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::web;

use crate::config::Config;
use crate::jobs::Jobs;
use crate::jobs::{Conn, Pool};
use crate::server::error::ApiError;

pub struct AppState {
    pub pool: Arc<Pool>,
    pub jobs: Arc<Jobs>,
    pub config: Arc<Config>,
    pub limiter: LoginLimiter,
    /// The compute device, in words (for the admin page and /healthz).
    pub device: String,
    /// The compute dtype of transformer and VAE (`f32`, `f16`, `bf16`), for the admin page.
    pub dtype: String,
    /// Where clients reach the server, for links: `[server] public_url`, else the bound
    /// address when it is a specific one; `None` (links stay relative) until the server is
    /// bound or when it listens on an unspecified address.
    pub public_url: std::sync::OnceLock<Option<String>>,
    /// Bumped whenever a session or key ends or an account is disabled, so open event
    /// streams check at once that their credential still holds.
    pub credentials: tokio::sync::watch::Sender<u64>,
}

impl AppState {
    /// Tells open event streams to check their credentials again.
    pub fn credentials_changed(&self) {
        self.credentials.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether the request came through one of `[server] trusted_proxies`, whose forwarded
    /// headers (client address, scheme) may then be believed.
    pub fn via_trusted_proxy(&self, req: &actix_web::HttpRequest) -> bool {
        req.peer_addr().is_some_and(|a| self.config.server.trusted_proxies.contains(&a.ip()))
    }

    /// The client's address: the peer's, or what a trusted proxy says it is.
    pub fn client_ip(&self, req: &actix_web::HttpRequest) -> String {
        let peer = req.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
        if !self.via_trusted_proxy(req) {
            return peer;
        }
        let info = req.connection_info();
        // realip_remote_addr may carry a port ("1.2.3.4:5678"); the address is what counts.
        info.realip_remote_addr()
            .map(|a| a.parse::<std::net::SocketAddr>().map(|s| s.ip().to_string()).unwrap_or_else(|_| a.to_string()))
            .unwrap_or(peer)
    }

    /// The scheme the client used: the binary speaks plain HTTP, so "https" only when a
    /// trusted proxy says so.
    pub fn client_scheme(&self, req: &actix_web::HttpRequest) -> String {
        if self.via_trusted_proxy(req) { req.connection_info().scheme().to_string() } else { "http".into() }
    }

    /// Runs `f` with a database connection on a blocking thread.
    pub async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let pool = self.pool.clone();
        web::block(move || pool.with(f)).await.map_err(ApiError::internal)?.map_err(ApiError::from)?
    }
}

/// Failed logins, counted per (account, client address) so that guesses from one place can
/// neither lock an account for everyone else nor lock a whole office behind one address out
/// of other accounts. Past `max` failures in the window each further failure doubles the wait
/// (5 s, 10 s, 20 s, … up to the window), so nobody is ever locked out for good. One address
/// guessing across many accounts is slowed the same way past `max` × 20 failures.
pub struct LoginLimiter {
    max: u32,
    window: Duration,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

/// What is counted for one login attempt.
pub struct Attempt {
    pair: String,
    address: String,
    /// For the log.
    account: String,
    ip: String,
}

impl Attempt {
    pub fn new(account: &str, ip: &str) -> Attempt {
        Attempt {
            pair: format!("{account}\u{0}{ip}"),
            address: format!("ip:{ip}"),
            account: account.to_string(),
            ip: ip.to_string(),
        }
    }
}

impl LoginLimiter {
    pub fn new(max: u32, window: Duration) -> LoginLimiter {
        LoginLimiter { max, window, failures: Mutex::new(HashMap::new()) }
    }

    /// How long `times` (failures, oldest first) make the next attempt wait, past `max`.
    fn wait(&self, times: &[Instant], max: u32, now: Instant) -> Option<Duration> {
        let over = (times.len() as u32).checked_sub(max)?;
        let delay = Duration::from_secs(5u64 << over.min(20)).min(self.window);
        let last = *times.last()?;
        delay.checked_sub(now.duration_since(last)).filter(|d| !d.is_zero())
    }

    fn limits<'a>(&self, a: &'a Attempt) -> [(&'a str, u32); 2] {
        [(&a.pair, self.max), (&a.address, self.max.saturating_mul(20))]
    }

    /// Seconds until this attempt may be made, or None when it may be now.
    pub fn blocked(&self, a: &Attempt) -> Option<u64> {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait: Option<Duration> = None;
        for (key, max) in self.limits(a) {
            if let Some(v) = f.get_mut(key) {
                v.retain(|t| now.duration_since(*t) < self.window);
                if let Some(w) = self.wait(v, max, now) {
                    wait = Some(wait.map_or(w, |x| x.max(w)));
                }
            }
        }
        wait.map(|w| w.as_secs_f64().ceil() as u64)
    }

    /// Counts a failed attempt (before the password is checked, so parallel guesses cannot
    /// slip past the limit; a success takes it back).
    pub fn fail(&self, a: &Attempt) {
        let now = Instant::now();
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() > 100_000 {
            // Bounded memory under a flood of made-up names: forget windows that ended.
            f.retain(|_, v| v.last().is_some_and(|t| now.duration_since(*t) < self.window));
        }
        for (key, max) in self.limits(a) {
            let v = f.entry(key.to_string()).or_default();
            v.push(now);
            if v.len() as u32 == max {
                log::warn!(
                    "login throttled after {max} failed attempts: account {:?} from {} (waits grow with each further failure)",
                    a.account,
                    a.ip
                );
            }
        }
    }

    /// Takes back the attempt `fail` counted (it succeeded) and forgets the pair's earlier
    /// failures.
    pub fn succeed(&self, a: &Attempt) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(&a.pair);
        if let Some(v) = f.get_mut(&a.address) {
            v.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_from_one_address_do_not_lock_the_account_elsewhere() {
        let l = LoginLimiter::new(5, Duration::from_secs(300));
        let attacker = Attempt::new("admin", "10.0.0.66");
        for _ in 0..5 {
            assert_eq!(l.blocked(&attacker), None);
            l.fail(&attacker);
        }
        assert_eq!(l.blocked(&attacker), Some(5), "the sixth try waits 5 s");
        l.fail(&attacker);
        assert_eq!(l.blocked(&attacker), Some(10), "then 10 s");
        // The owner, from their own desk, is not held up.
        assert_eq!(l.blocked(&Attempt::new("admin", "10.0.0.5")), None);
        // Nor is a colleague behind the same address logging in to another account.
        assert_eq!(l.blocked(&Attempt::new("bob", "10.0.0.66")), None);
    }

    #[test]
    fn waits_grow_but_stay_within_the_window() {
        let l = LoginLimiter::new(2, Duration::from_secs(10));
        let a = Attempt::new("x", "1.2.3.4");
        for _ in 0..40 {
            l.fail(&a);
        }
        let w = l.blocked(&a).unwrap();
        assert!((9..=10).contains(&w), "{w}");
    }

    #[test]
    fn one_address_guessing_many_accounts_is_slowed() {
        let l = LoginLimiter::new(5, Duration::from_secs(300));
        for i in 0..99 {
            l.fail(&Attempt::new(&format!("user{i}"), "10.9.9.9"));
        }
        assert_eq!(l.blocked(&Attempt::new("fresh", "10.9.9.9")), None, "99 failures are allowed");
        l.fail(&Attempt::new("user99", "10.9.9.9"));
        assert_eq!(l.blocked(&Attempt::new("fresh", "10.9.9.9")), Some(5));
        assert_eq!(l.blocked(&Attempt::new("fresh", "10.9.9.10")), None);
    }
}
