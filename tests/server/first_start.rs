//! The admin `serve` creates at first start: on the top plan (`[server] admin_plan`, Max by
//! default), and still bound by that plan like every other account.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Logs in as the admin whose name and password `serve` wrote to `initial-admin-password`.
fn initial_admin(server: &Server, data: &std::path::Path) -> Client {
    let text = std::fs::read_to_string(data.join("initial-admin-password")).expect("no initial-admin-password");
    let mut lines = text.lines();
    let (name, password) = (lines.next().unwrap(), lines.next().unwrap());
    Client::login(&server.url, name, password)
}

/// The shipped config with `[server] admin_plan = plan` (config_with appends, and the shipped
/// `[server]` table already names admin_plan, so this edits it).
fn config_with_admin_plan(data: &std::path::Path, plan: &str) -> std::path::PathBuf {
    let config = config_with(data, "");
    let line = format!("admin_plan = {plan:?}");
    let text = std::fs::read_to_string(&config).unwrap().replace("admin_plan = \"max\"", &line);
    assert!(text.contains(&line), "config.toml names no admin_plan to change");
    std::fs::write(&config, text).unwrap();
    config
}

/// Whether `client`'s plan allows a job of these parameters on demo-schnell (GET /api/price).
fn allowed(client: &Client, query: &str) -> bool {
    let r = client.get(&format!("/api/price?model=demo-schnell&{query}"));
    assert_eq!(r.status, 200, "{}", r.message());
    r.json()["allowed"].as_bool().unwrap()
}

#[test]
fn the_first_admin_is_on_max() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let server = Server::start(data, None);
    let admin = initial_admin(&server, data);
    let models = admin.get("/api/models").json();
    assert_eq!(models["plan"], "max", "{models}");
    assert_eq!(models["parameters"], "full");
    // What Free refuses: a custom size, more steps, a seed, a batch.
    assert!(allowed(&admin, "width=640&height=448&steps=50&seed=7&batch=4"));
    let users = admin.get("/api/admin/users").json();
    assert_eq!(users["users"][0]["period"], "weekly", "{users}");
    assert!(users["users"][0]["credits_available"].as_i64().unwrap() >= 2000, "{users}");
}

#[test]
fn the_first_admin_takes_the_configured_plan_and_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let config = config_with_admin_plan(data, "starter");
    let server = Server::start(data, Some(&config));
    let admin = initial_admin(&server, data);
    assert_eq!(admin.get("/api/models").json()["plan"], "starter");
    // Starter's "standard" parameters: a seed and steps, but no custom size, even for an admin.
    assert!(allowed(&admin, "width=512&height=512&steps=8&seed=7"));
    assert!(!allowed(&admin, "width=640&height=448"));
}

#[test]
fn an_unknown_admin_plan_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let config = config_with_admin_plan(data, "platinum");
    let log = data.join("serve.log");
    let mut child = Command::new(bin())
        .current_dir(repo())
        .arg("--data")
        .arg(data)
        .arg("--config")
        .arg(&config)
        .args(["serve", "--listen", "127.0.0.1:0", "--device", "cpu"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // A server that starts anyway would never exit: give it a while, then fail.
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(status.is_some_and(|s| !s.success()), "serve started with admin_plan = \"platinum\": {err}");
    assert!(err.contains("admin_plan") && err.contains("platinum") && err.contains("max"), "{err}");
    assert!(!data.join("initial-admin-password").exists(), "an admin was created before the error");
}
