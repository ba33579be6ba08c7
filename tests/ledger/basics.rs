//! Plans config, entitlements, prices, holds, grants, quotas, events and usage against a real
//! SQLite file.
use atelier::ledger;

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use ledger::{
    GrantRequest, GrantSource, HoldRequest, HoldStatus, JobParams, JobRequest, Ledger, LedgerError, ModelAccess,
    ParamLevel, Period, PlansConfig, QueueClass, Refusal, Resource, TestClock, TrainingRequest, UsageKind,
};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 12, 0, 0).unwrap() // a Monday
}

fn open(dir: &tempfile::TempDir, cfg: PlansConfig) -> (Ledger, TestClock) {
    let clock = TestClock::new(t0());
    let l = Ledger::open_data_dir(dir.path(), Arc::new(cfg), Arc::new(clock.clone())).unwrap();
    (l, clock)
}

fn audit(l: &mut Ledger) {
    l.audit().unwrap();
    for u in l.users().unwrap() {
        for r in [Resource::Credits, Resource::Training] {
            let b = l.balance(u.id, r).unwrap();
            assert!(b.is_consistent(), "{b:?}");
            assert!(b.available >= 0 && b.held >= 0);
        }
    }
}

#[test]
fn shipped_plans_parse_validate_and_match_the_issue() {
    let cfg = PlansConfig::defaults();
    assert_eq!(cfg.plan_ids_by_rank(), ["free", "starter", "pro", "ultra", "max"]);
    let want = [
        ("free", 0, 0, 0, 0, ParamLevel::Basic, Some(1)),
        ("starter", 200, 10_400, 0, 2, ParamLevel::Standard, Some(4)),
        ("pro", 450, 23_400, 1, 12, ParamLevel::Advanced, Some(8)),
        ("ultra", 1000, 52_000, 5, 50, ParamLevel::Full, Some(16)),
        ("max", 2000, 104_000, 10, 100, ParamLevel::Full, None),
    ];
    for (id, cw, cy, tw, ty, level, batch) in want {
        let e = cfg.entitlements(id, None).unwrap();
        assert_eq!(
            (e.credits_weekly, e.credits_yearly, e.training_weekly, e.training_yearly),
            (cw, cy, tw, ty),
            "{id}"
        );
        assert_eq!(e.parameters, level, "{id}");
        assert_eq!(e.max_batch, batch, "{id}");
    }
    assert_eq!(cfg.plan("free").unwrap().signup_credits, 50);
    assert_eq!(cfg.entitlements("starter", Some(Period::Weekly)).unwrap().queue, QueueClass::Standard);
    assert_eq!(cfg.entitlements("starter", Some(Period::Yearly)).unwrap().queue, QueueClass::Priority);
    assert_eq!(cfg.entitlements("max", None).unwrap().queue, QueueClass::Instant);
    assert_eq!(cfg.plan("free").unwrap().models["dev"], ModelAccess::Limited);
    assert_eq!(cfg.plan("pro").unwrap().models["beta"], ModelAccess::No);
    assert_eq!(cfg.metering.limited_per_week["dev"], 5);
    assert_eq!(cfg.metering.limited_per_week["video"], 2);
    // The shipped text parses through the strict and the whole-config paths alike.
    assert_eq!(PlansConfig::from_toml(ledger::plans::default_plans_toml()).unwrap(), cfg);
    let whole = format!("[server]\nlisten = \"x\"\n\n{}", ledger::plans::default_plans_toml());
    assert_eq!(PlansConfig::from_config_toml(&whole).unwrap(), cfg);
    assert_eq!(PlansConfig::from_config_toml("[server]\nlisten = \"x\"\n").unwrap(), cfg);
}

#[test]
fn bad_plans_config_is_a_clear_error() {
    let base = ledger::plans::default_plans_toml();
    let cases = [
        (base.replace("rank = 3", "rank = 2"), "rank 2"),
        (base.replace("max_batch = 16", "max_batch = 0"), "max_batch"),
        (base.replace("image_min = 10", "image_min = 300"), "image_min"),
        (base.replace("dev = 5\n", ""), "limited_per_week"),
        (base.replace("hold_max_age_secs = 86400", "hold_max_age_secs = 86400\nhold_max_ages = 1"), "unknown field"),
        (base.replace("tags = [\"dev\"]", "tags = [\"dev\", \"nsfw\"]"), "nsfw"),
        (base.replace("default_plan = \"free\"", "default_plan = \"pro\""), "default_plan"),
    ];
    for (text, needle) in cases {
        let err = PlansConfig::from_toml(&text).expect_err(needle).to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }
}

