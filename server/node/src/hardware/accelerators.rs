//! Accelerator discovery. Each probe only reports what it can see evidence of; nothing
//! is assumed from the OS alone except on Apple targets, where Metal is always there.

use modeld_engine_core::Accelerator;

use super::AcceleratorInfo;

pub(super) fn probe() -> Vec<AcceleratorInfo> {
    let mut out = Vec::new();
    out.extend(nvidia());
    out.extend(vulkan());
    out.extend(apple());
    out
}

/// NVIDIA GPUs through `nvidia-smi`, falling back to the driver's /proc files.
fn nvidia() -> Vec<AcceleratorInfo> {
    let smi = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader,nounits",
        ])
        .output();
    if let Ok(out) = smi
        && out.status.success()
    {
        return parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout));
    }
    let Ok(version) = std::fs::read_to_string("/proc/driver/nvidia/version") else {
        return Vec::new();
    };
    let driver = version
        .split_whitespace()
        .skip_while(|w| *w != "Module")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let Ok(gpus) = std::fs::read_dir("/proc/driver/nvidia/gpus") else {
        return Vec::new();
    };
    gpus.filter_map(|g| g.ok())
        .filter_map(|g| std::fs::read_to_string(g.path().join("information")).ok())
        .map(|info| AcceleratorInfo {
            kind: Accelerator::Cuda,
            name: info
                .lines()
                .find_map(|l| l.strip_prefix("Model:"))
                .unwrap_or("NVIDIA GPU")
                .trim()
                .to_owned(),
            vendor: "NVIDIA".into(),
            memory_bytes: 0,
            driver_version: driver.clone(),
        })
        .collect()
}

fn parse_nvidia_smi(csv: &str) -> Vec<AcceleratorInfo> {
    csv.lines()
        .filter_map(|line| {
            let mut parts = line.split(',').map(str::trim);
            let name = parts.next().filter(|n| !n.is_empty())?;
            let mib: u64 = parts.next()?.parse().ok()?;
            let driver = parts.next().unwrap_or_default();
            Some(AcceleratorInfo {
                kind: Accelerator::Cuda,
                name: name.to_owned(),
                vendor: "NVIDIA".into(),
                memory_bytes: mib * 1024 * 1024,
                driver_version: driver.to_owned(),
            })
        })
        .collect()
}

/// Vulkan needs the loader and at least one installable client driver (ICD).
#[cfg(not(target_vendor = "apple"))]
fn vulkan() -> Vec<AcceleratorInfo> {
    let loader_dirs = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ];
    let has_loader = loader_dirs
        .iter()
        .any(|d| std::path::Path::new(d).join("libvulkan.so.1").exists());
    if !has_loader {
        return Vec::new();
    }
    let icd_dirs = [
        "/usr/share/vulkan/icd.d",
        "/etc/vulkan/icd.d",
        "/usr/local/share/vulkan/icd.d",
    ];
    let mut out = Vec::new();
    for dir in icd_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") {
                continue;
            }
            let driver = name.trim_end_matches(".json").to_owned();
            let software = driver.starts_with("lvp") || driver.contains("swiftshader");
            out.push(AcceleratorInfo {
                kind: Accelerator::Vulkan,
                name: if software {
                    format!("{driver} (software rasterizer)")
                } else {
                    driver
                },
                vendor: String::new(),
                memory_bytes: 0,
                driver_version: String::new(),
            });
        }
    }
    out
}

#[cfg(target_vendor = "apple")]
fn vulkan() -> Vec<AcceleratorInfo> {
    Vec::new()
}

#[cfg(not(target_vendor = "apple"))]
fn apple() -> Vec<AcceleratorInfo> {
    Vec::new()
}

/// Every Apple device this agent targets has a Metal GPU; Apple silicon also has the
/// Neural Engine. Both share system memory.
#[cfg(target_vendor = "apple")]
fn apple() -> Vec<AcceleratorInfo> {
    let mut out = vec![AcceleratorInfo {
        kind: Accelerator::Metal,
        name: "Apple GPU".into(),
        vendor: "Apple".into(),
        memory_bytes: 0,
        driver_version: String::new(),
    }];
    if cfg!(target_arch = "aarch64") {
        out.push(AcceleratorInfo {
            kind: Accelerator::Ane,
            name: "Apple Neural Engine".into(),
            vendor: "Apple".into(),
            memory_bytes: 0,
            driver_version: String::new(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_csv_is_parsed() {
        let gpus =
            parse_nvidia_smi("NVIDIA GeForce RTX 4090, 24564, 550.54.14\nTesla T4, 15360, 535.1\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].name, "NVIDIA GeForce RTX 4090");
        assert_eq!(gpus[0].memory_bytes, 24564 * 1024 * 1024);
        assert_eq!(gpus[1].driver_version, "535.1");
    }
}
