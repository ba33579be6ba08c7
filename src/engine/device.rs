//! Choosing where models run: a wgpu adapter (Vulkan / Metal / DX12) or burn's `flex` CPU backend.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use anyhow::{Result, anyhow, bail};
use burn::tensor::wgpu::{WgpuBackend, wgpu};
use burn::tensor::{DType, Device, DeviceKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The best GPU adapter wgpu finds, else the CPU; never a software rasterizer (see [`choose`]).
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

/// From a config file's string, as from the command line (`engine.device = "cpu"`).
impl<'de> serde::Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A device ready for tensors, with a human description of what was chosen.
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    pub description: String,
    pub is_gpu: bool,
    /// Bytes of the adapter's largest device-local memory heap, where it can be read (Vulkan);
    /// what `[engine] memory_budget = "auto"` starts from on a GPU.
    pub memory_bytes: Option<u64>,
}

/// What the choice of an adapter looks at: what wgpu reports about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    pub name: String,
    pub device_type: wgpu::DeviceType,
    pub backend: wgpu::Backend,
}

/// Names of software rasterizers, for drivers that report them as something other than a CPU:
/// Mesa's llvmpipe / lavapipe / softpipe, Google's SwiftShader, and Microsoft's WARP (which
/// calls itself "Microsoft Basic Render Driver").
const SOFTWARE_NAMES: [&str; 5] = ["llvmpipe", "lavapipe", "softpipe", "swiftshader", "basic render driver"];

impl Adapter {
    /// Runs on the CPU: kernels compile and run far slower there than burn's own flex backend.
    pub fn is_software(&self) -> bool {
        let name = self.name.to_ascii_lowercase();
        self.device_type == wgpu::DeviceType::Cpu
            || SOFTWARE_NAMES.iter().any(|s| name.contains(s))
            // "warp" only as a word: it is a common syllable.
            || name.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| w == "warp")
    }

    /// Preference among adapters, lower first: real GPUs by kind, software rasterizers last.
    fn rank(&self) -> u8 {
        if self.is_software() {
            return 4;
        }
        match self.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Other | wgpu::DeviceType::Cpu => 3,
        }
    }
}

impl std::fmt::Display for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\" ({:?}, {:?})", self.name, self.device_type, self.backend)
    }
}

/// The outcome of [`choose`]: an index into the adapter list (None: the CPU backend, or for an
/// explicit wgpu, no adapter at all) and why, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub adapter: Option<usize>,
    pub reason: String,
}

/// Picks the adapter to run on from what wgpu enumerated, in enumeration order: a discrete GPU
/// over an integrated one over a virtual one over any other, earlier in the list on a tie.
/// A software rasterizer (lavapipe, llvmpipe, WARP, SwiftShader) is only taken when
/// `software_ok` (an explicit `--device wgpu`): for `auto` the flex CPU backend beats it, since
/// it runs the same CPU without minutes of kernel compilation first.
pub fn choose(adapters: &[Adapter], software_ok: bool) -> Choice {
    let best = adapters
        .iter()
        .enumerate()
        .filter(|(_, a)| software_ok || !a.is_software())
        .min_by_key(|(i, a)| (a.rank(), *i))
        .map(|(i, _)| i);
    let reason = match best {
        Some(i) if adapters[i].is_software() => {
            format!("{} is a software rasterizer, but wgpu was asked for and no GPU adapter exists", adapters[i])
        }
        Some(i) => format!("{} is the best GPU adapter of {}", adapters[i], adapters.len()),
        None if adapters.is_empty() => "wgpu found no adapter".into(),
        None => format!(
            "only software rasterizers ({}): the flex CPU backend runs the same CPU faster",
            adapters.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
    };
    Choice { adapter: best, reason }
}

/// The graphics APIs burn's wgpu runtime can come up on here, in the order it prefers them.
const BACKENDS: &[wgpu::Backend] = if cfg!(target_os = "macos") {
    &[wgpu::Backend::Metal]
} else {
    &[wgpu::Backend::Vulkan, wgpu::Backend::Dx12, wgpu::Backend::Gl]
};

/// Every adapter of every API, asked once per process (each API through its own instance, as
/// burn does, so each adapter's place among those of its API is the one burn counts).
fn adapters() -> &'static [Adapter] {
    static ADAPTERS: OnceLock<Vec<Adapter>> = OnceLock::new();
    ADAPTERS.get_or_init(|| {
        use futures_util::FutureExt;
        let mut all = Vec::new();
        for &backend in BACKENDS {
            let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
                backends: backend.into(),
                ..wgpu::InstanceDescriptor::new_without_display_handle()
            });
            // Native enumeration is synchronous behind its future: it is ready at the first poll.
            let Some(found) = instance.enumerate_adapters(backend.into()).now_or_never() else {
                log::warn!("wgpu did not list the {backend:?} adapters at once; skipping them");
                continue;
            };
            all.extend(found.iter().map(|a| {
                let info = a.get_info();
                Adapter { name: info.name, device_type: info.device_type, backend }
            }));
        }
        all
    })
}

