//! The real `openai` Python package against the OpenAI-compatible API (tests/openai_client.py).
//! Runs when a Python with `openai` is found ($ATELIER_PYTHON, else python3); CI installs one
//! (.ci/run), so there a missing package is a failure, elsewhere a skip.

use std::process::Command;

use crate::common::*;

fn python() -> Option<String> {
    let py = std::env::var("ATELIER_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py).args(["-c", "import openai"]).output().map(|o| o.status.success()).unwrap_or(false);
    ok.then_some(py)
}

#[test]
fn the_openai_package_generates_and_is_metered() {
    let Some(py) = python() else {
        assert!(std::env::var_os("CI").is_none(), "CI must have Python with the openai package (see .ci/run)");
        eprintln!("skipping: no python3 with the openai package (pip install openai)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "olga", "olga-pass-1", "starter", false);
    let key = cli(data, None, &["user", "api-key", "olga", "--label", "openai test"], "").trim().to_string();
    assert!(key.starts_with("atk_"), "{key}");
    let server = Server::start(data, None);
    let out = Command::new(py)
        .arg(repo().join("tests/openai_client.py"))
        .env("ATELIER_URL", &server.url)
        .env("ATELIER_KEY", &key)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai client failed:\n{text}\nserver log:\n{}", server.log());
    eprintln!("{text}");
    // 20 for the pair, 10 for the kite; refusals cost nothing.
    let olga = Client::new(&server.url).with_key(&key);
    assert_eq!(olga.balance(), 250 - 30);
}
