//! The model code. It takes a burn `Device` as a parameter and knows nothing of HTTP or SQL.

pub mod clip;
pub mod cpu;
pub mod device;
pub mod filehash;
pub mod flux;
pub mod footprint;
pub mod fp8;
pub mod gguf;
pub mod host_tensor;
pub mod layers;
pub mod loader;
pub mod lora;
pub mod memory;
pub mod noise;
pub mod packed;
pub mod pipeline;
pub mod pngfile;
pub mod preview;
pub mod profile;
pub mod sampler;
pub mod streaming;
pub mod t5;
pub mod to_gguf;
pub mod tokenize;
pub mod vae;
pub mod weights;