/// burn's address of `adapters[index]`: its API, and its kind with its place among the
/// adapters of that kind on that API.
fn burn_address(adapters: &[Adapter], index: usize) -> (WgpuBackend, DeviceKind) {
    let a = &adapters[index];
    let nth = adapters[..index].iter().filter(|b| b.backend == a.backend && b.device_type == a.device_type).count();
    let kind = match a.device_type {
        wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu(nth),
        wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(nth),
        wgpu::DeviceType::VirtualGpu => DeviceKind::VirtualGpu(nth),
        // burn addresses only the first CPU adapter of an API, and has no kind for `Other`
        // but the default device.
        wgpu::DeviceType::Cpu => DeviceKind::Cpu,
        wgpu::DeviceType::Other => DeviceKind::DefaultDevice,
    };
    let api = match a.backend {
        wgpu::Backend::Vulkan => WgpuBackend::Vulkan,
        wgpu::Backend::Metal => WgpuBackend::Metal,
        wgpu::Backend::Dx12 => WgpuBackend::Dx12,
        wgpu::Backend::Gl => WgpuBackend::Gl,
        _ => WgpuBackend::Auto,
    };
    (api, kind)
}

/// A burn runtime can be initialized once per adapter and process; remember each outcome.
fn init_adapter(index: usize) -> std::result::Result<SelectedDevice, String> {
    static RUNTIMES: Mutex<BTreeMap<usize, std::result::Result<SelectedDevice, String>>> = Mutex::new(BTreeMap::new());
    let mut runtimes = RUNTIMES.lock().unwrap_or_else(|e| e.into_inner());
    runtimes
        .entry(index)
        .or_insert_with(|| {
            let (device, adapter) = if cfg!(feature = "vulkan") {
                // The SPIR-V path asks the device for Vulkan extensions of its own: burn makes it.
                let (api, kind) = burn_address(adapters(), index);
                let (device, setup) = Device::wgpu_options()
                    .graphics_api(api)
                    .device_kind(kind)
                    .init_with_setup()
                    .map_err(|e| e.to_string())?;
                (device, setup.adapter)
            } else {
                let setup = wgsl_setup(index)?;
                let adapter = setup.adapter.clone();
                (Device::wgpu_options().setup(setup).init().map_err(|e| e.to_string())?, adapter)
            };
            let info = adapter.get_info();
            Ok(SelectedDevice {
                device,
                description: format!(
                    "wgpu adapter \"{}\" ({:?}, {:?} backend, driver {} {})",
                    info.name, info.device_type, info.backend, info.driver, info.driver_info
                ),
                is_gpu: true,
                memory_bytes: device_local_bytes(&adapter),
            })
        })
        .clone()
}

/// Percent of the memory budget the driver reports at which wgpu refuses new buffers (an error
/// instead of the driver's own failure). The job's memory plan keeps well below; this only
/// turns a misjudged plan into a clean failure. No device-loss threshold: a lost device would
/// need the server restarted, and the budget counts other processes' memory too.
const BUDGET_THRESHOLDS: wgpu::MemoryBudgetThresholds =
    wgpu::MemoryBudgetThresholds { for_resource_creation: Some(95), for_device_loss: None };

/// `adapters()[index]` brought up as burn's WGSL runtime would bring it up (every feature
/// the adapter has but mappable primary buffers, its own limits, allocations sized for memory
/// use), on an instance with [`BUDGET_THRESHOLDS`], which burn gives no way to set.
fn wgsl_setup(index: usize) -> std::result::Result<burn::tensor::wgpu::WgpuSetup, String> {
    use futures_util::FutureExt;
    let wanted = &adapters()[index];
    let backend = wanted.backend;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: backend.into(),
        memory_budget_thresholds: BUDGET_THRESHOLDS,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let found = instance.enumerate_adapters(backend.into()).now_or_never().ok_or("wgpu did not list its adapters")?;
    // The same place among its API's adapters as in `adapters()`, which lists them the same way.
    let nth = adapters()[..index].iter().filter(|a| a.backend == backend).count();
    let adapter = found.into_iter().nth(nth).ok_or_else(|| format!("{wanted} is gone"))?;
    if adapter.get_info().name != wanted.name {
        return Err(format!("the adapters changed order ({wanted} expected)"));
    }
    let descriptor = wgpu::DeviceDescriptor {
        label: None,
        required_features: adapter.features().difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
        required_limits: adapter.limits(),
        memory_hints: wgpu::MemoryHints::MemoryUsage,
        trace: wgpu::Trace::Off,
        // SAFETY: what burn's WGSL runtime enables on the devices it makes itself.
        experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
    };
    let (device, queue) = adapter
        .request_device(&descriptor)
        .now_or_never()
        .ok_or("wgpu did not create the device at once")?
        .map_err(|e| e.to_string())?;
    Ok(burn::tensor::wgpu::WgpuSetup { instance, adapter, device, queue, backend })
}

