//! NVRTC (the CUDA runtime compiler) loaded at run time with libloading, so nothing in the
//! build needs CUDA. Used by the tests here to turn CUDA C++ into PTX, and by the CUDA
//! backend. NVRTC 12 or 13, found by `cudalib` (its builtins library opened first from the same
//! folder, so no LD_LIBRARY_PATH is needed).

use crate::cudalib;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;

type Prog = *mut c_void;
type Res = c_int;

/// An NVRTC failure; `Compile` carries the program log.
#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error(transparent)]
    NotFound(#[from] cudalib::NotFound),
    #[error("NVRTC {path}: {reason}")]
    Symbol { path: String, reason: String },
    #[error("NVRTC compile of {name} failed:\n{log}")]
    Compile { name: String, log: String },
    #[error("NVRTC call {call} failed with code {code}")]
    Call { call: &'static str, code: i32 },
}

/// A loaded libnvrtc.
pub struct Nvrtc {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Res,
    num_archs: Option<unsafe extern "C" fn(*mut c_int) -> Res>,
    archs: Option<unsafe extern "C" fn(*mut c_int) -> Res>,
    create: unsafe extern "C" fn(*mut Prog, *const c_char, *const c_char, c_int, *const *const c_char, *const *const c_char) -> Res,
    compile: unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> Res,
    ptx_size: unsafe extern "C" fn(Prog, *mut usize) -> Res,
    ptx: unsafe extern "C" fn(Prog, *mut c_char) -> Res,
    cubin_size: unsafe extern "C" fn(Prog, *mut usize) -> Res,
    cubin: unsafe extern "C" fn(Prog, *mut c_char) -> Res,
    log_size: unsafe extern "C" fn(Prog, *mut usize) -> Res,
    log: unsafe extern "C" fn(Prog, *mut c_char) -> Res,
    destroy: unsafe extern "C" fn(*mut Prog) -> Res,
    /// The library (last: the function pointers above point into it).
    lib: cudalib::Loaded,
}

/// Include directories for CUDA headers: $IPO_CUDA_INCLUDE (colon separated), else the
/// runtime and nvcc wheel include dirs under <workspace>/.deps/cuda when present.
pub fn include_dirs() -> Vec<String> {
    if let Ok(s) = std::env::var("IPO_CUDA_INCLUDE") {
        let v: Vec<String> = s.split(':').filter(|x| !x.is_empty()).map(String::from).collect();
        if !v.is_empty() {
            return v;
        }
    }
    let ws = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.deps/cuda/nvidia");
    let v: Vec<String> = ["cuda_runtime/include", "cuda_nvcc/include"]
        .iter()
        .map(|d| ws.join(d))
        .filter(|p| p.is_dir())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if !v.is_empty() {
        return v;
    }
    cudalib::include_dir().map(|d| vec![d.to_string_lossy().into_owned()]).unwrap_or_default()
}

impl Nvrtc {
    /// Loads libnvrtc (see `cudalib` for where it looks).
    pub fn load() -> Result<Nvrtc, NvrtcError> {
        Self::from_lib(cudalib::load(&cudalib::NVRTC)?)
    }

    fn from_lib(lib: cudalib::Loaded) -> Result<Nvrtc, NvrtcError> {
        macro_rules! sym {
            ($n:literal) => {
                unsafe {
                    *lib.lib.get($n).map_err(|e| NvrtcError::Symbol { path: lib.path.display().to_string(), reason: e.to_string() })?
                }
            };
        }
        macro_rules! opt_sym {
            ($n:literal) => {
                unsafe { lib.lib.get($n).ok().map(|s| *s) }
            };
        }
        Ok(Nvrtc {
            version: sym!(b"nvrtcVersion\0"),
            num_archs: opt_sym!(b"nvrtcGetNumSupportedArchs\0"),
            archs: opt_sym!(b"nvrtcGetSupportedArchs\0"),
            create: sym!(b"nvrtcCreateProgram\0"),
            compile: sym!(b"nvrtcCompileProgram\0"),
            ptx_size: sym!(b"nvrtcGetPTXSize\0"),
            ptx: sym!(b"nvrtcGetPTX\0"),
            cubin_size: sym!(b"nvrtcGetCUBINSize\0"),
            cubin: sym!(b"nvrtcGetCUBIN\0"),
            log_size: sym!(b"nvrtcGetProgramLogSize\0"),
            log: sym!(b"nvrtcGetProgramLog\0"),
            destroy: sym!(b"nvrtcDestroyProgram\0"),
            lib,
        })
    }

    /// The library file and how it was found.
    pub fn library(&self) -> &cudalib::Loaded {
        &self.lib
    }

    /// The real architectures this NVRTC compiles for, as numbers (80 for sm_80), ascending;
    /// empty when the library does not say (NVRTC before 11.2).
    pub fn supported_archs(&self) -> Result<Vec<i32>, NvrtcError> {
        let (Some(num), Some(archs)) = (self.num_archs, self.archs) else { return Ok(Vec::new()) };
        let mut n = 0;
        check("nvrtcGetNumSupportedArchs", unsafe { num(&mut n) })?;
        let mut v = vec![0; n.max(0) as usize];
        check("nvrtcGetSupportedArchs", unsafe { archs(v.as_mut_ptr()) })?;
        v.sort();
        Ok(v)
    }

    /// (major, minor) of the loaded NVRTC.
    pub fn version(&self) -> Result<(i32, i32), NvrtcError> {
        let (mut a, mut b) = (0, 0);
        check("nvrtcVersion", unsafe { (self.version)(&mut a, &mut b) })?;
        Ok((a, b))
    }

    /// Compile CUDA C++ `src` (named `name` in messages) with NVRTC `options`
    /// (e.g. "--gpu-architecture=compute_80", "-I<dir>"); returns the PTX text.
    pub fn compile(&self, name: &str, src: &str, options: &[String]) -> Result<String, NvrtcError> {
        self.with_program(name, src, options, |p| self.get_ptx(p))
    }

    /// Compile `src` for a real architecture (`options` must contain
    /// `--gpu-architecture=sm_XY`) to a CUBIN; returns the CUBIN and the program log, which
    /// NVRTC fills on success too (e.g. the ptxas resource report with `-Xptxas -v`).
    pub fn compile_cubin(&self, name: &str, src: &str, options: &[String]) -> Result<(Vec<u8>, String), NvrtcError> {
        self.with_program(name, src, options, |p| {
            let mut n = 0usize;
            check("nvrtcGetCUBINSize", unsafe { (self.cubin_size)(p, &mut n) })?;
            if n == 0 {
                // compute_XY targets produce no CUBIN.
                return Err(NvrtcError::Call { call: "nvrtcGetCUBINSize (0 bytes: a compute_XY target?)", code: 0 });
            }
            let mut buf = vec![0u8; n];
            check("nvrtcGetCUBIN", unsafe { (self.cubin)(p, buf.as_mut_ptr() as *mut c_char) })?;
            Ok((buf, self.get_log(p)?))
        })
    }

    /// Creates and compiles a program, runs `out` on it when the compile succeeded (the
    /// log is the error otherwise), and destroys it.
    fn with_program<T>(&self, name: &str, src: &str, options: &[String], out: impl FnOnce(Prog) -> Result<T, NvrtcError>) -> Result<T, NvrtcError> {
        let csrc = CString::new(src).expect("source contains NUL");
        let cname = CString::new(name).expect("name contains NUL");
        let copts: Vec<CString> = options.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
        let ptrs: Vec<*const c_char> = copts.iter().map(|c| c.as_ptr()).collect();
        let mut prog: Prog = std::ptr::null_mut();
        check("nvrtcCreateProgram", unsafe {
            (self.create)(&mut prog, csrc.as_ptr(), cname.as_ptr(), 0, std::ptr::null(), std::ptr::null())
        })?;
        let res = unsafe { (self.compile)(prog, ptrs.len() as c_int, ptrs.as_ptr()) };
        let r = if res != 0 {
            let log = self.get_log(prog).unwrap_or_else(|e| e.to_string());
            Err(NvrtcError::Compile { name: name.to_string(), log })
        } else {
            out(prog)
        };
        unsafe { (self.destroy)(&mut prog) };
        r
    }

    fn get_log(&self, prog: Prog) -> Result<String, NvrtcError> {
        let mut n = 0usize;
        check("nvrtcGetProgramLogSize", unsafe { (self.log_size)(prog, &mut n) })?;
        let mut buf = vec![0u8; n.max(1)];
        check("nvrtcGetProgramLog", unsafe { (self.log)(prog, buf.as_mut_ptr() as *mut c_char) })?;
        Ok(cstr(&buf))
    }

    fn get_ptx(&self, prog: Prog) -> Result<String, NvrtcError> {
        let mut n = 0usize;
        check("nvrtcGetPTXSize", unsafe { (self.ptx_size)(prog, &mut n) })?;
        let mut buf = vec![0u8; n.max(1)];
        check("nvrtcGetPTX", unsafe { (self.ptx)(prog, buf.as_mut_ptr() as *mut c_char) })?;
        Ok(cstr(&buf))
    }
}

fn cstr(buf: &[u8]) -> String {
    CStr::from_bytes_until_nul(buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(buf).into_owned())
}

fn check(call: &'static str, code: Res) -> Result<(), NvrtcError> {
    if code == 0 {
        Ok(())
    } else {
        Err(NvrtcError::Call { call, code })
    }
}
