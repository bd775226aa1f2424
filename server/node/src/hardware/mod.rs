//! What this node is: OS, device class, CPU, memory, disk and accelerators.
//!
//! Static facts are probed once at start-up; memory, disk and pressure are read fresh
//! on every call, since a fleet controller places models on them.

mod accelerators;
pub mod bandwidth;
pub mod cgroup;
pub mod compute;
mod cpu;
mod device;
mod profile;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use modeld_engine_core::Accelerator;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

pub use device::DeviceClass;
pub use profile::DeviceProfile;

/// The best rate over `passes` timed runs of `pass`, which returns the work it did
/// (bytes read, FLOPs): the best pass is the one no other process disturbed.
fn best_rate(passes: usize, mut pass: impl FnMut() -> f64) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..passes {
        let started = std::time::Instant::now();
        let work = pass();
        let seconds = started.elapsed().as_secs_f64();
        if seconds > 0.0 {
            best = best.max(work / seconds);
        }
    }
    best
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuInfo {
    pub model: String,
    pub vendor: String,
    pub architecture: String,
    pub physical_cores: u32,
    pub logical_cores: u32,
    pub features: Vec<String>,
    pub frequency_mhz: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceleratorInfo {
    pub kind: Accelerator,
    pub name: String,
    pub vendor: String,
    pub memory_bytes: u64,
    pub driver_version: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
    /// The memory limit of the agent's control group (a container's), if any.
    pub cgroup_limit_bytes: Option<u64>,
}

impl MemoryInfo {
    /// What the agent's processes may use at most: physical memory, or the cgroup's
    /// limit when that is smaller.
    pub fn usable_bytes(&self) -> u64 {
        self.cgroup_limit_bytes
            .map_or(self.total_bytes, |limit| limit.min(self.total_bytes))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskInfo {
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// Facts that do not change while the agent runs.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub hostname: String,
    pub os: String,
    pub os_version: String,
    pub kernel_version: String,
    pub device_class: DeviceClass,
    pub cpu: CpuInfo,
    pub accelerators: Vec<AcceleratorInfo>,
    pub start_time: SystemTime,
}

/// One sample of the node's resources.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ResourceSnapshot {
    pub time: Option<SystemTime>,
    pub memory: MemoryInfo,
    /// Linux PSI "some avg10" for memory, in percent; None where the kernel has no PSI.
    pub memory_pressure: Option<f64>,
    pub cpu_usage_percent: f64,
    pub agent_rss_bytes: u64,
    pub disk_free_bytes: u64,
}

pub struct Hardware {
    host: HostInfo,
    data_dir: PathBuf,
    /// Physical memory a device profile reports instead of the real one.
    memory_total: Option<u64>,
    /// The cgroup memory limit, read once at start-up.
    cgroup_limit: Option<u64>,
    // sysinfo needs &mut for refreshes; samples are cheap and rare, so a Mutex is fine.
    sys: Mutex<System>,
}

impl std::fmt::Debug for Hardware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hardware")
            .field("host", &self.host)
            .finish()
    }
}

impl Hardware {
    /// Probes the host. Blocking: it reads /proc and /sys and may run `nvidia-smi`.
    pub fn probe(data_dir: &Path) -> Hardware {
        let mut sys = System::new();
        sys.refresh_memory();
        sys.refresh_cpu_all();
        let cpu = cpu::probe(&sys);
        let host = HostInfo {
            hostname: System::host_name().unwrap_or_default(),
            os: System::name().unwrap_or_else(|| std::env::consts::OS.to_owned()),
            os_version: System::os_version().unwrap_or_default(),
            kernel_version: System::kernel_version().unwrap_or_default(),
            device_class: device::detect(&cpu),
            accelerators: accelerators::probe(),
            cpu,
            start_time: SystemTime::now(),
        };
        Hardware {
            host,
            data_dir: data_dir.to_path_buf(),
            memory_total: None,
            cgroup_limit: cgroup::memory_limit(),
            sys: Mutex::new(sys),
        }
    }

