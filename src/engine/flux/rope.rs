//! Rotary position embedding over FLUX's 3-axis token ids, and the sinusoidal
//! timestep embedding. Both are cheap and computed on the host, as the reference does
//! (RoPE angles in f64, the timestep embedding in f32), then uploaded.

use burn::tensor::{Device, Tensor, TensorData};

/// cos/sin tables for one sequence of ids, shaped [1, 1, L, head_dim/2, 1] for broadcasting
/// against queries and keys viewed as [B, H, L, head_dim/2, 2].
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor<5>,
    pub sin: Tensor<5>,
}

impl Rope {
    /// `ids` are the text ids followed by the image ids, each (axis0, row, col).
    pub fn new(ids: &[[f32; 3]], axes_dim: &[usize], theta: f64, device: &Device) -> Self {
        let half: usize = axes_dim.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(ids.len() * half);
        let mut sin = Vec::with_capacity(ids.len() * half);
        for id in ids {
            for (axis, &dim) in axes_dim.iter().enumerate() {
                let pos = id[axis] as f64;
                for j in 0..dim / 2 {
                    // omega_j = theta^(-2j/dim), as BFL's `rope` and diffusers' float64 path.
                    let omega = 1.0 / theta.powf((2 * j) as f64 / dim as f64);
                    let angle = pos * omega;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let shape = [1, 1, ids.len(), half, 1];
        Rope {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// Rotates interleaved pairs (x[2i], x[2i+1]) of `x` [B, H, L, D]; in f32.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, h, l, d] = x.dims();
        let x = x.reshape([b, h, l, d / 2, 2]);
        let x0 = x.clone().narrow(4, 0, 1);
        let x1 = x.narrow(4, 1, 1);
        let out0 = self.cos.clone() * x0.clone() - self.sin.clone() * x1.clone();
        let out1 = self.sin.clone() * x0 + self.cos.clone() * x1;
        Tensor::cat(vec![out0, out1], 4).reshape([b, h, l, d])
    }
}

/// Image token ids for a packed latent grid of `rows` × `cols`: (0, row, col), as
/// FluxPipeline's `_prepare_latent_image_ids`.
pub fn image_ids(rows: usize, cols: usize) -> Vec<[f32; 3]> {
    (0..rows)
        .flat_map(|r| (0..cols).map(move |c| [0.0, r as f32, c as f32]))
        .collect()
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
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_period * i as f32) / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(values.len() * dim);
    for &v in values {
        let t = v * 1000.0;
        out.extend(freqs.iter().map(|f| (t * f).cos()));
        out.extend(freqs.iter().map(|f| (t * f).sin()));
    }
    Tensor::from_data(TensorData::new(out, [values.len(), dim]), device)
}
