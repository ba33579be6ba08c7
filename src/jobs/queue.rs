//! Which queued job runs next.
//!
//! 1. Between queue classes, weighted fair queueing: while several classes wait, each starts
//!    jobs in proportion to its weight (instant 8 : fastest 4 : priority 2 : standard 1 by
//!    default), so a higher class goes first most of the time and no class starves. A class
//!    that was idle does not bank credit for when it comes back.
//! 2. Within a class, users take turns: the user whose last job started longest ago (or who
//!    never had one) goes first.
//! 3. Then first come, first served.

use crate::config::QueueWeights;
use crate::jobs::store::Waiting;
use crate::ledger::QueueClass;

const CLASSES: [QueueClass; 4] = [QueueClass::Standard, QueueClass::Priority, QueueClass::Fastest, QueueClass::Instant];

fn slot(c: QueueClass) -> usize {
    CLASSES.iter().position(|x| *x == c).expect("every class is listed")
}

/// The scheduler's memory between picks: each class's virtual finish time.
#[derive(Debug, Clone)]
pub struct Scheduler {
    weights: [f64; 4],
    finish: [f64; 4],
    /// Virtual time: the latest start tag of a job picked.
    now: f64,
    /// Classes that still had jobs waiting after the last pick. A class that did not is idle
    /// and starts again from `now` (it banks no credit for the time it was away).
    backlogged: [bool; 4],
}

impl Scheduler {
    pub fn new(weights: &QueueWeights) -> Scheduler {
        Scheduler {
            weights: CLASSES.map(|c| weights.of(c).max(1) as f64),
            finish: [0.0; 4],
            now: 0.0,
            backlogged: [false; 4],
        }
    }

    /// The index in `waiting` of the job to start next (and the scheduler advances), or None.
    pub fn pick(&mut self, waiting: &[Waiting]) -> Option<usize> {
        let mut best: Option<(f64, usize)> = None;
        // Higher classes first, so that on equal finish tags the higher class wins.
        for c in CLASSES.iter().rev() {
            let s = slot(*c);
            if !waiting.iter().any(|w| w.queue == *c) {
                continue;
            }
            let start = if self.backlogged[s] { self.finish[s] } else { self.finish[s].max(self.now) };
            let tag = start + 1.0 / self.weights[s];
            if best.is_none_or(|(b, _)| tag < b - 1e-12) {
                best = Some((tag, s));
            }
        }
        let (tag, s) = best?;
        self.now = self.now.max(tag - 1.0 / self.weights[s]);
        self.finish[s] = tag;
        let class = CLASSES[s];
        // Within the class: the user served least recently, then the oldest job.
        let picked = waiting
            .iter()
            .enumerate()
            .filter(|(_, w)| w.queue == class)
            .min_by_key(|(_, w)| (w.user_last_start.unwrap_or(i64::MIN), w.seq))
            .map(|(i, _)| i)?;
        for c in CLASSES {
            self.backlogged[slot(c)] = waiting.iter().enumerate().any(|(i, w)| i != picked && w.queue == c);
        }
        Some(picked)
    }

    /// The order in which `waiting` would start if nothing else arrived: job ids, first first.
    /// Used for queue positions; it does not advance this scheduler.
    pub fn order(&self, waiting: &[Waiting]) -> Vec<String> {
        let mut sim = self.clone();
        let mut left = waiting.to_vec();
        let mut out = Vec::with_capacity(left.len());
        let mut next_start = left.iter().filter_map(|w| w.user_last_start).max().unwrap_or(0) + 1;
        while let Some(i) = sim.pick(&left) {
            let w = left.remove(i);
            for other in left.iter_mut().filter(|o| o.user_id == w.user_id) {
                other.user_last_start = Some(next_start);
            }
            next_start += 1;
            out.push(w.job_id);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str, user: i64, queue: QueueClass, seq: i64) -> Waiting {
        Waiting {
            job_id: id.into(),
            user_id: user,
            queue,
            seq,
            user_last_start: None,
            kind: crate::jobs::store::JobKind::Image,
        }
    }

    #[test]
    fn a_single_class_is_fair_between_users_then_fifo() {
        let s = Scheduler::new(&QueueWeights::default());
        let q = vec![
            w("a1", 1, QueueClass::Standard, 1),
            w("a2", 1, QueueClass::Standard, 2),
            w("a3", 1, QueueClass::Standard, 3),
            w("b1", 2, QueueClass::Standard, 4),
            w("c1", 3, QueueClass::Standard, 5),
            w("b2", 2, QueueClass::Standard, 6),
        ];
        assert_eq!(s.order(&q), ["a1", "b1", "c1", "a2", "b2", "a3"]);
    }

    #[test]
    fn classes_share_by_weight_and_none_starves() {
        let s = Scheduler::new(&QueueWeights::default());
        let mut q = Vec::new();
        for (i, c) in CLASSES.iter().enumerate() {
            for k in 0..16 {
                q.push(w(&format!("{c}{k}"), i as i64, *c, (i * 100 + k) as i64));
            }
        }
        let order = s.order(&q);
        // In the first 15 starts: 8 instant, 4 fastest, 2 priority, 1 standard.
        let first: Vec<&String> = order.iter().take(15).collect();
        let count = |p: &str| first.iter().filter(|id| id.starts_with(p)).count();
        assert_eq!((count("instant"), count("fastest"), count("priority"), count("standard")), (8, 4, 2, 1));
        assert_eq!(order[0], "instant0");
    }

    #[test]
    fn an_idle_class_banks_no_credit() {
        let mut s = Scheduler::new(&QueueWeights::default());
        // Standard runs alone for a while...
        let alone: Vec<Waiting> = (0..10).map(|k| w(&format!("s{k}"), 1, QueueClass::Standard, k)).collect();
        for _ in 0..5 {
            s.pick(&alone);
        }
        // ...then an instant job arrives: it goes first, not after standard's 5 "credits".
        let mut q = alone[5..].to_vec();
        q.push(w("i0", 2, QueueClass::Instant, 100));
        let first = s.pick(&q).unwrap();
        assert_eq!(q[first].job_id, "i0");
    }

    #[test]
    fn a_user_served_recently_waits_for_others() {
        let mut s = Scheduler::new(&QueueWeights::default());
        let mut a = w("a9", 1, QueueClass::Priority, 1);
        a.user_last_start = Some(7);
        let mut b = w("b9", 2, QueueClass::Priority, 2);
        b.user_last_start = Some(3);
        let q = vec![a, b];
        assert_eq!(q[s.pick(&q).unwrap()].job_id, "b9");
    }
}