#[test]
fn entitlements_follow_tags_levels_and_batch() {
    let mut text = ledger::plans::default_plans_toml().to_string();
    text.push_str(
        "\n[pricing.models.clip-video]\nkind = \"video\"\ntags = [\"video\"]\ndefault_steps = 20\nbase = 2.0\nper_mp_step = 0.5\ndefault_seconds = 4.0\n\
         [pricing.models.raw]\nkind = \"image\"\ntags = [\"uncensored\"]\ndefault_steps = 20\nbase = 4.0\nper_mp_step = 1.0\n\
         [pricing.models.next]\nkind = \"image\"\ntags = [\"beta\"]\ndefault_steps = 20\nbase = 4.0\nper_mp_step = 1.0\n",
    );
    let cfg = PlansConfig::from_toml(&text).unwrap();
    let basic = JobParams::new(1024, 1024);
    // Free: schnell yes, dev limited (quota), uncensored no.
    let c = cfg.check_job_by_id("free", None, "flux-schnell", &basic).unwrap();
    assert!(c.quotas.is_empty());
    let c = cfg.check_job_by_id("free", None, "flux-dev", &basic).unwrap();
    assert_eq!((c.quotas[0].tag.as_str(), c.quotas[0].limit, c.quotas[0].units), ("dev", 5, 1));
    let c = cfg.check_job_by_id("free", None, "clip-video", &basic).unwrap();
    assert_eq!((c.quotas[0].tag.as_str(), c.quotas[0].limit), ("video", 2));
    match cfg.check_job_by_id("free", None, "raw", &basic).unwrap_err() {
        Refusal::ModelNotInPlan { tag, plans_allowing, .. } => {
            assert_eq!(tag, "uncensored");
            assert_eq!(plans_allowing, ["pro", "ultra", "max"]);
        }
        other => panic!("{other:?}"),
    }
    match cfg.check_job_by_id("pro", Some(Period::Weekly), "next", &basic).unwrap_err() {
        Refusal::ModelNotInPlan { plans_allowing, .. } => assert_eq!(plans_allowing, ["ultra", "max"]),
        other => panic!("{other:?}"),
    }
    assert!(cfg.check_job_by_id("starter", Some(Period::Weekly), "flux-dev", &basic).unwrap().quotas.is_empty());
    // Parameter levels.
    let seeded = JobParams { seed: Some(7), ..basic.clone() };
    let r = cfg.check_job_by_id("free", None, "flux-schnell", &seeded).unwrap_err();
    assert!(matches!(&r, Refusal::ParameterLevel { needs: ParamLevel::Standard, .. }), "{r:?}");
    assert!(r.to_string().contains("seed"), "{r}");
    assert!(cfg.check_job_by_id("starter", Some(Period::Weekly), "flux-schnell", &seeded).is_ok());
    let custom = JobParams::new(1000, 700);
    assert!(matches!(
        cfg.check_job_by_id("starter", Some(Period::Weekly), "flux-schnell", &custom),
        Err(Refusal::ParameterLevel { needs: ParamLevel::Advanced, .. })
    ));
    assert!(cfg.check_job_by_id("pro", Some(Period::Weekly), "flux-schnell", &custom).is_ok());
    let extra = JobParams { extra: vec!["sampler".into()], ..basic.clone() };
    match cfg.check_job_by_id("pro", Some(Period::Weekly), "flux-schnell", &extra).unwrap_err() {
        Refusal::ParameterLevel { needs: ParamLevel::Full, plans_allowing, .. } => {
            assert_eq!(plans_allowing, ["ultra", "max"])
        }
        other => panic!("{other:?}"),
    }
    // Batch.
    let b5 = basic.clone().with_batch(5);
    match cfg.check_job_by_id("starter", Some(Period::Weekly), "flux-schnell", &b5).unwrap_err() {
        Refusal::BatchTooLarge { max: 4, plans_allowing, .. } => assert_eq!(plans_allowing, ["pro", "ultra", "max"]),
        other => panic!("{other:?}"),
    }
    assert!(cfg.check_job_by_id("max", Some(Period::Weekly), "flux-schnell", &basic.clone().with_batch(500)).is_ok());
    // LoRAs per job: their own entitlement (no parameter level), Free none, Max any number.
    let loras = |n: u32| JobParams { loras: n, ..basic.clone() };
    match cfg.check_job_by_id("free", None, "flux-schnell", &loras(1)).unwrap_err() {
        Refusal::TooManyLoras { max: 0, loras: 1, plans_allowing, .. } => {
            assert_eq!(plans_allowing, ["starter", "pro", "ultra", "max"])
        }
        other => panic!("{other:?}"),
    }
    assert!(cfg.check_job_by_id("starter", Some(Period::Weekly), "flux-schnell", &loras(1)).is_ok());
    let r = cfg.check_job_by_id("pro", Some(Period::Weekly), "flux-schnell", &loras(4)).unwrap_err();
    assert!(matches!(&r, Refusal::TooManyLoras { max: 3, .. }), "{r:?}");
    assert!(r.to_string().contains("up to 3 LoRAs per job; this job asks for 4 (allowed on: ultra, max)"), "{r}");
    assert!(cfg.check_job_by_id("max", Some(Period::Weekly), "flux-schnell", &loras(16)).is_ok());
    // A config written before LoRA counts existed allows none.
    let old = ledger::plans::default_plans_toml().replace("loras = 3\n", "");
    let cfg_old = PlansConfig::from_toml(&old).unwrap();
    assert!(cfg_old.check_job_by_id("pro", Some(Period::Weekly), "flux-schnell", &loras(1)).is_err());
    // Bad input is a refusal, not a panic.
    assert!(matches!(
        cfg.check_job_by_id("max", None, "flux-schnell", &JobParams::new(0, 5)),
        Err(Refusal::InvalidParams { .. })
    ));
    assert!(matches!(cfg.check_job_by_id("max", None, "nope", &basic), Err(Refusal::UnknownModel { .. })));
}

