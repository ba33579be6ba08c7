//! Choosing where models run: a wgpu adapter (Vulkan / Metal / DX12) or burn's `flex` CPU backend.

use std::str::FromStr;
use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};
use burn::tensor::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// wgpu when an adapter exists, else the CPU.
    Auto,
    Cpu,
    /// wgpu with WGSL kernels: any Vulkan, Metal or DX12 adapter, lavapipe included.
    Wgpu,
    /// burn's native Vulkan (SPIR-V) path; needs the `vulkan` cargo feature.
    Vulkan,
}

impl FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" | "flex" => Ok(DeviceChoice::Cpu),
            "wgpu" | "gpu" => Ok(DeviceChoice::Wgpu),
            "vulkan" => Ok(DeviceChoice::Vulkan),
            other => bail!("unknown device {other:?}: expected auto, cpu, wgpu or vulkan"),
        }
    }
}

/// A device ready for tensors, with a human description of what was chosen.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    pub description: String,
    pub is_gpu: bool,
}

/// The wgpu runtime can be initialized once per process; remember the outcome.
static WGPU: OnceLock<std::result::Result<SelectedDevice, String>> = OnceLock::new();

fn init_wgpu() -> std::result::Result<SelectedDevice, String> {
    WGPU.get_or_init(|| {
        let (device, setup) = Device::wgpu_options().init_with_setup().map_err(|e| e.to_string())?;
        let info = setup.adapter.get_info();
        Ok(SelectedDevice {
            device,
            description: format!(
                "wgpu adapter \"{}\" ({:?}, {:?} backend, driver {} {})",
                info.name, info.device_type, info.backend, info.driver, info.driver_info
            ),
            is_gpu: true,
        })
    })
    .clone()
}

pub fn cpu() -> SelectedDevice {
    SelectedDevice { device: Device::flex(), description: "CPU (burn flex backend)".into(), is_gpu: false }
}

/// Resolves a choice to a device and logs which adapter was picked.
pub fn select(choice: DeviceChoice) -> Result<SelectedDevice> {
    let selected = match choice {
        DeviceChoice::Cpu => cpu(),
        DeviceChoice::Wgpu => init_wgpu()
            .map_err(|e| anyhow!("--device wgpu: no usable GPU adapter ({e}); use --device cpu"))?,
        DeviceChoice::Auto => match init_wgpu() {
            Ok(d) => d,
            Err(e) => {
                log::info!("no wgpu adapter ({e}); falling back to the CPU");
                cpu()
            }
        },
        DeviceChoice::Vulkan => vulkan()?,
    };
    log::info!("running models on {}", selected.description);
    Ok(selected)
}

#[cfg(feature = "vulkan")]
fn vulkan() -> Result<SelectedDevice> {
    use burn::tensor::wgpu::WgpuBackend;
    let (device, setup) = Device::wgpu_options()
        .graphics_api(WgpuBackend::Vulkan)
        .init_with_setup()
        .map_err(|e| anyhow!("--device vulkan: no Vulkan adapter ({e})"))?;
    let info = setup.adapter.get_info();
    Ok(SelectedDevice {
        device,
        description: format!("Vulkan (SPIR-V) adapter \"{}\" ({:?})", info.name, info.device_type),
        is_gpu: true,
    })
}

#[cfg(not(feature = "vulkan"))]
fn vulkan() -> Result<SelectedDevice> {
    bail!("--device vulkan needs a build with `--features vulkan`; use --device wgpu")
}