    /// Reports the device `profile` describes instead of this one (simulation and
    /// tests). Available memory stays real, capped at the profile's total.
    pub fn with_profile(mut self, profile: &DeviceProfile) -> Hardware {
        if let Some(class) = profile.device_class.as_deref().and_then(|c| c.parse().ok()) {
            self.host.device_class = class;
        }
        if let Some(os) = &profile.os {
            self.host.os.clone_from(os);
        }
        if let Some(version) = &profile.os_version {
            self.host.os_version.clone_from(version);
        }
        if let Some(hostname) = &profile.hostname {
            self.host.hostname.clone_from(hostname);
        }
        if let Some(accelerators) = &profile.accelerators {
            self.host.accelerators = accelerators
                .iter()
                .filter(|a| **a != Accelerator::Cpu)
                .map(|a| AcceleratorInfo {
                    kind: *a,
                    name: format!("{} (device profile)", a.as_str()),
                    vendor: String::new(),
                    memory_bytes: 0,
                    driver_version: String::new(),
                })
                .collect();
        }
        self.memory_total = profile.memory.map(|m| m.as_u64());
        self
    }

    fn profiled(&self, mut memory: MemoryInfo) -> MemoryInfo {
        if let Some(total) = self.memory_total {
            memory.total_bytes = total;
            memory.available_bytes = memory.available_bytes.min(total);
        }
        memory
    }

    pub fn host(&self) -> &HostInfo {
        &self.host
    }

    fn with_sys<T>(&self, f: impl FnOnce(&mut System) -> T) -> T {
        // A poisoned lock only means another sampler panicked mid-refresh; the System
        // is still usable.
        let mut guard = self.sys.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    pub fn memory(&self) -> MemoryInfo {
        let memory = self.with_sys(|sys| {
            sys.refresh_memory();
            MemoryInfo {
                total_bytes: sys.total_memory(),
                available_bytes: sys.available_memory(),
                swap_total_bytes: sys.total_swap(),
                swap_free_bytes: sys.free_swap(),
                cgroup_limit_bytes: self.cgroup_limit,
            }
        });
        self.profiled(memory)
    }

    /// Free and total bytes of the filesystem holding the data directory.
    pub fn disk(&self) -> DiskInfo {
        DiskInfo {
            free_bytes: fs4::available_space(&self.data_dir).unwrap_or(0),
            total_bytes: fs4::total_space(&self.data_dir).unwrap_or(0),
        }
    }

    pub fn snapshot(&self) -> ResourceSnapshot {
        let (memory, cpu_usage_percent, agent_rss_bytes) = self.with_sys(|sys| {
            sys.refresh_memory();
            sys.refresh_cpu_usage();
            let pid = Pid::from_u32(std::process::id());
            sys.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                true,
                ProcessRefreshKind::nothing().with_memory(),
            );
            let rss = sys.process(pid).map(|p| p.memory()).unwrap_or(0);
            (
                MemoryInfo {
                    total_bytes: sys.total_memory(),
                    available_bytes: sys.available_memory(),
                    swap_total_bytes: sys.total_swap(),
                    swap_free_bytes: sys.free_swap(),
                    cgroup_limit_bytes: self.cgroup_limit,
                },
                f64::from(sys.global_cpu_usage()),
                rss,
            )
        });
        ResourceSnapshot {
            time: Some(SystemTime::now()),
            memory: self.profiled(memory),
            memory_pressure: memory_pressure(),
            cpu_usage_percent,
            agent_rss_bytes,
            disk_free_bytes: self.disk().free_bytes,
        }
    }
}

/// Reads "some avg10" from Linux PSI; None on kernels or platforms without it.
pub fn memory_pressure() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/pressure/memory").ok()?;
    parse_psi_some_avg10(&text)
}

fn parse_psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_line_is_parsed() {
        let text = "some avg10=1.25 avg60=0.50 avg300=0.10 total=12345\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi_some_avg10(text), Some(1.25));
        assert_eq!(parse_psi_some_avg10("garbage"), None);
    }

    #[test]
    fn probe_reports_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let hw = Hardware::probe(dir.path());
        let mem = hw.memory();
        assert!(mem.total_bytes > 0 && mem.available_bytes <= mem.total_bytes);
        assert!(hw.host().cpu.logical_cores >= 1);
        assert!(hw.host().cpu.physical_cores >= 1);
        assert!(hw.disk().total_bytes >= hw.disk().free_bytes);
        assert_eq!(hw.host().cpu.architecture, std::env::consts::ARCH);
    }
}
