//! The shipped demo model (weights/demo, trained by scripts/demo/train_demo.sh) draws the emoji
//! it is asked for: for 100 names of its training set (every 19th emoji, fixed seeds), the
//! generated image's nearest training emoji (`atelier::emoji_eval`: L2 on 32×32 pixels) is the
//! named one far more often than for a random model of the same architecture, and the named
//! emoji ranks near the top (see the test for the figures and the gap to issue 17's bar).

use std::path::PathBuf;

use atelier::emoji_eval::EmojiAtlas;
use atelier::engine::pipeline::{GenerateRequest, ModelFiles, generate};
use burn::tensor::Device;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// For 100 names of the training set (every 19th emoji, seed k for the k-th): how many the model
/// at `files` draws as their own emoji, and the median rank of the named emoji among all 1911 by
/// distance to the image (0: nearest; about 955 for an unrelated image). T5 length `max_len`.
fn measure(files: &ModelFiles, atlas: &EmojiAtlas, max_len: usize) -> (usize, usize) {
    let mut ranks: Vec<usize> = (0..100)
        .map(|k| {
            let i = k * 19;
            let req = GenerateRequest {
                prompt: atlas.names[i].clone(),
                seed: k as u64,
                width: 64,
                height: 64,
                max_sequence_length: Some(max_len),
                ..Default::default()
            };
            let out = generate(files, &req, &Device::flex(), |_| {}).unwrap();
            atlas.rank_of(&out.images[0], i).unwrap()
        })
        .collect();
    let hits = ranks.iter().filter(|&&r| r == 0).count();
    ranks.sort();
    (hits, ranks[ranks.len() / 2])
}

/// (`ATELIER_DEMO_MODEL=<WORK>/out/dev cargo test --release --test demo` measures a recipe's
/// output before it ships.)
///
/// Issue 17 asks for at least half of the names drawn as the nearest emoji, and that is the
/// bound: the shipped model (weights/demo/README.md: 16000 CPU steps of 32, 400 + 120 H200
/// steps of 1024, CPU decays and warm restarts; the VAE fine-tuned with `--keep-latents`) draws
/// 52/100 (53 with the VAE before that fine-tune; an emoji whose image has an
/// identical twin counts when the image is nearest both), with the named emoji at median rank
/// 0 of 1911 (a random model: 0/100, median rank ~1000); most misses are a close neighbour
/// (another face, the same flag colours). The same 52 (and the same LoRA figures below) with the
/// element-wise kernels forced to AVX2 instead of AVX-512 and `ATELIER_NO_AMX=1` (another CPU's
/// rounding); the earlier VAE kept its 53 so too.
#[test]
fn the_demo_model_draws_the_emoji_it_is_named_for() {
    let atlas = EmojiAtlas::load(&root().join("tests/fixtures/demo")).unwrap();
    assert_eq!(atlas.names.len(), 1911);
    // The measure itself: each tile, upscaled, is its own nearest emoji.
    assert!((0..1911).step_by(97).all(|i| atlas.nearest(&atlas.tile_image(i)).unwrap() == i));

    // ATELIER_DEMO_MODEL measures another pipeline folder (a recipe's output before it ships).
    let dir = std::env::var_os("ATELIER_DEMO_MODEL").map_or(root().join("weights/demo/dev"), PathBuf::from);
    let demo = ModelFiles::from_diffusers(&dir, None).unwrap();
    let max_len = atelier::engine::flux::default_sequence_length(&demo.transformer, true);
    let (trained, trained_rank) = measure(&demo, &atlas, max_len);
    // The same architecture with random weights.
    let dir = tempfile::tempdir().unwrap();
    let (_, config) = atelier::engine::flux::open_checked(&demo.transformer, None).unwrap();
    let random = dir.path().join("random.safetensors");
    atelier::engine::flux::write_random_checkpoint(&config, &random, 7).unwrap();
    let (baseline, baseline_rank) = measure(&ModelFiles { transformer: random, ..demo.clone() }, &atlas, max_len);
    eprintln!(
        "nearest emoji is the named one: demo model {trained}/100 (median rank {trained_rank}), random weights \
         {baseline}/100 (median rank {baseline_rank})"
    );
    assert!(trained >= 50 && trained >= baseline + 40, "demo {trained}/100 vs random {baseline}/100");
    assert!(trained_rank <= 2 && baseline_rank >= 400, "median ranks: demo {trained_rank}, random {baseline_rank}");
}

