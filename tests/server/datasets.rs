//! Training datasets through the server: create, list, read, rename, delete; multipart image
//! uploads (PNG, JPEG with EXIF orientation, WebP) with captions; captions one by one and in
//! bulk; privacy (another user's dataset is a 404, an admin reads); the plan's image limit;
//! bad uploads (each a clear 4xx that leaves nothing on disk).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use serde_json::{Value, json};

use crate::common::*;

/// A multipart part: (field name, file name, content type, bytes).
type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

fn multipart(parts: &[Part]) -> (Vec<u8>, String) {
    let boundary = "----atelier-test-7c1f0e";
    let mut body = Vec::new();
    for (field, file, ct, bytes) in parts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"").as_bytes());
        if let Some(f) = file {
            body.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        if let Some(ct) = ct {
            body.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (body, format!("multipart/form-data; boundary={boundary}"))
}

fn upload(c: &Client, id: &str, parts: &[Part]) -> Resp {
    let (body, ct) = multipart(parts);
    c.post_body(&format!("/api/datasets/{id}/images"), &body, &ct)
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A `w`×`h` image: red on the left half, blue on the right.
fn halves(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(
        w,
        h,
        |x, _| if x < w / 2 { Rgb([230, 20, 20]) } else { Rgb([20, 20, 230]) },
    ))
}

fn png(w: u32, h: u32) -> Vec<u8> {
    encode(&halves(w, h), ImageFormat::Png)
}

/// A JPEG with an EXIF orientation of 6 (displayed rotated 90° clockwise), the way phones
/// store portrait photos.
fn jpeg_rotated(w: u32, h: u32) -> Vec<u8> {
    let jpg = encode(&halves(w, h), ImageFormat::Jpeg);
    // APP1 "Exif": a big-endian TIFF header and one IFD entry, Orientation (0x0112) = 6.
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&[0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = jpg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpg[2..]);
    out
}

/// Pixels that do not compress: a PNG of about `w`·`h`·3 bytes.
fn noise_png(w: u32, h: u32) -> Vec<u8> {
    let mut s: u32 = 12345;
    let img = RgbImage::from_fn(w, h, |_, _| {
        s = s.wrapping_mul(1664525).wrapping_add(1013904223);
        let b = s.to_be_bytes();
        Rgb([b[0], b[1], b[2]])
    });
    encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png)
}

/// A decompression bomb: a PNG of a few hundred KB whose header says 20000×20000 (1-bit zero
/// rows, which decode to 400 MB of 8-bit pixels).
fn bomb_png() -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, 20000, 20000);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::One);
    enc.set_compression(png::Compression::High);
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&vec![0u8; 2500 * 20000]).unwrap();
    w.finish().unwrap();
    out
}

/// The dataset's folder holds nothing but an empty dataset (no images, thumbnails, staging).
fn assert_empty(data: &Path, id: &str, what: &str) {
    let dir = data.join("datasets").join(id);
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["dataset.json", "images", "thumbs"], "{what}: left in {}", dir.display());
    for sub in ["images", "thumbs"] {
        let left: Vec<PathBuf> = std::fs::read_dir(dir.join(sub)).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(left.is_empty(), "{what}: left {left:?}");
    }
}

