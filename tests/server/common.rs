//! A real `atelier serve` process on loopback with its own data folder, driven over HTTP.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_atelier")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the CLI against `data` (with `stdin`); panics with its output on failure.
pub fn cli(data: &Path, config: Option<&Path>, args: &[&str], stdin: &str) -> String {
    let mut cmd = Command::new(bin());
    cmd.current_dir(repo()).arg("--data").arg(data);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let mut child = cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "atelier {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Creates a user with a password, on `plan` (weekly; or yearly when `yearly`).
pub fn add_user(data: &Path, config: Option<&Path>, name: &str, password: &str, plan: &str, admin: bool) {
    let mut args = vec!["user", "add", name, "--password-stdin"];
    if admin {
        args.push("--admin");
    }
    cli(data, config, &args, &format!("{password}\n"));
    if plan != "free" {
        let (plan, period) = plan.split_once(':').unwrap_or((plan, "weekly"));
        cli(data, config, &["user", "set-plan", name, plan, &format!("--{period}")], "");
    }
}

/// The shipped config.toml with `from` replaced by `to` (for settings of existing tables).
pub fn config_replacing(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = std::fs::read_to_string(repo().join("config.toml")).unwrap();
    for (from, to) in edits {
        assert!(text.contains(from), "config.toml has no {from:?}");
        text = text.replacen(from, to, 1);
    }
    let p = dir.join("config.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// A config file: the shipped one plus `extra` TOML.
pub fn config_with(dir: &Path, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("config.toml")).unwrap() + "\n" + extra;
    let p = dir.join("config.toml");
    std::fs::write(&p, text).unwrap();
    p
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl Server {
    pub fn start(data: &Path, config: Option<&Path>) -> Server {
        Server::start_with(data, config, &[])
    }

    /// With more `serve` arguments (e.g. `--model id=path`).
    pub fn start_with(data: &Path, config: Option<&Path>, extra: &[&str]) -> Server {
        Server::start_env(data, config, extra, &[])
    }

    /// With more `serve` arguments and environment variables.
    pub fn start_env(data: &Path, config: Option<&Path>, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let log = data.join(format!("server-{}.log", std::process::id()));
        let mut cmd = Command::new(bin());
        cmd.current_dir(repo()).env("RUST_LOG", "info").envs(env.iter().copied()).arg("--data").arg(data);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let err = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut child = cmd
            .args(["serve", "--device", "cpu"])
            .args(if extra.contains(&"--listen") { &[][..] } else { &["--listen", "127.0.0.1:0"][..] })
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = Instant::now();
        let url = loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("listening on ") => break l["listening on ".len()..].to_string(),
                Some(Ok(_)) => {}
                _ => panic!("the server did not start: {}", std::fs::read_to_string(&log).unwrap_or_default()),
            }
            assert!(started.elapsed() < Duration::from_secs(120), "the server took too long to start");
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, url, log }
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client with an optional session (cookie + CSRF token) or API key.
#[derive(Clone)]
pub struct Client {
    pub url: String,
    agent: ureq::Agent,
    pub cookie: Option<String>,
    pub csrf: Option<String>,
    pub key: Option<String>,
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON ({}): {}", self.status, String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    /// The error message of an API error.
    pub fn message(&self) -> String {
        self.json()["error"]["message"].as_str().unwrap_or_default().to_string()
    }
}

impl Client {
    pub fn new(url: &str) -> Client {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(600)))
                .build(),
        );
        Client { url: url.to_string(), agent, cookie: None, csrf: None, key: None }
    }

    pub fn with_key(&self, key: &str) -> Client {
        Client { key: Some(key.to_string()), cookie: None, csrf: None, ..self.clone() }
    }

    pub fn login(url: &str, name: &str, password: &str) -> Client {
        let mut c = Client::new(url);
        let r = c.request("POST", "/api/login", Some(json!({"name": name, "password": password})));
        assert_eq!(r.status, 200, "login {name}: {}", String::from_utf8_lossy(&r.body));
        let cookie = r.header("set-cookie").expect("a session cookie").to_string();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "cookie flags: {cookie}");
        c.cookie = Some(cookie.split(';').next().unwrap().to_string());
        c.csrf = Some(r.json()["csrf_token"].as_str().unwrap().to_string());
        c
    }

    pub fn request(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        self.request_with(method, path, body, &[])
    }

    pub fn request_with(&self, method: &str, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> Resp {
        self.send(method, path, body, None, headers)
    }

    /// POSTs `bytes` as the raw body (a file upload).
    pub fn upload(&self, path: &str, bytes: &[u8]) -> Resp {
        self.send("POST", path, None, Some(bytes), &[("Content-Type", "application/octet-stream")])
    }

    /// POSTs `bytes` as the raw body with `content_type` (a multipart form).
    pub fn post_body(&self, path: &str, bytes: &[u8], content_type: &str) -> Resp {
        self.send("POST", path, None, Some(bytes), &[("Content-Type", content_type)])
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        raw: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let url = format!("{}{path}", self.url);
        let mut hs: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if let Some(c) = &self.cookie {
            hs.push(("Cookie".into(), c.clone()));
        }
        if let Some(t) = &self.csrf
            && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("x-csrf-token"))
        {
            hs.push(("X-CSRF-Token".into(), t.clone()));
        }
        if let Some(k) = &self.key {
            hs.push(("Authorization".into(), format!("Bearer {k}")));
        }
        let resp = match method {
            "GET" | "DELETE" => {
                let mut rb = if method == "GET" { self.agent.get(&url) } else { self.agent.delete(&url) };
                for (k, v) in &hs {
                    rb = rb.header(k, v);
                }
                rb.call()
            }
            _ => {
                let mut rb = if method == "PATCH" { self.agent.patch(&url) } else { self.agent.post(&url) };
                for (k, v) in &hs {
                    rb = rb.header(k, v);
                }
                match (body, raw) {
                    (Some(b), _) => rb.send_json(b),
                    (None, Some(r)) => rb.send(r),
                    (None, None) => rb.send_empty(),
                }
            }
        };
        let mut resp = resp.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let headers =
            resp.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect();
        let mut body = Vec::new();
        resp.body_mut().as_reader().read_to_end(&mut body).unwrap();
        Resp { status, headers, body }
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Value) -> Resp {
        self.request("POST", path, Some(body))
    }

    /// Reads server-sent events from `path` until `stop` returns true for one (or the stream
    /// ends); returns all events seen.
    pub fn sse_until(&self, path: &str, mut stop: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let url = format!("{}{path}", self.url);
        let mut rb = self.agent.get(&url);
        if let Some(c) = &self.cookie {
            rb = rb.header("Cookie", c);
        }
        if let Some(k) = &self.key {
            rb = rb.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = rb.call().unwrap();
        assert_eq!(resp.status().as_u16(), 200, "SSE {path}");
        let reader = BufReader::new(resp.body_mut().as_reader());
        let mut events = Vec::new();
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if let Some(data) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).unwrap();
                let done = stop(&v);
                events.push(v);
                if done {
                    break;
                }
            }
        }
        events
    }

    /// Credits available now.
    pub fn balance(&self) -> i64 {
        self.get("/api/usage").json()["credits_available"].as_i64().unwrap()
    }

    /// Submits a job; panics unless 201.
    pub fn submit(&self, spec: Value) -> Value {
        let r = self.post("/api/jobs", spec);
        assert_eq!(r.status, 201, "submit: {}", String::from_utf8_lossy(&r.body));
        r.json()["job"].clone()
    }

    /// Waits for job `id` to end; returns the job.
    pub fn wait_job(&self, id: &str) -> Value {
        let started = Instant::now();
        loop {
            let j = self.get(&format!("/api/jobs/{id}")).json()["job"].clone();
            if ["succeeded", "failed", "canceled"].contains(&j["status"].as_str().unwrap()) {
                return j;
            }
            assert!(started.elapsed() < Duration::from_secs(300), "job {id} did not end: {j}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn schnell(prompt: &str) -> Value {
    json!({"model": "demo-schnell", "prompt": prompt, "width": 512, "height": 512, "batch": 1})
}
