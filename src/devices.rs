//! Compute devices: parsing `--device`, choosing a Vulkan adapter, and failing with a message
//! (never a panic) where there is none or it does not work.
//!
//! `--device vulkan` picks the best adapter: the first discrete GPU, else integrated, else
//! virtual (software rasterisers such as lavapipe are only used when named, `vulkan:N`: Mesa's
//! crashes on our shaders). `--device vulkan:N` takes adapter N of `inception devices`.

use burn::tensor::Device;
use serde::Serialize;

use crate::error::{Error, Result};

/// The kind of an adapter, as wgpu reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterKind {
    Discrete,
    Integrated,
    Virtual,
    /// A software implementation (lavapipe, SwiftShader).
    Cpu,
    Other,
}

/// One adapter of the system.
#[derive(Clone, Debug, Serialize)]
pub struct Adapter {
    pub name: String,
    pub kind: AdapterKind,
    pub driver: String,
    pub backend: String,
}

/// A parsed `--device` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    /// Vulkan; `Some(n)`: adapter `n` of the list.
    Vulkan(Option<usize>),
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Invalid(format!("unknown device '{s}' (cpu, vulkan, vulkan:N, cuda, cuda:N)"));
        let (name, index) = match s.split_once(':') {
            Some((n, i)) => (n, Some(i.parse::<usize>().map_err(|_| bad())?)),
            None => (s, None),
        };
        match name {
            "cpu" | "flex" => Ok(DeviceArg::Cpu),
            "vulkan" | "gpu" | "wgpu" => Ok(DeviceArg::Vulkan(index)),
            "cuda" => Ok(DeviceArg::Cuda(index.unwrap_or(0))),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Cpu => f.write_str("cpu"),
            DeviceArg::Vulkan(None) => f.write_str("vulkan"),
            DeviceArg::Vulkan(Some(n)) => write!(f, "vulkan:{n}"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Which adapter `--device vulkan[:N]` uses: `(position in the list, its kind, its index among
/// adapters of that kind)`, the last being what the backend's `DeviceKind` counts.
pub fn select(kinds: &[AdapterKind], wanted: Option<usize>) -> Result<(usize, AdapterKind, usize)> {
    let pick = |pos: usize| {
        let kind = kinds[pos];
        let nth = kinds[..pos].iter().filter(|k| **k == kind).count();
        (pos, kind, nth)
    };
    match wanted {
        Some(n) if n < kinds.len() => {
            if kinds[n] == AdapterKind::Other {
                return Err(Error::Invalid(format!("adapter {n} is of an unsupported kind")));
            }
            Ok(pick(n))
        }
        Some(n) => Err(Error::Invalid(format!(
            "no Vulkan adapter {n}: this machine has {} (see `inception devices`)",
            kinds.len()
        ))),
        None => [AdapterKind::Discrete, AdapterKind::Integrated, AdapterKind::Virtual]
            .iter()
            .find_map(|want| kinds.iter().position(|k| k == want))
            .map(pick)
            .ok_or_else(|| {
                Error::Invalid(if kinds.is_empty() {
                    "no Vulkan adapter found: use --device cpu (or install the GPU's Vulkan driver)".to_string()
                } else {
                    format!(
                        "no Vulkan GPU found, only {} software adapter(s): use --device cpu, or name one with \
                         --device vulkan:N (see `inception devices`)",
                        kinds.len()
                    )
                })
            }),
    }
}

/// The adapters of this machine (Vulkan), empty in a build without the `vulkan` feature.
pub fn adapters() -> Vec<Adapter> {
    #[cfg(feature = "vulkan")]
    {
        quiet_wayland();
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::VULKAN,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let list = block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
        list.into_iter()
            .map(|a| {
                let i = a.get_info();
                let kind = match i.device_type {
                    wgpu::DeviceType::DiscreteGpu => AdapterKind::Discrete,
                    wgpu::DeviceType::IntegratedGpu => AdapterKind::Integrated,
                    wgpu::DeviceType::VirtualGpu => AdapterKind::Virtual,
                    wgpu::DeviceType::Cpu => AdapterKind::Cpu,
                    wgpu::DeviceType::Other => AdapterKind::Other,
                };
                Adapter {
                    name: i.name,
                    kind,
                    driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
                    backend: format!("{:?}", i.backend),
                }
            })
            .collect()
    }
    #[cfg(not(feature = "vulkan"))]
    Vec::new()
}

/// wgpu probes Wayland / X11 and complains without `XDG_RUNTIME_DIR`; give it a private one.
#[cfg(feature = "vulkan")]
fn quiet_wayland() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join(format!("inception-xdg-{}", std::process::id()));
        if std::fs::create_dir_all(&dir).is_ok() {
            // SAFETY: called before the backend starts its threads.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", &dir) };
        }
    }
}