fn config(dir: &Path) -> PathBuf {
    config_replacing(
        dir,
        &[
            // Starter (the first plan that trains): 6 images per LoRA here, so the test hits it.
            ("training_images_per_lora = 30", "training_images_per_lora = 6"),
            ("max_image_mib = 30", "max_image_mib = 1"),
            ("max_dataset_mib = 1024", "max_dataset_mib = 2"),
            ("max_datasets_per_user = 20", "max_datasets_per_user = 3"),
        ],
    )
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn datasets_images_and_captions_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let cfg = config(dir.path());
    add_user(&data, Some(&cfg), "root", "root-pass-1", "max", true);
    add_user(&data, Some(&cfg), "alice", "alice-pass-1", "starter:yearly", false);
    add_user(&data, Some(&cfg), "bob", "bob-pass-12", "starter:yearly", false);
    add_user(&data, Some(&cfg), "fred", "fred-pass-12", "free", false);
    let server = Server::start(&data, Some(&cfg));
    let alice = Client::login(&server.url, "alice", "alice-pass-1");
    let bob = Client::login(&server.url, "bob", "bob-pass-12");
    let root = Client::login(&server.url, "root", "root-pass-1");
    let fred = Client::login(&server.url, "fred", "fred-pass-12");

    // Create, list, rename.
    let r = alice.post("/api/datasets", json!({"name": "  My dog ", "trigger": "rexdog"}));
    assert_eq!(r.status, 201, "{}", r.message());
    let ds = r.json()["dataset"].clone();
    let id = ds["id"].as_str().unwrap().to_string();
    assert_eq!(
        (ds["name"].as_str(), ds["trigger"].as_str(), ds["image_count"].as_u64()),
        (Some("My dog"), Some("rexdog"), Some(0))
    );
    assert_eq!(alice.post("/api/datasets", json!({"name": "  "})).status, 400);
    let l = alice.get("/api/datasets").json();
    assert_eq!(ids(&l["datasets"]), [id.as_str()]);
    assert_eq!((l["max_images"].as_u64(), l["plan"].as_str()), (Some(6), Some("starter")));
    let r = alice.request("PATCH", &format!("/api/datasets/{id}"), Some(json!({"name": "Rex", "trigger": "rex_dog"})));
    assert_eq!(r.status, 200, "{}", r.message());
    assert_eq!(
        (r.json()["dataset"]["name"].as_str(), r.json()["dataset"]["trigger"].as_str()),
        (Some("Rex"), Some("rex_dog"))
    );

    // Four images in one request: PNG with a caption field, JPEG (EXIF-rotated) with a kohya
    // .txt, WebP without a caption, and a second PNG.
    let (a, b, c, d) = (png(48, 32), jpeg_rotated(64, 32), encode(&halves(40, 40), ImageFormat::WebP), png(20, 30));
    let r = upload(
        &alice,
        &id,
        &[
            ("files", Some("a.png"), Some("image/png"), &a),
            ("caption:a.png", None, None, b"a photo of [trigger] on grass"),
            ("files", Some("b.jpg"), Some("image/jpeg"), &b),
            ("files", Some("b.txt"), Some("text/plain"), b"[trigger] sleeping\n"),
            ("files", Some("c.webp"), Some("image/webp"), &c),
            ("files", Some("d.png"), Some("image/png"), &d),
        ],
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let new = r.json()["images"].clone();
    assert_eq!(new.as_array().unwrap().len(), 4);
    let got = alice.get(&format!("/api/datasets/{id}")).json();
    let images = got["images"].as_array().unwrap().clone();
    assert_eq!(got["dataset"]["image_count"], 4);
    assert_eq!(got["max_images"], 6);
    let dims: Vec<(u64, u64)> =
        images.iter().map(|i| (i["width"].as_u64().unwrap(), i["height"].as_u64().unwrap())).collect();
    assert_eq!(dims, [(48, 32), (32, 64), (40, 40), (20, 30)], "in upload order; the JPEG stored upright");
    let captions: Vec<&str> = images.iter().map(|i| i["caption"].as_str().unwrap()).collect();
    assert_eq!(captions, ["a photo of [trigger] on grass", "[trigger] sleeping", "", ""]);
    let img_ids = ids(&got["images"]);
    // On disk as the trainer reads it: PNGs with .txt captions, JPEG thumbnails.
    let images_dir = data.join("datasets").join(&id).join("images");
    assert_eq!(std::fs::read_to_string(images_dir.join(format!("{}.txt", img_ids[1]))).unwrap(), "[trigger] sleeping");
    assert!(images.iter().all(|i| i["bytes"].as_u64().unwrap() > 0));
    // The rotated JPEG: its left (red) half is now on top.
    let file = alice.get(images[1]["url"].as_str().unwrap());
    assert_eq!((file.status, file.header("content-type")), (200, Some("image/png")));
    let stored = image::load_from_memory(&file.body).unwrap().to_rgb8();
    assert_eq!(stored.dimensions(), (32, 64));
    let (top, bottom) = (stored.get_pixel(16, 8), stored.get_pixel(16, 56));
    assert!(top[0] > 150 && top[2] < 100 && bottom[2] > 150 && bottom[0] < 100, "top {top:?} bottom {bottom:?}");
    let thumb = alice.get(images[0]["thumb_url"].as_str().unwrap());
    assert_eq!((thumb.status, thumb.header("content-type")), (200, Some("image/jpeg")));
    assert_eq!(image::load_from_memory(&thumb.body).unwrap().width(), 48);

    // Captions: one, then in bulk (set, prefix / suffix applied once), with a length limit.
    let one = format!("/api/datasets/{id}/images/{}", img_ids[2]);
    let r = alice.request("PATCH", &one, Some(json!({"caption": "  [trigger] running  "})));
    assert_eq!(r.status, 200, "{}", r.message());
    assert_eq!(r.json()["image"]["caption"], "[trigger] running");
    let r = alice.request("PATCH", &one, Some(json!({"caption": "x".repeat(1001)})));
    assert_eq!(r.status, 400);
    assert!(r.message().contains("1000"), "{}", r.message());
    let bulk = format!("/api/datasets/{id}/captions");
    let edit = json!({"captions": {img_ids[3].clone(): "[trigger] in snow"}, "prefix": "photo of", "find": "grass", "replace": "a lawn"});
    let r = alice.request("PATCH", &bulk, Some(edit.clone()));
    assert_eq!(r.status, 200, "{}", r.message());
    let want = [
        "photo of a photo of [trigger] on a lawn",
        "photo of [trigger] sleeping",
        "photo of [trigger] running",
        "photo of [trigger] in snow",
    ];
    let got: Vec<String> =
        r.json()["images"].as_array().unwrap().iter().map(|i| i["caption"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, want);
    let again = alice.request("PATCH", &bulk, Some(json!({"prefix": "photo of", "images": [img_ids[1].clone()]})));
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["images"][1]["caption"], want[1]);
    let r = alice.request("PATCH", &bulk, Some(json!({"captions": {"abcdef": "x"}})));
    assert_eq!(r.status, 400, "an unknown image changes nothing");
    let r = alice.request("PATCH", &bulk, Some(json!({"suffix": "y".repeat(1000)})));
    assert_eq!(r.status, 400);
    assert_eq!(alice.get(&format!("/api/datasets/{id}")).json()["images"][0]["caption"], want[0], "all or nothing");

    // Delete an image: its PNG, caption and thumbnail go.
    let r = alice.request("DELETE", &format!("/api/datasets/{id}/images/{}", img_ids[1]), None);
    assert_eq!(r.status, 204);
    assert!(!images_dir.join(format!("{}.png", img_ids[1])).exists());
    assert!(!images_dir.join(format!("{}.txt", img_ids[1])).exists());
    assert!(!data.join("datasets").join(&id).join("thumbs").join(format!("{}.jpg", img_ids[1])).exists());
    assert_eq!(alice.get(&format!("/api/datasets/{id}")).json()["dataset"]["image_count"], 3);

    // Privacy: bob gets 404 for everything of alice's, as for a missing dataset; root reads.
    let img = &img_ids[0];
    let probes = [
        ("GET", format!("/api/datasets/{id}")),
        ("PATCH", format!("/api/datasets/{id}")),
        ("DELETE", format!("/api/datasets/{id}")),
        ("PATCH", format!("/api/datasets/{id}/captions")),
        ("PATCH", format!("/api/datasets/{id}/images/{img}")),
        ("DELETE", format!("/api/datasets/{id}/images/{img}")),
        ("GET", format!("/api/datasets/{id}/images/{img}/file")),
        ("GET", format!("/api/datasets/{id}/images/{img}/thumb")),
    ];
    for (method, path) in &probes {
        let body = match (*method, path) {
            ("PATCH", p) if p.ends_with("captions") => Some(json!({"set_all": "mine"})),
            ("PATCH", p) if p.contains("/images/") => Some(json!({"caption": "mine"})),
            ("PATCH", _) => Some(json!({"name": "mine"})),
            _ => None,
        };
        let r = bob.request(method, path, body);
        assert_eq!(r.status, 404, "bob {method} {path}: {}", String::from_utf8_lossy(&r.body));
    }
    assert_eq!(upload(&bob, &id, &[("files", Some("x.png"), Some("image/png"), &a)]).status, 404);
    assert_eq!(bob.get("/api/datasets/0123456789abcdef0123456789abcdef").status, 404);
    assert!(bob.get("/api/datasets").json()["datasets"].as_array().unwrap().is_empty());
    assert_eq!(bob.get("/api/datasets?all=true").status, 403);
    for path in
        [format!("/api/datasets/{id}/images/..%2F..%2Fdataset/file"), "/api/datasets/..%2Fdatasets/x".to_string()]
    {
        assert_eq!(alice.get(&path).status, 404, "{path}");
    }
    assert_eq!(root.get(&format!("/api/datasets/{id}")).json()["dataset"]["owner"], ds["owner"]);
    assert_eq!(root.get(&format!("/api/datasets/{id}/images/{img}/thumb")).status, 200);
    let alice_id = ds["owner"].as_i64().unwrap();
    assert_eq!(ids(&root.get(&format!("/api/datasets?user={alice_id}")).json()["datasets"]), [id.as_str()]);
    assert_eq!(ids(&root.get("/api/datasets?all=true").json()["datasets"]), [id.as_str()]);
    // Reading is not changing: an admin does not edit someone else's dataset.
    assert_eq!(root.request("DELETE", &format!("/api/datasets/{id}"), None).status, 404);

    // The plan's image limit (6 on Starter here): 3 + 4 is refused, naming the limit and the
    // plans that allow 7; nothing is stored.
    let four: Vec<Vec<u8>> = (0..4).map(|i| png(16 + i, 16)).collect();
    let names = ["e.png", "f.png", "g.png", "h.png"];
    let parts: Vec<Part> =
        four.iter().zip(names).map(|(b, n)| ("files", Some(n), Some("image/png"), b.as_slice())).collect();
    let r = upload(&alice, &id, &parts);
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json()["error"].clone();
    assert_eq!(
        (e["details"]["reason"].as_str(), e["details"]["max"].as_u64()),
        (Some("too_many_training_images"), Some(6))
    );
    assert_eq!(e["details"]["plans_allowing"], json!(["pro", "ultra", "max"]));
    assert!(r.message().contains('6') && r.message().contains("pro"), "{}", r.message());
    assert_eq!(alice.get(&format!("/api/datasets/{id}")).json()["dataset"]["image_count"], 3);
    assert_eq!(upload(&alice, &id, &parts[..3]).status, 201, "up to the limit is fine");

    // Free: no training, so no images; the refusal names the plans with training.
    let r = fred.post("/api/datasets", json!({"name": "free"}));
    assert_eq!(r.status, 201);
    let free_id = r.json()["dataset"]["id"].as_str().unwrap().to_string();
    let r = upload(&fred, &free_id, &parts[..1]);
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["details"]["reason"], "training_not_in_plan");
    assert_eq!(r.json()["error"]["details"]["plans_allowing"], json!(["starter", "pro", "ultra", "max"]));
    assert_empty(&data, &free_id, "free");

    // The cap on datasets per user (3 here).
    for n in 0..2 {
        assert_eq!(alice.post("/api/datasets", json!({"name": format!("more {n}")})).status, 201);
    }
    let r = alice.post("/api/datasets", json!({"name": "one too many"}));
    assert_eq!(r.status, 409);
    assert!(r.message().contains("max_datasets_per_user"), "{}", r.message());

    // Deleting a dataset removes its folder.
    assert_eq!(alice.request("DELETE", &format!("/api/datasets/{id}"), None).status, 204);
    assert!(!data.join("datasets").join(&id).exists());
    assert_eq!(alice.get(&format!("/api/datasets/{id}")).status, 404);
    assert_eq!(alice.get("/api/datasets").json()["datasets"].as_array().unwrap().len(), 2);
}

