//! Device class: what kind of machine this is, so a fleet controller can tell a phone
//! from a rack server without a lookup table of model names.

use super::CpuInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceClass {
    Unknown,
    Phone,
    Tablet,
    Laptop,
    Desktop,
    Server,
    EdgeBox,
    VirtualMachine,
    Container,
}

impl DeviceClass {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceClass::Unknown => "unknown",
            DeviceClass::Phone => "phone",
            DeviceClass::Tablet => "tablet",
            DeviceClass::Laptop => "laptop",
            DeviceClass::Desktop => "desktop",
            DeviceClass::Server => "server",
            DeviceClass::EdgeBox => "edge-box",
            DeviceClass::VirtualMachine => "virtual-machine",
            DeviceClass::Container => "container",
        }
    }
}

#[cfg(target_os = "ios")]
pub(super) fn detect(_cpu: &CpuInfo) -> DeviceClass {
    // iPadOS reports itself as iOS; sysinfo's host name carries the device type there.
    let host = sysinfo::System::host_name()
        .unwrap_or_default()
        .to_lowercase();
    if host.contains("ipad") {
        DeviceClass::Tablet
    } else {
        DeviceClass::Phone
    }
}

#[cfg(target_os = "macos")]
pub(super) fn detect(_cpu: &CpuInfo) -> DeviceClass {
    let model = std::process::Command::new("sysctl")
        .args(["-n", "hw.model"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if model.starts_with("MacBook") {
        DeviceClass::Laptop
    } else if model.starts_with("VirtualMac") {
        DeviceClass::VirtualMachine
    } else if model.is_empty() {
        DeviceClass::Unknown
    } else {
        DeviceClass::Desktop
    }
}

#[cfg(not(any(target_os = "ios", target_os = "macos")))]
pub(super) fn detect(cpu: &CpuInfo) -> DeviceClass {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    classify_linux(&LinuxFacts {
        in_container: std::path::Path::new("/.dockerenv").exists()
            || std::path::Path::new("/run/.containerenv").exists()
            || {
                let cg = read("/proc/1/cgroup");
                ["docker", "kubepods", "containerd", "libpod", "lxc"]
                    .iter()
                    .any(|k| cg.contains(k))
            },
        sys_vendor: read("/sys/class/dmi/id/sys_vendor"),
        product_name: read("/sys/class/dmi/id/product_name"),
        chassis_type: read("/sys/class/dmi/id/chassis_type").trim().parse().ok(),
        device_tree_model: read("/proc/device-tree/model"),
        hypervisor_flag: read("/proc/cpuinfo").contains(" hypervisor"),
        arch: cpu.architecture.clone(),
    })
}

/// What Linux exposes about the machine, gathered so classification can be tested.
#[derive(Debug, Default)]
#[allow(dead_code)]
pub(super) struct LinuxFacts {
    pub in_container: bool,
    pub sys_vendor: String,
    pub product_name: String,
    pub chassis_type: Option<u32>,
    pub device_tree_model: String,
    pub hypervisor_flag: bool,
    pub arch: String,
}

#[allow(dead_code)]
pub(super) fn classify_linux(f: &LinuxFacts) -> DeviceClass {
    if f.in_container {
        return DeviceClass::Container;
    }
    let dmi = format!("{} {}", f.sys_vendor, f.product_name).to_lowercase();
    let vm_markers = [
        "qemu",
        "kvm",
        "vmware",
        "virtualbox",
        "xen",
        "bochs",
        "hyper-v",
        "virtual machine",
        "amazon ec2",
        "google compute",
        "cloud hypervisor",
        "firecracker",
    ];
    if f.hypervisor_flag || vm_markers.iter().any(|m| dmi.contains(m)) {
        return DeviceClass::VirtualMachine;
    }
    // SMBIOS chassis types (DMTF DSP0134, table 17).
    match f.chassis_type {
        Some(3..=7 | 13 | 15 | 16 | 24 | 35 | 36) => return DeviceClass::Desktop,
        Some(8..=10 | 14 | 31 | 32) => return DeviceClass::Laptop,
        Some(11) => return DeviceClass::Phone,
        Some(30) => return DeviceClass::Tablet,
        Some(17 | 23 | 25 | 28 | 29) => return DeviceClass::Server,
        Some(33 | 34) => return DeviceClass::EdgeBox,
        _ => {}
    }
    // ARM boards (Raspberry Pi, Jetson) have a device tree instead of DMI.
    if !f.device_tree_model.trim_matches('\0').is_empty()
        || matches!(f.arch.as_str(), "aarch64" | "arm")
    {
        return DeviceClass::EdgeBox;
    }
    DeviceClass::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_strongest_signal() {
        let vm = LinuxFacts {
            sys_vendor: "QEMU".into(),
            chassis_type: Some(1),
            ..Default::default()
        };
        assert_eq!(classify_linux(&vm), DeviceClass::VirtualMachine);
        let laptop = LinuxFacts {
            chassis_type: Some(10),
            ..Default::default()
        };
        assert_eq!(classify_linux(&laptop), DeviceClass::Laptop);
        let pi = LinuxFacts {
            device_tree_model: "Raspberry Pi 5 Model B Rev 1.0\0".into(),
            arch: "aarch64".into(),
            ..Default::default()
        };
        assert_eq!(classify_linux(&pi), DeviceClass::EdgeBox);
        let boxed = LinuxFacts {
            in_container: true,
            sys_vendor: "QEMU".into(),
            ..Default::default()
        };
        assert_eq!(classify_linux(&boxed), DeviceClass::Container);
    }
}
