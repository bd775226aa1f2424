//! LiteRT's C API, opened at run time from `libLiteRt` (the ai-edge-litert wheel ships
//! it): the library, a compiled model, and tensor buffers over memory this module
//! owns. Every `unsafe` of the engine is here, behind types whose methods are safe.
//!
//! The library exports no version function, so compatibility is checked by what it
//! exports: every entry point this module calls must resolve, or the runtime is
//! unavailable with the missing name. The signatures below are those of LiteRT's
//! `litert/c` headers as of the 2.3 wheel (a model is read within an environment
//! since 2.x); the one structure passed in (`LiteRtRankedTensorType`) is one the
//! header declares ABI-stable.
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use modeld_engine_core::EngineError;

use crate::dylib::{self, Opened};

/// The environment variable naming the library when no flag does.
pub const LIBRARY_ENV: &str = "LITERT_LIBRARY";

type Handle = *mut c_void;
type Status = c_int;

/// LiteRT's `LITERT_HOST_MEMORY_BUFFER_ALIGNMENT`.
const HOST_ALIGNMENT: usize = 64;
/// `LITERT_TENSOR_MAX_RANK`.
const MAX_RANK: usize = 8;
/// `kLiteRtHwAcceleratorCpu`.
const ACCELERATOR_CPU: c_int = 1;
/// `kLiteRtStatusOk`.
const OK: Status = 0;

/// `LiteRtLayout`: `rank:7` and `has_strides:1` share one `unsigned int`.
#[repr(C)]
struct RawLayout {
    rank_and_strides: u32,
    dimensions: [i32; MAX_RANK],
    strides: [u32; MAX_RANK],
}

/// `LiteRtRankedTensorType`.
#[repr(C)]
struct RawRankedTensorType {
    element_type: c_int,
    layout: RawLayout,
}

/// The element types this engine binds, by `LiteRtElementType` (TfLiteType) number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Element {
    Float32,
    Int32,
}

impl Element {
    fn code(self) -> c_int {
        match self {
            Element::Float32 => 1,
            Element::Int32 => 2,
        }
    }
}

crate::dylib::c_api! {
    create_environment: fn(c_int, *const c_void, *mut Handle) -> Status = "LiteRtCreateEnvironment";
    destroy_environment: fn(Handle) = "LiteRtDestroyEnvironment";
    create_model_from_file: fn(Handle, *const c_char, *mut Handle) -> Status = "LiteRtCreateModelFromFile";
    destroy_model: fn(Handle) = "LiteRtDestroyModel";
    num_model_signatures: fn(Handle, *mut usize) -> Status = "LiteRtGetNumModelSignatures";
    model_signature: fn(Handle, usize, *mut Handle) -> Status = "LiteRtGetModelSignature";
    signature_key: fn(Handle, *mut *const c_char) -> Status = "LiteRtGetSignatureKey";
    num_signature_inputs: fn(Handle, *mut usize) -> Status = "LiteRtGetNumSignatureInputs";
    signature_input_name: fn(Handle, usize, *mut *const c_char) -> Status = "LiteRtGetSignatureInputName";
    num_signature_outputs: fn(Handle, *mut usize) -> Status = "LiteRtGetNumSignatureOutputs";
    signature_output_name: fn(Handle, usize, *mut *const c_char) -> Status = "LiteRtGetSignatureOutputName";
    create_options: fn(*mut Handle) -> Status = "LiteRtCreateOptions";
    destroy_options: fn(Handle) = "LiteRtDestroyOptions";
    set_accelerators: fn(Handle, c_int) -> Status = "LiteRtSetOptionsHardwareAccelerators";
    create_opaque_options: fn(*const c_char, *mut c_void, Option<unsafe extern "C" fn(*mut c_void)>, *mut Handle) -> Status = "LiteRtCreateOpaqueOptions";
    destroy_opaque_options: fn(Handle) = "LiteRtDestroyOpaqueOptions";
    add_opaque_options: fn(Handle, Handle) -> Status = "LiteRtAddOpaqueOptions";
    create_compiled_model: fn(Handle, Handle, Handle, *mut Handle) -> Status = "LiteRtCreateCompiledModel";
    destroy_compiled_model: fn(Handle) = "LiteRtDestroyCompiledModel";
    run_compiled_model: fn(Handle, usize, usize, *mut Handle, usize, *mut Handle) -> Status = "LiteRtRunCompiledModel";
    create_host_buffer: fn(*const RawRankedTensorType, *mut c_void, usize, Option<unsafe extern "C" fn(*mut c_void)>, *mut Handle) -> Status = "LiteRtCreateTensorBufferFromHostMemory";
    destroy_tensor_buffer: fn(Handle) = "LiteRtDestroyTensorBuffer";
}

