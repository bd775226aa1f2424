use sysinfo::System;

use super::CpuInfo;

pub(super) fn probe(sys: &System) -> CpuInfo {
    let cpus = sys.cpus();
    let first = cpus.first();
    let logical = u32::try_from(cpus.len()).unwrap_or(u32::MAX).max(1);
    CpuInfo {
        model: first
            .map(|c| c.brand().trim().to_owned())
            .unwrap_or_default(),
        vendor: first.map(|c| c.vendor_id().to_owned()).unwrap_or_default(),
        architecture: std::env::consts::ARCH.to_owned(),
        physical_cores: System::physical_core_count()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(logical),
        logical_cores: logical,
        features: features(),
        frequency_mhz: first.map(|c| c.frequency()).unwrap_or(0),
    }
}

/// SIMD and ML-relevant features the CPU reports at run time, lower case.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
pub(super) fn features() -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! check {
        ($($f:tt),*) => {
            $(if std::arch::is_x86_feature_detected!($f) { out.push($f.to_owned()); })*
        };
    }
    check!(
        "sse3",
        "ssse3",
        "sse4.1",
        "sse4.2",
        "popcnt",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "bmi2",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512cd",
        "avx512vnni",
        "avx512bf16",
        "avx512fp16",
        "avxvnni"
    );
    out
}

#[cfg(target_arch = "aarch64")]
pub(super) fn features() -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! check {
        ($($f:tt),*) => {
            $(if std::arch::is_aarch64_feature_detected!($f) { out.push($f.to_owned()); })*
        };
    }
    check!(
        "neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme"
    );
    out
}

#[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
pub(super) fn features() -> Vec<String> {
    Vec::new()
}

impl CpuInfo {
    /// The inference threads a load gets when it does not say: one per physical core
    /// this process may run on (cgroup quota and affinity count). Matrix kernels gain
    /// nothing from a core's second hardware thread, and one thread more than there are
    /// cores stalls every step at the barrier where all threads meet.
    pub fn inference_threads(&self) -> u32 {
        self.physical_cores
            .clamp(1, modeld_engine_core::cpu::usable_cpus())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn x86_64_always_has_sse3_era_features() {
        // Every x86_64 CPU that runs this toolchain's output has SSE3.
        assert!(super::features().iter().any(|f| f == "sse3"));
    }
}
