//! Rotary position embedding over FLUX's 3-axis token ids, and the sinusoidal
//! timestep embedding. Both are cheap and computed on the host, as the reference does
//! (RoPE angles in f64, the timestep embedding in f32), then uploaded.

use burn::tensor::{Device, Tensor, TensorData};

/// Rotation tables for one sequence of ids, [1, 1, L, head_dim]: `cos` holds each pair's
/// cosine twice, `sin` holds (−sin, +sin), so that rotating interleaved pairs is
/// x·cos + swap_pairs(x)·sin.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor<4>,
    pub sin: Tensor<4>,
}

impl Rope {
    /// `ids` are the text ids followed by the image ids, each (axis0, row, col).
    pub fn new(ids: &[[f32; 3]], axes_dim: &[usize], theta: f64, device: &Device) -> Self {
        let dim: usize = axes_dim.iter().sum();
        let mut cos = Vec::with_capacity(ids.len() * dim);
        let mut sin = Vec::with_capacity(ids.len() * dim);
        for id in ids {
            for (axis, &dim) in axes_dim.iter().enumerate() {
                let pos = id[axis] as f64;
                for j in 0..dim / 2 {
                    // omega_j = theta^(-2j/dim), as BFL's `rope` and diffusers' float64 path.
                    let omega = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
                    let angle = pos * omega;
                    let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                    cos.extend([c, c]);
                    sin.extend([-s, s]);
                }
            }
        }
        let shape = [1, 1, ids.len(), dim];
        Rope {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// Rotates interleaved pairs (x[2i], x[2i+1]) of `x` [B, H, L, D] by their angles:
    /// (x0·cos − x1·sin, x0·sin + x1·cos); in f32.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, l, d] = x.dims();
        let swapped = x.clone().reshape([b, h, l, d / 2, 2]).flip([4]).reshape([b, h, l, d]);
        x * self.cos.clone() + swapped * self.sin.clone()
    }
}

/// Image token ids for a packed latent grid of `rows` × `cols`: (0, row, col), as
/// FluxPipeline's `_prepare_latent_image_ids`.
pub fn image_ids(rows: usize, cols: usize) -> Vec<[f32; 3]> {
    (0..rows).flat_map(|r| (0..cols).map(move |c| [0.0, r as f32, c as f32])).collect()
}

/// Text token ids: all zeros (FLUX gives text no position of its own).
pub fn text_ids(len: usize) -> Vec<[f32; 3]> {
    vec![[0.0; 3]; len]
}

/// Sinusoidal embedding of `values × 1000` into `dim` channels, cos half first
/// (BFL's `timestep_embedding`, diffusers' `Timesteps(flip_sin_to_cos=True)`), in f32.
pub fn timestep_embedding(values: &[f32], dim: usize, device: &Device) -> Tensor<2> {
    let half = dim / 2;
    let log_period = -(10_000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half).map(|i| ((log_period * i as f32) / half as f32).exp()).collect();
    let mut out = Vec::with_capacity(values.len() * dim);
    for &v in values {
        let t = v * 1000.0;
        out.extend(freqs.iter().map(|f| (t * f).cos()));
        out.extend(freqs.iter().map(|f| (t * f).sin()));
    }
    Tensor::from_data(TensorData::new(out, [values.len(), dim]), device)
}
