//! LoRAs through the server: the studio and private libraries, jobs that switch LoRAs on one
//! loaded base (images equal to the CLI's), the plans' LoRA counts, uploads and their checks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::common::*;

const MODEL: &str = "tests/fixtures/pipeline/schnell/diffusers";

fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures/lora").join(rel)
}

/// A config serving the tiny schnell pipeline as `tiny`, with the studio library at `loras`,
/// components kept loaded between jobs, and no previews.
fn config(dir: &Path, loras: &Path, extra: &[(&str, &str)]) -> PathBuf {
    let line = format!("loras_dir = {:?}", loras.to_str().unwrap());
    let mut edits = vec![
        ("# loras_dir = \"weights/loras\"", line.as_str()),
        ("keep_resident = false", "keep_resident = true"),
        ("preview_every = 1", "preview_every = 0"),
    ];
    edits.extend_from_slice(extra);
    config_replacing(dir, &edits)
}

fn start(data: &Path, config: &Path) -> Server {
    Server::start_with(data, Some(config), &["--model", &format!("tiny={MODEL}")])
}

/// A kohya LoRA of rank 4 on `module` (`lora_unet_…`) of width `hidden`, plus `extra` keys.
fn kohya_file(path: &Path, module: &str, hidden: usize, extra: &[(&str, Vec<usize>)]) {
    use safetensors::tensor::{Dtype, TensorView};
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        (format!("{module}.lora_down.weight"), vec![4, hidden]),
        (format!("{module}.lora_up.weight"), vec![hidden, 4]),
    ];
    tensors.extend(extra.iter().map(|(k, s)| (k.to_string(), s.clone())));
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            let bytes = (0..n).flat_map(|i| ((i % 7) as f32 * 0.01).to_le_bytes()).collect();
            (k, s, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> =
        data.iter().map(|(k, s, b)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn pixels(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().to_rgb8().into_raw()
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap_or(0)
}

/// `atelier generate` of the same settings as `job` with `loras` (`FILE:WEIGHT`); the PNG.
fn cli_image(dir: &Path, prompt: &str, loras: &[String]) -> Vec<u8> {
    let out = dir.join(format!("cli-{}.png", loras.len() + prompt.len()));
    let mut cmd = Command::new(bin());
    cmd.current_dir(repo()).args([
        "generate", "--model", MODEL, "--prompt", prompt, "--width", "80", "--height", "64", "--steps", "2", "--seed",
        "7", "--device", "cpu", "--out",
    ]);
    cmd.arg(&out);
    for l in loras {
        cmd.args(["--lora", l]);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

fn job(prompt: &str, loras: Value) -> Value {
    json!({"model": "tiny", "prompt": prompt, "width": 80, "height": 64, "steps": 2, "seed": 7, "loras": loras})
}

/// A job any plan's parameter level allows (a preset size, no seed or steps), so only the LoRA
/// count decides.
fn basic_job(loras: Value) -> Value {
    json!({"model": "tiny", "prompt": "a fox", "width": 512, "height": 512, "loras": loras})
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(-1.0)
}

#[test]
fn loras_switch_per_job_on_one_loaded_base_and_give_the_clis_images() {
    let dir = tempfile::tempdir().unwrap();
    let (data, loras) = (dir.path().join("data"), dir.path().join("loras"));
    std::fs::create_dir_all(&loras).unwrap();
    std::fs::copy(fixture("schnell/kohya.safetensors"), loras.join("ink.safetensors")).unwrap();
    std::fs::copy(fixture("schnell/peft.safetensors"), loras.join("grain.safetensors")).unwrap();
    std::fs::write(
        loras.join("ink.json"),
        r#"{"label": "Ink wash", "triggers": ["inkwash"], "default_weight": 0.8, "licence": "CC-BY-4.0"}"#,
    )
    .unwrap();
    // A1111's sidecar keys are read too.
    std::fs::write(loras.join("grain.json"), r#"{"activation text": "film grain, 35mm", "preferred weight": 0.6}"#)
        .unwrap();
    std::fs::write(loras.join("ink.preview.png"), b"\x89PNG-not-really").unwrap();
    add_user(&data, None, "pro", "pro-password", "pro", false);
    let config = config(dir.path(), &loras, &[]);
    let server = start(&data, &config);
    let u = Client::login(&server.url, "pro", "pro-password");

    let list = u.get("/api/loras").json();
    assert_eq!(list["max_loras"], 3, "{list}");
    let by_name: HashMap<&str, &Value> =
        list["loras"].as_array().unwrap().iter().map(|l| (l["name"].as_str().unwrap(), l)).collect();
    let ink = by_name["ink"];
    assert_eq!((ink["label"].as_str(), ink["scope"].as_str()), (Some("Ink wash"), Some("studio")));
    assert_eq!((ink["triggers"].clone(), ink["default_weight"].clone()), (json!(["inkwash"]), json!(0.8)));
    assert_eq!((ink["licence"].as_str(), ink["has_preview"].as_bool()), (Some("CC-BY-4.0"), Some(true)));
    assert_eq!(by_name["grain"]["triggers"], json!(["film grain", "35mm"]));
    assert_eq!(by_name["grain"]["default_weight"], json!(0.6));
    assert_eq!(u.get("/api/loras/ink/preview").body, b"\x89PNG-not-really");
    let plans: Vec<Value> = list["plans"].as_array().unwrap().iter().map(|p| p["max_loras"].clone()).collect();
    assert_eq!(plans, [json!(0), json!(1), json!(3), json!(5), Value::Null]);

    // With a LoRA, without, with another (named by a prompt tag): one loaded base.
    let a = u.submit(job("a red fox", json!([{"name": "ink", "weight": 0.8}])));
    let b = u.submit(job("a red fox", json!([])));
    let c = u.submit(job("a red fox <lora:grain:0.6>", json!([])));
    assert_eq!(c["spec"]["prompt"], "a red fox", "the tag leaves the prompt: {c}");
    assert_eq!(c["spec"]["loras"], json!([{"name": "grain", "weight": 0.6}]));
    let (mut images, mut ids) = (Vec::new(), Vec::new());
    for j in [&a, &b, &c] {
        let done = u.wait_job(j["id"].as_str().unwrap());
        assert_eq!(done["status"], "succeeded", "{done}");
        let id = done["images"][0].as_str().unwrap().to_string();
        images.push(u.get(&format!("/api/images/{id}/file")).body);
        ids.push(id);
    }
    // The gallery keeps the prompt the A1111 way, tags included ("Use these settings" reads them).
    let gallery_prompt = |id: &str| u.get(&format!("/api/images/{id}")).json()["image"]["prompt"].clone();
    assert_eq!(gallery_prompt(&ids[0]), "a red fox <lora:ink:0.8>");
    assert_eq!(gallery_prompt(&ids[1]), "a red fox");
    let cli = [
        cli_image(dir.path(), "a red fox", &[format!("{}:0.8", loras.join("ink.safetensors").display())]),
        cli_image(dir.path(), "a red fox", &[]),
        cli_image(dir.path(), "a red fox", &[format!("{}:0.6", loras.join("grain.safetensors").display())]),
    ];
    for (i, (server_png, cli_png)) in images.iter().zip(&cli).enumerate() {
        assert_eq!(max_diff(&pixels(server_png), &pixels(cli_png)), 0, "job {i}: the server's image is the CLI's");
    }
    assert!(max_diff(&pixels(&images[0]), &pixels(&images[1])) > 8, "the LoRA changes the image");
    assert!(max_diff(&pixels(&images[2]), &pixels(&images[1])) > 8, "the LoRA changes the image");
    let metrics = u.get("/metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    assert_eq!(metric(&text, "atelier_model_loads_total{component=\"transformer\"}"), 1.0, "{text}");

    // The PNG records the LoRAs as A1111/Forge do, as the CLI does (but for the model's name).
    let read = |png: &[u8]| atelier::engine::pngfile::read_parameters(png).unwrap().unwrap();
    let (server_text, cli_text) = (read(&images[0]), read(&cli[0]));
    assert_eq!(server_text.replace("Model: tiny", "Model: diffusers"), cli_text);
    let lora_hash = atelier::engine::lora::Lora::open(&loras.join("ink.safetensors")).unwrap().hash;
    assert!(server_text.starts_with("a red fox <lora:ink:0.8>\n"), "{server_text}");
    assert!(server_text.ends_with(&format!("Lora hashes: \"ink: {lora_hash}\"")), "{server_text}");
    let transformer = repo().join(MODEL).join("transformer/diffusion_pytorch_model.safetensors");
    let model_hash = atelier::engine::filehash::model_hash(&transformer).unwrap();
    assert!(server_text.contains(&format!("Model hash: {model_hash}, Model: tiny")), "{server_text}");
    assert!(read(&images[2]).starts_with("a red fox <lora:grain:0.6>\n"));

    // The OpenAI route takes the same `loras`.
    let key = u.post("/api/keys", json!({"label": "sdk"})).json()["key"].as_str().unwrap().to_string();
    let api = Client::new(&server.url).with_key(&key);
    let r = api.post(
        "/v1/images/generations",
        json!({"model": "tiny", "prompt": "a red fox", "size": "80x64", "steps": 2, "seed": 7,
               "loras": [{"name": "ink", "weight": 0.8}]}),
    );
    assert_eq!(r.status, 200, "{}", r.message());
    let b64 = r.json()["data"][0]["b64_json"].as_str().unwrap().to_string();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    assert_eq!(max_diff(&pixels(&png), &pixels(&cli[0])), 0);
    let r = api.post("/v1/images/generations", json!({"model": "tiny", "prompt": "x <lora:nope:1>", "size": "80x64"}));
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (404, Some("lora_not_found")), "{}", r.message());
}

#[test]
fn plans_count_loras_private_libraries_stay_private_and_uploads_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (data, loras) = (dir.path().join("data"), dir.path().join("loras"));
    std::fs::create_dir_all(&loras).unwrap();
    std::fs::copy(fixture("schnell/kohya.safetensors"), loras.join("ink.safetensors")).unwrap();
    std::fs::copy(fixture("schnell/peft.safetensors"), loras.join("grain.safetensors")).unwrap();
    for (name, plan) in [("fay", "free"), ("sam", "starter"), ("ann", "pro"), ("bob", "pro")] {
        add_user(&data, None, name, &format!("{name}-password"), plan, false);
    }
    add_user(&data, None, "root", "root-password", "max", true);
    let config = config(dir.path(), &loras, &[("max_lora_upload_mib = 2048", "max_lora_upload_mib = 1")]);
    let server = start(&data, &config);
    let login = |n: &str| Client::login(&server.url, n, &format!("{n}-password"));
    let (fay, sam, ann, bob, root) = (login("fay"), login("sam"), login("ann"), login("bob"), login("root"));

    // Plans: Free none, Starter one; the refusal names the plans that allow it.
    let one = json!([{"name": "ink", "weight": 1.0}]);
    let two = json!([{"name": "ink"}, {"name": "grain", "weight": -0.5}]);
    let before = fay.balance();
    let r = fay.post("/api/jobs", basic_job(one.clone()));
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (403, Some("not_in_plan")), "{}", r.message());
    assert_eq!(r.json()["error"]["details"]["plans_allowing"], json!(["starter", "pro", "ultra", "max"]));
    assert!(r.message().contains("no LoRAs"), "{}", r.message());
    assert_eq!(fay.balance(), before, "a refusal holds nothing");
    let r = sam.post("/api/jobs", basic_job(two));
    assert_eq!(r.status, 403, "{}", r.message());
    assert_eq!(r.json()["error"]["details"]["plans_allowing"], json!(["pro", "ultra", "max"]));
    let price = sam.get("/api/price?model=tiny&width=512&height=512&loras=2").json();
    assert_eq!((price["allowed"].as_bool(), price["status"].as_u64()), (Some(false), Some(403)), "{price}");
    assert_eq!(sam.post("/api/jobs", basic_job(one)).status, 201);

    // Unknown names are 404; bad weights and names 400.
    let r = ann.post("/api/jobs", job("a fox", json!([{"name": "nope"}])));
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (404, Some("lora_not_found")));
    let r = ann.post("/api/jobs", job("a fox", json!([{"name": "ink", "weight": 99}])));
    assert_eq!(r.status, 400, "{}", r.message());
    let r = ann.post("/api/jobs", job("a fox", json!([{"name": "../ink"}])));
    assert_eq!(r.status, 400, "{}", r.message());

    // Uploads: checked before they are stored.
    let good = std::fs::read(fixture("schnell/kohya.safetensors")).unwrap();
    let r = ann.upload("/api/loras?name=mine", &good);
    assert_eq!(r.status, 201, "{}", r.message());
    assert_eq!((r.json()["format"].as_str(), r.json()["lora"]["scope"].as_str()), (Some("kohya"), Some("mine")));
    let bad = |c: &Client, name: &str, bytes: &[u8], status: u16, says: &str| {
        let r = c.upload(&format!("/api/loras?name={name}"), bytes);
        assert_eq!(r.status, status, "{name}: {}", r.message());
        assert!(r.message().contains(says), "{name}: {}", r.message());
        if status == 400 {
            assert_eq!(r.json()["error"]["code"], "invalid_lora", "{name}");
        }
        // Messages name the upload, never the server's folders.
        assert!(!r.message().contains(".upload-") && !r.message().contains("/loras/"), "{name}: {}", r.message());
    };
    bad(&ann, "cut", &good[..good.len() / 2], 400, "LoRA cut");
    bad(&ann, "text", b"this is not a safetensors file at all", 400, "LoRA text");
    // An SDXL LoRA: its UNet keys are not FLUX's (only its CLIP-L keys would fit).
    let sdxl = dir.path().join("sdxl.safetensors");
    kohya_file(
        &sdxl,
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        32,
        &[
            ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", vec![4, 4]),
            ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", vec![4, 4]),
        ],
    );
    bad(&ann, "sdxl", &std::fs::read(&sdxl).unwrap(), 400, "FLUX transformer");
    let wide = dir.path().join("wide.safetensors");
    kohya_file(&wide, "lora_unet_double_blocks_0_img_attn_proj", 64, &[]);
    bad(&ann, "wide", &std::fs::read(&wide).unwrap(), 400, "width 64");
    bad(&ann, "big", &vec![0u8; (1 << 20) + 10], 413, "1 MiB");
    bad(&ann, "ink", &good, 409, "studio library");
    bad(&ann, "mine", &good, 409, "already");
    bad(&ann, "a%2Fb", &good, 400, "not a LoRA name");
    let names = |c: &Client| -> Vec<String> {
        c.get("/api/loras").json()["loras"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap().into())
            .collect()
    };
    assert_eq!(names(&ann), ["grain", "ink", "mine"], "nothing of the refused uploads was kept");
    let leftovers: Vec<_> = std::fs::read_dir(data.join("loras")).unwrap().flatten().collect::<Vec<_>>();
    assert_eq!(leftovers.len(), 1, "one user folder");

    // Private: bob neither sees nor uses ann's; ann does.
    assert_eq!(names(&bob), ["grain", "ink"]);
    let r = bob.post("/api/jobs", job("a fox", json!([{"name": "mine"}])));
    assert_eq!(r.status, 404, "{}", r.message());
    assert_eq!(bob.request("DELETE", "/api/loras/mine", None).status, 404);
    let j = ann.submit(job("a fox", json!([{"name": "mine", "weight": 0.7}])));
    assert_eq!(ann.wait_job(j["id"].as_str().unwrap())["status"], "succeeded");

    // The owner renames and describes it; an admin publishes it to the studio.
    let r = ann.request("PATCH", "/api/loras/mine", Some(json!({"name": "my ink", "triggers": ["myink"]})));
    assert_eq!(r.status, 200, "{}", r.message());
    assert_eq!(names(&ann), ["grain", "ink", "my ink"]);
    assert_eq!(
        ann.request("PATCH", "/api/loras/ink", Some(json!({"label": "x"}))).status,
        404,
        "studio LoRAs are the admin's"
    );
    assert_eq!(bob.post("/api/admin/loras/publish", json!({"user": "ann", "name": "my ink"})).status, 403);
    let r = root.post("/api/admin/loras/publish", json!({"user": "ann", "name": "my ink", "as": "ann ink"}));
    assert_eq!(r.status, 201, "{}", r.message());
    assert_eq!(names(&bob), ["ann ink", "grain", "ink"]);
    let bob_list = bob.get("/api/loras").json();
    assert_eq!(bob_list["loras"][0]["triggers"], json!(["myink"]), "the sidecar goes with it");
    assert_eq!(ann.request("DELETE", "/api/loras/my%20ink", None).status, 204);
    assert_eq!(names(&ann), ["ann ink", "grain", "ink"]);
}