#[cfg(feature = "vulkan")]
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// The burn device for a `--device` value, checked to work (a failing backend is an error
/// naming it, not a panic).
pub fn open(arg: &DeviceArg) -> Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::flex()),
        #[cfg(feature = "vulkan")]
        DeviceArg::Vulkan(wanted) => {
            let list = adapters();
            let kinds: Vec<AdapterKind> = list.iter().map(|a| a.kind).collect();
            let (pos, kind, nth) = select(&kinds, *wanted)?;
            use burn::tensor::DeviceKind;
            let dk = match kind {
                AdapterKind::Discrete => DeviceKind::DiscreteGpu(nth),
                AdapterKind::Integrated => DeviceKind::IntegratedGpu(nth),
                AdapterKind::Virtual => DeviceKind::VirtualGpu(nth),
                _ => DeviceKind::Cpu,
            };
            probe(move || Device::vulkan(dk), &format!("Vulkan adapter {pos} ({})", list[pos].name))
        }
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda(i) => probe(move || Device::cuda(*i), &format!("CUDA device {i}")),
        other => Err(Error::Invalid(format!(
            "device '{other}' is not available in this build (cpu{}{}; GPU builds: cargo build --release \
             --features vulkan)",
            if cfg!(feature = "vulkan") { ", vulkan" } else { "" },
            if cfg!(feature = "cuda") { ", cuda" } else { "" }
        ))),
    }
}

/// Create a device and run one tiny computation on it; a panic in the backend becomes an error.
#[cfg(any(feature = "vulkan", feature = "cuda"))]
fn probe(make: impl FnOnce() -> Device, what: &str) -> Result<Device> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        use burn::tensor::{Tensor, module::conv2d, ops::ConvOptions};
        let d = make();
        // the kinds of kernels our networks run: a 3x3 convolution and a matrix product
        let x = Tensor::<4>::ones([1, 4, 5, 5], &d);
        let w = Tensor::<4>::ones([4, 4, 3, 3], &d);
        let y = conv2d(x, w, None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1)); // centre: 36
        let m = Tensor::<2>::ones([4, 4], &d).matmul(Tensor::<2>::ones([4, 4], &d)); // 4s
        let t = y.slice([0..1, 0..1, 2..3, 2..3]).sum().into_scalar::<f32>() / 9.0
            + m.slice([0..1, 0..1]).sum().into_scalar::<f32>() / 4.0;
        (d, t) // 4 + 1
    }));
    std::panic::set_hook(hook);
    match r {
        Ok((d, t)) if (t - 5.0).abs() < 1e-3 => Ok(d),
        Ok((_, t)) => Err(Error::Invalid(format!("{what} computes wrong results (test value {t}, expected 5)"))),
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Error::Invalid(format!("{what} does not work: {}", msg.lines().next().unwrap_or("backend error"))))
        }
    }
}

/// What `inception devices` prints: the adapters and what each `--device` value selects.
pub fn report() -> String {
    let list = adapters();
    let mut s = String::from("cpu          burn flex on the CPU (inference on the fast engine)\n");
    if !cfg!(feature = "vulkan") {
        s += "vulkan       not in this build (cargo build --release --features vulkan)\n";
        return s;
    }
    for (i, a) in list.iter().enumerate() {
        s += &format!("vulkan:{i:<5} {} [{:?}] {} ({})\n", a.name, a.kind, a.driver, a.backend);
    }
    let kinds: Vec<AdapterKind> = list.iter().map(|a| a.kind).collect();
    s += &match select(&kinds, None) {
        Ok((pos, _, _)) => format!("vulkan       = vulkan:{pos} ({})\n", list[pos].name),
        Err(e) => format!("vulkan       unavailable: {e}\n"),
    };
    s
}
