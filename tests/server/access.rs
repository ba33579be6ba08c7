//! Every route that takes an id answers 404 to a user who does not own the thing; requests
//! without a valid session, key or CSRF token are refused; admin routes need an admin.

use serde_json::json;

use crate::common::*;

#[test]
fn nobody_reaches_anyone_elses_things() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "root", "root-pass-1", "free", true);
    add_user(data, None, "anna", "anna-pass-1", "starter", false);
    add_user(data, None, "ben", "ben-pass-12", "starter", false);
    let server = Server::start(data, None);
    let anna = Client::login(&server.url, "anna", "anna-pass-1");
    let ben = Client::login(&server.url, "ben", "ben-pass-12");

    // Anna's things: a finished job with an image, a queued job behind a long one, an API key.
    let done = anna.submit(schnell("anna's"));
    let done = anna.wait_job(done["id"].as_str().unwrap());
    let image = done["images"][0].as_str().unwrap().to_string();
    let long = anna.submit(json!({"model": "demo-dev", "prompt": "long", "width": 1024, "height": 1024, "steps": 100}));
    let queued = anna.submit(schnell("queued"));
    let key = anna.post("/api/keys", json!({"label": "laptop"}));
    assert_eq!(key.status, 201);
    let key_id = key.json()["info"]["id"].as_i64().unwrap();
    let anna_key = key.json()["key"].as_str().unwrap().to_string();

    let ids = [done["id"].as_str().unwrap(), long["id"].as_str().unwrap(), queued["id"].as_str().unwrap()];
    let mut probes: Vec<(&str, String)> = Vec::new();
    for id in ids {
        probes.push(("GET", format!("/api/jobs/{id}")));
        probes.push(("POST", format!("/api/jobs/{id}/cancel")));
        probes.push(("GET", format!("/api/jobs/{id}/events")));
    }
    probes.push(("GET", format!("/api/images/{image}")));
    probes.push(("GET", format!("/api/images/{image}/file")));
    probes.push(("DELETE", format!("/api/images/{image}")));
    probes.push(("DELETE", format!("/api/keys/{key_id}")));
    let ben_key = ben.post("/api/keys", json!({"label": "b"})).json()["key"].as_str().unwrap().to_string();
    for (who, client) in [("ben (session)", ben.clone()), ("ben (API key)", ben.with_key(&ben_key))] {
        for (method, path) in &probes {
            let r = client.request(method, path, Some(json!({})));
            assert_eq!(r.status, 404, "{who} {method} {path}: {}", String::from_utf8_lossy(&r.body));
        }
        // Listings show only one's own.
        assert_eq!(client.get("/api/images").json()["total"], 0);
        assert!(client.get("/api/jobs").json()["jobs"].as_array().unwrap().is_empty());
        assert_eq!(client.get("/api/jobs?all=true").status, 403);
    }
    // Ben's user stream never carries Anna's events: it opens with nothing of hers.
    // (Her jobs are live right now, so her stream does carry them.)
    let anna_first = anna.sse_until("/api/events", |_| true);
    assert_eq!(anna_first[0]["user_id"], done["user_id"]);

    // No credentials, wrong credentials.
    let anon = Client::new(&server.url);
    let mut wrong_cookie = Client::new(&server.url);
    wrong_cookie.cookie = Some("atelier_session=0000".into());
    let wrong_key = anon.with_key("atk_not_a_key");
    let protected = [
        ("GET", "/api/session".to_string()),
        ("GET", "/api/usage".into()),
        ("GET", "/api/models".into()),
        ("GET", "/api/jobs".into()),
        ("POST", "/api/jobs".into()),
        ("GET", format!("/api/jobs/{}", ids[0])),
        ("GET", format!("/api/images/{image}/file")),
        ("GET", "/api/images".into()),
        ("GET", "/api/events".into()),
        ("GET", "/api/keys".into()),
        ("GET", "/api/admin/users".into()),
        ("GET", "/v1/models".into()),
        ("POST", "/v1/images/generations".into()),
    ];
    for client in [&anon, &wrong_cookie, &wrong_key] {
        for (method, path) in &protected {
            let r = client.request(method, path, Some(schnell("x")));
            assert_eq!(r.status, 401, "{method} {path} without valid credentials");
            assert!(r.json()["error"]["message"].is_string());
        }
    }
    // A cookie without the CSRF token cannot change anything; with it, it can.
    let mut no_csrf = anna.clone();
    no_csrf.csrf = None;
    for (method, path) in [
        ("POST", "/api/jobs"),
        ("POST", "/api/keys"),
        ("DELETE", &*format!("/api/images/{image}")),
        ("POST", "/api/logout"),
    ] {
        let r = no_csrf.request(method, path, Some(schnell("x")));
        assert_eq!(r.status, 403, "{method} {path} without CSRF");
    }
    // A key needs no CSRF token and is metered like a session.
    let via_key = anon.with_key(&anna_key);
    assert_eq!(via_key.get("/api/usage").json()["name"], "anna");

    // Admin routes: 403 for users, open to admins.
    let root = Client::login(&server.url, "root", "root-pass-1");
    for path in ["/api/admin/users", "/api/admin/queue", "/api/admin/models", "/api/admin/users/1"] {
        assert_eq!(ben.get(path).status, 403, "{path}");
        assert_eq!(root.get(path).status, 200, "{path}");
    }
    let anna_id = done["user_id"].as_i64().unwrap();
    assert_eq!(ben.post(&format!("/api/admin/users/{anna_id}/grant"), json!({"credits": 5})).status, 403);
    // An admin may open anyone's image.
    assert_eq!(root.get(&format!("/api/images/{image}/file")).status, 200);

    // A password change needs the current one, ends the other sessions and revokes the keys.
    let anna_other = Client::login(&server.url, "anna", "anna-pass-1");
    let r = anna.post("/api/password", json!({"current": "wrong", "new": "anna-pass-2"}));
    assert_eq!(r.status, 403);
    let r = anna.post("/api/password", json!({"current": "anna-pass-1", "new": "anna-pass-2"}));
    assert_eq!(r.status, 200);
    assert_eq!((r.json()["sessions_ended"].as_u64(), r.json()["api_keys_revoked"].as_u64()), (Some(1), Some(1)));
    assert_eq!(anna_other.get("/api/usage").status, 401);
    assert_eq!(via_key.get("/api/usage").status, 401, "the password change revoked the key");
    assert_eq!(anna.get("/api/usage").status, 200);
    let r = anna.post("/api/password", json!({"current": "anna-pass-2", "new": "anna-pass-1"}));
    assert_eq!(r.status, 200);
    // Not with an API key: a leaked key must not be able to lock the owner out, nor mint
    // keys that would outlive its own revocation.
    let key = anna.post("/api/keys", json!({"label": "second"}));
    assert_eq!(key.status, 201);
    let key_id = key.json()["info"]["id"].as_i64().unwrap();
    let via_key = anon.with_key(key.json()["key"].as_str().unwrap());
    let r = via_key.post("/api/password", json!({"current": "anna-pass-1", "new": "taken-over"}));
    assert_eq!(r.status, 403);
    let r = via_key.post("/api/keys", json!({"label": "minted"}));
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(anna.get("/api/keys").json()["keys"].as_array().unwrap().len(), 2, "no key was minted");

    // Revoked key, logged-out session, disabled account.
    assert_eq!(anna.request("DELETE", &format!("/api/keys/{key_id}"), None).status, 200);
    assert_eq!(via_key.get("/api/usage").status, 401);
    let anna2 = Client::login(&server.url, "anna", "anna-pass-1");
    assert_eq!(anna2.post("/api/logout", json!({})).status, 200);
    assert_eq!(anna2.get("/api/usage").status, 401);
    assert_eq!(root.post(&format!("/api/admin/users/{anna_id}/disable"), json!({"disabled": true})).status, 200);
    assert_eq!(anna.get("/api/usage").status, 401, "disabling ends sessions");
    // A disabled account answers its right password as a wrong one: a guess learns nothing.
    let right = Client::new(&server.url).post("/api/login", json!({"name": "anna", "password": "anna-pass-1"}));
    let wrong = Client::new(&server.url).post("/api/login", json!({"name": "anna", "password": "not-it-at-all"}));
    assert_eq!((right.status, right.body), (wrong.status, wrong.body));
    assert_eq!(wrong.status, 401);
    root.post(&format!("/api/admin/users/{anna_id}/disable"), json!({"disabled": false}));

    // Clean up Anna's running work so the server stops promptly.
    let anna = Client::login(&server.url, "anna", "anna-pass-1");
    for id in &ids[1..] {
        anna.post(&format!("/api/jobs/{id}/cancel"), json!({}));
    }

    // Login rate limit: 5 wrong passwords, then 429 even with the right one (from this
    // address; tests/server/hardening.rs has the per-address rules).
    for _ in 0..5 {
        let r = Client::new(&server.url).post("/api/login", json!({"name": "ben", "password": "nope"}));
        assert_eq!(r.status, 401);
    }
    let r = Client::new(&server.url).post("/api/login", json!({"name": "ben", "password": "ben-pass-12"}));
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
}