pub fn cpu() -> SelectedDevice {
    SelectedDevice {
        device: Device::flex(),
        description: "CPU (burn flex backend)".into(),
        is_gpu: false,
        memory_bytes: None,
    }
}

/// The largest device-local memory heap of a Vulkan adapter, read through wgpu-hal (wgpu has
/// no portable query of a card's memory); None on other graphics APIs.
fn device_local_bytes(adapter: &wgpu::Adapter) -> Option<u64> {
    // SAFETY: the HAL adapter is only read (its physical device's memory properties); nothing
    // is created or destroyed through it.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let instance = hal.shared_instance().raw_instance();
    // SAFETY: the physical device belongs to this instance, which outlives the call.
    let props = unsafe { instance.get_physical_device_memory_properties(hal.raw_physical_device()) };
    // VK_MEMORY_HEAP_DEVICE_LOCAL_BIT
    const DEVICE_LOCAL: u32 = 1;
    props.memory_heaps[..props.memory_heap_count as usize]
        .iter()
        .filter(|h| h.flags.as_raw() & DEVICE_LOCAL != 0)
        .map(|h| h.size)
        .max()
}

/// Resolves a choice to a device and logs which adapters there were and why one was picked.
pub fn select(choice: DeviceChoice) -> Result<SelectedDevice> {
    let selected = match choice {
        DeviceChoice::Cpu => cpu(),
        DeviceChoice::Wgpu | DeviceChoice::Auto => {
            let adapters = adapters();
            for a in adapters {
                log::info!("wgpu adapter {a}{}", if a.is_software() { ": a software rasterizer" } else { "" });
            }
            let pick = choose(adapters, choice == DeviceChoice::Wgpu);
            log::info!("device {choice:?}: {}", pick.reason);
            match (pick.adapter, choice) {
                (Some(i), DeviceChoice::Wgpu) => init_adapter(i)
                    .map_err(|e| anyhow!("--device wgpu: no usable GPU adapter ({e}); use --device cpu"))?,
                (None, DeviceChoice::Wgpu) => {
                    bail!("--device wgpu: {}; use --device cpu", pick.reason)
                }
                (Some(i), _) => init_adapter(i).unwrap_or_else(|e| {
                    log::info!("{} did not start ({e}); falling back to the CPU", adapters[i]);
                    cpu()
                }),
                (None, _) => cpu(),
            }
        }
        DeviceChoice::Vulkan => vulkan()?,
    };
    log::info!("running models on {}", selected.description);
    Ok(selected)
}

/// The compute dtype of transformer and VAE on `device`: `requested` when given, else (auto)
/// f32 on the CPU (the flex backend's half types are emulated and slower there), bf16 on a GPU
/// that computes in it, f16 on one with `shader-f16`, else f32. With the reason, for the log.
pub fn compute_dtype(requested: Option<DType>, device: &SelectedDevice) -> (DType, String) {
    if let Some(d) = requested {
        let how = match d {
            DType::BF16 if crate::engine::cpu::bf16_tiles(&device.device, d) => {
                ": Linear weights as bf16 AMX tiles, activations f32"
            }
            DType::BF16 | DType::F16 if !device.is_gpu => ": emulated by the CPU backend (slower than f32)",
            _ => "",
        };
        return (d, format!("{d:?} as configured{how}"));
    }
    if !device.is_gpu {
        return (DType::F32, "F32: auto on the CPU".into());
    }
    for (d, what) in [(DType::BF16, "computes in bf16"), (DType::F16, "has shader-f16")] {
        if device.device.supports_dtype(d) {
            return (d, format!("{d:?}: auto, the GPU {what}"));
        }
    }
    (DType::F32, "F32: auto, the GPU has no half-precision arithmetic".into())
}

#[cfg(feature = "vulkan")]
fn vulkan() -> Result<SelectedDevice> {
    let (device, setup) = Device::wgpu_options()
        .graphics_api(WgpuBackend::Vulkan)
        .init_with_setup()
        .map_err(|e| anyhow!("--device vulkan: no Vulkan adapter ({e})"))?;
    let info = setup.adapter.get_info();
    Ok(SelectedDevice {
        device,
        description: format!("Vulkan (SPIR-V) adapter \"{}\" ({:?})", info.name, info.device_type),
        is_gpu: true,
        memory_bytes: device_local_bytes(&setup.adapter),
    })
}