/// How far an image is from sepia: the mean distance of its pixels (0–255 RGB) from the sepia
/// line through (1.07, 0.86, 0.62)·gray, over the pixels that are not near white.
fn off_sepia(img: &image::RgbImage) -> f64 {
    let dir = [1.07f64, 0.86, 0.62];
    let norm = dir.iter().map(|d| d * d).sum::<f64>().sqrt();
    let dir = dir.map(|d| d / norm);
    let (mut sum, mut n) = (0.0, 0usize);
    for p in img.pixels() {
        let v = p.0.map(f64::from);
        if v.iter().all(|&c| c > 235.0) {
            continue;
        }
        let along: f64 = v.iter().zip(dir).map(|(a, b)| a * b).sum();
        let off: f64 = v.iter().zip(dir).map(|(a, b)| (a - along * b).powi(2)).sum::<f64>().sqrt();
        sum += off;
        n += 1;
    }
    sum / n.max(1) as f64
}

/// The demo model also trains: a LoRA learned from 4 emoji turned into old film photos (sepia
/// and grain, like scripts/demo/make_grain_lora.sh) moves what the model draws for
/// other emoji towards sepia.
#[test]
fn a_lora_trained_on_the_demo_model_moves_its_style() {
    use atelier::engine::lora::LoraChoice;
    use atelier::train::run::{Job, Settings, train};

    let atlas = EmojiAtlas::load(&root().join("tests/fixtures/demo")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for name in ["red apple", "cat face", "rocket", "rainbow"] {
        let i = atlas.names.iter().position(|n| n == name).unwrap();
        let tile = atlas.tile_image(i);
        let sepia = image::RgbImage::from_fn(64, 64, |x, y| {
            let p = tile.get_pixel(x, y).0.map(f64::from);
            let gray = 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
            let grain = (((x * 7919 + y * 104_729) % 23) as f64 - 11.0) * 1.2;
            image::Rgb([1.07, 0.86, 0.62].map(|k: f64| (k * gray * 0.9 + 15.0 + grain).clamp(0.0, 255.0) as u8))
        });
        sepia.save(images.join(format!("{}.png", name.replace(' ', "_")))).unwrap();
        std::fs::write(images.join(format!("{}.txt", name.replace(' ', "_"))), format!("grainy film, {name}\n"))
            .unwrap();
    }
    let files = ModelFiles::from_diffusers(&root().join("weights/demo/schnell"), None).unwrap();
    let out = dir.path().join("grain.safetensors");
    let job = Job {
        files: files.clone(),
        images,
        out: out.clone(),
        resume: None,
        init: None,
        dtype: burn::tensor::DType::F32,
        stop_after: None,
    };
    let s = Settings {
        trigger: "grainy film".into(),
        steps: 300,
        rank: 4,
        alpha: 4.0,
        batch: 4,
        resolution: 64,
        caption_dropout: 0.0,
        seed: 1,
        adamw: atelier::train::adamw::AdamWConfig { lr: 1e-3, ..Default::default() },
        ..Settings::default()
    };
    train(&job, &s, &Device::flex(), |_| {}).unwrap();

    let draw = |prompt: &str, seed: u64, loras: Vec<LoraChoice>| {
        let req = GenerateRequest { prompt: prompt.into(), seed, width: 64, height: 64, loras, ..Default::default() };
        generate(&files, &req, &Device::flex(), |_| {}).unwrap().images.remove(0)
    };
    let mut plain = 0.0;
    let mut styled = 0.0;
    for (k, name) in ["grinning face", "red heart", "dog face", "sun with face"].iter().enumerate() {
        plain += off_sepia(&draw(name, k as u64, vec![]));
        let lora = vec![LoraChoice { path: out.clone(), weight: 1.0 }];
        styled += off_sepia(&draw(&format!("grainy film, {name}"), k as u64, lora));
    }
    eprintln!("mean distance from sepia: without the LoRA {:.1}, with it {:.1}", plain / 4.0, styled / 4.0);
    // Measured on the shipped model (2026-12-05, the VAE fine-tuned with --keep-latents): 77.7
    // without, 42.3 with (0.54; 150 steps: 50.3, lr 3e-3: 43.6); with the VAE before it, 40.6
    // (150 steps: 45.7, 0.59, too near the bound). What the prompts draw keeps some colour
    // whatever the LoRA learned.
    assert!(styled < plain * 0.6, "the LoRA did not move the images towards sepia: {styled} vs {plain}");
}
