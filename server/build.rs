//! With llama.cpp's CPU variants, llama.cpp and ggml are shared libraries. A packaged
//! `modeld` carries them beside itself (scripts/package), so the binary looks there
//! first ($ORIGIN); a binary run from the build tree finds them where llama.cpp's
//! build left them, so it runs without LD_LIBRARY_PATH.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_MODELD_ENGINE_LLAMA_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_LLAMA_CPU_VARIANTS").is_none() {
        return;
    }
    let build_tree = std::env::var("DEP_MODELD_ENGINE_LLAMA_LIB_DIR").unwrap_or_default();
    let origin = match std::env::var("CARGO_CFG_TARGET_OS").as_deref() {
        Ok("linux" | "android" | "freebsd") => "$ORIGIN",
        Ok("macos" | "ios") => "@executable_path",
        _ => return,
    };
    // DT_RPATH, not DT_RUNPATH: it also applies to the libraries' own dependencies
    // (libllama → libggml → libggml-base), which RUNPATH would not cover.
    if origin == "$ORIGIN" {
        println!("cargo:rustc-link-arg-bins=-Wl,--disable-new-dtags");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{origin}");
    if !build_tree.is_empty() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{build_tree}");
    }
}