#[test]
fn prices_are_one_function_and_clamped() {
    let cfg = PlansConfig::defaults();
    let p = |m: &str, w, h, s: Option<u32>, b| {
        cfg.price_job(m, &JobParams { steps: s, ..JobParams::new(w, h).with_batch(b) }).unwrap()
    };
    // 4 + 1.048576 * 4 = 8.2 -> clamped up to 10 per image.
    assert_eq!(p("flux-schnell", 1024, 1024, None, 1).total, 10);
    assert_eq!(p("flux-schnell", 1024, 1024, None, 3).total, 30);
    // 4 + 1.048576 * 28 = 33.4 -> 34.
    assert_eq!(p("flux-dev", 1024, 1024, None, 1).per_item, 34);
    assert_eq!(p("flux-dev", 1024, 1024, Some(50), 2).total, 2 * 57);
    // Huge jobs stop at 200 per image.
    assert_eq!(p("flux-dev", 2048, 2048, Some(100), 4).total, 800);
    let video = ledger::ModelPricing {
        kind: ledger::ModelKind::Video,
        tags: vec!["video".into()],
        default_steps: 20,
        base: 1.0,
        per_mp_step: 0.5,
        default_seconds: Some(4.0),
    };
    let v = ledger::price(&cfg.pricing, &video, 256, 256, None, 1, None).unwrap();
    assert_eq!(v.total, 20, "small clips cost the video minimum");
    let v = ledger::price(&cfg.pricing, &video, 1280, 720, Some(50), 1, Some(60.0)).unwrap();
    assert_eq!(v.total, 800, "long clips cost the video maximum");
    let v = ledger::price(&cfg.pricing, &video, 512, 512, Some(20), 1, Some(8.0)).unwrap();
    assert_eq!(v.total, ((1.0 + 0.5 * 0.262144 * 20.0) * 8.0f64).ceil() as i64);
    assert_eq!(v.total, 29);
    assert!(ledger::price(&cfg.pricing, &video, 512, 512, None, 0, None).is_err());
    assert!(ledger::price(&cfg.pricing, &video, 512, 512, None, 1, Some(-1.0)).is_err());
}

