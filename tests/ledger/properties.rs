//! Property test: random sequences of grant / hold / capture / release / expire (time passing)
//! / renew / plan change / cancel against a small in-memory model. After every step the
//! ledger's balance and every grant's buckets equal the model's, the audit against the ledger
//! entries passes, and granted = available + held + spent + expired exactly.
use atelier::ledger;

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use ledger::{
    GrantRequest, GrantSource, HoldRequest, HoldStatus, Ledger, LedgerError, Period, PlansConfig, Resource, TestClock,
};
use proptest::prelude::*;

const WEEK: i64 = 7 * 86_400;
const PLANS: [(&str, i64, u32); 4] = [("free", 0, 0), ("starter", 200, 1), ("pro", 450, 2), ("ultra", 1000, 3)];

#[derive(Debug, Clone)]
enum Op {
    Grant { amount: i64, expires_in: Option<i64>, priority: i64 },
    Hold { amount: i64 },
    Capture { which: usize, pct: Option<u8> },
    Release { which: usize },
    Replay { which: usize },
    Advance { secs: i64 },
    Renew,
    SetPlan { plan: usize },
    Cancel,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1i64..200, proptest::option::of(1i64..20 * 86_400), 0i64..3)
            .prop_map(|(amount, expires_in, priority)| Op::Grant { amount, expires_in, priority }),
        5 => (1i64..150).prop_map(|amount| Op::Hold { amount }),
        3 => (any::<usize>(), proptest::option::of(0u8..=100)).prop_map(|(which, pct)| Op::Capture { which, pct }),
        2 => any::<usize>().prop_map(|which| Op::Release { which }),
        1 => any::<usize>().prop_map(|which| Op::Replay { which }),
        3 => (1i64..4 * 86_400).prop_map(|secs| Op::Advance { secs }),
        2 => Just(Op::Renew),
        2 => (0usize..4).prop_map(|plan| Op::SetPlan { plan }),
        1 => Just(Op::Cancel),
    ]
}

#[derive(Debug, Clone)]
struct MGrant {
    amount: i64,
    remaining: i64,
    held: i64,
    spent: i64,
    expired: i64,
    expires: Option<i64>,
    priority: i64,
}

#[derive(Debug, Clone)]
struct MHold {
    db_id: i64,
    key: String,
    amount: i64,
    allocs: Vec<(usize, i64)>,
    status: HoldStatus,
    captured: i64,
}

#[derive(Debug, Clone)]
struct MSub {
    plan: usize,
    paid: bool,
    anchor: i64,
    index: i64,
    end: i64,
    cancel: bool,
    pending: Option<usize>,
}

struct Model {
    now: i64,
    grants: Vec<MGrant>,
    holds: Vec<MHold>,
    sub: MSub,
}

impl Model {
    fn live(&self, g: &MGrant) -> bool {
        g.expires.is_none_or(|e| self.now < e)
    }

    fn spend_order(&self, idx: &mut [usize]) {
        idx.sort_by_key(|&i| {
            let g = &self.grants[i];
            (g.expires.is_none(), g.expires.unwrap_or(0), g.priority, i)
        });
    }

    fn expire(&mut self) {
        let now = self.now;
        for g in &mut self.grants {
            if g.expires.is_some_and(|e| e <= now) {
                g.expired += g.remaining;
                g.remaining = 0;
            }
        }
    }

    fn available(&self) -> i64 {
        self.grants.iter().filter(|g| self.live(g)).map(|g| g.remaining).sum()
    }

    fn add_grant(&mut self, amount: i64, expires: Option<i64>, priority: i64) {
        self.grants.push(MGrant { amount, remaining: amount, held: 0, spent: 0, expired: 0, expires, priority });
    }

    fn settle(&mut self, h: usize, capture: i64) {
        let mut allocs = self.holds[h].allocs.clone();
        allocs.sort_by_key(|&(gi, _)| {
            let g = &self.grants[gi];
            (g.expires.is_none(), g.expires.unwrap_or(0), g.priority, gi)
        });
        let mut left = capture;
        for (gi, amt) in allocs {
            let c = amt.min(left);
            left -= c;
            let g = &mut self.grants[gi];
            g.held -= amt;
            g.spent += c;
            g.remaining += amt - c;
        }
        self.expire();
        self.holds[h].captured = capture;
    }

