//! Which CPU kernels a runtime runs on this machine, and how they were chosen.
//!
//! A fleet binary is built once and runs on many CPUs, so "what did this build compile
//! for" and "what did the runtime pick here" are different questions; capabilities
//! report both through this type.

use std::path::PathBuf;

/// How a runtime's CPU kernels were chosen for the CPU it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuDispatch {
    /// Several variants are compiled; the best one for this CPU was chosen at startup.
    Runtime,
    /// The kernels were fixed when the binary was compiled (the build's target CPU).
    BuildTime,
    /// The runtime library dispatches by itself, per kernel, at run time.
    Library,
}

impl CpuDispatch {
    pub fn as_str(self) -> &'static str {
        match self {
            CpuDispatch::Runtime => "runtime",
            CpuDispatch::BuildTime => "build-time",
            CpuDispatch::Library => "library",
        }
    }
}

/// The CPU kernels a runtime uses here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuVariant {
    /// The variant in use: a llama.cpp CPU backend ("haswell", "zen4"...), the build's
    /// target ("x86-64-v3", "target-cpu=native"), or the library's own dispatcher.
    pub name: String,
    pub dispatch: CpuDispatch,
    /// Instruction-set extensions the chosen kernels use, lower case.
    pub features: Vec<String>,
    /// Variants the build has but never chooses, each with the reason.
    pub withheld: Vec<String>,
    /// The module the kernels were loaded from, when they live in a file of their own.
    pub module: Option<PathBuf>,
}

impl CpuVariant {
    /// Kernels a shared library loaded at run time picks for the CPU it finds (its
    /// `name`d dispatcher): the library file decides, not this build. Without the file
    /// the runtime is unavailable, and `configure` says how to name one.
    pub fn library(
        name: &str,
        library: Option<PathBuf>,
        runtime: &str,
        configure: &str,
    ) -> Result<CpuVariant, crate::EngineError> {
        let library = library.ok_or_else(|| crate::EngineError::Unavailable(configure.into()))?;
        if !library.is_file() {
            return Err(crate::EngineError::Unavailable(format!(
                "{}: the {runtime} library does not exist",
                library.display()
            )));
        }
        Ok(CpuVariant {
            name: name.to_owned(),
            dispatch: CpuDispatch::Library,
            features: Vec::new(),
            withheld: Vec::new(),
            module: Some(library),
        })
    }

    /// The kernels compiled into this binary: what the build's target features allow.
    pub fn build_target() -> CpuVariant {
        CpuVariant {
            name: build_level().to_owned(),
            dispatch: CpuDispatch::BuildTime,
            features: build_features(),
            withheld: Vec::new(),
            module: None,
        }
    }
}

/// The logical CPUs this process may run on: its affinity mask and cgroup quota count,
/// at least 1.
pub fn usable_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

/// The x86-64 micro-architecture level (or the architecture) the build targets.
pub fn build_level() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        if cfg!(all(
            target_feature = "avx512f",
            target_feature = "avx512bw",
            target_feature = "avx512cd",
            target_feature = "avx512dq",
            target_feature = "avx512vl"
        )) {
            "x86-64-v4"
        } else if cfg!(all(
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "bmi2"
        )) {
            "x86-64-v3"
        } else if cfg!(all(target_feature = "sse4.2", target_feature = "popcnt")) {
            "x86-64-v2"
        } else {
            "x86-64"
        }
    } else {
        std::env::consts::ARCH
    }
}

/// SIMD extensions enabled at compile time, as inference kernels care about them.
pub fn build_features() -> Vec<String> {
    let enabled = [
        ("sse4.2", cfg!(target_feature = "sse4.2")),
        ("avx", cfg!(target_feature = "avx")),
        ("avx2", cfg!(target_feature = "avx2")),
        ("fma", cfg!(target_feature = "fma")),
        ("f16c", cfg!(target_feature = "f16c")),
        ("bmi2", cfg!(target_feature = "bmi2")),
        ("avx512f", cfg!(target_feature = "avx512f")),
        ("avx512bw", cfg!(target_feature = "avx512bw")),
        ("avx512vnni", cfg!(target_feature = "avx512vnni")),
        ("avx512bf16", cfg!(target_feature = "avx512bf16")),
        ("avxvnni", cfg!(target_feature = "avxvnni")),
        ("neon", cfg!(target_feature = "neon")),
        ("dotprod", cfg!(target_feature = "dotprod")),
        ("i8mm", cfg!(target_feature = "i8mm")),
        ("sve", cfg!(target_feature = "sve")),
    ];
    enabled
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| name.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_target_names_its_level_and_features_consistently() {
        let v = CpuVariant::build_target();
        assert_eq!(v.dispatch, CpuDispatch::BuildTime);
        let has = |f: &str| v.features.iter().any(|x| x == f);
        match v.name.as_str() {
            "x86-64-v4" => assert!(has("avx512f") && has("avx2")),
            "x86-64-v3" => assert!(has("avx2") && has("fma") && !has("avx512f")),
            "x86-64-v2" => assert!(has("sse4.2") && !has("avx2")),
            "x86-64" => assert!(!has("sse4.2")),
            other => assert_eq!(other, std::env::consts::ARCH),
        }
    }
}
