//! Models from the config and from `--model id=path`; a model whose files are missing is
//! listed with the reason, refused with 503, and never stops the server.

use serde_json::json;

use crate::common::*;

#[test]
fn missing_models_are_listed_and_cli_models_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let config = config_with(data, "[models.gone]\npath = \"weights/no-such-model\"\nkind = \"dev\"\n");
    add_user(data, Some(&config), "root", "root-pass-1", "max", true);
    let server = Server::start_with(data, Some(&config), &["--model", "extra=weights/demo/dev"]);
    assert!(server.log().contains("model gone is not available"), "{}", server.log());
    let root = Client::login(&server.url, "root", "root-pass-1");

    let view = root.get("/api/admin/models").json();
    // The server's tests run on the CPU, where `auto` computes in f32; the log says so too.
    assert_eq!(view["dtype"], "f32", "{view}");
    assert!(server.log().contains("compute dtype F32: auto on the CPU"), "{}", server.log());
    let models = view["models"].as_array().unwrap().clone();
    let by_id = |id: &str| models.iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("{id} listed")).clone();
    let gone = by_id("gone");
    assert_eq!(gone["state"], "missing");
    assert!(gone["reason"].as_str().unwrap().contains("no-such-model"), "{gone}");
    // The kind of a --model comes from its weights; it is priced (and tagged) as flux-dev.
    let extra = by_id("extra");
    assert_eq!((extra["state"].as_str(), extra["kind"].as_str()), (Some("ready"), Some("dev")));
    assert_eq!(extra["tags"], json!(["dev"]));

    let r = root.post("/api/jobs", json!({"model": "gone", "prompt": "p", "width": 512, "height": 512}));
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.message().contains("not available"));
    let j = root.submit(json!({"model": "extra", "prompt": "p", "width": 512, "height": 512, "steps": 2}));
    assert_eq!(root.wait_job(j["id"].as_str().unwrap())["status"], "succeeded");
    let v1: Vec<String> = root.get("/v1/models").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(v1.contains(&"extra".to_string()) && !v1.contains(&"gone".to_string()), "{v1:?}");
    // /healthz and /metrics answer without credentials.
    let anon = Client::new(&server.url);
    assert_eq!(anon.get("/healthz").json()["models_ready"], 3);
    let metrics = String::from_utf8(anon.get("/metrics").body).unwrap();
    for line in [
        "atelier_queue_depth 0",
        "atelier_jobs{state=\"succeeded\"} 1",
        "atelier_step_seconds_count 2",
        "atelier_images_total 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[test]
fn a_server_with_no_usable_model_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let config = dir.path().join("empty.toml");
    // A config's own [models] replace the shipped demo models.
    std::fs::write(&config, "[models.gone]\npath = \"weights/nothing-here\"\nkind = \"schnell\"\n").unwrap();
    add_user(data, Some(&config), "u", "u-password", "free", false);
    let server = Server::start(data, Some(&config));
    assert!(server.log().contains("no usable model"), "{}", server.log());
    let u = Client::login(&server.url, "u", "u-password");
    let models = u.get("/api/models").json()["models"].as_array().unwrap().clone();
    assert_eq!(models.len(), 1);
    assert_eq!((models[0]["id"].as_str(), models[0]["access"].as_str()), (Some("gone"), Some("unavailable")));
    // Users get a plain sentence; the path stays in the log and the admin view.
    assert!(models[0]["reason"].as_str().unwrap().contains("not available"), "{}", models[0]);
    assert!(!models[0].to_string().contains("nothing-here"), "{}", models[0]);
    assert!(server.log().contains("nothing-here"));
    let r = u.post("/api/jobs", json!({"model": "demo-schnell", "prompt": "p", "width": 512, "height": 512}));
    assert_eq!(r.status, 404);
    let r = u.post("/api/jobs", json!({"model": "gone", "prompt": "p", "width": 512, "height": 512}));
    assert_eq!(r.status, 503);
    assert_eq!(u.balance(), 50);
}

#[test]
fn models_with_a_missing_or_wrong_vae_or_encoder_are_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let empty = data.join("empty-vae");
    std::fs::create_dir(&empty).unwrap();
    let demo = "weights/demo/schnell";
    // Single-file style entries, so each component can be pointed at the wrong thing.
    let entry = |id: &str, vae: &str, clip: &str, t5: &str| {
        format!(
            "[models.{id}]\ntransformer = \"{demo}/transformer\"\nvae = \"{vae}\"\nclip = \"{clip}\"\nt5 = \"{t5}\"\nkind = \"schnell\"\n"
        )
    };
    let (vae, clip, t5) = (format!("{demo}/vae"), format!("{demo}/text_encoder"), format!("{demo}/text_encoder_2"));
    let config = config_with(
        data,
        &[
            entry("whole", &vae, &clip, &t5),
            entry("no-vae", empty.to_str().unwrap(), &clip, &t5),
            entry("clip-as-vae", &clip, &clip, &t5),
            entry("clip-as-t5", &vae, &clip, &clip),
        ]
        .concat(),
    );
    add_user(data, Some(&config), "root", "root-pass-1", "max", true);
    let server = Server::start(data, Some(&config));
    let root = Client::login(&server.url, "root", "root-pass-1");
    let view = root.get("/api/admin/models").json();
    // The server's tests run on the CPU, where `auto` computes in f32; the log says so too.
    assert_eq!(view["dtype"], "f32", "{view}");
    assert!(server.log().contains("compute dtype F32: auto on the CPU"), "{}", server.log());
    let models = view["models"].as_array().unwrap().clone();
    let state = |id: &str| {
        let m = models.iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("{id} listed"));
        (m["state"].as_str().unwrap().to_string(), m["reason"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(state("whole").0, "ready");
    for (id, expected) in
        [("no-vae", "no .safetensors"), ("clip-as-vae", "not a VAE"), ("clip-as-t5", "not a T5 encoder")]
    {
        let (s, reason) = state(id);
        assert_eq!(s, "missing", "{id}: {reason}");
        assert!(reason.contains(expected), "{id}: expected {expected:?} in {reason:?}");
        let r = root.post("/api/jobs", json!({"model": id, "prompt": "p", "width": 64, "height": 64}));
        assert_eq!(r.status, 503, "{id}");
    }
}