pub(crate) type Library = dylib::Library<Api>;

static OPENED: Opened<Api> = Opened::new();

/// Where the library is: the configured path, else `LITERT_LIBRARY`.
pub fn configured_path(configured: Option<&Path>) -> Option<PathBuf> {
    dylib::configured_path(configured, LIBRARY_ENV)
}

pub fn open(configured: Option<&Path>) -> Result<Arc<Library>, EngineError> {
    let path = configured_path(configured).ok_or_else(|| {
        EngineError::Unavailable(format!(
            "the LiteRT library is not configured: set --litert-library (or {LIBRARY_ENV}) to \
             libLiteRt.so from the ai-edge-litert 2.3 wheel (scripts/setup --tests fetches it)"
        ))
    })?;
    OPENED.get_or_open(&path, "LiteRT", "a LiteRT 2.x C API library", Api::resolve)
}

/// A LiteRT status as a sentence.
fn describe(status: Status) -> String {
    let name = match status {
        1 => "invalid argument",
        2 => "memory allocation failure",
        3 => "runtime failure",
        4 => "missing input tensor",
        5 => "unsupported",
        6 => "not found",
        7 => "timeout expired",
        8 => "wrong version",
        9 => "unknown error",
        10 => "already exists",
        100 => "cancelled",
        500 => "file I/O error",
        501 => "invalid flatbuffer",
        502 => "dynamic loading failed",
        503 => "serialization failed",
        504 => "compilation failed",
        1000 => "index out of bounds",
        1001 => "invalid IR type",
        1002 => "invalid graph invariant",
        4000 => "unsupported runtime version",
        5001 => "shape inference failed",
        _ => "error",
    };
    format!("{name} (LiteRT status {status})")
}

fn check(status: Status, what: &str, fail: fn(String) -> EngineError) -> Result<(), EngineError> {
    if status == OK {
        Ok(())
    } else {
        Err(fail(format!(
            "LiteRT could not {what}: {}",
            describe(status)
        )))
    }
}

fn c_text(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // LiteRT returns names it owns, NUL-terminated, valid while the model lives.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// A signature as LiteRT orders its inputs and outputs (the order `run` binds).
#[derive(Debug, Clone)]
pub struct Signature {
    pub key: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// A model compiled for the CPU, with its signatures.
pub struct CompiledModel {
    lib: Arc<Library>,
    env: Handle,
    model: Handle,
    compiled: Handle,
    pub signatures: Vec<Signature>,
    /// XNNPACK's packed weights; closed after the compiled model is destroyed.
    weight_cache: Option<OwnedFd>,
}

// The handles are used by one thread at a time (`run` takes `&mut self`); LiteRT's
// objects are not tied to the thread that made them.
unsafe impl Send for CompiledModel {}

impl std::fmt::Debug for CompiledModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledModel")
            .field("signatures", &self.signatures)
            .finish()
    }
}

/// A weight cache for XNNPACK. XNNPACK packs float weights into its own layout once
/// per signature's subgraph: without a cache, the two signatures of a 540 MB decoder
/// held 1.1 GB of packed copies. With one, it packs once into the cache and every
/// subgraph maps it. The cache is an anonymous memory file because an engine process
/// may not write files.
#[cfg(target_os = "linux")]
fn weight_cache() -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    let fd = unsafe { libc::memfd_create(c"xnnpack-weights".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "no memory file for XNNPACK's weight cache: each signature packs its own weights"
        );
        return None;
    }
    // A descriptor memfd_create just returned, owned by nothing else.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(not(target_os = "linux"))]
fn weight_cache() -> Option<OwnedFd> {
    None
}

unsafe extern "C" fn drop_c_string(payload: *mut c_void) {
    if !payload.is_null() {
        drop(unsafe { CString::from_raw(payload.cast()) });
    }
}

