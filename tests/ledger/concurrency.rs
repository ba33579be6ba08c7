//! 16 threads × 1,000 operations on one user, each thread through its own connection: no
//! negative balance at any read, no lost or doubled hold, the invariant exact at the end.
use atelier::ledger;

use std::sync::{Arc, Barrier};
use std::time::Instant;

use chrono::{TimeZone, Utc};
use ledger::{
    GrantRequest, GrantSource, HoldRequest, HoldStatus, Ledger, LedgerError, PlansConfig, Refusal, Resource, TestClock,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const THREADS: usize = 16;
const OPS: usize = 1_000;
const GRANTED: i64 = 8_000;

#[derive(Default, Debug)]
struct Tally {
    placed: i64,
    replays: i64,
    captured: i64,
    refused: i64,
    reads: i64,
}

#[test]
fn sixteen_connections_hammer_one_user() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock::new(Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap()));
    let cfg = Arc::new(PlansConfig::defaults());
    let mut l = Ledger::open_data_dir(dir.path(), cfg.clone(), clock.clone()).unwrap();
    let u = l.add_user("hot", false, None).unwrap().id;
    l.grant(u, &GrantRequest::credits(GRANTED, GrantSource::TopUp, None)).unwrap();
    let barrier = Arc::new(Barrier::new(THREADS));
    let started = Instant::now();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let path = l.path().to_path_buf();
            let (cfg, clock, barrier) = (cfg.clone(), clock.clone(), barrier.clone());
            std::thread::spawn(move || -> Tally {
                let mut l = Ledger::open(&path, cfg, clock).unwrap();
                let mut rng = StdRng::seed_from_u64(t as u64);
                let mut tally = Tally::default();
                let mut open: Vec<(i64, i64, String)> = Vec::new(); // (hold id, amount, key)
                barrier.wait();
                for i in 0..OPS {
                    let roll = rng.random_range(0..100);
                    if open.is_empty() || roll < 40 {
                        let amount = rng.random_range(1..=6);
                        let key = format!("t{t}-{i}");
                        match l.place_hold(&HoldRequest::credits(u, &key, &key, amount)) {
                            Ok(out) => {
                                assert!(!out.replayed);
                                tally.placed += 1;
                                open.push((out.hold.id, amount, key));
                            }
                            Err(LedgerError::Refused(Refusal::OutOfCredits { available, .. })) => {
                                assert!((0..amount).contains(&available), "refused with {available} available");
                                tally.refused += 1;
                            }
                            Err(e) => panic!("place: {e}"),
                        }
                    } else if roll < 50 {
                        // A client retry of a hold this thread placed: same hold, no charge.
                        let (id, amount, key) = open[rng.random_range(0..open.len())].clone();
                        let out = l.place_hold(&HoldRequest::credits(u, &key, &key, amount)).unwrap();
                        assert!(out.replayed && out.hold.id == id);
                        tally.replays += 1;
                    } else if roll < 80 {
                        let (id, amount, _) = open.swap_remove(rng.random_range(0..open.len()));
                        let part = rng.random_range(0..=amount);
                        let out = l.capture(id, Some(part)).unwrap();
                        assert_eq!(
                            (out.hold.status, out.hold.captured, out.replayed),
                            (HoldStatus::Captured, part, false)
                        );
                        tally.captured += part;
                    } else if roll < 92 {
                        let (id, _, _) = open.swap_remove(rng.random_range(0..open.len()));
                        let out = l.release(id).unwrap();
                        assert_eq!((out.hold.status, out.replayed), (HoldStatus::Released, false));
                    } else {
                        let b = l.balance(u, Resource::Credits).unwrap();
                        assert!(b.available >= 0 && b.held >= 0 && b.is_consistent(), "{b:?}");
                        assert_eq!(b.granted, GRANTED + 50);
                        tally.reads += 1;
                    }
                }
                for (id, _, _) in open {
                    l.release(id).unwrap();
                }
                tally
            })
        })
        .collect();
    let tallies: Vec<Tally> = handles.into_iter().map(|h| h.join().expect("worker thread")).collect();
    let secs = started.elapsed().as_secs_f64();
    let placed: i64 = tallies.iter().map(|t| t.placed).sum();
    let captured: i64 = tallies.iter().map(|t| t.captured).sum();
    let refused: i64 = tallies.iter().map(|t| t.refused).sum();
    println!(
        "{} ops on one user in {secs:.1}s ({:.0} ops/s); placed {placed}, refused {refused}, captured {captured} credits",
        THREADS * OPS,
        (THREADS * OPS) as f64 / secs
    );
    let b = l.balance(u, Resource::Credits).unwrap();
    assert_eq!(b.held, 0);
    assert_eq!(b.spent, captured, "every capture counted once");
    assert_eq!(b.granted, GRANTED + 50);
    assert_eq!(b.available, GRANTED + 50 - captured);
    assert_eq!(b.granted, b.available + b.held + b.spent + b.expired);
    let report = l.audit().unwrap();
    assert_eq!(report.holds as i64, placed, "no lost or doubled hold");
    assert!(l.open_holds(u).unwrap().is_empty());
}