#[test]
fn bad_uploads_are_refused_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let cfg = config(dir.path());
    add_user(&data, Some(&cfg), "alice", "alice-pass-1", "starter:yearly", false);
    let server = Server::start(&data, Some(&cfg));
    let alice = Client::login(&server.url, "alice", "alice-pass-1");
    let id = alice.post("/api/datasets", json!({"name": "bad"})).json()["dataset"]["id"].as_str().unwrap().to_string();

    let good = png(32, 32);
    let mut truncated = noise_png(64, 64);
    truncated.truncate(truncated.len() / 2);
    let bomb = bomb_png();
    assert!(bomb.len() < 1 << 20, "the bomb is small ({} bytes)", bomb.len());
    let big = noise_png(700, 600);
    assert!(big.len() > 1 << 20);
    let cases: Vec<(&str, Part, u16, &str)> = vec![
        (
            "a non-image",
            ("files", Some("notes.png"), Some("image/png"), b"hello, not an image at all"),
            415,
            "notes.png",
        ),
        ("a truncated PNG", ("files", Some("cut.png"), Some("image/png"), &truncated), 400, "cut.png"),
        ("a 20000x20000 PNG", ("files", Some("bomb.png"), Some("image/png"), &bomb), 413, "20000×20000"),
        ("a 0-byte file", ("files", Some("empty.png"), Some("image/png"), b""), 400, "empty.png"),
        ("a wrong content type", ("files", Some("page.png"), Some("text/html"), &good), 415, "text/html"),
        ("a GIF", ("files", Some("anim.gif"), Some("image/png"), b"GIF89a\x01\0\x01\0\0\0\0;"), 415, "GIF"),
        ("too big", ("files", Some("huge.png"), Some("image/png"), &big), 413, "max_image_mib"),
        ("a caption without its image", ("caption:zzz.png", None, None, b"lost"), 400, "zzz.png"),
    ];
    for (what, bad, status, says) in cases {
        // A good image first: the request is all or nothing.
        let r = upload(&alice, &id, &[("files", Some("good.png"), Some("image/png"), &good), bad]);
        assert_eq!(r.status, status, "{what}: {}", String::from_utf8_lossy(&r.body));
        assert!(r.message().contains(says), "{what}: {}", r.message());
        assert_empty(&data, &id, what);
    }
    // A file sent without a content type (Python's requests) or as octet-stream (curl's .webp)
    // is taken: its bytes decide.
    for ct in [None, Some("application/octet-stream")] {
        let r = upload(&alice, &id, &[("files", Some("bare.png"), ct, &good)]);
        assert_eq!(r.status, 201, "{ct:?}: {}", String::from_utf8_lossy(&r.body));
        let img = r.json()["images"][0]["id"].as_str().unwrap().to_string();
        assert_eq!(alice.request("DELETE", &format!("/api/datasets/{id}/images/{img}"), None).status, 204);
    }
    // Not multipart at all, and a form without images.
    let r = alice.post_body(&format!("/api/datasets/{id}/images"), &good, "image/png");
    assert_eq!(r.status, 415, "{}", String::from_utf8_lossy(&r.body));
    let r = upload(&alice, &id, &[]);
    assert_eq!(r.status, 400);
    assert_empty(&data, &id, "no images");

    // A client that goes away mid-upload leaves nothing behind either.
    let noise = noise_png(500, 600);
    assert!(noise.len() < 1 << 20);
    let (body, ct) = multipart(&[("files", Some("slow.png"), Some("image/png"), &noise)]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    let head = format!(
        "POST /api/datasets/{id}/images HTTP/1.1\r\nHost: {addr}\r\nCookie: {}\r\nX-CSRF-Token: {}\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
        alice.cookie.as_deref().unwrap(),
        alice.csrf.as_deref().unwrap(),
        body.len()
    );
    std::io::Write::write_all(&mut conn, head.as_bytes()).unwrap();
    std::io::Write::write_all(&mut conn, &body[..body.len() / 2]).unwrap();
    let ds_dir = data.join("datasets").join(&id);
    let staged = || {
        std::fs::read_dir(&ds_dir).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".upload-"))
    };
    let until = |want: bool| {
        let start = std::time::Instant::now();
        while staged() != want {
            assert!(start.elapsed().as_secs() < 10, "the staging folder exists: {}", !want);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    until(true);
    drop(conn);
    until(false);
    assert_empty(&data, &id, "a client gone mid-upload");

    // And after all that, a good upload works.
    assert_eq!(upload(&alice, &id, &[("files", Some("good.png"), Some("image/png"), &good)]).status, 201);

    // The dataset's size limit (2 MiB here): two ~900 KB images fit, a third does not.
    let r = upload(
        &alice,
        &id,
        &[("files", Some("n1.png"), Some("image/png"), &noise), ("files", Some("n2.png"), Some("image/png"), &noise)],
    );
    assert_eq!(r.status, 201, "{}", r.message());
    let r = upload(&alice, &id, &[("files", Some("n3.png"), Some("image/png"), &noise)]);
    assert_eq!(r.status, 413, "{}", r.message());
    assert!(r.message().contains("n3.png") && r.message().contains("max_dataset_mib"), "{}", r.message());
    assert_eq!(alice.get(&format!("/api/datasets/{id}")).json()["dataset"]["image_count"], 3);
}