impl CompiledModel {
    /// Loads and compiles the (already checked) file at `path` for the CPU with
    /// `threads` XNNPACK threads (0 = LiteRT's choice).
    pub fn open(
        lib: Arc<Library>,
        path: &Path,
        threads: u32,
    ) -> Result<CompiledModel, EngineError> {
        let api = &lib.api;
        let load = EngineError::Load;
        let path_c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
            EngineError::InvalidRequest(format!("{}: the path holds a NUL byte", path.display()))
        })?;
        let mut model = CompiledModel {
            env: std::ptr::null_mut(),
            model: std::ptr::null_mut(),
            compiled: std::ptr::null_mut(),
            signatures: Vec::new(),
            lib: lib.clone(),
            weight_cache: weight_cache(),
        };
        unsafe {
            check(
                (api.create_environment)(0, std::ptr::null(), &mut model.env),
                "create an environment",
                load,
            )?;
            check(
                (api.create_model_from_file)(model.env, path_c.as_ptr(), &mut model.model),
                "read the model",
                EngineError::InvalidModel,
            )?;
            model.signatures = model.read_signatures()?;

            let mut options: Handle = std::ptr::null_mut();
            check((api.create_options)(&mut options), "create options", load)?;
            let configured = model.configure(options, threads);
            let compiled = configured.and_then(|()| {
                check(
                    (api.create_compiled_model)(
                        model.env,
                        model.model,
                        options,
                        &mut model.compiled,
                    ),
                    "compile the model for the CPU",
                    load,
                )
            });
            (api.destroy_options)(options);
            compiled?;
        }
        Ok(model)
    }

    /// CPU only, with the thread count and the weight cache as XNNPACK's options
    /// payload (TOML text under the identifier "xnnpack", as LiteRT's own CPU options
    /// serialize it).
    unsafe fn configure(&self, options: Handle, threads: u32) -> Result<(), EngineError> {
        let api = &self.lib.api;
        let load = EngineError::Load;
        let mut toml = String::new();
        if threads > 0 {
            toml.push_str(&format!("num_threads = {threads}\n"));
        }
        if let Some(fd) = &self.weight_cache {
            // By path: XNNPACK closes a descriptor it is given, which this process
            // still owns; through the path it opens (and closes) its own.
            use std::os::fd::AsRawFd;
            toml.push_str(&format!(
                "weight_cache_file_path = \"/proc/self/fd/{}\"\n",
                fd.as_raw_fd()
            ));
        }
        unsafe {
            check(
                (api.set_accelerators)(options, ACCELERATOR_CPU),
                "select the CPU",
                load,
            )?;
            if toml.is_empty() {
                return Ok(());
            }
            let payload = CString::new(toml)
                .map_err(|_| EngineError::Load("thread option".into()))?
                .into_raw();
            let mut opaque: Handle = std::ptr::null_mut();
            let status = (api.create_opaque_options)(
                c"xnnpack".as_ptr(),
                payload.cast(),
                Some(drop_c_string),
                &mut opaque,
            );
            if status != OK {
                drop(CString::from_raw(payload));
                return check(status, "set the CPU threads", load);
            }
            let status = (api.add_opaque_options)(options, opaque);
            if status != OK {
                (api.destroy_opaque_options)(opaque);
            }
            check(status, "set the CPU threads", load)
        }
    }

    unsafe fn read_signatures(&self) -> Result<Vec<Signature>, EngineError> {
        let api = &self.lib.api;
        let load = EngineError::Load;
        let mut count = 0usize;
        unsafe {
            check(
                (api.num_model_signatures)(self.model, &mut count),
                "list signatures",
                load,
            )?;
            let mut out = Vec::with_capacity(count);
            for i in 0..count {
                let mut sig: Handle = std::ptr::null_mut();
                check(
                    (api.model_signature)(self.model, i, &mut sig),
                    "read a signature",
                    load,
                )?;
                let mut key: *const c_char = std::ptr::null();
                check(
                    (api.signature_key)(sig, &mut key),
                    "read a signature key",
                    load,
                )?;
                let names =
                    |count_fn: unsafe extern "C" fn(Handle, *mut usize) -> Status,
                     name_fn: unsafe extern "C" fn(Handle, usize, *mut *const c_char) -> Status|
                     -> Result<Vec<String>, EngineError> {
                        let mut n = 0usize;
                        check(count_fn(sig, &mut n), "count signature tensors", load)?;
                        (0..n)
                            .map(|j| {
                                let mut name: *const c_char = std::ptr::null();
                                check(name_fn(sig, j, &mut name), "name a signature tensor", load)?;
                                Ok(c_text(name))
                            })
                            .collect()
                    };
                out.push(Signature {
                    key: c_text(key),
                    inputs: names(api.num_signature_inputs, api.signature_input_name)?,
                    outputs: names(api.num_signature_outputs, api.signature_output_name)?,
                });
            }
            Ok(out)
        }
    }

    pub fn library(&self) -> &Arc<Library> {
        &self.lib
    }

    /// Runs signature `index` over buffers in the signature's order. LiteRT writes
    /// the outputs through the buffers' own memory, which no Rust reference covers
    /// while it runs, so one buffer may be both an input and an output (a cache
    /// updated in place).
    pub fn run(
        &mut self,
        index: usize,
        inputs: &[&HostBuffer],
        outputs: &[&HostBuffer],
    ) -> Result<(), EngineError> {
        let sig = self
            .signatures
            .get(index)
            .ok_or_else(|| EngineError::Inference(format!("no signature {index}")))?;
        if inputs.len() != sig.inputs.len() || outputs.len() != sig.outputs.len() {
            return Err(EngineError::Inference(format!(
                "signature {:?} takes {} inputs and {} outputs, given {} and {}",
                sig.key,
                sig.inputs.len(),
                sig.outputs.len(),
                inputs.len(),
                outputs.len()
            )));
        }
        let mut ins: Vec<Handle> = inputs.iter().map(|b| b.handle).collect();
        let mut outs: Vec<Handle> = outputs.iter().map(|b| b.handle).collect();
        let status = unsafe {
            (self.lib.api.run_compiled_model)(
                self.compiled,
                index,
                ins.len(),
                ins.as_mut_ptr(),
                outs.len(),
                outs.as_mut_ptr(),
            )
        };
        check(
            status,
            &format!("run {:?}", sig.key),
            EngineError::Inference,
        )
    }
}

