//! Hold+capture throughput, on one user and across 1,000 users (each pair = two
//! `BEGIN IMMEDIATE` transactions with `synchronous = FULL`). Ignored by default; run with
//! `cargo test --release --test ledger throughput -- --ignored --nocapture`.
use atelier::ledger;

use std::sync::Arc;
use std::time::Instant;

use chrono::{TimeZone, Utc};
use ledger::{GrantRequest, GrantSource, HoldRequest, Ledger, PlansConfig, Resource, Synchronous, TestClock};

fn config(sync: Synchronous) -> Arc<PlansConfig> {
    let mut cfg = PlansConfig::defaults();
    cfg.metering.synchronous = sync;
    Arc::new(cfg)
}

fn setup(users: usize, sync: Synchronous) -> (tempfile::TempDir, Ledger, Vec<i64>) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(TestClock::new(Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap()));
    let mut l = Ledger::open_data_dir(dir.path(), config(sync), clock).unwrap();
    let ids: Vec<i64> = (0..users)
        .map(|i| {
            let id = l.add_user(&format!("u{i}"), false, None).unwrap().id;
            l.grant(id, &GrantRequest::credits(1_000_000, GrantSource::TopUp, None)).unwrap();
            id
        })
        .collect();
    (dir, l, ids)
}

fn pairs(l: &mut Ledger, users: &[i64], n: usize, tag: &str) -> f64 {
    let start = Instant::now();
    for i in 0..n {
        let u = users[i % users.len()];
        let key = format!("{tag}-{i}");
        let h = l.place_hold(&HoldRequest::credits(u, &key, &key, 10)).unwrap().hold;
        l.capture(h.id, None).unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

#[test]
#[ignore = "a measurement; run it on purpose"]
fn hold_capture_throughput() {
    for sync in [Synchronous::Full, Synchronous::Normal] {
        measure(sync);
    }
}

fn measure(sync: Synchronous) {
    let n = 2_000;
    let (_d1, mut one, u1) = setup(1, sync);
    let r1 = pairs(&mut one, &u1, n, "one");
    let (_d2, mut many, u2) = setup(1_000, sync);
    let r2 = pairs(&mut many, &u2, n, "many");
    // Four threads, each its own connection, across the 1,000 users.
    let path = many.path().to_path_buf();
    let start = Instant::now();
    let hs: Vec<_> = (0..4)
        .map(|t| {
            let (path, users) = (path.clone(), u2.clone());
            std::thread::spawn(move || {
                let clock = Arc::new(TestClock::new(Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap()));
                let mut l = Ledger::open(&path, config(sync), clock).unwrap();
                let mine: Vec<i64> = users.iter().copied().skip(t).step_by(4).collect();
                pairs(&mut l, &mine, n / 4, &format!("t{t}"));
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let r3 = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "synchronous={sync:?}: hold+capture pairs/s: one user {r1:.0}, 1,000 users {r2:.0}, 1,000 users from 4 threads {r3:.0}"
    );
    for (l, users) in [(&mut one, &u1), (&mut many, &u2)] {
        l.audit().unwrap();
        let spent: i64 = users.iter().map(|&u| l.balance(u, Resource::Credits).unwrap().spent).sum();
        assert_eq!(spent, 10 * n as i64 * if users.len() == 1 { 1 } else { 2 });
    }
}
