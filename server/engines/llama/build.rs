//! With `cpu-variants`, llama.cpp's build leaves one CPU-backend module per CPU variant
//! in `DEP_LLAMA_BACKENDS_DIR`, and at startup ggml loads the best-scoring module it
//! finds in the directory it is given. This script gives it a directory holding every
//! variant except the withheld ones, so a withheld variant can never be chosen, and
//! names both directories for the engine (and its tests) at compile time.

use std::path::{Path, PathBuf};

/// Variants compiled by llama.cpp but never offered to ggml's selection, with why.
/// Keep in step with `WITHHELD_VARIANTS` in src/cpu.rs.
const WITHHELD: &[&str] = &[
    // Its AMX kernels kill the process on the first decode on Xeons with AMX (SIGILL
    // here, SIGSEGV in ggml_backend_amx_mul_mat from a native build): upstream
    // llama.cpp issue 20824, unfixed in llama-cpp-sys-2 0.1.161.
    "sapphirerapids",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_BACKENDS_DIR");
    // The target CPU the build was asked for, so capabilities can say "native".
    let target_cpu = std::env::var("CARGO_ENCODED_RUSTFLAGS")
        .unwrap_or_default()
        .split('\x1f')
        .find_map(|f| f.split("target-cpu=").nth(1).map(str::to_owned))
        .unwrap_or_default();
    println!("cargo:rustc-env=MODELD_BUILD_TARGET_CPU={target_cpu}");
    if std::env::var_os("CARGO_FEATURE_CPU_VARIANTS").is_none() {
        // scripts/run compiles llama.cpp for the one variant ggml would pick on the
        // build machine (scripts/llama-host-cpu); capabilities name it.
        println!("cargo:rerun-if-env-changed=MODELD_LLAMA_HOST_VARIANT");
        let host = std::env::var("MODELD_LLAMA_HOST_VARIANT").unwrap_or_default();
        println!("cargo:rustc-env=MODELD_BUILD_LLAMA_HOST_VARIANT={host}");
        return;
    }
    let Some(all) = std::env::var_os("DEP_LLAMA_BACKENDS_DIR").map(PathBuf::from) else {
        panic!("llama-cpp-sys-2 did not report its backends directory (dynamic-backends off?)");
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("cpu-variants");
    if let Err(e) = offer(&all, &out) {
        panic!(
            "preparing llama.cpp's CPU variants in {}: {e}",
            out.display()
        );
    }
    println!(
        "cargo:rustc-env=MODELD_BUILD_LLAMA_CPU_VARIANTS_DIR={}",
        out.display()
    );
    println!(
        "cargo:rustc-env=MODELD_BUILD_LLAMA_ALL_CPU_VARIANTS_DIR={}",
        all.display()
    );
    // llama.cpp's shared libraries (libllama.so.0, libggml.so.0...) sit in the sys
    // crate's out/lib; the links cargo makes beside the binaries miss their sonames.
    if let Some(out) = all.parent() {
        for lib in ["lib", "lib64"] {
            if out.join(lib).is_dir() {
                println!("cargo:lib_dir={}", out.join(lib).display());
                break;
            }
        }
    }
}

fn offer(all: &Path, out: &Path) -> std::io::Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::create_dir_all(out)?;
    let mut offered = 0;
    for entry in std::fs::read_dir(all)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let Some(variant) = variant_of(&name) else {
            continue;
        };
        if WITHHELD.contains(&variant) {
            continue;
        }
        // A copy, not a link: the directory must stay valid if cargo rebuilds
        // llama.cpp in place, and the modules are a few MB each.
        std::fs::copy(&path, out.join(&name))?;
        offered += 1;
    }
    if offered == 0 {
        return Err(std::io::Error::other(format!(
            "no CPU variant modules in {}",
            all.display()
        )));
    }
    Ok(())
}

/// `libggml-cpu-haswell.so` → `haswell`.
fn variant_of(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_prefix("lib").unwrap_or(file_name);
    let stem = stem.strip_prefix("ggml-cpu-")?;
    [".so", ".dylib", ".dll"]
        .iter()
        .find_map(|ext| stem.strip_suffix(ext))
}
