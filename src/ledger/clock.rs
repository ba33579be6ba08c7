//! The ledger's only source of time. Production uses [`SystemClock`]; tests use [`TestClock`]
//! and move it by hand. Every write transaction reads the clock once, after it holds the write
//! lock, so the time stored with a change is the time the change happened.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, TimeZone, Utc};

/// Where the ledger gets "now" from.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// Wall-clock time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct TestClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl TestClock {
    pub fn new(start: DateTime<Utc>) -> TestClock {
        TestClock { now: Arc::new(Mutex::new(start)) }
    }

    /// A clock at a unix time in seconds (handy in tests).
    pub fn at_unix(secs: i64) -> TestClock {
        TestClock::new(Utc.timestamp_opt(secs, 0).single().unwrap_or_default())
    }

    pub fn set(&self, t: DateTime<Utc>) {
        *self.lock() = t;
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.lock();
        *now += by;
    }

    pub fn advance_secs(&self, secs: i64) {
        self.advance(Duration::seconds(secs));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DateTime<Utc>> {
        // A poisoned lock still holds a valid time: keep using it.
        self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.lock()
    }
}

/// Seconds since the epoch, the unit the database stores.
pub(crate) fn unix(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

/// Back from stored seconds to a time.
pub(crate) fn from_unix(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}