#[test]
fn holds_capture_release_once_and_idempotently() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, _clock) = open(&dir, PlansConfig::defaults());
    let u = l.add_user("ann", false, None).unwrap().id;
    assert_eq!(l.balance(u, Resource::Credits).unwrap().available, 50);

    let h = l.place_hold(&HoldRequest::credits(u, "job-1", "key-1", 30)).unwrap();
    assert!(!h.replayed);
    assert_eq!(h.hold.status, HoldStatus::Held);
    let b = l.balance(u, Resource::Credits).unwrap();
    assert_eq!((b.available, b.held), (20, 30));
    // Same key: same hold, no second charge.
    let again = l.place_hold(&HoldRequest::credits(u, "job-1", "key-1", 30)).unwrap();
    assert!(again.replayed);
    assert_eq!(again.hold.id, h.hold.id);
    assert_eq!(l.balance(u, Resource::Credits).unwrap().held, 30);
    // Same key, different request: a conflict, not a second hold.
    assert!(matches!(
        l.place_hold(&HoldRequest::credits(u, "job-2", "key-1", 5)),
        Err(LedgerError::IdempotencyConflict { .. })
    ));
    // Not enough available.
    match l.place_hold(&HoldRequest::credits(u, "job-3", "key-3", 21)).unwrap_err() {
        LedgerError::Refused(Refusal::OutOfCredits {
            needed: 21,
            available: 20,
            next_renewal_at: None,
            plans_allowing,
            ..
        }) => {
            assert_eq!(plans_allowing, ["starter", "pro", "ultra", "max"]);
        }
        other => panic!("{other:?}"),
    }
    // Partial capture: 12 spent, 18 back.
    let c = l.capture(h.hold.id, Some(12)).unwrap();
    assert_eq!((c.hold.status, c.hold.captured, c.replayed), (HoldStatus::Captured, 12, false));
    let b = l.balance(u, Resource::Credits).unwrap();
    assert_eq!((b.available, b.held, b.spent), (38, 0, 12));
    // Twice: the original outcome, nothing changes.
    let c2 = l.capture(h.hold.id, Some(30)).unwrap();
    assert!(c2.replayed);
    assert_eq!(c2.hold.captured, 12);
    assert_eq!(l.balance(u, Resource::Credits).unwrap().spent, 12);
    assert!(matches!(l.release(h.hold.id), Err(LedgerError::HoldSettled { status: HoldStatus::Captured, .. })));
    // A retry of the original place after capture returns the captured hold, uncharged.
    let r = l.place_hold(&HoldRequest::credits(u, "job-1", "key-1", 30)).unwrap();
    assert!(r.replayed && r.hold.status == HoldStatus::Captured);
    assert_eq!(l.balance(u, Resource::Credits).unwrap().available, 38);

    // Release: all back, once.
    let h2 = l.place_hold(&HoldRequest::credits(u, "job-4", "key-4", 8)).unwrap().hold;
    let r1 = l.release(h2.id).unwrap();
    assert!(!r1.replayed && r1.hold.status == HoldStatus::Released);
    assert!(l.release(h2.id).unwrap().replayed);
    assert!(matches!(l.capture(h2.id, None), Err(LedgerError::HoldSettled { .. })));
    assert_eq!(l.balance(u, Resource::Credits).unwrap().available, 38);
    // Bad input.
    let h3 = l.place_hold(&HoldRequest::credits(u, "job-5", "key-5", 8)).unwrap().hold;
    assert!(matches!(l.capture(h3.id, Some(9)), Err(LedgerError::Invalid(_))));
    assert!(matches!(l.capture(h3.id, Some(-1)), Err(LedgerError::Invalid(_))));
    assert!(matches!(l.capture(999_999, None), Err(LedgerError::UnknownHold(_))));
    assert!(matches!(l.place_hold(&HoldRequest::credits(u, "j", "k", 0)), Err(LedgerError::Invalid(_))));
    assert!(matches!(l.place_hold(&HoldRequest::credits(u, "j", "k", -5)), Err(LedgerError::Invalid(_))));
    assert!(matches!(l.place_hold(&HoldRequest::credits(4242, "j", "k", 5)), Err(LedgerError::UnknownUser(_))));
    l.capture(h3.id, None).unwrap();
    audit(&mut l);
    // Usage: two image jobs captured today.
    let day = t0().date_naive();
    let usage = l.usage(u, day, day).unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0].kind, usage[0].jobs, usage[0].credits), (UsageKind::Images, 2, 20));
}

