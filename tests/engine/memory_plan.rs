//! The memory plan end to end: a streamed transformer and T5 make the image resident ones make,
//! and a job the budget cannot hold is refused before any compute.

use std::path::PathBuf;

use atelier::engine::memory::{Mode, OutOfBudget};
use atelier::engine::pipeline::{self, GenerateRequest, ModelFiles, Placement, Progress, Resident};
use burn::tensor::{DType, Device};

use crate::common::fixture;

fn files() -> ModelFiles {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights/tokenizers");
    ModelFiles::from_diffusers(&fixture("pipeline/dev/diffusers"), Some(&shipped)).unwrap()
}

fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: "a lighthouse at dusk".into(),
        seed: 42,
        steps: Some(3),
        width: 80,
        height: 48,
        guidance: Some(3.5),
        max_sequence_length: Some(32),
        batch: 1,
        ..Default::default()
    }
}

#[test]
fn a_streamed_transformer_and_t5_make_the_image_the_staged_ones_make() {
    let (files, req) = (files(), request());
    let staged = pipeline::generate(&files, &req, &Device::flex(), |_| {}).unwrap();
    let mut resident =
        Resident::placed(Placement { stream_blocks: true, memory_budget: None, ..Placement::staged(DType::F32) });
    let streamed = pipeline::generate_with(&files, &req, &Device::flex(), &mut resident, |_| {}).unwrap();
    let plan = resident.last_plan().expect("a plan for the job");
    assert_eq!(plan.mode("transformer"), Some(Mode::Streamed), "{}", plan.summary());
    assert_eq!(plan.mode("t5"), Some(Mode::Streamed));
    assert_eq!(resident.loads().t5, 1);
    assert_eq!(staged.images[0].as_raw(), streamed.images[0].as_raw(), "streaming changed the image");
}

#[test]
fn a_job_over_the_budget_is_refused_before_any_compute_and_a_smaller_one_runs() {
    let (files, req) = (files(), request());
    // The fixture's components are tiny; what a large image needs is its activations.
    let budget = 64 << 20;
    let mut resident = Resident::placed(Placement { memory_budget: Some(budget), ..Placement::staged(DType::F32) });
    let big = GenerateRequest { width: 1024, height: 1024, ..req.clone() };
    let mut events = 0;
    let err = pipeline::generate_with(&files, &big, &Device::flex(), &mut resident, |_: Progress| events += 1)
        .err()
        .expect("a 1024² job does not fit 64 MiB");
    let refusal = err.downcast_ref::<OutOfBudget>().unwrap_or_else(|| panic!("not a refusal: {err:#}"));
    assert_eq!((refusal.budget, refusal.width, refusal.height), (budget, 1024, 1024));
    assert!(refusal.needed > budget);
    let text = refusal.to_string();
    assert!(text.contains("64.0 MiB") && text.contains("1024×1024"), "{text}");
    assert_eq!(events, 0, "refused before the first stage");
    assert!(resident.last_plan().is_none());

    let out = pipeline::generate_with(&files, &req, &Device::flex(), &mut resident, |_| {}).unwrap();
    assert_eq!(out.images.len(), 1);
    let plan = resident.last_plan().unwrap();
    assert!(plan.peak <= budget && plan.budget == Some(budget), "{}", plan.summary());
}

#[test]
fn a_vulkan_adapter_reports_its_device_local_memory_for_an_auto_budget() {
    use atelier::engine::device::{DeviceChoice, select};
    use atelier::engine::memory::{MemoryBudget, resolve};
    let device = match select(DeviceChoice::Wgpu) {
        Ok(d) if d.description.contains("Vulkan") => d,
        other => {
            eprintln!("skipping: no Vulkan adapter through wgpu ({:?})", other.map(|d| d.description).err());
            return;
        }
    };
    let heap = device.memory_bytes.unwrap_or_else(|| panic!("{} reports no device-local heap", device.description));
    eprintln!("{}: device-local heap {} MiB", device.description, heap >> 20);
    assert!(heap >= 256 << 20, "{heap}");
    let (budget, why) = resolve(MemoryBudget::Auto, true, device.memory_bytes);
    assert!(budget.is_some_and(|b| b < heap) && why.contains("device-local"), "{why}");
}

#[test]
fn a_streamed_transformer_applies_loras_to_each_block_as_a_resident_one_does() {
    let files = files();
    let loras = ["kohya.safetensors", "comfy.safetensors"]
        .iter()
        .filter(|f| fixture(&format!("lora/dev/{f}")).exists())
        .map(|f| atelier::engine::lora::LoraChoice { path: fixture(&format!("lora/dev/{f}")), weight: 0.8 })
        .collect::<Vec<_>>();
    assert!(!loras.is_empty(), "the dev LoRA fixtures");
    let req = GenerateRequest { loras, ..request() };
    let staged = pipeline::generate(&files, &req, &Device::flex(), |_| {}).unwrap();
    let mut resident =
        Resident::placed(Placement { stream_blocks: true, memory_budget: None, ..Placement::staged(DType::F32) });
    let streamed = pipeline::generate_with(&files, &req, &Device::flex(), &mut resident, |_| {}).unwrap();
    assert!(resident.last_plan().unwrap().transformer_streamed());
    assert_eq!(staged.warnings, streamed.warnings, "the same LoRA warnings for the whole model");
    let without = pipeline::generate(&files, &request(), &Device::flex(), |_| {}).unwrap();
    assert_ne!(without.images[0].as_raw(), staged.images[0].as_raw(), "the LoRAs change the image");
    assert_eq!(staged.images[0].as_raw(), streamed.images[0].as_raw(), "streaming changed the LoRA image");
}
