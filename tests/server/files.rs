//! What the server writes: a private data folder, database and images, the first admin's
//! password only in its file, PNG text in any script, and a job whose images could not be
//! saved refused before any compute.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::json;

use crate::common::*;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

#[test]
fn data_is_private_and_prompts_in_any_script_are_kept_identical() {
    let dir = tempfile::tempdir().unwrap();
    // A folder the server creates itself (tempdir's own is already 0700).
    let data = dir.path().join("data");
    add_user(&data, None, "u", "u-password-1", "max", false);
    let server = Server::start(&data, None);
    let u = Client::login(&server.url, "u", "u-password-1");

    let prompt = "一只红狐狸、雪の中 🦊 — “snow” ‘at dusk’…";
    let mut spec = schnell(prompt);
    spec["width"] = json!(64);
    spec["height"] = json!(64);
    let job = u.wait_job(u.submit(spec)["id"].as_str().unwrap());
    assert_eq!(job["status"], "succeeded", "{job}");
    let image = job["images"][0].as_str().unwrap();
    let png = u.get(&format!("/api/images/{image}/file")).body;
    let transformer = repo().join("weights/demo/schnell/transformer/diffusion_pytorch_model.safetensors");
    let hash = atelier::engine::filehash::model_hash(&transformer).unwrap();
    let expected = format!(
        "{prompt}\nSteps: 4, Sampler: Euler, Seed: {}, Size: 64x64, Model hash: {hash}, Model: demo-schnell",
        job["seed"]
    );
    assert_eq!(atelier::engine::pngfile::read_parameters(&png).unwrap().as_deref(), Some(expected.as_str()));
    assert_eq!(u.get(&format!("/api/images/{image}")).json()["image"]["prompt"], prompt);

    // Only the owner reads the data: the folder, the database and its WAL files, the images,
    // the first admin's password.
    let images = data.join("images");
    assert_eq!((mode(&data), mode(&images)), (0o700, 0o700));
    for file in ["atelier.db", "atelier.db-wal", "atelier.db-shm", "initial-admin-password"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    let names: Vec<String> =
        std::fs::read_dir(&images).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, [format!("{image}.png")], "only the image, no temporary file");
    assert_eq!(mode(&images.join(&names[0])), 0o600);

    // The log names the password's file, never the password.
    let password =
        std::fs::read_to_string(data.join("initial-admin-password")).unwrap().lines().nth(1).unwrap().to_string();
    let log = server.log();
    assert!(log.contains("initial-admin-password"), "{log}");
    assert!(!log.contains(&password), "the admin password is in the log: {log}");
}

#[test]
fn a_job_whose_images_cannot_be_saved_fails_before_any_step() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    add_user(data, None, "u", "u-password-1", "starter", false);
    // Where the images folder should be, a file: no image can be saved.
    std::fs::write(data.join("images"), "not a folder").unwrap();
    let server = Server::start(data, None);
    let u = Client::login(&server.url, "u", "u-password-1");
    let before = u.balance();
    let job = u.wait_job(u.submit(schnell("a fox"))["id"].as_str().unwrap());
    assert_eq!(job["status"], "failed", "{job}");
    // No step ran, and nothing was charged.
    let metrics = String::from_utf8(Client::new(&server.url).get("/metrics").body).unwrap();
    assert!(metrics.contains("atelier_step_seconds_count 0"), "{metrics}");
    assert_eq!(u.balance(), before);
}
