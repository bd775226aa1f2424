//! Which of llama.cpp's CPU kernels this process runs.
//!
//! With the `cpu-variants` feature, llama.cpp's CPU backend is compiled once per CPU
//! variant (x64, sse42, haswell, skylakex, icelake, zen4, alderlake...) into loadable
//! modules, and ggml loads the one that scores best on the CPU it finds at startup: one
//! binary serves every CPU of a fleet. Without it, the kernels are the ones the build's
//! target CPU allowed (a build tuned to one device class).

use std::path::{Path, PathBuf};

use modeld_engine_core::{CpuDispatch, CpuVariant, EngineError};

/// Variants llama.cpp compiles that are never offered to its selection, with why.
/// The build script leaves them out of the directory it prepares; keep both in step.
pub const WITHHELD_VARIANTS: &[(&str, &str)] = &[(
    "sapphirerapids",
    "its AMX kernels kill the process on the first decode on Xeons with AMX (SIGILL \
     from this module, SIGSEGV in ggml_backend_amx_mul_mat from a native build); llama.cpp \
     issue 20824, unfixed in llama-cpp-sys-2 0.1.161",
)];

/// The directory of CPU variants the build prepared (withheld ones left out).
#[cfg(feature = "cpu-variants")]
pub const BUILD_VARIANTS_DIR: Option<&str> = Some(env!("MODELD_BUILD_LLAMA_CPU_VARIANTS_DIR"));
#[cfg(not(feature = "cpu-variants"))]
pub const BUILD_VARIANTS_DIR: Option<&str> = None;

/// Every variant llama.cpp compiled, withheld ones included: for tests that check
/// whether a withheld variant still fails.
#[cfg(feature = "cpu-variants")]
pub const BUILD_ALL_VARIANTS_DIR: Option<&str> =
    Some(env!("MODELD_BUILD_LLAMA_ALL_CPU_VARIANTS_DIR"));
#[cfg(not(feature = "cpu-variants"))]
pub const BUILD_ALL_VARIANTS_DIR: Option<&str> = None;

/// The one variant llama.cpp was compiled for, where a build compiled it alone for the
/// build machine (scripts/run, through scripts/llama-host-cpu); empty otherwise.
#[cfg(not(feature = "cpu-variants"))]
const BUILD_HOST_VARIANT: &str = env!("MODELD_BUILD_LLAMA_HOST_VARIANT");
#[cfg(feature = "cpu-variants")]
const BUILD_HOST_VARIANT: &str = "";

/// The directory a packaged `modeld` carries its CPU variants in, beside the binary.
pub const PACKAGED_DIR_NAME: &str = "llama-cpu-variants";

/// Where the CPU variants are looked for, first match wins: the configured directory,
/// the one packaged beside the running binary, then the one the build prepared.
pub fn candidate_dirs(configured: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = configured {
        dirs.push(dir.to_owned());
        // A configured directory is an operator's choice: never fall back past it.
        return dirs;
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
    {
        dirs.push(exe_dir.join(PACKAGED_DIR_NAME));
    }
    if let Some(dir) = BUILD_VARIANTS_DIR {
        dirs.push(PathBuf::from(dir));
    }
    dirs
}

/// The variant modules in `dir`, by variant name.
pub fn variants_in(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let path = e.path();
            let name = path.file_name()?.to_str()?;
            Some((variant_of(name)?.to_owned(), path.clone()))
        })
        .collect();
    out.sort();
    out
}

/// `libggml-cpu-haswell.so` → `haswell`.
pub fn variant_of(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_prefix("lib").unwrap_or(file_name);
    let stem = stem.strip_prefix("ggml-cpu-")?;
    [".so", ".dylib", ".dll"]
        .iter()
        .find_map(|ext| stem.strip_suffix(ext))
}

/// The first candidate directory that holds at least one variant.
pub fn variants_dir(configured: Option<&Path>) -> Result<PathBuf, EngineError> {
    let dirs = candidate_dirs(configured);
    dirs.iter()
        .find(|d| !variants_in(d).is_empty())
        .cloned()
        .ok_or_else(|| {
            let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            EngineError::Load(format!(
                "no llama.cpp CPU variant (libggml-cpu-*.so) found; looked in: {}. \
                 Ship the {PACKAGED_DIR_NAME}/ directory beside modeld, or name one with \
                 --llama-cpu-variants-dir",
                looked.join(", ")
            ))
        })
}

