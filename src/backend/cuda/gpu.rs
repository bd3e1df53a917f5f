//! The `Gpu` trait: the handful of device services `CudaBackend` needs (memory, copies,
//! kernel launch by name, fp32 GEMM with cuBLAS's column-major semantics). Implemented by
//! `Sim` (ptxsim on the CPU) and `Cudarc` (driver API + cuBLAS), so every host-side line of
//! the CUDA backend runs in CI through `Sim`.

/// A device address (CUdeviceptr on a GPU, a ptxsim address on the simulator).
pub type DevPtr = u64;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("kernel build: {0}")]
    Build(String),
    #[error("{0}")]
    Device(String),
}

/// One kernel argument, passed by value as the kernel declares it.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(DevPtr),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
}

/// `C = alpha * op(A) @ op(B) + beta * C` for `batch` matrices, column-major as in
/// `cublasSgemmStridedBatched`: op(A) is `[m, k]`, op(B) `[k, n]`, C `[m, n]`; element (i, j)
/// of a matrix X lives at `x + i + j * ldx` (+ `b * stride_x` for batch b). With
/// `beta == 0` C is not read (so it may hold NaN). All matrices fp32.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: DevPtr,
    pub lda: usize,
    pub stride_a: usize,
    pub b: DevPtr,
    pub ldb: usize,
    pub stride_b: usize,
    pub beta: f32,
    pub c: DevPtr,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
}

impl Gemm {
    /// The cuBLAS call for the row-major product `c[m, n] (+)= op(a)[m, k] @ op(b)[k, n]`
    /// (a stored `[k, m]` when `ta`, b stored `[n, k]` when `tb`). A row-major `[r, c]` matrix
    /// is the column-major `[c, r]` one, so we ask cuBLAS for `C^T = op(B)^T @ op(A)^T`:
    /// operands swapped, m and n swapped, leading dimensions = row-major row lengths.
    #[allow(clippy::too_many_arguments)]
    pub fn row_major(a: DevPtr, ta: bool, b: DevPtr, tb: bool, c: DevPtr, m: usize, n: usize, k: usize, accumulate: bool) -> Gemm {
        Gemm {
            trans_a: tb,
            trans_b: ta,
            m: n,
            n: m,
            k,
            alpha: 1.0,
            a: b,
            lda: if tb { k } else { n },
            stride_a: 0,
            b: a,
            ldb: if ta { m } else { k },
            stride_b: 0,
            beta: if accumulate { 1.0 } else { 0.0 },
            c,
            ldc: n,
            stride_c: 0,
            batch: 1,
        }
    }
}

/// Device services. Launches are ordered (one stream); copies to the host wait for them.
pub trait Gpu: Send + Sync + 'static {
    fn name(&self) -> String;
    /// The NVRTC `--gpu-architecture` to compile for (`compute_80` on the simulator).
    fn arch(&self) -> String;
    fn alloc(&self, bytes: usize) -> Result<DevPtr, GpuError>;
    fn free(&self, ptr: DevPtr);
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), GpuError>;
    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<(), GpuError>;
    /// Makes the kernels of `ptx` launchable under the module name `module` (idempotent).
    fn load(&self, module: &str, ptx: &str) -> Result<(), GpuError>;
    fn has_module(&self, module: &str) -> bool;
    #[allow(clippy::too_many_arguments)]
    fn launch(&self, module: &str, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[Arg]) -> Result<(), GpuError>;
    fn gemm(&self, g: &Gemm) -> Result<(), GpuError>;
}
