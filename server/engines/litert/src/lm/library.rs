//! LiteRT-LM's C API, opened at run time from `liblitert-lm` (the litert-lm-api wheel
//! ships it): an engine over one `.litertlm` bundle, and sessions that take text and
//! stream text back. Every `unsafe` of this route is here, behind types whose methods
//! are safe.
//!
//! The library ships no header; the signatures are those the wheel's own bindings
//! (`litert_lm/_ffi.py`, 0.18) declare. Compatibility is checked by what the library
//! exports: every entry point called here must resolve, or the runtime is unavailable
//! with the missing name.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_float, c_int, c_void};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::mpsc;

use modeld_engine_core::EngineError;

use crate::dylib::{self, Opened};

/// The environment variable naming the library when no flag does.
pub const LIBRARY_ENV: &str = "LITERT_LM_LIBRARY";

type Handle = *mut c_void;
type Callback = unsafe extern "C" fn(*mut c_void, *mut c_void);

/// `InputDataType::TEXT`.
const INPUT_TEXT: c_int = 0;
/// `LogSeverity::ERROR`: LiteRT-LM warns of every optional section a bundle lacks
/// (vision, audio, a SentencePiece tokenizer) on each load.
const LOG_ERROR: c_int = 4;

/// `SamplerType::TOP_P`: LiteRT-LM 0.18's CPU sampler has no other; greedy is top-p
/// over the single best token.
const SAMPLER_TOP_P: c_int = 2;

crate::dylib::c_api! {
    set_min_log_level: fn(c_int) = "litert_lm_set_min_log_level";
    settings_create: fn(*const c_char, *const c_char, *const c_char, *const c_char) -> Handle = "litert_lm_engine_settings_create";
    settings_delete: fn(Handle) = "litert_lm_engine_settings_delete";
    settings_set_max_num_tokens: fn(Handle, c_int) = "litert_lm_engine_settings_set_max_num_tokens";
    settings_set_num_threads: fn(Handle, c_int) = "litert_lm_engine_settings_set_num_threads";
    settings_set_cache_dir: fn(Handle, *const c_char) = "litert_lm_engine_settings_set_cache_dir";
    engine_create: fn(Handle) -> Handle = "litert_lm_engine_create";
    engine_delete: fn(Handle) = "litert_lm_engine_delete";
    sampler_create: fn(c_int) -> Handle = "litert_lm_sampler_params_create";
    sampler_delete: fn(Handle) = "litert_lm_sampler_params_delete";
    sampler_set_top_k: fn(Handle, c_int) = "litert_lm_sampler_params_set_top_k";
    sampler_set_top_p: fn(Handle, c_float) = "litert_lm_sampler_params_set_top_p";
    sampler_set_temperature: fn(Handle, c_float) = "litert_lm_sampler_params_set_temperature";
    sampler_set_seed: fn(Handle, c_int) = "litert_lm_sampler_params_set_seed";
    session_config_create: fn() -> Handle = "litert_lm_session_config_create";
    session_config_delete: fn(Handle) = "litert_lm_session_config_delete";
    session_config_set_max_output_tokens: fn(Handle, c_int) = "litert_lm_session_config_set_max_output_tokens";
    session_config_set_apply_prompt_template: fn(Handle, bool) = "litert_lm_session_config_set_apply_prompt_template";
    session_config_set_sampler_params: fn(Handle, Handle) = "litert_lm_session_config_set_sampler_params";
    create_session: fn(Handle, Handle) -> Handle = "litert_lm_engine_create_session";
    session_delete: fn(Handle) = "litert_lm_session_delete";
    session_cancel: fn(Handle) = "litert_lm_session_cancel_process";
    input_create: fn(c_int, *const c_void, usize) -> Handle = "litert_lm_input_data_create";
    input_delete: fn(Handle) = "litert_lm_input_data_delete";
    run_prefill: fn(Handle, *const Handle, usize) -> c_int = "litert_lm_session_run_prefill";
    run_decode_async: fn(Handle, Callback, *mut c_void) -> c_int = "litert_lm_session_run_decode_async";
    chunk_text: fn(Handle) -> *const c_char = "litert_lm_stream_chunk_get_text";
    chunk_is_final: fn(Handle) -> bool = "litert_lm_stream_chunk_is_final";
    chunk_error: fn(Handle) -> *const c_char = "litert_lm_stream_chunk_get_error";
}

pub(crate) type Library = dylib::Library<Api>;

static OPENED: Opened<Api> = Opened::new();

/// Where the library is: the configured path, else `LITERT_LM_LIBRARY`.
pub fn configured_path(configured: Option<&Path>) -> Option<PathBuf> {
    dylib::configured_path(configured, LIBRARY_ENV)
}

