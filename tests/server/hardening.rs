//! Bad input and hostile use: idempotency keys bound to one request, the queue limit under
//! concurrency, credentials that end with a password change or a disabled account, no server
//! paths for users, cancels that race, links that do not come from the request, login
//! throttling per account and address, /metrics access, and a locked database.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

/// Starts a long job of `who`'s that keeps the worker busy; returns its id once it runs.
fn block_worker(who: &Client) -> String {
    let j = who.submit(json!({"model": "demo-dev", "prompt": "blocker", "width": 1024, "height": 1024, "steps": 100}));
    let id = j["id"].as_str().unwrap().to_string();
    who.sse_until(&format!("/api/jobs/{id}/events"), |e| e["type"] == "step");
    id
}

#[test]
fn an_idempotency_key_binds_one_request_under_concurrent_retries() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "blk", "blk-password", "starter", false);
    add_user(data, None, "fred", "fred-password", "free", false);
    cli(data, None, &["user", "grant", "fred", "100000"], "");
    let server = Server::start(data, None);
    let blk = Client::login(&server.url, "blk", "blk-password");
    let fred = Client::login(&server.url, "fred", "fred-password");
    let blocker = block_worker(&blk);

    // Same key, different bodies: one Free may run, one Free may not (batch 8), one with
    // another prompt at the same price, one on the dev model (a weekly quota of 5 on Free).
    let bodies = [
        json!({"model": "demo-schnell", "prompt": "a", "width": 512, "height": 512, "batch": 1}),
        json!({"model": "demo-schnell", "prompt": "a", "width": 512, "height": 512, "batch": 8}),
        json!({"model": "demo-schnell", "prompt": "b", "width": 512, "height": 512, "batch": 1}),
        json!({"model": "demo-dev", "prompt": "a", "width": 512, "height": 512, "batch": 1}),
    ];
    let quote = |b: &Value| {
        let q = format!("/api/price?model={}&width=512&height=512&batch=1", b["model"].as_str().unwrap());
        fred.get(&q).json()["price"]["total"].as_i64().unwrap()
    };
    let prices: Vec<i64> = bodies.iter().map(quote).collect();
    let rounds = 25;
    for round in 0..rounds {
        let key = format!("race-{round}");
        // Two requests per body, all at once.
        let barrier = Arc::new(Barrier::new(bodies.len() * 2));
        let handles: Vec<_> = (0..bodies.len() * 2)
            .map(|i| {
                let (c, b, k, bar) = (fred.clone(), bodies[i % bodies.len()].clone(), key.clone(), barrier.clone());
                std::thread::spawn(move || {
                    bar.wait();
                    let r = c.request_with("POST", "/api/jobs", Some(b.clone()), &[("Idempotency-Key", &k)]);
                    (b, r.status, r.body)
                })
            })
            .collect();
        let answers: Vec<(Value, u16, Vec<u8>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let mut job_ids = std::collections::BTreeSet::new();
        for (body, status, resp) in &answers {
            let text = String::from_utf8_lossy(resp);
            match status {
                200 | 201 => {
                    let job = &serde_json::from_slice::<Value>(resp).unwrap()["job"];
                    job_ids.insert(job["id"].as_str().unwrap().to_string());
                    // Whoever got the job back sent exactly the request it was made from.
                    for f in ["model", "prompt", "batch"] {
                        assert_eq!(job["spec"][f], body[f], "round {round}: {f} of {job} vs {body}");
                    }
                    let i = bodies.iter().position(|b| b == body).unwrap();
                    assert_eq!(job["price"].as_i64().unwrap(), prices[i], "round {round}: priced as checked");
                }
                403 | 402 => {
                    assert!(body["batch"] == 8 || body["model"] == "demo-dev", "round {round}: {status} {text}")
                }
                422 => assert!(text.contains("idempotency_key_reused"), "{text}"),
                409 => assert!(text.contains("idempotency_key_in_use"), "{text}"),
                other => panic!("round {round}: unexpected {other}: {text}"),
            }
        }
        assert!(job_ids.len() <= 1, "round {round}: one key made several jobs: {job_ids:?}");
        for id in &job_ids {
            assert_eq!(fred.post(&format!("/api/jobs/{id}/cancel"), json!({})).status, 200);
        }
    }
    // Every job of Fred's is one of the requests, at its price, within Free's batch limit.
    let jobs = fred.get("/api/jobs?limit=500").json()["jobs"].as_array().unwrap().clone();
    assert!(!jobs.is_empty());
    for j in &jobs {
        assert_eq!(j["spec"]["batch"], 1, "{j}");
        let i = bodies
            .iter()
            .position(|b| b["model"] == j["spec"]["model"] && b["prompt"] == j["spec"]["prompt"] && b["batch"] == 1)
            .unwrap();
        assert_eq!(j["price"].as_i64().unwrap(), prices[i]);
    }
    let usage = fred.get("/api/usage").json();
    assert_eq!(usage["credits_held"], 0, "every canceled job was released: {usage}");
    blk.post(&format!("/api/jobs/{blocker}/cancel"), json!({}));
}

