//! Period boundaries: weekly credits end with their week, yearly credits come once a year,
//! Free's 50 once per account, renewals missed while down caught up exactly once.
use atelier::ledger;

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use ledger::{
    GrantSource, HoldRequest, Ledger, Period, PlanChange, PlansConfig, Resource, SubscriptionStatus, TestClock,
};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 31, 10, 30, 0).unwrap()
}

fn open(dir: &tempfile::TempDir) -> (Ledger, TestClock) {
    let clock = TestClock::new(t0());
    let l = Ledger::open_data_dir(dir.path(), Arc::new(PlansConfig::defaults()), Arc::new(clock.clone())).unwrap();
    (l, clock)
}

fn period_grants(l: &mut Ledger, u: i64) -> Vec<ledger::Grant> {
    l.grants(u)
        .unwrap()
        .into_iter()
        .filter(|g| g.source == GrantSource::Period && g.resource == Resource::Credits)
        .collect()
}

fn available(l: &mut Ledger, u: i64) -> i64 {
    l.balance(u, Resource::Credits).unwrap().available
}

#[test]
fn weekly_credits_are_usable_until_the_last_second_and_gone_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, clock) = open(&dir);
    let u = l.add_user("wes", false, None).unwrap().id;
    l.set_plan(u, "starter", Some(Period::Weekly)).unwrap();
    l.cancel(u).unwrap(); // no renewal, so the end of the week shows alone
    let end = t0() + Duration::days(7);
    clock.set(end - Duration::seconds(1));
    assert_eq!(l.sweep().unwrap().renewals, 0);
    assert_eq!(available(&mut l, u), 250);
    // The whole 200 can be spent one second before the end.
    let h = l.place_hold(&HoldRequest::credits(u, "j", "k", 240)).unwrap().hold;
    l.release(h.id).unwrap();
    clock.set(end);
    assert_eq!(available(&mut l, u), 50, "the week's 200 are gone at the end");
    assert_eq!(l.sweep().unwrap().renewals, 0);
    let g = &period_grants(&mut l, u)[0];
    assert_eq!((g.remaining, g.expired), (0, 200));
    let sub = l.subscription(u).unwrap();
    assert_eq!((sub.plan.as_str(), sub.period, sub.status), ("free", None, SubscriptionStatus::Canceled));
    l.audit().unwrap();
}

#[test]
fn weekly_renewal_replaces_the_week_and_does_not_roll_over() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, clock) = open(&dir);
    let u = l.add_user("ray", false, None).unwrap().id;
    l.set_plan(u, "pro", Some(Period::Weekly)).unwrap();
    l.place_hold(&HoldRequest::credits(u, "j", "k", 100)).unwrap();
    clock.set(t0() + Duration::days(7));
    assert_eq!(l.catch_up().unwrap(), 1);
    assert_eq!(l.catch_up().unwrap(), 0);
    // 50 signup (capture-free), week 2's 450; week 1's 350 unheld expired.
    let b = l.balance(u, Resource::Credits).unwrap();
    assert_eq!((b.available, b.held, b.expired), (500, 100, 350));
    let gs = period_grants(&mut l, u);
    assert_eq!(gs.len(), 2);
    assert_eq!(gs[1].effective_at, t0() + Duration::days(7));
    assert_eq!(gs[1].expires_at, Some(t0() + Duration::days(14)));
    let sub = l.subscription(u).unwrap();
    assert_eq!((sub.period_index, sub.period_end), (1, Some(t0() + Duration::days(14))));
    l.audit().unwrap();
}

#[test]
fn yearly_plans_get_their_credits_once_per_year() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, clock) = open(&dir);
    let u = l.add_user("yan", false, None).unwrap().id;
    l.set_plan(u, "starter", Some(Period::Yearly)).unwrap();
    assert_eq!(available(&mut l, u), 50 + 10_400);
    assert_eq!(l.balance(u, Resource::Training).unwrap().available, 2);
    // Weekly boundaries mean nothing to a yearly plan.
    for day in [7, 8, 30, 100, 364] {
        clock.set(t0() + Duration::days(day));
        assert_eq!(l.sweep().unwrap().renewals, 0);
    }
    assert_eq!(period_grants(&mut l, u).len(), 1);
    // Twelve calendar months from 2026-01-31 10:30 is 2027-01-31 10:30.
    let year_end = Utc.with_ymd_and_hms(2027, 1, 31, 10, 30, 0).unwrap();
    assert_eq!(l.subscription(u).unwrap().period_end, Some(year_end));
    clock.set(year_end - Duration::seconds(1));
    assert_eq!(l.catch_up().unwrap(), 0);
    assert_eq!(available(&mut l, u), 50 + 10_400);
    clock.set(year_end);
    assert_eq!(l.catch_up().unwrap(), 1);
    assert_eq!(period_grants(&mut l, u).len(), 2);
    assert_eq!(available(&mut l, u), 50 + 10_400);
    assert_eq!(l.balance(u, Resource::Credits).unwrap().expired, 10_400);
    // Year 3 starts 24 months after the anchor (no drift through short months).
    assert_eq!(l.subscription(u).unwrap().period_end, Some(Utc.with_ymd_and_hms(2028, 1, 31, 10, 30, 0).unwrap()));
    l.audit().unwrap();
}