pub fn open(configured: Option<&Path>) -> Result<Arc<Library>, EngineError> {
    let path = configured_path(configured).ok_or_else(|| {
        EngineError::Unavailable(format!(
            "the LiteRT-LM library is not configured: set --litert-lm-library (or \
             {LIBRARY_ENV}) to liblitert-lm.so from the litert-lm-api 0.18 wheel \
             (scripts/setup --tests fetches it)"
        ))
    })?;
    let lib = OPENED.get_or_open(
        &path,
        "LiteRT-LM",
        "a LiteRT-LM 0.18 C API library",
        Api::resolve,
    )?;
    unsafe { (lib.api.set_min_log_level)(LOG_ERROR) };
    Ok(lib)
}

fn c_path(path: &Path, what: &str) -> Result<CString, EngineError> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| EngineError::Load(format!("the {what} path {} holds a NUL", path.display())))
}

/// What the library owns and this module frees: a handle and its destructor.
struct Owned {
    ptr: NonNull<c_void>,
    delete: unsafe extern "C" fn(Handle),
}

impl Owned {
    fn new(ptr: Handle, delete: unsafe extern "C" fn(Handle)) -> Option<Owned> {
        NonNull::new(ptr).map(|ptr| Owned { ptr, delete })
    }
    fn get(&self) -> Handle {
        self.ptr.as_ptr()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        unsafe { (self.delete)(self.ptr.as_ptr()) }
    }
}

/// One bundle, loaded: LiteRT-LM's engine. Owned by the model's worker thread.
pub struct Engine {
    lib: Arc<Library>,
    handle: Owned,
}

// The engine is created, used and dropped by one thread at a time; LiteRT-LM's own
// threads are its business.
unsafe impl Send for Engine {}

impl Engine {
    /// Loads `bundle` on the CPU. `cache_dir` must be writable: LiteRT-LM keeps the
    /// weights XNNPACK packed there and maps them, instead of holding a packed copy in
    /// private memory (2.8 times less memory for the 135M test model).
    pub fn create(
        lib: Arc<Library>,
        bundle: &Path,
        cache_dir: &Path,
        threads: u32,
        max_tokens: u32,
    ) -> Result<Engine, EngineError> {
        let model = c_path(bundle, "model")?;
        let cache = c_path(cache_dir, "cache")?;
        let api = &lib.api;
        let settings = Owned::new(
            unsafe {
                (api.settings_create)(
                    model.as_ptr(),
                    c"cpu".as_ptr(),
                    std::ptr::null(),
                    std::ptr::null(),
                )
            },
            api.settings_delete,
        )
        .ok_or_else(|| {
            EngineError::Load(format!(
                "LiteRT-LM refused the settings for {}",
                bundle.display()
            ))
        })?;
        unsafe {
            (api.settings_set_cache_dir)(settings.get(), cache.as_ptr());
            (api.settings_set_max_num_tokens)(settings.get(), clamp_int(max_tokens));
            if threads > 0 {
                (api.settings_set_num_threads)(settings.get(), clamp_int(threads));
            }
        }
        let handle = Owned::new(
            unsafe { (api.engine_create)(settings.get()) },
            api.engine_delete,
        )
        .ok_or_else(|| {
            EngineError::Load(format!(
                "LiteRT-LM could not create an engine for {} (its log above says why)",
                bundle.display()
            ))
        })?;
        Ok(Engine {
            lib: lib.clone(),
            handle,
        })
    }

    /// A fresh session: its own KV cache, no prompt template (the agent renders chats).
    pub fn session(&self, config: &SessionConfig) -> Result<Session<'_>, EngineError> {
        let api = &self.lib.api;
        let failed = |what: &str| EngineError::Inference(format!("LiteRT-LM: {what}"));
        let session_config = Owned::new(
            unsafe { (api.session_config_create)() },
            api.session_config_delete,
        )
        .ok_or_else(|| failed("no session config"))?;
        let sampler = Owned::new(
            unsafe { (api.sampler_create)(SAMPLER_TOP_P) },
            api.sampler_delete,
        )
        .ok_or_else(|| failed("no sampler params"))?;
        unsafe {
            (api.sampler_set_top_k)(sampler.get(), clamp_int(config.top_k));
            (api.sampler_set_top_p)(sampler.get(), config.top_p);
            (api.sampler_set_temperature)(sampler.get(), config.temperature);
            (api.sampler_set_seed)(sampler.get(), config.seed as c_int);
            (api.session_config_set_sampler_params)(session_config.get(), sampler.get());
            (api.session_config_set_apply_prompt_template)(session_config.get(), false);
            (api.session_config_set_max_output_tokens)(
                session_config.get(),
                clamp_int(config.max_output_tokens),
            );
        }
        let handle = Owned::new(
            unsafe { (api.create_session)(self.handle.get(), session_config.get()) },
            api.session_delete,
        )
        .ok_or_else(|| failed("the engine refused a new session"))?;
        Ok(Session {
            api,
            handle: Some(handle),
            stream: None,
        })
    }
}

