use std::path::PathBuf;

use atelier::engine::weights::WeightSet;
use burn::tensor::{Device, Tensor, TensorData};

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// All tensors of a golden file, by name.
pub struct Golden(pub WeightSet);

impl Golden {
    pub fn open(rel: &str) -> Golden {
        Golden(WeightSet::open(&fixture(rel)).expect("golden file opens"))
    }

    pub fn vec(&self, name: &str) -> Vec<f32> {
        self.0.read(name).unwrap_or_else(|e| panic!("golden {name}: {e}")).data
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    pub fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Tensor<D> {
        let t = self.0.read(name).unwrap();
        Tensor::from_data(TensorData::new(t.data, t.shape), device)
    }

    pub fn ids(&self, name: &str) -> Vec<[f32; 3]> {
        self.vec(name).chunks(3).map(|c| [c[0], c[1], c[2]]).collect()
    }
}

/// max |a − b| / max |b|: the error relative to the reference's scale.
pub fn relative_error(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "lengths differ");
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let diff = actual.iter().zip(expected).fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    assert!(actual.iter().all(|v| v.is_finite()), "non-finite output");
    diff / scale.max(f64::MIN_POSITIVE)
}

/// A wgpu device, or None where this machine has no adapter. In CI the adapter
/// (lavapipe) is installed by `.ci/run`, so its absence there is a failure.
pub fn wgpu_device() -> Option<Device> {
    match atelier::engine::device::select(atelier::engine::device::DeviceChoice::Wgpu) {
        Ok(d) => {
            eprintln!("wgpu test on {}", d.description);
            Some(d.device)
        }
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping wgpu test: {e:#}");
            None
        }
        Err(e) => panic!("CI must have a wgpu adapter (lavapipe): {e:#}"),
    }
}
