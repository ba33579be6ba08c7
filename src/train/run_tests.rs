//! The training loop end to end on the tiny pipeline fixtures: export formats load back at the
//! trained strength, `--resume` continues exactly, bad input fails before any compute.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};

use super::export::Format;
use super::params::{TrainableLora, host};
use super::run::{Event, Job, Settings, train};
use crate::engine::flux;
use crate::engine::lora::{Lora, LoraSet, set_loras};
use crate::engine::pipeline::ModelFiles;

fn model(kind: &str) -> ModelFiles {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/pipeline/{kind}/diffusers"));
    ModelFiles::from_diffusers(&dir, None).unwrap()
}

/// Four 32×32 images of one pattern (a red diagonal on white), no captions.
fn images(dir: &Path) -> PathBuf {
    let d = dir.join("images");
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..4u32 {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            if (x + i) % 8 == y % 8 { image::Rgb([220, 20, 20]) } else { image::Rgb([250, 250, 250]) }
        });
        img.save(d.join(format!("{i}.png"))).unwrap();
    }
    d
}

fn settings() -> Settings {
    Settings {
        trigger: "zqx".into(),
        steps: 6,
        rank: 2,
        alpha: 4.0,
        resolution: 32,
        caption_dropout: 0.3,
        max_sequence_length: Some(32),
        seed: 5,
        ..Settings::default()
    }
}

fn job(files: ModelFiles, images: &Path, out: &Path) -> Job {
    Job { files, images: images.into(), out: out.into(), resume: None, init: None, dtype: DType::F32, stop_after: None }
}

fn run(job: &Job, s: &Settings) -> (TrainableLora, Vec<f32>) {
    let t = train(job, s, &Device::flex(), |_| {}).unwrap();
    (t.lora.unwrap(), t.losses)
}

