//! The sigma schedule against diffusers' FlowMatchEulerDiscreteScheduler as FluxPipeline uses it.

use atelier::engine::sampler::{ScheduleConfig, euler_step};
use burn::tensor::{Device, Tensor, TensorData};

use crate::common::fixture;

#[test]
fn schedules_match_diffusers() {
    let text = std::fs::read_to_string(fixture("sampler/schedules.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 20);
    let from_file = |kind: &str| {
        ScheduleConfig::from_file(&fixture(&format!("flux/{kind}/diffusers/scheduler/scheduler_config.json"))).unwrap()
    };
    for case in cases {
        let kind = case["kind"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let len = case["image_seq_len"].as_u64().unwrap() as usize;
        let preset = if kind == "dev" { ScheduleConfig::dev() } else { ScheduleConfig::schnell() };
        for config in [preset, from_file(kind)] {
            let sigmas = config.sigmas(steps, len);
            let expected: Vec<f32> =
                case["sigmas"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(sigmas.len(), expected.len(), "{kind} {steps} steps L={len}");
            for (a, b) in sigmas.iter().zip(&expected) {
                assert!((a - b).abs() <= 1e-6, "{kind} {steps} steps L={len}: {sigmas:?} vs {expected:?}");
            }
            let timesteps = config.timesteps(&sigmas);
            for (a, b) in timesteps.iter().zip(case["timesteps"].as_array().unwrap()) {
                let b = b.as_f64().unwrap() as f32;
                assert!((a - b).abs() <= 1e-3, "{kind} timesteps {a} vs {b}");
            }
            if let Some(mu) = case["mu"].as_f64() {
                assert!((config.mu(len) - mu).abs() < 1e-9);
            }
        }
    }
}

#[test]
fn euler_step_moves_along_the_velocity() {
    let device = Device::flex();
    let x = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &device);
    let v = Tensor::<1>::from_data(TensorData::new(vec![4.0f32, -2.0], [2]), &device);
    let out = euler_step(x, v, 1.0, 0.75).into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(out, vec![0.0, 2.5]);
}
