//! cuBLAS, loaded at run time: only the calls `Cudarc` makes. Our own binding (not cudarc's
//! `cublas` feature, whose search never tries `libcublas.so.13`): the library is found by
//! `ptxsim::cudalib` (CUDA 13 or 12, toolkit or pip wheel; `$IPO_CUBLAS` names a file), with
//! `libcublasLt.so.N` opened first from the same folder. The enum values below are those of
//! cublas_api.h / library_types.h, the same in CUDA 12 and 13.

use ptxsim::cudalib::{self, Spec};
use std::ffi::{c_int, c_longlong, c_void};

pub(crate) type Handle = *mut c_void;
type Status = c_int;

/// cublasOperation_t
pub(crate) const OP_N: c_int = 0;
pub(crate) const OP_T: c_int = 1;
/// cudaDataType
pub(crate) const R_32F: c_int = 0;
pub(crate) const R_16BF: c_int = 14;
/// cublasComputeType_t
const COMPUTE_32F: c_int = 68;
/// cublasGemmAlgo_t
const GEMM_DEFAULT: c_int = -1;

pub(crate) const CUBLAS: Spec = Spec {
    name: "cuBLAS",
    stem: "libcublas",
    env: "IPO_CUBLAS",
    companions: &["libcublasLt.so.{N}"],
    pip_dirs: &["nvidia/cu13/lib", "nvidia/cublas/lib"],
    majors: &ptxsim::cudalib::MAJORS,
};

type SgemmStridedBatched = unsafe extern "C" fn(
    Handle, c_int, c_int, c_int, c_int, c_int, *const f32, *const f32, c_int, c_longlong, *const f32, c_int, c_longlong, *const f32, *mut f32, c_int, c_longlong, c_int,
) -> Status;
type GemmStridedBatchedEx = unsafe extern "C" fn(
    Handle, c_int, c_int, c_int, c_int, c_int, *const c_void, *const c_void, c_int, c_int, c_longlong, *const c_void, c_int, c_int, c_longlong,
    *const c_void, *mut c_void, c_int, c_int, c_longlong, c_int, c_int, c_int,
) -> Status;

/// A loaded libcublas.
pub(crate) struct Cublas {
    create: unsafe extern "C" fn(*mut Handle) -> Status,
    destroy: unsafe extern "C" fn(Handle) -> Status,
    set_stream: unsafe extern "C" fn(Handle, *mut c_void) -> Status,
    set_workspace: unsafe extern "C" fn(Handle, *mut c_void, usize) -> Status,
    sgemm: SgemmStridedBatched,
    gemm_ex: GemmStridedBatchedEx,
    /// The library, kept open (last: the function pointers above point into it).
    _lib: cudalib::Loaded,
}

fn check(call: &str, s: Status) -> Result<(), String> {
    if s == 0 {
        Ok(())
    } else {
        Err(format!("{call} returned cublasStatus_t {s}"))
    }
}

/// One GEMM of `Gemm` (column-major, strided batch) in the types cuBLAS takes.
pub(crate) struct Call {
    pub ta: c_int,
    pub tb: c_int,
    pub m: c_int,
    pub n: c_int,
    pub k: c_int,
    pub a: *const c_void,
    pub lda: c_int,
    pub stride_a: c_longlong,
    pub b: *const c_void,
    pub ldb: c_int,
    pub stride_b: c_longlong,
    pub c: *mut c_void,
    pub ldc: c_int,
    pub stride_c: c_longlong,
    pub batch: c_int,
}

impl Cublas {
    pub(crate) fn load() -> Result<Cublas, String> {
        let lib = cudalib::load(&CUBLAS).map_err(|e| e.to_string())?;
        macro_rules! sym {
            ($n:literal) => {
                unsafe { *lib.lib.get($n).map_err(|e| format!("cuBLAS {}: {e}", lib.path.display()))? }
            };
        }
        Ok(Cublas {
            create: sym!(b"cublasCreate_v2\0"),
            destroy: sym!(b"cublasDestroy_v2\0"),
            set_stream: sym!(b"cublasSetStream_v2\0"),
            set_workspace: sym!(b"cublasSetWorkspace_v2\0"),
            sgemm: sym!(b"cublasSgemmStridedBatched\0"),
            gemm_ex: sym!(b"cublasGemmStridedBatchedEx\0"),
            _lib: lib,
        })
    }

    /// A handle (needs a current CUDA context).
    pub(crate) fn create(&self) -> Result<Handle, String> {
        let mut h: Handle = std::ptr::null_mut();
        check("cublasCreate_v2", unsafe { (self.create)(&mut h) })?;
        Ok(h)
    }

    pub(crate) fn destroy(&self, h: Handle) {
        unsafe { (self.destroy)(h) };
    }

    pub(crate) fn set_stream(&self, h: Handle, stream: *mut c_void) -> Result<(), String> {
        check("cublasSetStream_v2", unsafe { (self.set_stream)(h, stream) })
    }

    /// cublasSetWorkspace_v2: the handle's scratch from now on (until the next
    /// `set_stream`, which resets it to the library's own pool): `bytes` at `ws`, so that a
    /// GEMM under stream capture allocates nothing.
    pub(crate) fn set_workspace(&self, h: Handle, ws: *mut c_void, bytes: usize) -> Result<(), String> {
        check("cublasSetWorkspace_v2", unsafe { (self.set_workspace)(h, ws, bytes) })
    }

    /// cublasSgemmStridedBatched: fp32 A, B, C.
    pub(crate) fn sgemm(&self, h: Handle, g: &Call, alpha: f32, beta: f32) -> Result<(), String> {
        let s = unsafe {
            (self.sgemm)(
                h, g.ta, g.tb, g.m, g.n, g.k, &alpha, g.a as *const f32, g.lda, g.stride_a, g.b as *const f32, g.ldb, g.stride_b, &beta, g.c as *mut f32, g.ldc,
                g.stride_c, g.batch,
            )
        };
        check("cublasSgemmStridedBatched", s)
    }

    /// cublasGemmStridedBatchedEx with A and B of `input` type (R_16BF, R_32F), fp32 C and
    /// CUBLAS_COMPUTE_32F (so alpha and beta are f32), the default algorithm.
    pub(crate) fn gemm_ex(&self, h: Handle, g: &Call, input: c_int, alpha: f32, beta: f32) -> Result<(), String> {
        let s = unsafe {
            (self.gemm_ex)(
                h, g.ta, g.tb, g.m, g.n, g.k, &alpha as *const f32 as *const c_void, g.a, input, g.lda, g.stride_a, g.b, input, g.ldb, g.stride_b,
                &beta as *const f32 as *const c_void, g.c, R_32F, g.ldc, g.stride_c, g.batch, COMPUTE_32F, GEMM_DEFAULT,
            )
        };
        check("cublasGemmStridedBatchedEx", s)
    }
}
