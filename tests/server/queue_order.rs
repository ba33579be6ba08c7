//! Queue order with several users and classes: weighted between classes (instant 8, fastest 4,
//! priority 2, standard 1), users taking turns within a class, then first come first served.

use serde_json::json;

use crate::common::*;

#[test]
fn jobs_start_by_class_weight_then_user_turns_then_fifo() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    for (name, plan) in
        [("blk", "starter"), ("f1", "free"), ("f2", "free"), ("pro", "pro"), ("ult", "ultra"), ("mx", "max")]
    {
        add_user(data, None, name, &format!("{name}-password"), plan, false);
    }
    let server = Server::start(data, None);
    let c = |n: &str| Client::login(&server.url, n, &format!("{n}-password"));
    let (blk, f1, f2, pro, ult, mx) = (c("blk"), c("f1"), c("f2"), c("pro"), c("ult"), c("mx"));

    // A long standard-class job holds the worker while the others queue up.
    let blocker =
        blk.submit(json!({"model": "demo-dev", "prompt": "blocker", "width": 1024, "height": 1024, "steps": 100}));
    let bid = blocker["id"].as_str().unwrap().to_string();
    blk.sse_until(&format!("/api/jobs/{bid}/events"), |e| e["type"] == "step");

    // Lower classes submit first: order must come from the classes, not arrival.
    let mut by_label = Vec::new();
    for (label, client) in [("f1a", &f1), ("f1b", &f1), ("f2c", &f2), ("f2d", &f2)] {
        by_label.push((label, client.clone(), client.submit(schnell(label))["id"].as_str().unwrap().to_string()));
    }
    for (prefix, client) in [("P", &pro), ("F", &ult), ("I", &mx)] {
        for k in 0..3 {
            let label: &'static str = Box::leak(format!("{prefix}{k}").into_boxed_str());
            by_label.push((label, client.clone(), client.submit(schnell(label))["id"].as_str().unwrap().to_string()));
        }
    }
    // Positions while waiting follow the same order.
    let expected = ["I0", "I1", "F0", "I2", "F1", "P0", "F2", "P1", "P2", "f1a", "f2c", "f1b", "f2d"];
    for (label, client, id) in &by_label {
        let pos = client.get(&format!("/api/jobs/{id}")).json()["job"]["position"].as_u64().unwrap();
        let want = expected.iter().position(|l| l == label).unwrap() as u64 + 1;
        assert_eq!(pos, want, "queue position of {label}");
    }
    blk.post(&format!("/api/jobs/{bid}/cancel"), json!({}));
    let mut started = Vec::new();
    for (label, client, id) in &by_label {
        let j = client.wait_job(id);
        assert_eq!(j["status"], "succeeded", "{label}: {j}");
        started.push((j["start_order"].as_i64().unwrap(), *label));
    }
    started.sort();
    let order: Vec<&str> = started.iter().map(|(_, l)| *l).collect();
    assert_eq!(order, expected);
}
