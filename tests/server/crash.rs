//! kill -9 of the server in the middle of a job, then a restart: the interrupted job fails
//! with its credits released, the queued one still runs and is charged once, and the ledger's
//! audit holds. Also the window between placing a hold and saving its job.

use std::sync::Arc;

use serde_json::json;

use atelier::jobs::Conn;
use atelier::jobs::Jobs;
use atelier::ledger::{JobParams, JobRequest, PlansConfig, SystemClock};

use crate::common::*;

#[test]
fn kill_9_mid_job_loses_no_credit_and_leaves_no_hold() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "carl", "carl-pass-1", "starter", false);
    let mut server = Server::start(data, None);
    let carl = Client::login(&server.url, "carl", "carl-pass-1");
    let long = carl.submit(json!({"model": "demo-dev", "prompt": "long", "width": 1024, "height": 1024, "steps": 100}));
    let queued = carl.submit(schnell("after the crash"));
    let (lid, qid) = (long["id"].as_str().unwrap().to_string(), queued["id"].as_str().unwrap().to_string());
    carl.sse_until(&format!("/api/jobs/{lid}/events"), |e| e["type"] == "step");
    let usage = carl.get("/api/usage").json();
    assert_eq!(
        (usage["credits_available"].as_i64(), usage["credits_held"].as_i64()),
        (Some(250 - 109 - 10), Some(119))
    );

    server.kill9();
    let server = Server::start(data, None);
    assert!(server.log().contains("settled 1 credit holds"), "{}", server.log());
    let carl = Client::login(&server.url, "carl", "carl-pass-1");
    let l = carl.get(&format!("/api/jobs/{lid}")).json()["job"].clone();
    assert_eq!(l["status"], "failed");
    assert!(l["error"].as_str().unwrap().contains("stopped"), "{l}");
    let q = carl.wait_job(&qid);
    assert_eq!(q["status"], "succeeded");
    let usage = carl.get("/api/usage").json();
    assert_eq!(usage["credits_held"], 0);
    assert_eq!(usage["credits_spent"], 10);
    assert_eq!(usage["credits_available"], 240);
    assert!(usage["holds"].as_array().unwrap().is_empty());
    drop(server);

    // Every grant and hold matches the append-only entries.
    let mut ledger =
        atelier::ledger::Ledger::open_data_dir(data, Arc::new(PlansConfig::defaults()), Arc::new(SystemClock)).unwrap();
    ledger.audit().unwrap();
}

#[test]
fn a_hold_without_its_job_is_released_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = atelier::config::Config::default();
    let (models, plans) = atelier::models::ModelRegistry::build(&config, &[]).unwrap();
    let mut conn = Conn::open(dir.path(), Arc::new(plans), Arc::new(SystemClock)).unwrap();
    let user = conn.ledger.add_user("eve", false, None).unwrap();
    // The process "died" after the ledger placed the hold and before the job row was written.
    let req = JobRequest {
        job_id: "orphan".into(),
        idempotency_key: "orphan".into(),
        model_id: "demo-schnell".into(),
        params: JobParams::new(512, 512),
        request_hash: None,
    };
    let auth = conn.ledger.authorize_job(user.id, &req).unwrap();
    assert_eq!(conn.ledger.balance(user.id, atelier::ledger::Resource::Credits).unwrap().held, auth.hold.amount);
    let loras = Arc::new(atelier::loras::Library::new(config.engine.loras_dir(), dir.path()));
    let datasets = Arc::new(atelier::datasets::Datasets::new(dir.path()));
    let jobs = Jobs::new(
        Arc::new(models),
        config.limits.clone(),
        config.queue.clone(),
        dir.path().join("images"),
        loras,
        datasets,
    );
    assert_eq!(jobs.reconcile(&mut conn).unwrap(), 1);
    let b = conn.ledger.balance(user.id, atelier::ledger::Resource::Credits).unwrap();
    assert_eq!((b.held, b.available), (0, 50));
    // And a second start finds nothing left to settle.
    assert_eq!(jobs.reconcile(&mut conn).unwrap(), 0);

    // Holds and job rows are now written in one transaction, so a hold without its job can
    // only come from an older version. A retry under such a key is refused (it cannot be told
    // what request the key was for) and makes no job on a hold that the next start releases.
    let req = JobRequest { job_id: "orphan2".into(), idempotency_key: "retry-key".into(), ..req };
    let auth = conn.ledger.authorize_job(user.id, &req).unwrap();
    let spec = atelier::jobs::store::JobSpec {
        model: "demo-schnell".into(),
        prompt: "p".into(),
        width: 512,
        height: 512,
        steps: None,
        seed: None,
        guidance: None,
        batch: 1,
        loras: Vec::new(),
    };
    let e = jobs.submit(&mut conn, user.id, spec.clone(), Some("retry-key".into())).unwrap_err();
    assert!(matches!(e, atelier::jobs::SubmitError::KeyReused { .. }), "{e}");
    assert_eq!(conn.ledger.balance(user.id, atelier::ledger::Resource::Credits).unwrap().held, auth.hold.amount);
    assert_eq!(jobs.reconcile(&mut conn).unwrap(), 1, "the orphan hold is released at the next start");
    // A new key works as usual, and its hold and job come together.
    let s = jobs.submit(&mut conn, user.id, spec, Some("new-key".into())).unwrap();
    assert_eq!(conn.ledger.hold(s.job.hold_id).unwrap().job_id, s.job.id);
    assert_eq!(jobs.reconcile(&mut conn).unwrap(), 0, "a queued job keeps its hold");
}
