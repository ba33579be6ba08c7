//! The browser UI in headless Chromium: tests/browser/ui.test.mjs (playwright-core driving
//! Debian's /usr/bin/chromium) against a real `atelier serve` with the demo models. Screenshots
//! of every page at desktop and phone widths land in tests/browser/screenshots/.
//!
//! Needs node, `npm ci` in tests/browser and chromium; `.ci/run` installs them, so in CI their
//! absence is a failure and elsewhere a skip.

#[path = "server/common.rs"]
#[allow(dead_code)]
mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn missing_prerequisite() -> Option<String> {
    if Command::new("node").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("node is not installed".into());
    }
    if !repo().join("tests/browser/node_modules/playwright-core").is_dir() {
        return Some("run `npm ci` in tests/browser".into());
    }
    if !Path::new("/usr/bin/chromium").exists() {
        return Some("apt-get install chromium".into());
    }
    None
}

#[test]
fn the_ui_works_in_headless_chromium() {
    if let Some(why) = missing_prerequisite() {
        assert!(std::env::var_os("CI").is_none(), "CI must run the browser test: {why} (see .ci/install-deps)");
        eprintln!("skipping the browser test: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // No admin: the test logs in as the one `serve` creates at first start, as a newcomer would.
    add_user(data, None, "alice", "alicepass1", "starter", false);
    add_user(data, None, "bob", "bobpass12", "free", false);
    // Tara trains a LoRA from the Train page: Pro's weekly allowance, a preset small enough to
    // train the demo model in seconds, with samples along the way.
    add_user(data, None, "tara", "tarapass1", "pro", false);
    // Bob's five dev images cost more than Free's 50 sign-up credits.
    cli(data, None, &["user", "grant", "bob", "200"], "");
    let conf_dir = tempfile::tempdir().unwrap();
    let config = config_replacing(
        conf_dir.path(),
        &[
            ("preset_steps = 1500", "preset_steps = 60"),
            ("preset_rank = 16", "preset_rank = 4"),
            ("preset_resolution = 512", "preset_resolution = 64"),
            ("resolutions = [256, 512, 768, 1024]", "resolutions = [64, 256, 512, 768, 1024]"),
            ("checkpoint_every_steps = 100", "checkpoint_every_steps = 20"),
            ("sample_every = 250", "sample_every = 30"),
        ],
    );
    let server = Server::start(data, Some(&config));
    let initial = std::fs::read_to_string(data.join("initial-admin-password")).unwrap();
    let (admin, admin_pass) = initial.trim_end().split_once('\n').unwrap();
    let shots = repo().join("tests/browser/screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let results = tempfile::tempdir().unwrap();
    let out = Command::new("node")
        .arg(repo().join("tests/browser/ui.test.mjs"))
        .current_dir(repo().join("tests/browser"))
        .env("ATELIER_URL", &server.url)
        .env("SCREENSHOT_DIR", &shots)
        .env("RESULT_DIR", results.path())
        .env("ADMIN_USER", admin)
        .env("ADMIN_PASS", admin_pass)
        .env("ALICE", "alice")
        .env("ALICE_PASS", "alicepass1")
        .env("BOB", "bob")
        .env("BOB_PASS", "bobpass12")
        .env("TARA", "tara")
        .env("TARA_PASS", "tarapass1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "the browser test failed:\n{text}\nserver log:\n{}", server.log());
    let pngs: Vec<_> = std::fs::read_dir(&shots)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .collect();
    assert!(pngs.len() >= 14, "expected screenshots of 7 pages × 2 widths, found {}", pngs.len());
    // The first image a user asks for ("red heart" on the demo model, as the UI received it) is
    // the emoji named: its nearest training emoji (tests/demo.rs's measure) is U+2764.
    let heart = image::open(results.path().join("red-heart.png")).unwrap().to_rgb8();
    let atlas = atelier::emoji_eval::EmojiAtlas::load(&repo().join("tests/fixtures/demo")).unwrap();
    let nearest = atlas.nearest(&heart).unwrap();
    assert_eq!(
        atlas.names[nearest], "heavy black heart",
        "\"red heart\" drew an image nearest {:?}",
        atlas.names[nearest]
    );
    for p in &pngs {
        let len = p.metadata().unwrap().len();
        assert!(len > 10_000, "{} is {len} bytes: blank?", p.path().display());
    }
}
