//! Log in → submit → progress over SSE → image in the gallery → credits captured at the quoted
//! price; cancel → released; out of credits → 402 with the renewal; not in the plan → 403.

use serde_json::json;

use crate::common::*;

#[test]
fn generate_watch_gallery_and_pay_the_quoted_price() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "alice", "alice-pass-1", "starter", false);
    let server = Server::start(data, None);
    let alice = Client::login(&server.url, "alice", "alice-pass-1");

    // The price shown before submitting.
    let q = alice.get("/api/price?model=demo-schnell&width=512&height=512&batch=2").json();
    assert_eq!(q["allowed"], true, "{q}");
    let quoted = q["price"]["total"].as_i64().unwrap();
    // 2 × max(10, ⌈4 + 0.262144 MP × 4 steps⌉): the per-image minimum of 10.
    assert_eq!(quoted, 20);
    let before = alice.balance();
    // Starter's 200 a week and the 50 every account gets at sign-up.
    assert_eq!(before, 250);

    // A change without the CSRF token is refused, and nothing is held.
    let no_csrf = alice.request_with("POST", "/api/jobs", Some(schnell("x")), &[("X-CSRF-Token", "wrong")]);
    assert_eq!(no_csrf.status, 403);
    assert_eq!(alice.balance(), before);

    let mut spec = schnell("a lighthouse at dusk");
    spec["batch"] = json!(2);
    let r = alice.post("/api/jobs", spec.clone());
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let job = r.json()["job"].clone();
    assert_eq!(job["price"], quoted);
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    // While it runs, the price is held.
    let usage = alice.get("/api/usage").json();
    assert_eq!(
        usage["credits_available"].as_i64().unwrap()
            + usage["credits_held"].as_i64().unwrap()
            + usage["credits_spent"].as_i64().unwrap(),
        before
    );

    let events = alice.sse_until(&format!("/api/jobs/{id}/events"), |e| {
        ["succeeded", "failed", "canceled"].contains(&e["type"].as_str().unwrap())
    });
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let last = events.last().unwrap();
    assert_eq!(last["type"], "succeeded", "events: {kinds:?} {last}");
    let steps: Vec<(u64, u64, u64)> = events
        .iter()
        .filter(|e| e["type"] == "step")
        .map(|e| (e["image"].as_u64().unwrap(), e["step"].as_u64().unwrap(), e["steps"].as_u64().unwrap()))
        .collect();
    // Either the whole run was watched, or the stream began mid-way: the steps it saw count up.
    assert!(!steps.is_empty(), "no step events: {kinds:?}");
    assert!(steps.windows(2).all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)), "{steps:?}");
    assert!(steps.iter().all(|s| s.2 == 4));
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "preview" && e["data_url"].as_str().unwrap().starts_with("data:image/png;base64,"))
    );
    let images: Vec<String> =
        last["images"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(images.len(), 2);
    assert_eq!(last["credits_charged"], quoted);

    // The gallery has both, newest first, with metadata and the PNG's A1111 text.
    let g = alice.get("/api/images?page=1&per_page=10").json();
    assert_eq!(g["total"], 2);
    let listed: Vec<&str> = g["images"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(listed, images.iter().map(String::as_str).collect::<Vec<_>>());
    let meta = alice.get(&format!("/api/images/{}", images[0])).json()["image"].clone();
    assert_eq!(meta["prompt"], "a lighthouse at dusk");
    assert_eq!((meta["width"].as_u64(), meta["height"].as_u64()), (Some(512), Some(512)));
    let png = alice.get(&format!("/api/images/{}/file", images[0]));
    assert_eq!(png.status, 200);
    assert_eq!(png.header("content-type"), Some("image/png"));
    assert_eq!(&png.body[..8], b"\x89PNG\r\n\x1a\n");
    let text = String::from_utf8_lossy(&png.body);
    assert!(
        text.contains("parameters")
            && text.contains("a lighthouse at dusk")
            && text.contains(&format!("Seed: {}", meta["seed"]))
    );
    let dl = alice.get(&format!("/api/images/{}/file?download=true", images[0]));
    assert!(dl.header("content-disposition").unwrap().starts_with("attachment"));

    // Charged exactly the quoted price.
    let usage = alice.get("/api/usage").json();
    assert_eq!(usage["credits_available"].as_i64().unwrap(), before - quoted);
    assert_eq!(usage["credits_held"], 0);
    assert_eq!(usage["credits_spent"], quoted);
    let today = usage["history"].as_array().unwrap();
    assert_eq!(today.iter().map(|d| d["credits"].as_i64().unwrap()).sum::<i64>(), quoted);

    // Delete one image: gone from the listing and its file.
    assert_eq!(alice.request("DELETE", &format!("/api/images/{}", images[1]), None).status, 200);
    assert_eq!(alice.get(&format!("/api/images/{}", images[1])).status, 404);
    assert_eq!(alice.get("/api/images").json()["total"], 1);

    // Cancel a long job: its hold is released, nothing is charged.
    let before = alice.balance();
    let long = alice.submit(
        json!({"model": "demo-dev", "prompt": "long", "width": 1024, "height": 1024, "steps": 100, "batch": 1}),
    );
    let held = long["price"].as_i64().unwrap();
    assert_eq!(alice.balance(), before - held);
    let r = alice.post(&format!("/api/jobs/{}/cancel", long["id"].as_str().unwrap()), json!({}));
    assert!(r.status == 200 || r.status == 202, "{}", r.status);
    let done = alice.wait_job(long["id"].as_str().unwrap());
    assert_eq!(done["status"], "canceled");
    assert_eq!(alice.balance(), before);
    // Canceling again is a conflict, not a second release.
    assert_eq!(alice.post(&format!("/api/jobs/{}/cancel", long["id"].as_str().unwrap()), json!({})).status, 409);

    // Idempotency: the same key twice is one job, charged once.
    let before = alice.balance();
    let a = alice.request_with("POST", "/api/jobs", Some(schnell("once")), &[("Idempotency-Key", "k-1")]);
    let b = alice.request_with("POST", "/api/jobs", Some(schnell("once")), &[("Idempotency-Key", "k-1")]);
    assert_eq!((a.status, b.status), (201, 200));
    assert_eq!(a.json()["job"]["id"], b.json()["job"]["id"]);
    alice.wait_job(a.json()["job"]["id"].as_str().unwrap());
    assert_eq!(alice.balance(), before - 10);
    drop(server);
}

#[test]
fn refusals_say_why_out_of_credits_402_not_in_plan_403() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // A third model with the "beta" tag, which Free and Starter do not include.
    let config = config_with(
        data,
        "[models.demo-beta]\npath = \"weights/demo/schnell\"\nprice_as = \"flux-schnell\"\ntags = [\"beta\"]\ndefault_width = 512\ndefault_height = 512\n",
    );
    add_user(data, Some(&config), "dave", "dave-pass-1", "starter", false);
    add_user(data, Some(&config), "bob", "bob-pass-12", "free", false);
    add_user(data, Some(&config), "fay", "fay-pass-12", "free", false);
    cli(data, Some(&config), &["user", "grant", "fay", "100"], "");
    let server = Server::start(data, Some(&config));
    let dave = Client::login(&server.url, "dave", "dave-pass-1");
    let bob = Client::login(&server.url, "bob", "bob-pass-12");

    // 403: a model, a parameter, a batch the plan does not allow.
    let r = bob.post("/api/jobs", json!({"model": "demo-beta", "prompt": "p", "width": 512, "height": 512}));
    assert_eq!(r.status, 403, "{}", r.message());
    assert!(r.message().contains("beta"), "{}", r.message());
    assert_eq!(r.json()["error"]["details"]["reason"], "model_not_in_plan");
    assert!(r.json()["error"]["details"]["plans_allowing"].as_array().unwrap().iter().any(|p| p == "ultra"));
    let r =
        bob.post("/api/jobs", json!({"model": "demo-schnell", "prompt": "p", "width": 512, "height": 512, "seed": 7}));
    assert_eq!(r.status, 403);
    assert!(r.message().contains("seed"), "{}", r.message());
    let r =
        bob.post("/api/jobs", json!({"model": "demo-schnell", "prompt": "p", "width": 512, "height": 512, "batch": 2}));
    assert_eq!(r.status, 403);
    assert!(r.message().contains("batch"), "{}", r.message());
    // The models list says the same before anyone submits.
    let models = bob.get("/api/models").json();
    let beta = models["models"].as_array().unwrap().iter().find(|m| m["id"] == "demo-beta").unwrap().clone();
    assert_eq!(beta["access"], "locked");
    let dev = models["models"].as_array().unwrap().iter().find(|m| m["id"] == "demo-dev").unwrap().clone();
    assert_eq!(dev["access"], "limited");
    assert_eq!(dev["quota"]["left"], 5);
    assert_eq!(bob.balance(), 50, "refusals hold nothing");

    // Free has dev models "limited": 5 images a week, then 402 until Monday.
    let fay = Client::login(&server.url, "fay", "fay-pass-12");
    let dev = json!({"model": "demo-dev", "prompt": "d", "width": 512, "height": 512});
    for _ in 0..5 {
        let j = fay.submit(dev.clone());
        assert_eq!(fay.wait_job(j["id"].as_str().unwrap())["status"], "succeeded");
    }
    let r = fay.post("/api/jobs", dev.clone());
    assert_eq!(r.status, 402, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["details"]["reason"], "quota_exhausted");
    assert!(r.json()["error"]["details"]["resets_at"].is_string());
    assert!(r.json()["error"]["details"]["plans_allowing"].as_array().unwrap().iter().any(|p| p == "starter"));
    let m = fay.get("/api/models").json();
    let d = m["models"].as_array().unwrap().iter().find(|m| m["id"] == "demo-dev").unwrap().clone();
    assert_eq!((d["access"].as_str(), d["quota"]["left"].as_u64()), (Some("locked"), Some(0)), "{d}");
    let q = fay.get("/api/price?model=demo-dev&width=512&height=512").json();
    assert_eq!((q["allowed"].as_bool(), q["status"].as_u64()), (Some(false), Some(402)), "{q}");
    assert_eq!(q["details"]["plans_allowing"][0], "starter", "{q}");
    // Schnell has no tag: still open.
    fay.submit(schnell("still fine"));

    // 400: bad input.
    for bad in [
        json!({"model": "demo-schnell", "prompt": "", "width": 512, "height": 512}),
        json!({"model": "demo-schnell", "prompt": "p", "width": 500, "height": 512}),
        json!({"model": "demo-schnell", "prompt": "p", "width": 512, "height": 99999}),
        json!({"model": "demo-schnell", "prompt": "p"}),
    ] {
        let r = dave.post("/api/jobs", bad.clone());
        assert_eq!(r.status, 400, "{bad}: {}", String::from_utf8_lossy(&r.body));
        assert!(!r.message().is_empty());
    }
    assert_eq!(
        dave.post("/api/jobs", json!({"model": "nope", "prompt": "p", "width": 512, "height": 512})).status,
        404
    );
    // A control character in the prompt (a NUL would cut the PNG's text short): 400.
    let r =
        dave.post("/api/jobs", json!({"model": "demo-schnell", "prompt": "red\u{0}heart", "width": 64, "height": 64}));
    assert_eq!(r.status, 400, "{}", r.message());
    assert!(r.message().contains("control character"), "{}", r.message());
    // A body past the JSON limit: 413, not 400.
    let huge = json!({"model": "demo-schnell", "prompt": "p".repeat(300 * 1024), "width": 64, "height": 64});
    let r = dave.post_body("/api/jobs", huge.to_string().as_bytes(), "application/json");
    assert_eq!(r.status, 413, "{}", r.message());

    // 402: out of credits, saying when they renew. Dave has 250; two long dev jobs hold 218.
    let long = dave.submit(json!({"model": "demo-dev", "prompt": "a", "width": 1024, "height": 1024, "steps": 100}));
    assert_eq!(long["price"], 109);
    let long2 = dave.submit(json!({"model": "demo-dev", "prompt": "a2", "width": 1024, "height": 1024, "steps": 100}));
    let r = dave
        .post("/api/jobs", json!({"model": "demo-dev", "prompt": "b", "width": 1024, "height": 1024, "steps": 100}));
    assert_eq!(r.status, 402, "{}", String::from_utf8_lossy(&r.body));
    let details = r.json()["error"]["details"].clone();
    assert_eq!(details["reason"], "out_of_credits");
    assert_eq!((details["needed"].as_i64(), details["available"].as_i64()), (Some(109), Some(32)));
    assert!(details["next_renewal_at"].is_string(), "{details}");
    assert!(r.message().contains("next renewal"), "{}", r.message());
    let q = dave.get("/api/price?model=demo-dev&width=1024&height=1024&steps=100").json();
    assert_eq!((q["allowed"].as_bool(), q["status"].as_u64()), (Some(false), Some(402)));
    for j in [&long2, &long] {
        dave.post(&format!("/api/jobs/{}/cancel", j["id"].as_str().unwrap()), json!({}));
        assert_eq!(dave.wait_job(j["id"].as_str().unwrap())["status"], "canceled");
    }
    assert_eq!(dave.balance(), 250);

    // 429: too many jobs waiting (the cap is 8 per user) while one runs.
    let blocker =
        dave.submit(json!({"model": "demo-dev", "prompt": "blocker", "width": 1024, "height": 1024, "steps": 100}));
    let mut queued = Vec::new();
    let mut refused = None;
    for i in 0..12 {
        let r = dave.post("/api/jobs", schnell(&format!("q{i}")));
        if r.status == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 201);
        queued.push(r.json()["job"]["id"].as_str().unwrap().to_string());
    }
    let refused = refused.expect("the queue cap refuses");
    assert!(refused.header("retry-after").is_some());
    assert!(queued.len() >= 7, "{}", queued.len());
    for id in queued.iter().chain([&blocker["id"].as_str().unwrap().to_string()]) {
        dave.post(&format!("/api/jobs/{id}/cancel"), json!({}));
    }
    for id in &queued {
        dave.wait_job(id);
    }
    dave.wait_job(blocker["id"].as_str().unwrap());
    assert_eq!(dave.balance(), 250);
}