/// Which variant this process loaded and what its kernels use. `system_info` is
/// llama.cpp's `llama_print_system_info()`; `maps` is `/proc/self/maps` where the
/// platform has it (it names the module ggml chose).
pub fn describe(dir: Option<&Path>, system_info: &str, maps: Option<&str>) -> CpuVariant {
    let features = features_of(system_info);
    let Some(dir) = dir else {
        let target = env!("MODELD_BUILD_TARGET_CPU");
        return CpuVariant {
            name: if !target.is_empty() {
                format!("target-cpu={target}")
            } else if !BUILD_HOST_VARIANT.is_empty() {
                BUILD_HOST_VARIANT.to_owned()
            } else {
                modeld_engine_core::cpu::build_level().to_owned()
            },
            dispatch: CpuDispatch::BuildTime,
            features,
            withheld: Vec::new(),
            module: None,
        };
    };
    let offered = variants_in(dir);
    let module = maps.and_then(|maps| {
        maps.lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .map(PathBuf::from)
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(variant_of)
                    .is_some()
            })
    });
    let name = module
        .as_deref()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .and_then(variant_of)
        .unwrap_or("unknown")
        .to_owned();
    CpuVariant {
        name,
        dispatch: CpuDispatch::Runtime,
        features,
        withheld: WITHHELD_VARIANTS
            .iter()
            .filter(|(v, _)| !offered.iter().any(|(o, _)| o == v))
            .map(|(v, why)| format!("{v}: {why}"))
            .collect(),
        module,
    }
}

/// `CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 0 | REPACK = 1 |` → `["sse3", "avx2", "repack"]`.
fn features_of(system_info: &str) -> Vec<String> {
    system_info
        .split('|')
        .filter_map(|item| {
            let item = item.rsplit(':').next()?.trim();
            let (name, value) = item.split_once('=')?;
            (value.trim() == "1").then(|| name.trim().to_ascii_lowercase())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_come_from_module_file_names() {
        assert_eq!(variant_of("libggml-cpu-haswell.so"), Some("haswell"));
        assert_eq!(variant_of("libggml-cpu-zen4.dylib"), Some("zen4"));
        assert_eq!(variant_of("ggml-cpu-x64.dll"), Some("x64"));
        assert_eq!(variant_of("libggml-base.so"), None);
        assert_eq!(variant_of("libggml-cpu-haswell.so.1"), None);
    }

    #[test]
    fn features_are_the_enabled_items_of_system_info() {
        let info = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX512 = 0 | AMX_INT8 = 0 | \
                    LLAMAFILE = 1 | REPACK = 1 | ";
        assert_eq!(
            features_of(info),
            ["sse3", "ssse3", "avx", "llamafile", "repack"]
        );
    }

    #[test]
    fn the_loaded_module_names_the_variant_and_absent_withheld_ones_are_reported() {
        let dir = std::env::temp_dir().join(format!("modeld-variants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for v in ["x64", "haswell", "icelake"] {
            std::fs::write(dir.join(format!("libggml-cpu-{v}.so")), b"").unwrap();
        }
        let maps = format!(
            "7f00-7f01 r-xp 00000000 fd:01 42 /usr/lib/libc.so.6\n\
             7f02-7f03 r-xp 00000000 fd:01 43 {}\n",
            dir.join("libggml-cpu-icelake.so").display()
        );
        let v = describe(Some(&dir), "CPU : AVX2 = 1 | AVX512 = 1 |", Some(&maps));
        assert_eq!(v.name, "icelake");
        assert_eq!(v.dispatch, CpuDispatch::Runtime);
        assert_eq!(v.features, ["avx2", "avx512"]);
        assert_eq!(v.module, Some(dir.join("libggml-cpu-icelake.so")));
        assert_eq!(v.withheld.len(), WITHHELD_VARIANTS.len());
        assert!(v.withheld[0].starts_with("sapphirerapids: "));

        // A directory an operator filled with every variant withholds nothing.
        std::fs::write(dir.join("libggml-cpu-sapphirerapids.so"), b"").unwrap();
        assert!(describe(Some(&dir), "", None).withheld.is_empty());
        assert_eq!(describe(Some(&dir), "", None).name, "unknown");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_configured_directory_is_the_only_one_searched() {
        let dirs = candidate_dirs(Some(Path::new("/opt/modeld/variants")));
        assert_eq!(dirs, [PathBuf::from("/opt/modeld/variants")]);
        let err = variants_dir(Some(Path::new("/nonexistent/variants")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/variants"), "{err}");
        assert!(err.contains("--llama-cpu-variants-dir"), "{err}");
    }
}