#[test]
fn the_queue_limit_holds_under_concurrent_submits_and_keys_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "blk", "blk-password", "starter", false);
    add_user(data, None, "gina", "gina-password", "pro", false);
    let server = Server::start(data, None);
    let blk = Client::login(&server.url, "blk", "blk-password");
    let gina = Client::login(&server.url, "gina", "gina-password");
    let blocker = block_worker(&blk);

    let barrier = Arc::new(Barrier::new(12));
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let (c, bar) = (gina.clone(), barrier.clone());
            std::thread::spawn(move || {
                bar.wait();
                c.post("/api/jobs", schnell(&format!("q{i}"))).status
            })
        })
        .collect();
    let mut statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    statuses.sort();
    assert_eq!(statuses, [vec![201; 8], vec![429; 4]].concat(), "the limit is 8 waiting jobs");
    let queued = gina.get("/api/jobs?status=queued").json()["jobs"].as_array().unwrap().len();
    assert_eq!(queued, 8);

    // An Idempotency-Key that is not plain ASCII is refused, not ignored (raw bytes: HTTP
    // clients refuse to send them, browsers and scripts do not).
    let cookie = gina.cookie.clone().unwrap();
    let csrf = gina.csrf.clone().unwrap();
    let body = serde_json::to_vec(&schnell("k")).unwrap();
    for key in [&b"caf\xc3\xa9-1"[..], b"two words", b""] {
        let mut raw = format!(
            "POST /api/jobs HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nX-CSRF-Token: {csrf}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nIdempotency-Key: ",
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(key);
        raw.extend_from_slice(b"\r\n\r\n");
        raw.extend_from_slice(&body);
        let answer = raw_request(&server.url, &raw);
        assert!(answer.starts_with("HTTP/1.1 400"), "{key:?}: {answer}");
        assert!(answer.contains("Idempotency-Key"), "{answer}");
    }
    let after = gina.get("/api/jobs?status=queued").json()["jobs"].as_array().unwrap().len();
    assert_eq!(after, 8, "no job was made for a refused key");
    for j in gina.get("/api/jobs?status=queued").json()["jobs"].as_array().unwrap() {
        gina.post(&format!("/api/jobs/{}/cancel", j["id"].as_str().unwrap()), json!({}));
    }
    blk.post(&format!("/api/jobs/{blocker}/cancel"), json!({}));
}

/// Sends raw bytes to the server; returns the whole answer as text.
fn raw_request(url: &str, raw: &[u8]) -> String {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn concurrent_cancels_answer_what_the_job_became() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "blk", "blk-password", "starter", false);
    add_user(data, None, "hal", "hal-password", "pro", false);
    let server = Server::start(data, None);
    let blk = Client::login(&server.url, "blk", "blk-password");
    let hal = Client::login(&server.url, "hal", "hal-password");
    let blocker = block_worker(&blk);
    let before = hal.balance();
    for round in 0..10 {
        let id = hal.submit(schnell(&format!("c{round}")))["id"].as_str().unwrap().to_string();
        let barrier = Arc::new(Barrier::new(6));
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let (c, bar, id) = (hal.clone(), barrier.clone(), id.clone());
                std::thread::spawn(move || {
                    bar.wait();
                    let r = c.post(&format!("/api/jobs/{id}/cancel"), json!({}));
                    (r.status, String::from_utf8_lossy(&r.body).into_owned())
                })
            })
            .collect();
        let answers: Vec<(u16, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (status, body) in &answers {
            assert!(
                (*status == 200 && body.contains("\"canceled\"")) || *status == 409,
                "round {round}: a cancel of a queued job answered {status} {body}"
            );
        }
        assert!(answers.iter().any(|(s, _)| *s == 200));
    }
    assert_eq!(hal.balance(), before, "every canceled job was released once");
    blk.post(&format!("/api/jobs/{blocker}/cancel"), json!({}));
}

