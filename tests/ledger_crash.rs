//! Crash safety: a child process (this test binary, re-run with an environment variable) works
//! on the ledger and is killed with SIGKILL at a random point, 50 times. After each kill the
//! database is reopened: the audit passes, everything the child reported as committed is there,
//! the operation it was in the middle of is retried with the same idempotency key and charged
//! once. At the end the sweeper releases the holds left dangling.
use atelier::ledger;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use ledger::{GrantRequest, GrantSource, HoldRequest, HoldStatus, Ledger, PlansConfig, Resource, TestClock};
use rand::{Rng, SeedableRng};

const WORKER_ENV: &str = "ATELIER_LEDGER_CRASH_WORKER";
const ROUNDS: usize = 50;
const USER: &str = "crash";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 8, 0, 0).unwrap()
}

fn open(db: &Path, clock: &TestClock) -> Ledger {
    Ledger::open(db, Arc::new(PlansConfig::defaults()), Arc::new(clock.clone())).unwrap()
}

/// What operation `i` does: its amount, and how it ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Plan {
    LeaveOpen,
    Capture(i64),
    Release,
}

fn plan(i: u64) -> (i64, Plan) {
    let amount = 1 + (i % 7) as i64;
    let end = match i % 5 {
        0 => Plan::LeaveOpen,
        1 | 2 => Plan::Capture(amount - 1),
        3 => Plan::Capture(amount),
        _ => Plan::Release,
    };
    (amount, end)
}

fn key(i: u64) -> String {
    format!("op-{i}")
}

/// Places (or finds, by its key) hold `i` and settles it as planned; every step idempotent.
fn do_op(l: &mut Ledger, user: i64, i: u64) -> i64 {
    let (amount, end) = plan(i);
    let hold = l.place_hold(&HoldRequest::credits(user, &key(i), &key(i), amount)).unwrap().hold;
    match end {
        Plan::LeaveOpen => {}
        Plan::Capture(x) => assert_eq!(l.capture(hold.id, Some(x)).unwrap().hold.captured, x),
        Plan::Release => assert_eq!(l.release(hold.id).unwrap().hold.status, HoldStatus::Released),
    }
    hold.id
}

/// The child: work through operations from `start` until killed, reporting each commit.
fn worker(spec: &str) {
    let (db, start) = spec.split_once('|').expect("worker spec is db|start");
    let clock = TestClock::new(t0());
    let mut l = open(Path::new(db), &clock);
    let user = l.user_by_name(USER).unwrap().id;
    for i in start.parse::<u64>().unwrap().. {
        let id = do_op(&mut l, user, i);
        println!("done {i} {id}");
    }
}

#[test]
fn sigkill_at_random_points_loses_nothing_and_charges_once() {
    if let Ok(spec) = std::env::var(WORKER_ENV) {
        worker(&spec);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db: PathBuf = dir.path().join(ledger::DB_FILE);
    let clock = TestClock::new(t0());
    let user = {
        let mut l = open(&db, &clock);
        let u = l.add_user(USER, false, None).unwrap().id;
        l.grant(u, &GrantRequest::credits(1_000_000, GrantSource::TopUp, None)).unwrap();
        u
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0FFEE);
    let mut next: u64 = 0;
    let mut ids: HashMap<u64, i64> = HashMap::new();
    let mut retried_existing = 0;
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "sigkill_at_random_points_loses_nothing_and_charges_once",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER_ENV, format!("{}|{next}", db.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader =
            std::thread::spawn(move || BufReader::new(stdout).lines().map_while(Result::ok).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(rng.random_range(20..250)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let mut last_done: Option<u64> = None;
        for line in &lines {
            // libtest prints "test <name> ... " without a newline before the first line.
            if let Some(rest) = line.find("done ").map(|at| &line[at + 5..]) {
                let (i, id) = rest.split_once(' ').unwrap();
                let (i, id): (u64, i64) = (i.parse().unwrap(), id.parse().unwrap());
                assert_eq!(last_done.map_or(next, |d| d + 1), i, "the child works in order");
                ids.insert(i, id);
                last_done = Some(i);
            }
        }
        // Reopen: consistent, and every reported commit is there as reported.
        let mut l = open(&db, &clock);
        l.audit().unwrap_or_else(|e| panic!("round {round}: {e}"));
        let b = l.balance(user, Resource::Credits).unwrap();
        assert!(b.is_consistent() && b.available >= 0, "{b:?}");
        let done_to = last_done.map_or(next, |d| d + 1);
        for i in next..done_to {
            let h = l.hold_by_key(user, &key(i)).unwrap().expect("a reported hold is in the database");
            assert_eq!(h.id, ids[&i]);
            let want = match plan(i).1 {
                Plan::LeaveOpen => (HoldStatus::Held, 0),
                Plan::Capture(x) => (HoldStatus::Captured, x),
                Plan::Release => (HoldStatus::Released, 0),
            };
            assert_eq!((h.status, h.captured), want, "op {i}");
        }
        // The operation the child was in when killed: it may or may not have committed any of
        // its steps. Retry it with the same key: one hold, charged once.
        let inflight = done_to;
        if l.hold_by_key(user, &key(inflight)).unwrap().is_some() {
            retried_existing += 1;
        }
        let id = do_op(&mut l, user, inflight);
        assert_eq!(do_op(&mut l, user, inflight), id, "a second retry finds the same hold");
        ids.insert(inflight, id);
        next = inflight + 1;
        l.audit().unwrap();
    }
    assert!(next > ROUNDS as u64 * 2, "the children made progress ({next} operations)");
    // Every operation once: spent = what the plans capture, and one hold per key.
    let mut l = open(&db, &clock);
    let expect_spent: i64 = (0..next).map(|i| if let Plan::Capture(x) = plan(i).1 { x } else { 0 }).sum();
    let expect_open = (0..next).filter(|&i| plan(i).1 == Plan::LeaveOpen).count();
    let b = l.balance(user, Resource::Credits).unwrap();
    assert_eq!(b.spent, expect_spent);
    assert_eq!(l.audit().unwrap().holds as u64, next);
    assert_eq!(l.open_holds(user).unwrap().len(), expect_open);
    // The dangling holds go back when they are stale.
    clock.advance_secs(PlansConfig::defaults().metering.hold_max_age_secs);
    assert_eq!(l.sweep().unwrap().holds_released, expect_open);
    let b = l.balance(user, Resource::Credits).unwrap();
    assert_eq!((b.held, b.spent, b.available), (0, expect_spent, 1_000_050 - expect_spent));
    assert!(b.is_consistent());
    l.audit().unwrap();
    println!("{next} operations over {ROUNDS} kills; {retried_existing} in-flight operations had committed their hold");
}