fn clamp_int(n: u32) -> c_int {
    c_int::try_from(n).unwrap_or(c_int::MAX)
}

/// How a session samples (top-p, see [`SAMPLER_TOP_P`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    pub top_k: u32,
    pub top_p: f32,
    pub temperature: f32,
    pub seed: u32,
    pub max_output_tokens: u32,
}

/// What the decoding thread hands over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// The text of one decoded token (may be empty).
    Text(String),
    /// Decoding ended; `Some` when LiteRT-LM said why (an error, a cancellation, the
    /// context filled).
    End(Option<String>),
}

/// One generation's state in LiteRT-LM.
pub struct Session<'e> {
    api: &'e Api,
    /// Deleted before `stream`: LiteRT-LM's decode thread may hold the stream's address
    /// until the session is gone.
    handle: Option<Owned>,
    stream: Option<Box<Stream>>,
}

impl Session<'_> {
    pub fn prefill(&mut self, text: &str) -> Result<(), EngineError> {
        let handle = self.handle()?;
        let input = Owned::new(
            unsafe { (self.api.input_create)(INPUT_TEXT, text.as_ptr().cast(), text.len()) },
            self.api.input_delete,
        )
        .ok_or_else(|| EngineError::Inference("LiteRT-LM refused the prompt's text".into()))?;
        let inputs = [input.get()];
        match unsafe { (self.api.run_prefill)(handle, inputs.as_ptr(), inputs.len()) } {
            0 => Ok(()),
            status => Err(EngineError::Inference(format!(
                "LiteRT-LM's prefill failed (status {status}; its log above says why)"
            ))),
        }
    }

    /// Starts decoding on LiteRT-LM's thread; each token's text arrives on the
    /// returned channel, then one [`Chunk::End`].
    pub fn decode(&mut self) -> Result<mpsc::Receiver<Chunk>, EngineError> {
        let handle = self.handle()?;
        let (tx, rx) = mpsc::channel();
        let stream = self.stream.insert(Box::new(Stream {
            chunk_text: self.api.chunk_text,
            chunk_is_final: self.api.chunk_is_final,
            chunk_error: self.api.chunk_error,
            sender: tx,
        }));
        let data: *mut Stream = &mut **stream;
        match unsafe { (self.api.run_decode_async)(handle, on_chunk, data.cast()) } {
            0 => Ok(rx),
            status => Err(EngineError::Inference(format!(
                "LiteRT-LM's decode failed to start (status {status})"
            ))),
        }
    }

    /// Asks the decoding thread to stop; it ends with a [`Chunk::End`].
    pub fn cancel(&self) {
        if let Some(h) = &self.handle {
            unsafe { (self.api.session_cancel)(h.get()) }
        }
    }

    fn handle(&self) -> Result<Handle, EngineError> {
        self.handle
            .as_ref()
            .map(Owned::get)
            .ok_or_else(|| EngineError::Inference("the LiteRT-LM session is closed".into()))
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            unsafe { (self.api.session_cancel)(h.get()) }
        }
        self.handle = None;
        self.stream = None;
    }
}

/// What the stream callback needs, kept at one address until the session is gone.
struct Stream {
    chunk_text: unsafe extern "C" fn(Handle) -> *const c_char,
    chunk_is_final: unsafe extern "C" fn(Handle) -> bool,
    chunk_error: unsafe extern "C" fn(Handle) -> *const c_char,
    sender: mpsc::Sender<Chunk>,
}

/// LiteRT-LM's stream callback, on its decoding thread: copies the chunk out and
/// sends it. Never unwinds into C.
unsafe extern "C" fn on_chunk(data: *mut c_void, chunk: *mut c_void) {
    let Some(stream) = (unsafe { data.cast::<Stream>().as_ref() }) else {
        return;
    };
    let text_of = |p: *const c_char| {
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let error = text_of(unsafe { (stream.chunk_error)(chunk) });
    let text = text_of(unsafe { (stream.chunk_text)(chunk) });
    let last = unsafe { (stream.chunk_is_final)(chunk) };
    if let Some(text) = text.filter(|t| !t.is_empty()) {
        let _ = stream.sender.send(Chunk::Text(text));
    }
    if error.is_some() || last {
        let _ = stream.sender.send(Chunk::End(error));
    }
}
