//! The model code. It takes a burn `Device` as a parameter and knows nothing of HTTP or SQL.

pub mod clip;
pub mod device;
pub mod flux;
pub mod layers;
pub mod loader;
pub mod lora;
pub mod noise;
pub mod pipeline;
pub mod pngfile;
pub mod preview;
pub mod sampler;
pub mod t5;
pub mod tokenize;
pub mod vae;
pub mod weights;

use anyhow::{Result, bail};
use burn::tensor::DType;

/// Parses a compute dtype name from the config or command line.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "fp32" | "float32" => DType::F32,
        "f16" | "fp16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown dtype {other:?}: expected f32, f16 or bf16"),
    })
}
