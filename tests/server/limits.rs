//! `GET /api/limits` answers the bounds `POST /api/jobs` enforces, from the config.

use serde_json::json;

use crate::common::*;

#[test]
fn the_limits_the_api_states_are_the_limits_it_enforces() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let text = std::fs::read_to_string(repo().join("config.toml")).unwrap();
    assert!(text.contains("max_width = 2048\nmax_height = 2048\nmax_steps = 100"));
    let config = data.join("config.toml");
    std::fs::write(
        &config,
        text.replacen(
            "max_width = 2048\nmax_height = 2048\nmax_steps = 100",
            "max_width = 768\nmax_height = 1024\nmax_steps = 40",
            1,
        ),
    )
    .unwrap();
    add_user(data, Some(&config), "mia", "mia-pass-123", "max", false);
    cli(data, Some(&config), &["user", "grant", "mia", "100000"], "");
    let server = Server::start(data, Some(&config));

    assert_eq!(Client::new(&server.url).get("/api/limits").status, 401);
    let mia = Client::login(&server.url, "mia", "mia-pass-123");
    let r = mia.get("/api/limits");
    assert_eq!(r.status, 200);
    let l = r.json();
    assert_eq!(l["min_side"], 64, "{l}");
    assert_eq!(l["max_width"], 768, "{l}");
    assert_eq!(l["max_height"], 1024, "{l}");
    assert_eq!(l["size_step"], 16, "{l}");
    assert_eq!(l["max_steps"], 40, "{l}");
    assert_eq!(l["max_batch"], 64, "{l}");
    assert_eq!(l["max_prompt_bytes"], 10000, "{l}");
    assert_eq!(l["max_guidance"], 30.0, "{l}");

    let job = |edit: serde_json::Value| {
        let mut spec =
            json!({"model": "demo-dev", "prompt": "a kite", "width": 64, "height": 64, "steps": 1, "batch": 1});
        for (k, v) in edit.as_object().unwrap() {
            spec[k] = v.clone();
        }
        mia.post("/api/jobs", spec)
    };
    let refused = [
        (json!({"width": 48}), "at least 64"),
        (json!({"height": 72}), "multiples of 16"),
        (json!({"width": 784}), "above the configured maximum 768x1024"),
        (json!({"height": 1040}), "above the configured maximum"),
        (json!({"steps": 41}), "between 1 and 40"),
        (json!({"steps": 0}), "between 1 and 40"),
        (json!({"guidance": 30.5}), "between 0 and 30"),
        (json!({"batch": 65}), "between 1 and 64"),
        (json!({"batch": 0}), "between 1 and 64"),
        (json!({"prompt": "x".repeat(10_001)}), "longer than 10000 bytes"),
        (json!({"prompt": "  "}), "the prompt is empty"),
    ];
    let before = mia.balance();
    for (edit, why) in refused {
        let r = job(edit.clone());
        assert_eq!(r.status, 400, "{edit}: {}", r.message());
        assert!(r.message().contains(why), "{edit}: {}", r.message());
    }
    assert_eq!(mia.balance(), before, "a refused job holds nothing");
    // The bounds themselves are accepted.
    for edit in [
        json!({"width": 768, "height": 64, "steps": 1}),
        json!({"steps": 40, "guidance": 30.0, "prompt": "x".repeat(10_000)}),
    ] {
        let r = job(edit.clone());
        assert_eq!(r.status, 201, "{edit}: {}", r.message());
        let id = r.json()["job"]["id"].as_str().unwrap().to_string();
        mia.post(&format!("/api/jobs/{id}/cancel"), json!({}));
    }
}