    fn catch_up(&mut self) {
        loop {
            if !self.sub.paid || self.sub.end > self.now {
                break;
            }
            let boundary = self.sub.end;
            if self.sub.cancel {
                self.sub =
                    MSub { plan: 0, paid: false, anchor: boundary, index: 0, end: 0, cancel: false, pending: None };
                break;
            }
            if let Some(p) = self.sub.pending {
                if p == 0 {
                    self.sub =
                        MSub { plan: 0, paid: false, anchor: boundary, index: 0, end: 0, cancel: false, pending: None };
                } else {
                    self.sub = MSub {
                        plan: p,
                        paid: true,
                        anchor: boundary,
                        index: 0,
                        end: boundary + WEEK,
                        cancel: false,
                        pending: None,
                    };
                    self.add_grant(PLANS[p].1, Some(boundary + WEEK), 0);
                }
                continue;
            }
            self.sub.index += 1;
            self.sub.end = self.sub.anchor + (self.sub.index + 1) * WEEK;
            let (plan, end) = (self.sub.plan, self.sub.end);
            self.add_grant(PLANS[plan].1, Some(end), 0);
        }
        self.expire();
    }
}

fn check(l: &mut Ledger, m: &Model, u: i64) -> Result<(), TestCaseError> {
    l.audit().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let b = l.balance(u, Resource::Credits).unwrap();
    prop_assert!(b.is_consistent(), "{:?}", b);
    let live = |g: &MGrant| m.live(g);
    let want = (
        m.grants.iter().map(|g| g.amount).sum::<i64>(),
        m.available(),
        m.grants.iter().map(|g| g.held).sum::<i64>(),
        m.grants.iter().map(|g| g.spent).sum::<i64>(),
        m.grants.iter().map(|g| g.expired + if live(g) { 0 } else { g.remaining }).sum::<i64>(),
    );
    prop_assert_eq!((b.granted, b.available, b.held, b.spent, b.expired), want);
    prop_assert_eq!(b.granted, b.available + b.held + b.spent + b.expired);
    let now = Utc.timestamp_opt(m.now, 0).unwrap();
    let db: Vec<_> = l.grants(u).unwrap().into_iter().filter(|g| g.resource == Resource::Credits).collect();
    prop_assert_eq!(db.len(), m.grants.len());
    for (d, g) in db.iter().zip(&m.grants) {
        let eff = |rem: i64, exp: i64, is_live: bool| if is_live { (rem, exp) } else { (0, exp + rem) };
        prop_assert_eq!(
            (d.amount, d.held, d.spent, eff(d.remaining, d.expired, d.is_live(now))),
            (g.amount, g.held, g.spent, eff(g.remaining, g.expired, live(g))),
            "grant {}",
            d.id
        );
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let start = Utc.with_ymd_and_hms(2026, 2, 2, 0, 0, 0).unwrap();
    let clock = TestClock::new(start);
    let mut cfg = PlansConfig::defaults();
    cfg.metering.hold_max_age_secs = 10 * 365 * 86_400; // the sweeper's own test is elsewhere
    let mut l = Ledger::open_data_dir(dir.path(), Arc::new(cfg), Arc::new(clock.clone())).unwrap();
    let u = l.add_user("prop", false, None).unwrap().id;
    let mut m = Model {
        now: start.timestamp(),
        grants: Vec::new(),
        holds: Vec::new(),
        sub: MSub { plan: 0, paid: false, anchor: start.timestamp(), index: 0, end: 0, cancel: false, pending: None },
    };
    m.add_grant(50, None, 0);
    check(&mut l, &m, u)?;
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Grant { amount, expires_in, priority } => {
                let expires = expires_in.map(|s| m.now + s);
                let req = GrantRequest {
                    priority,
                    ..GrantRequest::credits(
                        amount,
                        GrantSource::TopUp,
                        expires.map(|e| Utc.timestamp_opt(e, 0).unwrap()),
                    )
                };
                l.grant(u, &req).unwrap();
                m.add_grant(amount, expires, priority);
            }
            Op::Hold { amount } => {
                let key = format!("k{step}");
                let r = l.place_hold(&HoldRequest::credits(u, &format!("job{step}"), &key, amount));
                m.expire();
                if m.available() >= amount {
                    let hold = r.map_err(|e| TestCaseError::fail(format!("hold {amount}: {e}")))?.hold;
                    let mut idx: Vec<usize> =
                        (0..m.grants.len()).filter(|&i| m.grants[i].remaining > 0 && m.live(&m.grants[i])).collect();
                    m.spend_order(&mut idx);
                    let mut left = amount;
                    let mut allocs = Vec::new();
                    for i in idx {
                        let take = m.grants[i].remaining.min(left);
                        if take == 0 {
                            break;
                        }
                        m.grants[i].remaining -= take;
                        m.grants[i].held += take;
                        allocs.push((i, take));
                        left -= take;
                    }
                    m.holds.push(MHold { db_id: hold.id, key, amount, allocs, status: HoldStatus::Held, captured: 0 });
                } else {
                    prop_assert!(
                        matches!(r, Err(LedgerError::Refused(ledger::Refusal::OutOfCredits { .. }))),
                        "expected a refusal, got {:?}",
                        r
                    );
                }
            }
            Op::Capture { which, pct } => {
                let open: Vec<usize> = (0..m.holds.len()).filter(|&i| m.holds[i].status == HoldStatus::Held).collect();
                if open.is_empty() {
                    continue;
                }
                let h = open[which % open.len()];
                let amount = pct.map(|p| m.holds[h].amount * p as i64 / 100);
                let out = l.capture(m.holds[h].db_id, amount).unwrap();
                let c = amount.unwrap_or(m.holds[h].amount);
                prop_assert_eq!(out.hold.captured, c);
                m.settle(h, c);
                m.holds[h].status = HoldStatus::Captured;
                // Once: a second capture changes nothing.
                prop_assert!(l.capture(m.holds[h].db_id, Some(0)).unwrap().replayed);
            }
            Op::Release { which } => {
                let open: Vec<usize> = (0..m.holds.len()).filter(|&i| m.holds[i].status == HoldStatus::Held).collect();
                if open.is_empty() {
                    continue;
                }
                let h = open[which % open.len()];
                l.release(m.holds[h].db_id).unwrap();
                m.settle(h, 0);
                m.holds[h].status = HoldStatus::Released;
                prop_assert!(l.release(m.holds[h].db_id).unwrap().replayed);
                prop_assert!(l.capture(m.holds[h].db_id, None).is_err());
            }
            Op::Replay { which } => {
                if m.holds.is_empty() {
                    continue;
                }
                let h = &m.holds[which % m.holds.len()];
                let job = format!("job{}", &h.key[1..]);
                let out = l.place_hold(&HoldRequest::credits(u, &job, &h.key, h.amount)).unwrap();
                prop_assert!(out.replayed);
                prop_assert_eq!((out.hold.id, out.hold.status, out.hold.captured), (h.db_id, h.status, h.captured));
            }
            Op::Advance { secs } => {
                clock.advance_secs(secs);
                m.now += secs;
                m.expire();
            }
            Op::Renew => {
                l.sweep().unwrap();
                m.catch_up();
            }
            Op::SetPlan { plan } => {
                let r = l.set_plan(u, PLANS[plan].0, if plan == 0 { None } else { Some(Period::Weekly) });
                r.map_err(|e| TestCaseError::fail(e.to_string()))?;
                m.catch_up();
                let s = m.sub.clone();
                if plan == 0 {
                    if s.paid {
                        m.sub.pending = Some(0);
                        m.sub.cancel = false;
                    }
                } else if s.paid && s.plan == plan {
                    m.sub.pending = None;
                    m.sub.cancel = false;
                } else if !s.paid || PLANS[plan].2 > PLANS[s.plan].2 {
                    m.sub = MSub {
                        plan,
                        paid: true,
                        anchor: m.now,
                        index: 0,
                        end: m.now + WEEK,
                        cancel: false,
                        pending: None,
                    };
                    m.add_grant(PLANS[plan].1, Some(m.now + WEEK), 0);
                } else {
                    m.sub.pending = Some(plan);
                    m.sub.cancel = false;
                }
            }
            Op::Cancel => {
                l.cancel(u).unwrap();
                m.catch_up();
                if m.sub.paid {
                    m.sub.cancel = true;
                    m.sub.pending = None;
                }
            }
        }
        check(&mut l, &m, u)?;
        let sub = l.subscription(u).unwrap();
        prop_assert_eq!(sub.plan.as_str(), PLANS[m.sub.plan].0, "step {}", step);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn ledger_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}
