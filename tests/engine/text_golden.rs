//! Tokenizers and text encoders against transformers (ids from the real tokenizers; tiny
//! random T5 and CLIP from `make_pipeline_goldens.py`), from single files and diffusers folders.

use std::path::PathBuf;

use atelier::engine::clip::{ClipHint, ClipText};
use atelier::engine::t5::T5Encoder;
use atelier::engine::tokenize::FluxTokenizers;
use burn::tensor::Device;

use crate::common::{Golden, fixture, relative_error};

fn tokenizers() -> FluxTokenizers {
    FluxTokenizers::from_dir(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tokenizers")).unwrap()
}

fn ids(golden: &Golden, key: &str) -> Vec<u32> {
    golden.vec(key).iter().map(|&v| v as u32).collect()
}

fn prompts(golden: &Golden) -> (String, String) {
    let settings: serde_json::Value = serde_json::from_str(golden.0.metadata("settings").unwrap()).unwrap();
    let get = |k: &str| settings[k].as_str().unwrap_or_else(|| panic!("settings has no {k}: {settings}")).to_string();
    (get("prompt"), get("long_prompt"))
}

#[test]
fn token_ids_equal_the_reference_tokenizers() {
    let tok = tokenizers();
    let text = std::fs::read_to_string(fixture("tokenizers_expected.json")).unwrap();
    let expected: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(expected.len() >= 5);
    for (prompt, want) in expected {
        let as_ids = |v: &serde_json::Value| {
            v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>()
        };
        let (t5, clip) = (as_ids(&want["t5"]), as_ids(&want["clip"]));
        let ours = tok.t5(&prompt, 512).unwrap();
        assert_eq!(&ours.ids[..t5.len()], &t5[..], "T5 ids of {prompt:?}");
        assert!(ours.ids[t5.len()..].iter().all(|&t| t == 0), "T5 padding of {prompt:?}");
        let ours = tok.clip(&prompt).unwrap();
        assert_eq!(&ours.ids[..clip.len()], &clip[..], "CLIP ids of {prompt:?}");
        assert!(ours.ids[clip.len()..].iter().all(|&t| t == 49407), "CLIP padding of {prompt:?}");
        assert_eq!(ours.ids.len(), 77);
    }
    let golden = Golden::open("pipeline/schnell/golden.safetensors");
    let (prompt, long) = prompts(&golden);
    assert_eq!(tok.t5(&prompt, 32).unwrap().ids, ids(&golden, "t5_ids"));
    assert_eq!(tok.clip(&prompt).unwrap().ids, ids(&golden, "clip_ids"));
    let t5_long = tok.t5(&long, 32).unwrap();
    let clip_long = tok.clip(&long).unwrap();
    assert_eq!(t5_long.ids, ids(&golden, "t5_ids_long"));
    assert_eq!(clip_long.ids, ids(&golden, "clip_ids_long"));
    assert!(t5_long.truncated() && clip_long.truncated());
    assert_eq!(t5_long.untruncated_len, golden.0.shape("t5_ids_long_untruncated").unwrap()[1]);
    assert_eq!(clip_long.untruncated_len, golden.0.shape("clip_ids_long_untruncated").unwrap()[1]);
    assert!(!tok.t5(&prompt, 32).unwrap().truncated());
}

#[test]
fn t5_matches_transformers_from_file_and_folder() {
    let device = Device::flex();
    let golden = Golden::open("pipeline/schnell/golden.safetensors");
    let mut first = None;
    for path in ["pipeline/single/t5xxl.safetensors", "pipeline/schnell/diffusers/text_encoder_2"] {
        let t5 = T5Encoder::load(&fixture(path), &device, None).unwrap_or_else(|e| panic!("{path}: {e:#}"));
        for (ids_key, out_key) in [("t5_ids", "t5_out"), ("t5_ids_long", "t5_out_long")] {
            let out = t5.forward(&[ids(&golden, ids_key)], &device).unwrap().into_data().try_to_vec::<f32>().unwrap();
            let err = relative_error(&out, &golden.vec(out_key));
            eprintln!("T5 {path} {out_key}: relative error {err:.2e}");
            assert!(err <= 1e-4, "T5 {path} {out_key}: {err:.3e}");
            if ids_key == "t5_ids" {
                match &first {
                    None => first = Some(out),
                    Some(f) => assert_eq!(f, &out, "{path} differs from the single file"),
                }
            }
        }
    }
}

#[test]
fn clip_matches_transformers_from_file_and_folder() {
    let device = Device::flex();
    let golden = Golden::open("pipeline/schnell/golden.safetensors");
    // The single file carries no config; the tiny model's head count comes from its folder.
    let config: ClipHint = serde_json::from_str(
        &std::fs::read_to_string(fixture("pipeline/schnell/diffusers/text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    for path in ["pipeline/single/clip_l.safetensors", "pipeline/schnell/diffusers/text_encoder"] {
        let clip = ClipText::load(&fixture(path), &device, Some(&config)).unwrap_or_else(|e| panic!("{path}: {e:#}"));
        for (ids_key, pooled_key) in [("clip_ids", "clip_pooled"), ("clip_ids_long", "clip_pooled_long")] {
            let out = clip.forward(&[ids(&golden, ids_key)]).unwrap();
            let pooled = out.pooled.into_data().try_to_vec::<f32>().unwrap();
            let err = relative_error(&pooled, &golden.vec(pooled_key));
            eprintln!("CLIP {path} {pooled_key}: relative error {err:.2e}");
            assert!(err <= 1e-4, "CLIP {path} {pooled_key}: {err:.3e}");
            if ids_key == "clip_ids" {
                let last = out.last_hidden.into_data().try_to_vec::<f32>().unwrap();
                let err = relative_error(&last, &golden.vec("clip_last_hidden"));
                assert!(err <= 1e-4, "CLIP {path} last hidden: {err:.3e}");
            }
        }
    }
}

#[test]
fn encoders_reject_the_wrong_file() {
    let device = Device::flex();
    let t5 = T5Encoder::load(&fixture("pipeline/single/clip_l.safetensors"), &device, None).err().unwrap();
    assert!(format!("{t5:#}").contains("not a T5 encoder checkpoint"), "{t5:#}");
    let clip = ClipText::load(&fixture("pipeline/single/t5xxl.safetensors"), &device, None).err().unwrap();
    assert!(format!("{clip:#}").contains("not a CLIP text checkpoint"), "{clip:#}");
}