#[test]
fn spending_takes_the_soonest_expiring_grant_first_and_expiry_is_an_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, clock) = open(&dir, PlansConfig::defaults());
    let u = l.add_user("bo", false, None).unwrap().id; // 50 signup, never expires
    let late = l.grant(u, &GrantRequest::credits(100, GrantSource::TopUp, Some(t0() + Duration::days(30)))).unwrap();
    let soon = l.grant(u, &GrantRequest::credits(40, GrantSource::Admin, Some(t0() + Duration::days(2)))).unwrap();
    let tie_hi = l
        .grant(
            u,
            &GrantRequest {
                priority: 5,
                ..GrantRequest::credits(10, GrantSource::Refund, Some(t0() + Duration::days(2)))
            },
        )
        .unwrap();
    let h = l.place_hold(&HoldRequest::credits(u, "j", "k", 45)).unwrap().hold;
    let g = |l: &mut Ledger, id| l.grants(u).unwrap().into_iter().find(|g| g.id == id).unwrap();
    assert_eq!(g(&mut l, soon.id).held, 40, "soonest expiry first");
    assert_eq!(g(&mut l, tie_hi.id).held, 5, "same expiry: lower priority number first");
    assert_eq!(g(&mut l, late.id).held, 0);
    // Capture 42: 40 from `soon`, 2 from `tie_hi`; 3 released back to `tie_hi`.
    l.capture(h.id, Some(42)).unwrap();
    assert_eq!((g(&mut l, soon.id).spent, g(&mut l, tie_hi.id).spent, g(&mut l, tie_hi.id).remaining), (40, 2, 8));
    // Expiry: usable one second before, written off at the boundary.
    clock.set(t0() + Duration::days(2) - Duration::seconds(1));
    assert_eq!(l.balance(u, Resource::Credits).unwrap().available, 50 + 100 + 8);
    clock.set(t0() + Duration::days(2));
    let b = l.balance(u, Resource::Credits).unwrap();
    assert_eq!((b.available, b.expired), (150, 8));
    assert_eq!(l.expire_due().unwrap(), 1);
    assert_eq!(g(&mut l, tie_hi.id).expired, 8);
    assert_eq!(l.expire_due().unwrap(), 0, "expiry is written once");
    assert_eq!(l.balance(u, Resource::Credits).unwrap(), b);
    // A hold on a grant that expires before release: the released part is written off.
    let h = l.place_hold(&HoldRequest::credits(u, "j2", "k2", 60)).unwrap().hold; // 60 from `late` (day 30)
    clock.set(t0() + Duration::days(31));
    l.release(h.id).unwrap();
    let b = l.balance(u, Resource::Credits).unwrap();
    assert_eq!((b.available, b.held, b.expired), (50, 0, 108));
    // Capture after the grant expired still charges what was reserved.
    let soon2 = l.grant(u, &GrantRequest::credits(20, GrantSource::Admin, Some(t0() + Duration::days(32)))).unwrap();
    let h = l.place_hold(&HoldRequest::credits(u, "j3", "k3", 20)).unwrap().hold;
    clock.set(t0() + Duration::days(33));
    l.capture(h.id, Some(20)).unwrap();
    assert_eq!(g(&mut l, soon2.id).spent, 20);
    // Admin grant input checks.
    assert!(l.grant(u, &GrantRequest::credits(0, GrantSource::Admin, None)).is_err());
    assert!(l.grant(u, &GrantRequest::credits(5, GrantSource::Admin, Some(t0()))).is_err(), "expiry in the past");
    audit(&mut l);
}

#[test]
fn stale_holds_are_released_by_the_sweeper() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, clock) = open(&dir, PlansConfig::defaults());
    let u = l.add_user("cy", false, None).unwrap().id;
    let h = l.place_hold(&HoldRequest::credits(u, "j", "k", 20)).unwrap().hold;
    clock.advance_secs(86_399);
    assert_eq!(l.sweep().unwrap().holds_released, 0);
    clock.advance_secs(1);
    let r = l.sweep().unwrap();
    assert_eq!(r.holds_released, 1);
    let hold = l.hold(h.id).unwrap();
    assert_eq!((hold.status, hold.settled_by), (HoldStatus::Released, Some(ledger::SettledBy::Sweeper)));
    assert_eq!(l.balance(u, Resource::Credits).unwrap().available, 50);
    assert!(matches!(l.capture(h.id, None), Err(LedgerError::HoldSettled { .. })));
    assert_eq!(l.sweep().unwrap().holds_released, 0);
    assert!(l.events(u, 10).unwrap().iter().any(|e| e.kind == "hold_swept"));
    audit(&mut l);
}

#[test]
fn a_renewed_hold_outlives_its_placement_age() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, clock) = open(&dir, PlansConfig::defaults());
    let u = l.add_user("cy", false, None).unwrap().id;
    let h = l.place_hold(&HoldRequest::credits(u, "j", "k", 20)).unwrap().hold;
    // Its job is still running 20 h later and says so.
    clock.advance_secs(20 * 3600);
    assert!(l.renew_hold(h.id).unwrap());
    clock.advance_secs(5 * 3600);
    assert_eq!(l.sweep().unwrap().holds_released, 0, "25 h after placing, 5 h after renewing");
    assert_eq!(l.capture(h.id, None).unwrap().hold.status, HoldStatus::Captured);
    assert!(!l.renew_hold(h.id).unwrap(), "a settled hold is not renewed");
    // An unrenewed one goes at its age.
    let h2 = l.place_hold(&HoldRequest::credits(u, "j2", "k2", 10)).unwrap().hold;
    clock.advance_secs(20 * 3600);
    assert!(l.renew_hold(h2.id).unwrap());
    clock.advance_secs(86_400);
    assert_eq!(l.sweep().unwrap().holds_released, 1);
    audit(&mut l);
}