#[test]
fn disabling_an_account_cancels_its_jobs_and_ends_its_streams() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "root", "root-password", "free", true);
    add_user(data, None, "blk", "blk-password", "starter", false);
    add_user(data, None, "ivy", "ivy-password", "pro", false);
    let server = Server::start(data, None);
    let root = Client::login(&server.url, "root", "root-password");
    let blk = Client::login(&server.url, "blk", "blk-password");
    let ivy = Client::login(&server.url, "ivy", "ivy-password");
    let blocker = block_worker(&blk);
    let before = ivy.balance();
    let ids: Vec<String> =
        (0..3).map(|i| ivy.submit(schnell(&format!("d{i}")))["id"].as_str().unwrap().to_string()).collect();
    assert!(ivy.balance() < before);
    let ivy_id = ivy.get("/api/session").json()["user"]["id"].as_i64().unwrap();

    // Ivy's progress stream ends when the account is disabled.
    let stream = {
        let ivy = ivy.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            ivy.sse_until("/api/events", |_| false);
            started.elapsed()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let r = root.post(&format!("/api/admin/users/{ivy_id}/disable"), json!({"disabled": true}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["jobs_canceled"], 3);
    let open_for = stream.join().unwrap();
    assert!(open_for < Duration::from_secs(10), "the stream stayed open {open_for:?} after the account was disabled");
    let usage = root.get(&format!("/api/admin/users/{ivy_id}")).json();
    assert_eq!(usage["credits_available"].as_i64().unwrap(), before, "the queued jobs' credits came back");
    assert_eq!(usage["credits_held"], 0);
    let queue = root.get("/api/admin/queue").json();
    for id in &ids {
        let j = queue["recent"].as_array().unwrap().iter().find(|j| j["id"] == id.as_str()).unwrap();
        assert_eq!(j["status"], "canceled");
    }
    blk.post(&format!("/api/jobs/{blocker}/cancel"), json!({}));
}

#[test]
fn streams_close_when_their_session_or_key_ends() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "jo", "jo-password", "pro", false);
    let server = Server::start(data, None);
    let jo = Client::login(&server.url, "jo", "jo-password");
    let other = Client::login(&server.url, "jo", "jo-password");
    let key = jo.post("/api/keys", json!({"label": "k"})).json();
    let via_key = Client::new(&server.url).with_key(key["key"].as_str().unwrap());
    let key_id = key["info"]["id"].as_i64().unwrap();
    // Each stream reports when it ends; a stream that never ends fails the test at the
    // timeout instead of hanging it.
    let watch = |c: Client| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            c.sse_until("/api/events", |_| false);
            let _ = tx.send(());
        });
        rx
    };
    let by_session = watch(other.clone());
    let by_key = watch(via_key.clone());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(other.post("/api/logout", json!({})).status, 200);
    assert!(by_session.recv_timeout(Duration::from_secs(10)).is_ok(), "the logged-out session's stream did not close");
    assert_eq!(jo.request("DELETE", &format!("/api/keys/{key_id}"), None).status, 200);
    assert!(by_key.recv_timeout(Duration::from_secs(10)).is_ok(), "the revoked key's stream did not close");
}

