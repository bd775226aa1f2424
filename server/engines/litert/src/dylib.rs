//! Opening a runtime's C library at run time: where it is, and opening it once per
//! path. LiteRT and LiteRT-LM register global state when loaded (accelerators, thread
//! pools), so a library once opened stays for the life of the process.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use modeld_engine_core::EngineError;

/// Declares `struct Api`, one field per C entry point, and `Api::resolve`, which
/// resolves them all from a library or names the first that is missing.
macro_rules! c_api {
    ($($field:ident: fn($($arg:ty),*) $(-> $ret:ty)? = $symbol:literal;)*) => {
        pub struct Api {
            $($field: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
        }

        impl Api {
            fn resolve(lib: &libloading::Library) -> Result<Api, &'static str> {
                Ok(Api {
                    $($field: unsafe {
                        *lib.get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>($symbol)
                            .map_err(|_| $symbol)?
                    },)*
                })
            }
        }
    };
}
pub(crate) use c_api;

/// Where a library is: the configured path, else the environment variable `env`.
pub fn configured_path(configured: Option<&Path>, env: &str) -> Option<PathBuf> {
    configured.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(env)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// An opened C library and its resolved entry points (`A`, an `Api` of [`c_api!`]).
pub struct Library<A> {
    pub api: A,
    path: PathBuf,
    _lib: libloading::Library,
}

impl<A> std::fmt::Debug for Library<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library").field("path", &self.path).finish()
    }
}

/// The libraries of one kind opened so far, by path.
pub struct Opened<A>(Mutex<Option<HashMap<PathBuf, Arc<Library<A>>>>>);

impl<A> Opened<A> {
    pub const fn new() -> Opened<A> {
        Opened(Mutex::new(None))
    }

    /// The library at `path`, its entry points resolved by `resolve` the first time it
    /// is opened. `what` names the library in errors ("LiteRT"), `speaks` the API a
    /// library lacking an entry point is not ("a LiteRT 2.x C API library").
    pub fn get_or_open(
        &self,
        path: &Path,
        what: &str,
        speaks: &str,
        resolve: impl FnOnce(&libloading::Library) -> Result<A, &'static str>,
    ) -> Result<Arc<Library<A>>, EngineError> {
        if !path.is_file() {
            return Err(EngineError::Unavailable(format!(
                "the {what} library {} does not exist",
                path.display()
            )));
        }
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let opened = guard.get_or_insert_with(HashMap::new);
        if let Some(lib) = opened.get(path) {
            return Ok(lib.clone());
        }
        // Loading runs the library's initializers: the path is the operator's, named by
        // a flag or the environment, never by a request.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
            EngineError::Unavailable(format!(
                "cannot open the {what} library {}: {e}",
                path.display()
            ))
        })?;
        let api = resolve(&lib).map_err(|missing| {
            EngineError::Unavailable(format!(
                "{} is not {speaks}: it does not export {missing}",
                path.display()
            ))
        })?;
        let library = Arc::new(Library {
            api,
            path: path.to_path_buf(),
            _lib: lib,
        });
        tracing::info!(library = %path.display(), "{what} loaded");
        opened.insert(path.to_path_buf(), library.clone());
        Ok(library)
    }
}