#[test]
fn authorize_job_checks_plan_quota_and_credits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, clock) = open(&dir, PlansConfig::defaults());
    let u = l.add_user("di", false, None).unwrap().id;
    l.grant(u, &GrantRequest::credits(1000, GrantSource::TopUp, None)).unwrap();
    let job = |i: u32, model: &str| JobRequest {
        job_id: format!("job-{i}"),
        idempotency_key: format!("key-{i}"),
        model_id: model.into(),
        params: JobParams::new(1024, 1024),
        request_hash: None,
    };
    // Free: 5 dev images per calendar week.
    let mut holds = Vec::new();
    for i in 0..5 {
        let a = l.authorize_job(u, &job(i, "flux-dev")).unwrap();
        assert_eq!((a.price.total, a.queue), (34, QueueClass::Standard));
        holds.push(a.hold.id);
    }
    match l.authorize_job(u, &job(5, "flux-dev")).unwrap_err() {
        LedgerError::Refused(Refusal::QuotaExhausted { tag, limit: 5, used: 5, resets_at, plans_allowing, .. }) => {
            assert_eq!(tag, "dev");
            assert_eq!(resets_at, Utc.with_ymd_and_hms(2026, 3, 9, 0, 0, 0).unwrap());
            assert_eq!(plans_allowing, ["starter", "pro", "ultra", "max"]);
        }
        other => panic!("{other:?}"),
    }
    // A released (failed) job gives its quota back; a retry of a placed job is not counted twice.
    l.release(holds[0]).unwrap();
    assert!(l.authorize_job(u, &job(4, "flux-dev")).unwrap().replayed);
    l.authorize_job(u, &job(5, "flux-dev")).unwrap();
    assert_eq!(l.quota_used(u, "dev").unwrap(), 5);
    // Schnell is not limited.
    l.authorize_job(u, &job(6, "flux-schnell")).unwrap();
    // Next calendar week: the quota is back.
    clock.set(Utc.with_ymd_and_hms(2026, 3, 9, 0, 0, 0).unwrap());
    assert_eq!(l.quota_used(u, "dev").unwrap(), 0);
    l.authorize_job(u, &job(7, "flux-dev")).unwrap();
    // Entitlements refusals come through authorize_job too.
    let mut big = job(8, "flux-schnell");
    big.params.batch = 2;
    assert!(matches!(l.authorize_job(u, &big), Err(LedgerError::Refused(Refusal::BatchTooLarge { .. }))));
    // Out of credits on a paid plan says when the next renewal comes.
    let v = l.add_user("vi", false, None).unwrap().id;
    l.set_plan(v, "starter", Some(Period::Weekly)).unwrap();
    let mut spent = 0;
    for i in 0..100 {
        match l.authorize_job(v, &job(100 + i, "flux-dev")) {
            Ok(a) => {
                l.capture(a.hold.id, None).unwrap();
                spent += a.price.total;
            }
            Err(LedgerError::Refused(Refusal::OutOfCredits { needed, available, next_renewal_at, .. })) => {
                assert_eq!(needed, 34);
                assert_eq!(available, 250 - spent);
                assert_eq!(next_renewal_at, Some(Utc.with_ymd_and_hms(2026, 3, 16, 0, 0, 0).unwrap()));
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(spent, 7 * 34);
    // Low-balance warning, once for the period: threshold 20% of 200 = 40.
    let lows: Vec<_> = l.events(v, 100).unwrap().into_iter().filter(|e| e.kind == "low_balance").collect();
    assert_eq!(lows.len(), 1, "{lows:?}");
    assert_eq!(lows[0].data["threshold"], 40);
    audit(&mut l);
}

#[test]
fn training_uses_the_allowance_with_hold_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, _clock) = open(&dir, PlansConfig::defaults());
    let u = l.add_user("ed", false, None).unwrap().id;
    let tr = |i: u32, images| TrainingRequest {
        job_id: format!("t{i}"),
        idempotency_key: format!("tk{i}"),
        images,
        custom: vec![],
        request_hash: None,
    };
    match l.authorize_training(u, &tr(0, 10)).unwrap_err() {
        LedgerError::Refused(Refusal::TrainingNotInPlan { plans_allowing, .. }) => {
            assert_eq!(plans_allowing, ["starter", "pro", "ultra", "max"])
        }
        other => panic!("{other:?}"),
    }
    l.set_plan(u, "pro", Some(Period::Weekly)).unwrap(); // 1 training per week
    assert!(matches!(
        l.authorize_training(u, &tr(1, 31)),
        Err(LedgerError::Refused(Refusal::TooManyTrainingImages { max: 30, .. }))
    ));
    let a = l.authorize_training(u, &tr(2, 30)).unwrap();
    assert!(matches!(l.authorize_training(u, &tr(3, 30)), Err(LedgerError::Refused(Refusal::OutOfCredits { .. }))));
    // The training failed: the allowance comes back.
    l.release(a.hold.id).unwrap();
    let a = l.authorize_training(u, &tr(4, 30)).unwrap();
    l.capture(a.hold.id, None).unwrap();
    let b = l.balance(u, Resource::Training).unwrap();
    assert_eq!((b.granted, b.available, b.spent), (1, 0, 1));
    // Credits untouched.
    assert_eq!(l.balance(u, Resource::Credits).unwrap().available, 500);
    // Yearly Pro: 12 up front.
    l.set_plan(u, "pro", Some(Period::Yearly)).unwrap();
    assert_eq!(l.balance(u, Resource::Training).unwrap().available, 12);
    let day = t0().date_naive();
    assert!(l.usage(u, day, day).unwrap().iter().any(|d| d.kind == UsageKind::Training && d.units == 1));
    audit(&mut l);
}