impl Drop for CompiledModel {
    fn drop(&mut self) {
        let api = &self.lib.api;
        unsafe {
            if !self.compiled.is_null() {
                (api.destroy_compiled_model)(self.compiled);
            }
            if !self.model.is_null() {
                (api.destroy_model)(self.model);
            }
            if !self.env.is_null() {
                (api.destroy_environment)(self.env);
            }
        }
    }
}

/// A tensor buffer over memory this type owns, aligned as LiteRT requires, so a
/// cache written by one step is read by the next without a copy.
pub struct HostBuffer {
    lib: Arc<Library>,
    handle: Handle,
    memory: NonNull<u8>,
    layout: Layout,
    elements: usize,
    element: Element,
}

unsafe impl Send for HostBuffer {}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("elements", &self.elements)
            .field("element", &self.element)
            .finish()
    }
}

impl HostBuffer {
    /// A zeroed buffer of `shape` (at most eight dimensions).
    pub fn new(
        lib: &Arc<Library>,
        element: Element,
        shape: &[i32],
    ) -> Result<HostBuffer, EngineError> {
        let fail = |what: String| EngineError::Load(format!("tensor buffer {shape:?}: {what}"));
        if shape.len() > MAX_RANK || shape.iter().any(|d| *d < 0) {
            return Err(fail("not a shape LiteRT binds".into()));
        }
        let elements = shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d as usize))
            .ok_or_else(|| fail("too large".into()))?;
        // f32 and i32 are both four bytes.
        let bytes = elements
            .checked_mul(4)
            .ok_or_else(|| fail("too large".into()))?;
        let layout = Layout::from_size_align(bytes.max(HOST_ALIGNMENT), HOST_ALIGNMENT)
            .map_err(|e| fail(e.to_string()))?;
        let memory = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or_else(|| fail(format!("out of memory for {bytes} bytes")))?;
        let mut dimensions = [0i32; MAX_RANK];
        dimensions[..shape.len()].copy_from_slice(shape);
        let tensor_type = RawRankedTensorType {
            element_type: element.code(),
            layout: RawLayout {
                rank_and_strides: shape.len() as u32,
                dimensions,
                strides: [0; MAX_RANK],
            },
        };
        let mut buffer = HostBuffer {
            lib: lib.clone(),
            handle: std::ptr::null_mut(),
            memory,
            layout,
            elements,
            element,
        };
        let status = unsafe {
            (lib.api.create_host_buffer)(
                &tensor_type,
                memory.as_ptr().cast(),
                bytes,
                None,
                &mut buffer.handle,
            )
        };
        check(status, "create a tensor buffer", EngineError::Load)?;
        Ok(buffer)
    }

    pub fn f32s(&self) -> &[f32] {
        debug_assert_eq!(self.element, Element::Float32);
        // Owned, aligned to 64, `elements` four-byte values, zeroed at creation.
        unsafe { std::slice::from_raw_parts(self.memory.as_ptr().cast(), self.elements) }
    }

    pub fn i32s_mut(&mut self) -> &mut [i32] {
        debug_assert_eq!(self.element, Element::Int32);
        unsafe { std::slice::from_raw_parts_mut(self.memory.as_ptr().cast(), self.elements) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        unsafe {
            if !self.handle.is_null() {
                (self.lib.api.destroy_tensor_buffer)(self.handle);
            }
            std::alloc::dealloc(self.memory.as_ptr(), self.layout);
        }
    }
}
