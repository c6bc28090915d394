//! Device selection without a GPU: the choice logic on made-up adapter lists, and the binary's
//! messages (exit 2, never a panic) where the requested device is not there.

use inception::devices::{AdapterKind as K, DeviceArg, select};

#[test]
fn vulkan_picks_discrete_then_integrated_then_virtual() {
    assert_eq!(select(&[K::Cpu, K::Integrated, K::Discrete], None).unwrap(), (2, K::Discrete, 0));
    assert_eq!(select(&[K::Cpu, K::Integrated, K::Virtual], None).unwrap(), (1, K::Integrated, 0));
    assert_eq!(select(&[K::Virtual, K::Cpu], None).unwrap(), (0, K::Virtual, 0));
    // the second discrete GPU is DiscreteGpu(1) for the backend
    assert_eq!(select(&[K::Discrete, K::Integrated, K::Discrete], Some(2)).unwrap(), (2, K::Discrete, 1));
    // a software adapter only when named
    assert!(select(&[K::Cpu], None).unwrap_err().to_string().contains("software"));
    assert_eq!(select(&[K::Cpu], Some(0)).unwrap(), (0, K::Cpu, 0));
    assert!(select(&[], None).unwrap_err().to_string().contains("no Vulkan adapter"));
    assert!(select(&[K::Discrete], Some(3)).unwrap_err().to_string().contains("no Vulkan adapter 3"));
}

#[test]
fn device_values_parse() {
    assert_eq!("cpu".parse::<DeviceArg>().unwrap(), DeviceArg::Cpu);
    assert_eq!("vulkan".parse::<DeviceArg>().unwrap(), DeviceArg::Vulkan(None));
    assert_eq!("vulkan:1".parse::<DeviceArg>().unwrap(), DeviceArg::Vulkan(Some(1)));
    assert_eq!("cuda:2".parse::<DeviceArg>().unwrap(), DeviceArg::Cuda(2));
    assert!("vulkan:x".parse::<DeviceArg>().is_err());
    assert!("tpu".parse::<DeviceArg>().is_err());
}

#[test]
fn unavailable_devices_are_a_message_not_a_panic() {
    let bin = env!("CARGO_BIN_EXE_inception");
    let o = std::process::Command::new(bin).args(["--device", "vulkan", "summary"]).output().unwrap();
    let t = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    let o = std::process::Command::new(bin).arg("devices").output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("cpu"));
}