#[test]
fn ledger_entries_are_append_only_and_schema_is_versioned() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, _clock) = open(&dir, PlansConfig::defaults());
    l.add_user("fay", true, Some("s3cret")).unwrap();
    assert!(l.verify_password("fay", "s3cret").unwrap());
    assert!(!l.verify_password("fay", "nope").unwrap());
    assert!(matches!(l.add_user("fay", false, None), Err(LedgerError::UserExists(_))));
    // A name differing only in case (Unicode too) is the same person to whoever reads it.
    assert!(matches!(l.add_user("Fay", false, None), Err(LedgerError::UserExists(n)) if n == "fay"));
    l.add_user("Émile", false, None).unwrap();
    assert!(matches!(l.add_user("éMILE", false, None), Err(LedgerError::UserExists(n)) if n == "Émile"));
    assert!(matches!(l.add_user("", false, None), Err(LedgerError::Invalid(_))));
    assert!(matches!(l.add_user("a b", false, None), Err(LedgerError::Invalid(_))));
    let path = l.path().to_path_buf();
    drop(l);
    let conn = rusqlite_free_check(&path);
    assert_eq!(conn.0, ledger::schema::SCHEMA_VERSION);
    assert!(conn.1.contains("append-only"), "{}", conn.1);
    assert_eq!(conn.2.to_lowercase(), "wal");
    // Reopening an up-to-date database migrates nothing and works.
    let mut l = Ledger::open(&path, Arc::new(PlansConfig::defaults()), Arc::new(TestClock::new(t0()))).unwrap();
    assert_eq!(l.users().unwrap().len(), 2);
    l.audit().unwrap();
}

/// Reads user_version, tries an UPDATE on ledger_entries, and reads the journal mode through a
/// fresh connection opened by the ledger's own schema module.
fn rusqlite_free_check(path: &std::path::Path) -> (i64, String, String) {
    let conn = ledger::schema::open_connection(path).unwrap();
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    let err = conn.execute("UPDATE ledger_entries SET amount = amount + 1", []).unwrap_err().to_string();
    let del = conn.execute("DELETE FROM ledger_entries", []).unwrap_err().to_string();
    assert!(del.contains("append-only"));
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    (v, err, mode)
}