#[cfg(not(feature = "vulkan"))]
fn vulkan() -> Result<SelectedDevice> {
    bail!("--device vulkan needs a build with `--features vulkan`; use --device wgpu")
}

#[cfg(test)]
mod dtype_tests {
    use super::*;

    #[test]
    fn auto_is_f32_on_the_cpu_and_an_explicit_dtype_wins() {
        let cpu = cpu();
        assert_eq!(compute_dtype(None, &cpu).0, DType::F32);
        assert_eq!(compute_dtype(Some(DType::BF16), &cpu).0, DType::BF16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgpu::{Backend, DeviceType};

    fn adapter(name: &str, device_type: DeviceType, backend: Backend) -> Adapter {
        Adapter { name: name.into(), device_type, backend }
    }

    fn lavapipe() -> Adapter {
        adapter("llvmpipe (LLVM 19.1.7, 256 bits)", DeviceType::Cpu, Backend::Vulkan)
    }

    #[test]
    fn auto_takes_the_discrete_gpu() {
        let list = [
            lavapipe(),
            adapter("Intel(R) UHD Graphics 770", DeviceType::IntegratedGpu, Backend::Vulkan),
            adapter("NVIDIA GeForce RTX 4090", DeviceType::DiscreteGpu, Backend::Vulkan),
            adapter("NVIDIA GeForce RTX 4090/PCIe/SSE2", DeviceType::DiscreteGpu, Backend::Gl),
        ];
        assert_eq!(choose(&list, false).adapter, Some(2));
        assert_eq!(choose(&list, true).adapter, Some(2), "an explicit wgpu prefers a GPU too");
    }

    #[test]
    fn auto_takes_an_integrated_gpu_over_a_cpu_adapter() {
        let list =
            [lavapipe(), adapter("AMD Radeon Graphics (RADV RENOIR)", DeviceType::IntegratedGpu, Backend::Vulkan)];
        let c = choose(&list, false);
        assert_eq!(c.adapter, Some(1));
        assert!(c.reason.contains("RADV"), "{}", c.reason);
    }

    #[test]
    fn auto_runs_on_flex_when_only_software_rasterizers_exist() {
        let list = [
            lavapipe(),
            // Drivers that misreport their type are known by name.
            adapter("llvmpipe (LLVM 19.1.7, 256 bits)", DeviceType::Other, Backend::Gl),
            adapter("Microsoft Basic Render Driver", DeviceType::IntegratedGpu, Backend::Dx12),
            adapter("SwiftShader Device (Subzero)", DeviceType::VirtualGpu, Backend::Vulkan),
        ];
        let c = choose(&list, false);
        assert_eq!(c.adapter, None, "auto chose {:?}", c.adapter.map(|i| &list[i]));
        assert!(c.reason.contains("flex") && c.reason.contains("llvmpipe"), "{}", c.reason);
    }

    #[test]
    fn auto_runs_on_flex_without_adapters() {
        let c = choose(&[], false);
        assert_eq!(c.adapter, None);
        assert!(c.reason.contains("no adapter"), "{}", c.reason);
        assert_eq!(choose(&[], true).adapter, None);
    }

    #[test]
    fn explicit_wgpu_takes_lavapipe_when_it_is_all_there_is() {
        let c = choose(&[lavapipe()], true);
        assert_eq!(c.adapter, Some(0));
        assert!(c.reason.contains("software"), "{}", c.reason);
    }

    #[test]
    fn software_is_told_by_type_or_name_but_not_by_a_syllable() {
        assert!(lavapipe().is_software());
        assert!(adapter("Microsoft WARP", DeviceType::Other, Backend::Dx12).is_software());
        assert!(!adapter("Warpath GPU 9000", DeviceType::DiscreteGpu, Backend::Vulkan).is_software());
        assert!(!adapter("Apple M3", DeviceType::IntegratedGpu, Backend::Metal).is_software());
    }

    #[test]
    fn burn_counts_adapters_per_graphics_api_and_kind() {
        let list = [
            adapter("A", DeviceType::DiscreteGpu, Backend::Vulkan),
            adapter("B", DeviceType::IntegratedGpu, Backend::Vulkan),
            adapter("C", DeviceType::DiscreteGpu, Backend::Vulkan),
            adapter("A/GL", DeviceType::DiscreteGpu, Backend::Gl),
            lavapipe(),
        ];
        assert_eq!(burn_address(&list, 2), (WgpuBackend::Vulkan, DeviceKind::DiscreteGpu(1)));
        assert_eq!(burn_address(&list, 3), (WgpuBackend::Gl, DeviceKind::DiscreteGpu(0)));
        assert_eq!(burn_address(&list, 1), (WgpuBackend::Vulkan, DeviceKind::IntegratedGpu(0)));
        assert_eq!(burn_address(&list, 4), (WgpuBackend::Vulkan, DeviceKind::Cpu));
    }
}
