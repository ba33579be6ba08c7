//! Engine tests against reference goldens made by `tests/reference/make_goldens.py`.

mod all_in_one;
mod common;
mod flux_errors;
mod flux_golden;
mod lora;
mod memory_plan;
mod noise_golden;
mod pipeline_golden;
mod quantized;
mod sampler_golden;
mod t5_gguf;
mod text_golden;
mod vae_golden;