#[test]
fn password_rules_are_the_same_everywhere_and_a_reset_revokes_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "root", "root-password", "free", true);
    add_user(data, None, "kim", "kim-password", "free", false);
    let key = cli(data, None, &["user", "api-key", "kim", "--label", "script"], "").trim().to_string();
    let server = Server::start(data, None);
    let root = Client::login(&server.url, "root", "root-password");
    let kim = Client::login(&server.url, "kim", "kim-password");
    let via_key = Client::new(&server.url).with_key(&key);
    assert_eq!(via_key.get("/api/usage").status, 200);

    let max = "p".repeat(1024);
    let over = "p".repeat(1025);
    // Over the maximum: refused when set, by every way of setting one.
    let r = kim.post("/api/password", json!({"current": "kim-password", "new": over}));
    assert_eq!(r.status, 400, "{}", r.message());
    let r = root.post("/api/admin/users", json!({"name": "long", "password": over}));
    assert_eq!(r.status, 400, "{}", r.message());
    let out = std::process::Command::new(bin())
        .current_dir(repo())
        .arg("--data")
        .arg(data)
        .args(["user", "passwd", "kim"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(format!("{over}\n").as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success(), "user passwd took a 1025-byte password");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1024"), "{}", String::from_utf8_lossy(&out.stderr));
    // At the maximum: set, and logs in.
    assert_eq!(root.post("/api/admin/users", json!({"name": "long", "password": max})).status, 201);
    Client::login(&server.url, "long", &max);

    // An admin's reset from the CLI ends the sessions and revokes the keys.
    let out = cli(data, None, &["user", "passwd", "kim"], "kim-new-password\n");
    assert!(out.contains("1 API keys revoked"), "{out}");
    assert_eq!(via_key.get("/api/usage").status, 401);
    assert_eq!(kim.get("/api/usage").status, 401);
}

#[test]
fn users_see_no_server_paths() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // A model whose transformer disappears after the start: its jobs fail inside the engine.
    let model = data.join("vanishing");
    copy_dir(&repo().join("weights/demo/schnell"), &model);
    let config = config_with(data, "[models.gone]\npath = \"/srv/no-such-model\"\nkind = \"dev\"\n");
    add_user(data, Some(&config), "root", "root-password", "free", true);
    add_user(data, Some(&config), "lea", "lea-password", "pro", false);
    let spec = format!("vanishing={}", model.display());
    let server = Server::start_with(data, Some(&config), &["--model", &spec]);
    let root = Client::login(&server.url, "root", "root-password");
    let lea = Client::login(&server.url, "lea", "lea-password");

    let models = lea.get("/api/models").json();
    let gone = models["models"].as_array().unwrap().iter().find(|m| m["id"] == "gone").unwrap().clone();
    assert_eq!(gone["access"], "unavailable");
    assert!(!gone.to_string().contains("/srv"), "a user sees a server path: {gone}");
    let r = lea.post("/api/jobs", json!({"model": "gone", "prompt": "p", "width": 512, "height": 512}));
    assert_eq!(r.status, 503);
    assert!(!r.message().contains("/srv"), "{}", r.message());
    // The admin view keeps the reason.
    let admin_models = root.get("/api/admin/models").json().to_string();
    assert!(admin_models.contains("/srv/no-such-model"), "{admin_models}");

    std::fs::remove_file(model.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    let job = lea.submit(json!({"model": "vanishing", "prompt": "p", "width": 512, "height": 512}));
    let job = lea.wait_job(job["id"].as_str().unwrap());
    assert_eq!(job["status"], "failed");
    let shown = job.to_string();
    assert!(!shown.contains(&*data.to_string_lossy()) && !shown.contains("safetensors"), "{shown}");
    let recent = root.get("/api/admin/queue").json()["recent"].clone();
    let seen = recent.as_array().unwrap().iter().find(|j| j["id"] == job["id"]).unwrap().clone();
    assert!(seen["error_detail"].as_str().unwrap().contains("vanishing"), "the admin sees the cause: {seen}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn links_proxies_throttling_and_metrics_follow_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // This machine is the "proxy": forwarded client addresses from it are believed.
    let config = config_replacing(data, &[("trusted_proxies = []", "trusted_proxies = [\"127.0.0.1\"]")]);
    add_user(data, Some(&config), "root", "root-password", "free", true);
    add_user(data, Some(&config), "max", "max-password", "pro", false);
    let server = Server::start(data, Some(&config));
    let key = cli(data, Some(&config), &["user", "api-key", "max"], "").trim().to_string();
    let from = |ip: &str| vec![("X-Forwarded-For".to_string(), ip.to_string())];
    let login = |name: &str, pw: &str, ip: &str| {
        let h = from(ip);
        let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Client::new(&server.url).request_with("POST", "/api/login", Some(json!({"name": name, "password": pw})), &hs)
    };

    // Five wrong passwords for root from one address: that address waits, and the waits grow.
    for _ in 0..5 {
        assert_eq!(login("root", "wrong", "10.0.0.66").status, 401);
    }
    let r = login("root", "root-password", "10.0.0.66");
    assert_eq!(r.status, 429);
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=5).contains(&wait), "{wait}");
    // Root at their own desk, and a colleague behind the attacker's address, are not held up.
    assert_eq!(login("root", "root-password", "10.0.0.5").status, 200);
    assert_eq!(login("max", "max-password", "10.0.0.66").status, 200);
    assert!(server.log().contains("login throttled"), "lockouts are logged");

    // /metrics: this machine and admins; not anyone else.
    let anon = Client::new(&server.url);
    let metrics_from = |c: &Client, ip: &str| {
        let h = from(ip);
        let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        c.request_with("GET", "/metrics", None, &hs).status
    };
    assert_eq!(anon.get("/metrics").status, 200, "from this machine");
    assert_eq!(metrics_from(&anon, "10.0.0.7"), 403);
    assert_eq!(metrics_from(&anon.with_key(&key), "10.0.0.7"), 403, "a user's key");
    let root = Client::login(&server.url, "root", "root-password");
    assert_eq!(metrics_from(&root, "10.0.0.7"), 200, "an admin");

    // The OpenAI route's links come from the bound address, never from Host or X-Forwarded-Host.
    let evil = [
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "javascript"),
        ("Forwarded", "host=evil.example;proto=javascript"),
    ];
    let r = anon.with_key(&key).request_with(
        "POST",
        "/v1/images/generations",
        Some(json!({"prompt": "p", "model": "demo-schnell", "size": "256x256", "response_format": "url"})),
        &evil,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&format!("{}/api/images/", server.url)), "{url}");
    drop(server);

    // With public_url set, links use it; with none and an unspecified listen address, they
    // are relative and the start warns.
    let config = config_replacing(
        data,
        &[
            ("# public_url = \"https://atelier.studio.lan\"", "public_url = \"https://atelier.studio.lan/\""),
            ("metrics_public = false", "metrics_public = true"),
        ],
    );
    let server = Server::start(data, Some(&config));
    let r = Client::new(&server.url).with_key(&key).post(
        "/v1/images/generations",
        json!({"prompt": "p", "model": "demo-schnell", "size": "256x256", "response_format": "url"}),
    );
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("https://atelier.studio.lan/api/images/"), "{url}");
    // metrics_public: anyone (the forwarded address is not believed now, nor needed).
    assert_eq!(Client::new(&server.url).get("/metrics").status, 200);
    drop(server);
    let server = Server::start_with(data, None, &["--listen", "0.0.0.0:0"]);
    assert!(server.log().contains("public_url is not set"), "{}", server.log());
    let port = server.url.rsplit(':').next().unwrap();
    let local = Client::new(&format!("http://127.0.0.1:{port}")).with_key(&key);
    let r = local.post(
        "/v1/images/generations",
        json!({"prompt": "p", "model": "demo-schnell", "size": "256x256", "response_format": "url"}),
    );
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("/api/images/"), "{url}");
}

#[test]
fn a_database_locked_past_its_timeout_answers_503() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "ned", "ned-password", "pro", false);
    let server = Server::start_env(data, None, &[], &[("ATELIER_DB_BUSY_TIMEOUT_MS", "300")]);
    let ned = Client::login(&server.url, "ned", "ned-password");
    let before = ned.balance();
    // Another process (a backup, a long admin query) holds the write lock.
    let db = rusqlite::Connection::open(data.join("atelier.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let r = ned.post("/api/jobs", schnell("locked"));
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "busy");
    assert!(r.header("retry-after").is_some());
    db.execute_batch("ROLLBACK").unwrap();
    assert_eq!(ned.balance(), before, "nothing was held");
    let j = ned.submit(schnell("unlocked"));
    assert_eq!(ned.wait_job(j["id"].as_str().unwrap())["status"], "succeeded");
}