#[test]
fn free_fifty_once_per_account() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, clock) = open(&dir);
    let u = l.add_user("fri", false, None).unwrap().id;
    let signups = |l: &mut Ledger| l.grants(u).unwrap().iter().filter(|g| g.source == GrantSource::Signup).count();
    assert_eq!((available(&mut l, u), signups(&mut l)), (50, 1));
    // Up, down, cancel, back to free, many sweeps: never again.
    l.set_plan(u, "starter", Some(Period::Weekly)).unwrap();
    assert!(matches!(l.set_plan(u, "free", None).unwrap(), PlanChange::Scheduled { .. }));
    clock.set(t0() + Duration::days(7));
    l.sweep().unwrap();
    assert_eq!(l.subscription(u).unwrap().plan, "free");
    assert!(matches!(l.set_plan(u, "free", None).unwrap(), PlanChange::Unchanged { .. }));
    l.set_plan(u, "pro", None).unwrap();
    l.cancel(u).unwrap();
    for d in 8..40 {
        clock.set(t0() + Duration::days(d));
        l.sweep().unwrap();
    }
    assert_eq!(l.subscription(u).unwrap().plan, "free");
    assert_eq!(signups(&mut l), 1);
    assert_eq!(available(&mut l, u), 50);
    assert!(matches!(l.set_plan(u, "free", Some(Period::Weekly)), Err(ledger::LedgerError::Invalid(_))));
    l.audit().unwrap();
}

#[test]
fn renewals_missed_while_down_are_caught_up_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, clock) = open(&dir);
    let u = l.add_user("dan", false, None).unwrap().id;
    let v = l.add_user("val", false, None).unwrap().id;
    l.set_plan(u, "ultra", Some(Period::Weekly)).unwrap();
    l.set_plan(v, "starter", Some(Period::Weekly)).unwrap();
    l.set_plan(v, "free", None).unwrap(); // downgrade scheduled for the first boundary
    drop(l);
    // "Down" for five weeks and three days.
    clock.set(t0() + Duration::days(5 * 7 + 3));
    let mut l = Ledger::open_data_dir(dir.path(), Arc::new(PlansConfig::defaults()), Arc::new(clock.clone())).unwrap();
    let mut other = l.reopen().unwrap();
    assert_eq!(l.catch_up().unwrap(), 5);
    assert_eq!(other.catch_up().unwrap(), 0, "a second runner finds nothing to do");
    assert_eq!(l.sweep().unwrap().renewals, 0);
    let gs = period_grants(&mut l, u);
    assert_eq!(gs.len(), 6, "the first week and five renewals");
    for (k, g) in gs.iter().enumerate() {
        assert_eq!(g.effective_at, t0() + Duration::days(7 * k as i64));
        assert_eq!(g.expires_at, Some(t0() + Duration::days(7 * (k as i64 + 1))));
    }
    // Only the current week's 1000 are usable.
    assert_eq!(available(&mut l, u), 50 + 1000);
    assert_eq!(l.balance(u, Resource::Credits).unwrap().expired, 5 * 1000);
    let sub = l.subscription(u).unwrap();
    assert_eq!((sub.period_index, sub.period_end), (5, Some(t0() + Duration::days(42))));
    let renewals = l.events(u, 100).unwrap().iter().filter(|e| e.kind == "renewal").count();
    assert_eq!(renewals, 5);
    // The downgrade took effect at the first boundary, and nothing more was granted.
    assert_eq!(l.subscription(v).unwrap().plan, "free");
    assert_eq!(period_grants(&mut l, v).len(), 1);
    l.audit().unwrap();
}

#[test]
fn upgrade_now_keeps_old_grants_downgrade_and_cancel_at_period_end() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, clock) = open(&dir);
    let u = l.add_user("uma", false, None).unwrap().id;
    l.set_plan(u, "starter", Some(Period::Weekly)).unwrap();
    clock.set(t0() + Duration::days(3));
    let change = l.set_plan(u, "pro", None).unwrap();
    assert!(matches!(change, PlanChange::Upgraded { period: Some(Period::Weekly), .. }), "{change:?}");
    let gs = period_grants(&mut l, u);
    assert_eq!(gs.len(), 2);
    assert_eq!(gs[0].expires_at, Some(t0() + Duration::days(7)), "the old grant keeps its expiry");
    assert_eq!(gs[1].expires_at, Some(t0() + Duration::days(10)), "a new period starts at the upgrade");
    assert_eq!(available(&mut l, u), 50 + 200 + 450);
    // Downgrade: scheduled, nothing changes until the period end.
    let change = l.set_plan(u, "starter", None).unwrap();
    assert!(matches!(change, PlanChange::Scheduled { .. }));
    assert_eq!(l.subscription(u).unwrap().plan, "pro");
    // Weekly -> yearly of the same plan is an upgrade; yearly -> weekly waits.
    clock.set(t0() + Duration::days(10));
    l.catch_up().unwrap();
    let sub = l.subscription(u).unwrap();
    assert_eq!((sub.plan.as_str(), sub.period), ("starter", Some(Period::Weekly)));
    assert_eq!(period_grants(&mut l, u).last().unwrap().amount, 200);
    assert!(matches!(l.set_plan(u, "starter", Some(Period::Yearly)).unwrap(), PlanChange::Upgraded { .. }));
    assert!(matches!(l.set_plan(u, "starter", Some(Period::Weekly)).unwrap(), PlanChange::Scheduled { .. }));
    // Asking for the current plan undoes the scheduled change; cancel then resume.
    assert!(matches!(l.set_plan(u, "starter", Some(Period::Yearly)).unwrap(), PlanChange::Resumed { .. }));
    assert!(matches!(l.cancel(u).unwrap(), PlanChange::CancelScheduled { .. }));
    assert_eq!(l.subscription(u).unwrap().next_renewal_at(), None);
    assert!(matches!(l.set_plan(u, "starter", None).unwrap(), PlanChange::Resumed { .. }));
    assert!(l.subscription(u).unwrap().next_renewal_at().is_some());
    assert!(matches!(l.set_plan(u, "gold", None), Err(ledger::LedgerError::UnknownPlan { .. })));
    l.audit().unwrap();
}
