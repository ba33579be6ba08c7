//! A job the memory plan refuses fails with its credits released, the worker stays up and
//! the next job runs; the admin view shows the budget and each model's last plan.

use serde_json::json;

use crate::common::*;

#[test]
fn a_job_over_the_memory_budget_fails_plainly_and_the_next_one_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // 32 MiB: the demo models' weights fit many times over; a 512² image's VAE attention
    // (4096² scores) and feature maps do not, a 64² image's do.
    let config = config_replacing(data, &[("memory_budget = \"auto\"", "memory_budget = \"32MiB\"")]);
    add_user(data, Some(&config), "mia", "mia-pass-1", "max", false);
    add_user(data, Some(&config), "root", "root-pass-1", "max", true);
    let server = Server::start(data, Some(&config));
    let mia = Client::login(&server.url, "mia", "mia-pass-1");
    let before = mia.balance();

    let big = mia.submit(schnell("a lighthouse at dusk"));
    let big = mia.wait_job(big["id"].as_str().unwrap());
    assert_eq!(big["status"], "failed", "{big}");
    let error = big["error"].as_str().unwrap();
    assert!(
        error.contains("memory budget of 32.0 MiB")
            && error.contains("512×512")
            && error.contains("credits were released"),
        "{error}"
    );
    assert!(!error.contains(&*data.to_string_lossy()), "no server paths: {error}");
    assert_eq!(mia.balance(), before, "the hold was released");

    // The same request at 64² fits and runs on the same worker.
    let mut small = schnell("a lighthouse at dusk");
    small["width"] = json!(64);
    small["height"] = json!(64);
    let small = mia.submit(small);
    let small = mia.wait_job(small["id"].as_str().unwrap());
    assert_eq!(small["status"], "succeeded", "{small}");
    assert!(mia.balance() < before, "the job that ran was paid for");

    let root = Client::login(&server.url, "root", "root-pass-1");
    let models = root.get("/api/admin/models").json();
    assert_eq!(models["memory_budget"], 32 << 20, "{models}");
    assert!(models["memory_budget_source"].as_str().unwrap().contains("configured"), "{models}");
    let plan = &models["memory_plans"]["demo-schnell"];
    assert_eq!((plan["job"]["width"].as_u64(), plan["budget"].as_u64()), (Some(64), Some(32 << 20)), "{models}");
    let modes: Vec<&str> = plan["components"].as_array().unwrap().iter().map(|c| c["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["staged"; 4], "{plan}");
    assert!(plan["peak"].as_u64().unwrap() <= 32 << 20, "{plan}");
    assert!(server.log().contains("memory plan"), "the plan is logged");
}
