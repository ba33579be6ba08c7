//! One training batch and the loss of a prediction on it (shared by the plain and the
//! recompute backward).

use burn::tensor::{DType, Tensor, TensorData};

use crate::engine::flux::{FluxInput, Rope};

/// One training batch, everything on the device and already encoded.
pub struct Batch {
    /// Packed clean latents [B, L_img, C].
    pub x0: Tensor<3>,
    /// ε, same shape.
    pub noise: Tensor<3>,
    /// σ per item.
    pub sigmas: Vec<f32>,
    /// T5 states [B, L_txt, context].
    pub txt: Tensor<3>,
    /// CLIP pooled [B, vec_in].
    pub y: Tensor<2>,
    /// Per item, for guidance-distilled (dev) models: 1.0 when training.
    pub guidance: Option<Vec<f32>>,
    pub rope: Rope,
    /// The caption each item trains with (what trained text encoders encode in the step).
    pub captions: Vec<String>,
}

impl Batch {
    /// x_t = (1 − σ)·x0 + σ·ε, in the latents' dtype.
    pub fn noisy(&self) -> Tensor<3> {
        let b = self.sigmas.len();
        let device = self.x0.device();
        let s = Tensor::<3>::from_data(TensorData::new(self.sigmas.clone(), [b, 1, 1]), &device).cast(self.x0.dtype());
        self.x0.clone() * (s.clone().neg() + 1.0) + self.noise.clone() * s
    }

    /// The velocity the model should predict: ε − x0.
    pub fn target(&self) -> Tensor<3> {
        self.noise.clone() - self.x0.clone()
    }

    pub fn input<'a>(&'a self, noisy: Tensor<3>) -> FluxInput<'a> {
        FluxInput {
            img: noisy,
            txt: self.txt.clone(),
            y: self.y.clone(),
            timesteps: &self.sigmas,
            guidance: self.guidance.as_deref(),
            rope: &self.rope,
        }
    }
}

/// Mean squared error in f32 (a scalar tensor of one element).
pub fn mse(pred: Tensor<3>, target: Tensor<3>) -> Tensor<1> {
    (pred.cast(DType::F32) - target.cast(DType::F32)).square().mean()
}