#[test]
fn video_jobs_count_against_the_weekly_video_quota_and_usage() {
    let mut text = ledger::plans::default_plans_toml().to_string();
    text.push_str(
        "\n[pricing.models.clip-video]\nkind = \"video\"\ntags = [\"video\"]\ndefault_steps = 20\nbase = 2.0\nper_mp_step = 0.5\ndefault_seconds = 2.0\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut l, _clock) = open(&dir, PlansConfig::from_toml(&text).unwrap());
    let u = l.add_user("gus", false, None).unwrap().id;
    l.grant(u, &GrantRequest::credits(500, GrantSource::TopUp, None)).unwrap();
    let job = |i: u32| JobRequest {
        job_id: format!("v{i}"),
        idempotency_key: format!("v{i}"),
        model_id: "clip-video".into(),
        params: JobParams::new(512, 512),
        request_hash: None,
    };
    for i in 0..2 {
        let a = l.authorize_job(u, &job(i)).unwrap();
        assert_eq!(a.price.total, 20);
        l.capture(a.hold.id, None).unwrap();
    }
    assert!(matches!(
        l.authorize_job(u, &job(2)),
        Err(LedgerError::Refused(Refusal::QuotaExhausted { limit: 2, used: 2, .. }))
    ));
    let day = t0().date_naive();
    let usage = l.usage(u, day, day).unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!((usage[0].kind, usage[0].jobs, usage[0].units, usage[0].credits), (UsageKind::Video, 2, 2, 40));
    audit(&mut l);
}

#[test]
fn the_sweeper_thread_releases_stale_holds_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = PlansConfig::defaults();
    cfg.metering.sweep_interval_secs = 1;
    let cfg = Arc::new(cfg);
    let clock = TestClock::new(t0());
    let mut l = Ledger::open_data_dir(dir.path(), cfg.clone(), Arc::new(clock.clone())).unwrap();
    let u = l.add_user("hal", false, None).unwrap().id;
    let h = l.place_hold(&HoldRequest::credits(u, "j", "k", 10)).unwrap().hold;
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let errs = errors.clone();
    let sweeper = ledger::Sweeper::spawn(l.path().to_path_buf(), cfg, Arc::new(clock.clone()), move |e| {
        errs.lock().unwrap().push(e.to_string())
    })
    .unwrap();
    clock.advance_secs(86_400);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while l.hold(h.id).unwrap().status == HoldStatus::Held {
        assert!(std::time::Instant::now() < deadline, "the sweeper did not run");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    sweeper.stop();
    assert!(errors.lock().unwrap().is_empty(), "{:?}", errors.lock().unwrap());
    assert_eq!(l.balance(u, Resource::Credits).unwrap().available, 50);
}

#[test]
fn an_idempotency_key_is_bound_to_the_request_it_was_first_used_for() {
    let dir = tempfile::tempdir().unwrap();
    let (mut l, _clock) = open(&dir, PlansConfig::defaults());
    let u = l.add_user("ida", false, None).unwrap().id;
    l.grant(u, &GrantRequest::credits(1000, GrantSource::TopUp, None)).unwrap();
    let req = |job: &str, batch: u32, hash: &str| JobRequest {
        job_id: job.into(),
        idempotency_key: "one-key".into(),
        model_id: "flux-schnell".into(),
        params: JobParams { batch, ..JobParams::new(512, 512) },
        request_hash: Some(hash.into()),
    };
    let first = l.authorize_job(u, &req("j1", 1, "hash-a")).unwrap();
    assert!(!first.replayed);
    // The same request again (a retry with a new job id): the first hold, nothing more held.
    let again = l.authorize_job(u, &req("j2", 1, "hash-a")).unwrap();
    assert!(again.replayed);
    assert_eq!((again.hold.id, again.hold.job_id.as_str()), (first.hold.id, "j1"));
    // Another request under the key: refused, whatever it would cost or be allowed.
    for other in [req("j3", 1, "hash-b"), req("j4", 8, "hash-c")] {
        match l.authorize_job(u, &other) {
            Err(LedgerError::IdempotencyConflict { job_id, .. }) => assert_eq!(job_id, "j1"),
            r => panic!("expected a conflict, got {r:?}"),
        }
    }
    assert_eq!(l.balance(u, Resource::Credits).unwrap().held, first.hold.amount);
    audit(&mut l);
}

#[test]
fn a_grant_past_the_caps_is_refused_and_writes_nothing() {
    use atelier::ledger::{MAX_GRANT, MAX_OPEN, Resource};
    let dir = tempfile::tempdir().unwrap();
    let (mut l, _clock) = open(&dir, PlansConfig::defaults());
    let u = l.add_user("cy", false, None).unwrap().id;
    let grants = |l: &mut Ledger| l.grants(u).unwrap().len();
    let before = grants(&mut l);
    // Near i64::MAX: once stored, every balance sum over this user's grants would overflow.
    let e = l.grant(u, &GrantRequest::credits(9_223_372_036_854_775_000, GrantSource::Admin, None)).unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
    assert_eq!(grants(&mut l), before, "nothing written");
    // Up to the cap on open credits, then refused, the refused grant writing nothing.
    let mut accepted = 0;
    while l.grant(u, &GrantRequest::credits(MAX_GRANT, GrantSource::Admin, None)).is_ok() {
        accepted += 1;
        assert!(accepted <= MAX_OPEN / MAX_GRANT, "the cap did not stop the grants");
    }
    let at_cap = grants(&mut l);
    let e = l.grant(u, &GrantRequest::credits(MAX_GRANT, GrantSource::Admin, None)).unwrap_err();
    assert!(e.to_string().contains("open credits"), "{e}");
    assert_eq!(grants(&mut l), at_cap, "nothing written");
    // The user stays usable: the balance reads, jobs can still be held against it.
    let b = l.balance(u, Resource::Credits).unwrap();
    assert!(b.available <= MAX_OPEN && b.available > MAX_OPEN - MAX_GRANT, "{b:?}");
    l.place_hold(&HoldRequest::credits(u, "j", "k", 45)).unwrap();
    audit(&mut l);
}
