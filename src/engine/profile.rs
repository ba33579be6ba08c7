//! Where a forward pass spends its time, by operation (`atelier bench --profile`): wall-clock
//! spans around the model's own calls, summed per label. Off unless enabled, when a span costs
//! one atomic load. Meaningful on the CPU backend, whose operations run when called; a GPU
//! backend queues work, so its spans time the queueing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<Total>> = Mutex::new(Vec::new());

/// The time spent under one label.
#[derive(Debug, Clone, PartialEq)]
pub struct Total {
    pub label: &'static str,
    pub seconds: f64,
    pub calls: u64,
}

/// Starts (or stops) recording spans, clearing what was recorded.
pub fn enable(on: bool) {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ENABLED.store(on, Ordering::Relaxed);
}

/// Runs `f`, adding its wall-clock time to `label` while recording. Spans must not nest
/// (the totals are meant to add up to the time of the pass).
pub fn span<T>(label: &'static str, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let t = Instant::now();
    let out = f();
    let seconds = t.elapsed().as_secs_f64();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    match totals.iter_mut().find(|x| x.label == label) {
        Some(x) => {
            x.seconds += seconds;
            x.calls += 1;
        }
        None => totals.push(Total { label, seconds, calls: 1 }),
    }
    out
}

/// What was recorded since [`enable`], largest first.
pub fn totals() -> Vec<Total> {
    let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    t.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    t
}