/// ΔWᵀ of every Linear with adapters: what the LoRA changes, in the model's own terms.
fn deltas(files: &ModelFiles, lora: &Path) -> Vec<(String, Vec<f32>)> {
    let mut m = flux::load_transformer(&files.transformer, &Device::flex(), DType::F32, None).unwrap();
    let set = LoraSet { lora: std::sync::Arc::new(Lora::open(lora).unwrap()), weight: 1.0 };
    let warnings = set_loras(&mut m, &[set]).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let mut out: Vec<(String, Vec<f32>)> = m
        .linears_mut()
        .into_iter()
        .filter(|(_, l)| !l.adapters.is_empty())
        .map(|(p, l)| {
            let a = &l.adapters[0];
            (p, host(a.down.val().matmul(a.up.as_ref().unwrap().val())))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn train_exports_load_back_at_the_trained_strength_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = images(dir.path());
    let files = model("dev");
    let kohya = dir.path().join("k.safetensors");
    let mut events = Vec::new();
    let t = train(&job(files.clone(), &imgs, &kohya), &settings(), &Device::flex(), |e| events.push(e)).unwrap();
    assert_eq!(t.losses.len(), 6);
    assert!(t.losses.iter().all(|l| l.is_finite()));
    assert!(events.iter().any(|e| matches!(e, Event::Step { step: 6, steps: 6, .. })));
    let csv = std::fs::read_to_string(dir.path().join("k_train/loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");
    // The trained ΔWᵀ = s · Aᵀ Bᵀ of each pair.
    let lora = t.lora.expect("a LoRA run returns its LoRA");
    let s = lora.scale();
    let expected: Vec<(String, Vec<f32>)> =
        lora.pairs.iter().map(|p| (p.path.clone(), host(p.down.clone().matmul(p.up.clone()) * s))).collect();
    assert!(expected.iter().any(|(_, d)| d.iter().any(|v| *v != 0.0)), "training moved B");
    let peft = dir.path().join("p.safetensors");
    super::export::write(&lora, Format::Peft, &Default::default(), &peft).unwrap();
    for file in [&kohya, &peft] {
        let got = deltas(&files, file);
        assert_eq!(got.len(), expected.len(), "{}", file.display());
        for ((gp, g), (ep, e)) in got.iter().zip(&expected) {
            assert_eq!(gp, ep);
            let err = g.iter().zip(e).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = e.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(err <= 1e-6 * scale.max(1e-6), "{}: {gp} differs by {err}", file.display());
        }
    }
    let lora = Lora::open(&kohya).unwrap();
    assert_eq!(lora.format, "kohya");
    let header = crate::engine::weights::WeightSet::open(&kohya).unwrap();
    assert_eq!(header.metadata("ss_network_dim"), Some("2"));
    assert_eq!(header.metadata("modelspec.trigger_phrase"), Some("zqx"));
    assert_eq!(header.metadata("ss_num_train_images"), Some("4"));
    assert_eq!(lora.hash, header.metadata("sshs_model_hash").unwrap()[..12]);
    assert_eq!(Lora::open(&peft).unwrap().format, "diffusers/PEFT");
}

#[test]
fn train_resume_from_a_checkpoint_equals_the_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = images(dir.path());
    let files = model("schnell");
    let s = Settings { batch: 2, ..settings() };
    let (straight, straight_losses) = run(&job(files.clone(), &imgs, &dir.path().join("a.safetensors")), &s);
    let out = dir.path().join("b.safetensors");
    let first = Job { stop_after: Some(2), ..job(files.clone(), &imgs, &out) };
    let (_, first_losses) = run(&first, &s);
    let ckpt = dir.path().join("b_train/checkpoints/step_2");
    let second = Job { resume: Some(ckpt.clone()), ..job(files.clone(), &imgs, &out) };
    let (resumed, resumed_losses) = run(&second, &s);
    assert_eq!([first_losses, resumed_losses].concat(), straight_losses);
    for (a, b) in straight.factors().iter().zip(resumed.factors()) {
        let err = a.1.iter().chain(&a.2).zip(b.1.iter().chain(&b.2)).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(err <= 1e-6, "{}: {err}", a.0);
    }
    // Other settings than the checkpoint's are refused.
    let other = Job { resume: Some(ckpt), ..job(files, &imgs, &out) };
    let err = train(&other, &Settings { rank: 3, ..s }, &Device::flex(), |_| {}).err().unwrap();
    assert!(format!("{err:#}").contains("other settings"), "{err:#}");
}

#[test]
fn train_refuses_bad_input_before_any_compute() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = images(dir.path());
    let out = dir.path().join("x.safetensors");
    let fail = |job: &Job, s: &Settings| -> String {
        let mut stages = 0;
        let err = train(job, s, &Device::flex(), |_| stages += 1).err().expect("an error");
        assert_eq!(stages, 0, "failed after starting work: {err:#}");
        format!("{err:#}")
    };
    let good = job(model("schnell"), &imgs, &out);
    let e = fail(&good, &Settings { rank: 4096, ..settings() });
    assert!(e.contains("--rank 4096"), "{e}");
    let e = fail(&good, &Settings { max_images: 3, ..settings() });
    assert!(e.contains("at most 3"), "{e}");
    let e = fail(&job(model("schnell"), &dir.path().join("none"), &out), &settings());
    assert!(e.contains("cannot read the image folder"), "{e}");
    // A "model" whose transformer is a VAE.
    let mut files = model("schnell");
    files.transformer = files.vae.clone();
    let e = fail(&job(files, &imgs, &out), &settings());
    assert!(e.contains("FLUX") || e.contains("transformer"), "{e}");
    std::fs::write(imgs.join("broken.jpg"), b"not a jpeg").unwrap();
    let e = fail(&good, &settings());
    assert!(e.contains("broken.jpg"), "{e}");
}

/// The learning check of issue 15: 200 steps on four images of one pattern with one trigger
/// (tests/fixtures/train/learn, made by tests/reference/make_learning_golden.py, which trains
/// torch + peft the same way): the loss falls, and generating the trigger with the LoRA lands
/// nearer the training latents than the base does, by a ratio at most 0.1 above torch's.
#[test]
fn train_learns_a_pattern_about_as_well_as_torch_and_peft() {
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train/learn");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("torch.json")).unwrap()).unwrap();
    let g = |k: &str| golden[k].as_f64().unwrap();
    let gs = |k: &str| golden["settings"][k].as_f64().unwrap();
    let s = Settings {
        trigger: "zqx".into(),
        steps: gs("steps") as usize,
        rank: gs("rank") as usize,
        alpha: gs("alpha") as f32,
        adamw: super::adamw::AdamWConfig { lr: gs("lr"), ..Default::default() },
        resolution: gs("size") as usize,
        caption_dropout: 0.0,
        max_sequence_length: Some(gs("max_sequence_length") as usize),
        seed: gs("seed") as u64,
        ..Settings::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let files = model("schnell");
    let images = fixture.join("images");
    let (lora, losses) = run(&job(files.clone(), &images, &dir.path().join("l.safetensors")), &s);
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (first, last) = (mean(&losses[..10]), mean(&losses[losses.len() - 10..]));
    eprintln!("loss {first:.4} → {last:.4} (torch {:.4} → {:.4})", g("loss_first10"), g("loss_last10"));
    assert!(last < 0.8 * first, "the loss did not fall: {first} → {last}");

    let device = Device::flex();
    let items = super::dataset::scan(&images, "zqx", s.resolution, 30).unwrap();
    let latents = super::cache::encode_images(&files, &items, &device).unwrap();
    let texts = super::cache::encode_texts(&files, &["zqx".to_string()], 32, &device, &mut Vec::new()).unwrap();
    let mut m = flux::load_transformer(&files.transformer, &device, DType::F32, None).unwrap();
    let distance = |z: &[f32]| -> f64 {
        latents
            .iter()
            .map(|l| {
                let x0 = crate::engine::pipeline::unpack(&l.packed, l.channels, l.rows, l.cols);
                z.iter().zip(&x0).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let text = &texts["zqx"];
    let (base, _) = super::samples::generate_latents(&files, &mut m, None, text, s.resolution, 0, &device).unwrap();
    let (tuned, _) =
        super::samples::generate_latents(&files, &mut m, Some(&lora), text, s.resolution, 0, &device).unwrap();
    let (d_base, d_lora) = (distance(&base), distance(&tuned));
    let ratio = d_lora / d_base;
    eprintln!(
        "distance to the training latents: base {d_base:.4}, LoRA {d_lora:.4}, ratio {ratio:.4} (torch: {:.4} / {:.4} = {:.4})",
        g("d_base"),
        g("d_lora"),
        g("ratio")
    );
    // Same model, noise and schedule: the base generations agree with diffusers'.
    assert!((d_base - g("d_base")).abs() <= 1e-3 * g("d_base"), "base distance {d_base} vs diffusers {}", g("d_base"));
    assert!(ratio <= g("ratio") + 0.1, "ratio {ratio} is more than 0.1 above torch + peft's {}", g("ratio"));
}

/// `--full --init random`: a transformer drawn from a config learns the pattern (the loss falls),
/// the exported file loads back as exactly the trained weights, a run resumed from a checkpoint
/// ends where the straight run does, and LoRA-only or random-only combinations are refused.
#[test]
fn train_full_from_random_weights_learns_exports_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let imgs = images(dir.path());
    let files = model("dev");
    // The fixture's sizes, with its own widths for the text encoders and the VAE.
    let base = flux::open_checked(&files.transformer, None).unwrap().1;
    let init = flux::FluxConfig { depth: 1, depth_single_blocks: 1, ..base };
    let s = Settings {
        full: true,
        steps: 120,
        batch: 2,
        caption_dropout: 0.0,
        adamw: super::adamw::AdamWConfig { lr: 3e-3, ..Default::default() },
        save_every: 60,
        ..settings()
    };
    let full_job = |out: &str| Job { init: Some(init.clone()), ..job(files.clone(), &imgs, &dir.path().join(out)) };
    let straight = train(&full_job("a.safetensors"), &s, &Device::flex(), |_| {}).unwrap();
    assert!(straight.lora.is_none());
    let losses = &straight.losses;
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (first, last) = (mean(&losses[..20]), mean(&losses[losses.len() - 20..]));
    eprintln!(
        "full training from random weights: mean loss of the first 20 steps {first:.4}, of the last 20 {last:.4}"
    );
    assert!(last < 0.7 * first, "the loss did not fall: {first} → {last}");

    // The file is a BFL checkpoint of the config's shapes (the RoPE axes in its metadata).
    let out = dir.path().join("a.safetensors");
    let (_, config) = flux::open_checked(&out, None).unwrap();
    assert_eq!(config, init);
    // It records the captions' T5 length, which generation then defaults to.
    assert_eq!(flux::default_sequence_length(&out, true), 32);
    assert_eq!(flux::default_sequence_length(&files.transformer, true), 512, "a file without the record");

    // Stopped at step 60 and resumed: the same losses and the same weights, bit for bit.
    let first = Job { stop_after: Some(60), ..full_job("b.safetensors") };
    let part = train(&first, &s, &Device::flex(), |_| {}).unwrap();
    assert!(part.out.is_none());
    let ckpt = dir.path().join("b_train/checkpoints/step_60");
    let second = Job { resume: Some(ckpt.clone()), ..full_job("b.safetensors") };
    let rest = train(&second, &s, &Device::flex(), |_| {}).unwrap();
    assert_eq!([part.losses, rest.losses].concat(), straight.losses);
    let (a, b) = (std::fs::read(&out).unwrap(), std::fs::read(dir.path().join("b.safetensors")).unwrap());
    assert!(a == b, "the resumed run wrote other weights than the straight run");
    // A LoRA run cannot resume a full checkpoint (other settings).
    let lora_resume = Job { resume: Some(ckpt), ..job(files.clone(), &imgs, &dir.path().join("c.safetensors")) };
    let err = train(&lora_resume, &Settings { full: false, ..s.clone() }, &Device::flex(), |_| {}).err().unwrap();
    assert!(format!("{err:#}").contains("other settings"), "{err:#}");

    // --save-dtype f16 writes half-size tensors (their values: train::tests' export check).
    let f16 = Settings { steps: 2, save_dtype: crate::engine::weights::StoreDtype::F16, ..s.clone() };
    train(&full_job("h.safetensors"), &f16, &Device::flex(), |_| {}).unwrap();
    let half_size = std::fs::metadata(dir.path().join("h.safetensors")).unwrap().len() as f64;
    assert!((half_size / a.len() as f64) < 0.55, "an f16 file is about half the f32 one");

    // Refused before any work: random init without --full, full training in f16.
    let e = train(&full_job("x.safetensors"), &Settings { full: false, ..s.clone() }, &Device::flex(), |_| {});
    assert!(format!("{:#}", e.err().unwrap()).contains("needs --full"));
    let e = train(&Job { dtype: DType::F16, ..full_job("x.safetensors") }, &s, &Device::flex(), |_| {});
    assert!(format!("{:#}", e.err().unwrap()).contains("keeps the weights in f32"));
}

/// `--full --train-text-encoders`: both encoders train with the transformer (the rows of the
/// caption's tokens move, the others only by weight decay), are written as loadable
/// transformers folders beside the transformer, and a resumed run ends bit for bit where the
/// straight run does; single-file encoders and LoRA runs are refused before any work.
#[test]
fn train_text_encoders_moves_the_caption_rows_exports_folders_and_resumes_exactly() {
    use crate::engine::clip::ClipText;
    use crate::engine::t5::T5Encoder;
    let dir = tempfile::tempdir().unwrap();
    let imgs = images(dir.path());
    let files = model("schnell");
    let base = flux::open_checked(&files.transformer, None).unwrap().1;
    let init = flux::FluxConfig { depth: 1, depth_single_blocks: 1, ..base };
    let s = Settings {
        full: true,
        train_text_encoders: true,
        steps: 8,
        batch: 2,
        caption_dropout: 0.0,
        max_sequence_length: Some(8),
        adamw: super::adamw::AdamWConfig { lr: 1e-2, ..Default::default() },
        save_every: 4,
        ..settings()
    };
    let full_job = |out: &str| Job { init: Some(init.clone()), ..job(files.clone(), &imgs, &dir.path().join(out)) };
    let straight = train(&full_job("a.safetensors"), &s, &Device::flex(), |_| {}).unwrap();
    assert_eq!(straight.losses.len(), 8);

    // The folders load as encoders; the caption's rows moved, an unused token's row barely.
    let device = Device::flex();
    let [clip_dir, t5_dir] = super::text::encoder_dirs(&dir.path().join("a.safetensors"));
    let (t5_before, t5_after) =
        (T5Encoder::load(&files.t5, &device, None).unwrap(), T5Encoder::load(&t5_dir, &device, None).unwrap());
    let (clip_before, clip_after) =
        (ClipText::load(&files.clip, &device, None).unwrap(), ClipText::load(&clip_dir, &device, None).unwrap());
    let tokenizers = files.load_tokenizers().unwrap();
    let row_shift = |before: &crate::engine::layers::Embedding, after: &crate::engine::layers::Embedding, id: u32| {
        let (b, a) = (host(before.weight.val()), host(after.weight.val()));
        let d = before.weight.val().dims()[1];
        let r = id as usize * d..(id as usize + 1) * d;
        b[r.clone()].iter().zip(&a[r]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    };
    let unused = 31_000; // a T5 and CLIP id no caption here contains
    let t5_word = tokenizers.t5("zqx", 8).unwrap().ids[0];
    let clip_word = tokenizers.clip("zqx").unwrap().ids[1];
    let (t5_moved, t5_still) = (
        row_shift(&t5_before.shared, &t5_after.shared, t5_word),
        row_shift(&t5_before.shared, &t5_after.shared, unused),
    );
    let (ct, ca) = (&clip_before.embeddings.token_embedding, &clip_after.embeddings.token_embedding);
    let (clip_moved, clip_still) = (row_shift(ct, ca, clip_word), row_shift(ct, ca, unused));
    eprintln!("T5 row of the caption moved {t5_moved}, unused {t5_still}; CLIP {clip_moved}, {clip_still}");
    assert!(t5_moved > 1e-2 && t5_moved > 10.0 * t5_still, "T5: {t5_moved} vs {t5_still}");
    assert!(clip_moved > 1e-2 && clip_moved > 10.0 * clip_still, "CLIP: {clip_moved} vs {clip_still}");
    assert!(t5_dir.join("config.json").is_file() && clip_dir.join("config.json").is_file());

    // Stopped at step 4 and resumed: the same losses and the same three files.
    let first = Job { stop_after: Some(4), ..full_job("b.safetensors") };
    let part = train(&first, &s, &Device::flex(), |_| {}).unwrap();
    let ckpt = dir.path().join("b_train/checkpoints/step_4");
    let rest =
        train(&Job { resume: Some(ckpt.clone()), ..full_job("b.safetensors") }, &s, &Device::flex(), |_| {}).unwrap();
    assert_eq!([part.losses, rest.losses].concat(), straight.losses);
    let [b_clip, b_t5] = super::text::encoder_dirs(&dir.path().join("b.safetensors"));
    for (a, b) in [
        (dir.path().join("a.safetensors"), dir.path().join("b.safetensors")),
        (clip_dir.join("model.safetensors"), b_clip.join("model.safetensors")),
        (t5_dir.join("model.safetensors"), b_t5.join("model.safetensors")),
    ] {
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "{} differs after a resume", b.display());
    }
    // A transformer-only run cannot resume it (other settings).
    let only = Settings { train_text_encoders: false, ..s.clone() };
    let err = train(&Job { resume: Some(ckpt), ..full_job("c.safetensors") }, &only, &Device::flex(), |_| {});
    assert!(format!("{:#}", err.err().unwrap()).contains("other settings"));

    // Refused before any work: without --full, and with a single-file encoder.
    let lora = Settings { full: false, ..s.clone() };
    let e = train(&job(files.clone(), &imgs, &dir.path().join("x.safetensors")), &lora, &Device::flex(), |_| {});
    assert!(format!("{:#}", e.err().unwrap()).contains("needs --full"));
    let single = ModelFiles { t5: files.t5.join("model.safetensors"), ..files.clone() };
    let e = train(
        &Job { init: Some(init.clone()), ..job(single, &imgs, &dir.path().join("y.safetensors")) },
        &s,
        &device,
        |_| {},
    );
    let e = format!("{:#}", e.err().unwrap());
    assert!(e.contains("transformers folders") && e.contains("T5"), "{e}");
    assert!(!dir.path().join("y_train/checkpoints").exists());
}
