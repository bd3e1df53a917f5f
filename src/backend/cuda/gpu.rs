//! The `Gpu` trait: the handful of device services `CudaBackend` needs (memory, copies,
//! kernel launch by name, fp32 GEMM with cuBLAS's column-major semantics). Implemented by
//! `Sim` (ptxsim on the CPU) and `Cudarc` (driver API + cuBLAS), so every host-side line of
//! the CUDA backend runs in CI through `Sim`. GEMM inputs are fp32 or bf16 (`GemmInput`); the
//! output and the accumulation are always fp32.

/// A compiled kernel file: PTX text (for the simulator, or a device newer than NVRTC knows,
/// which the driver then JIT-compiles) or a CUBIN for one real architecture.
#[derive(Clone, Debug)]
pub enum Image {
    Ptx(String),
    Cubin(Vec<u8>),
}

/// A device address (CUdeviceptr on a GPU, a ptxsim address on the simulator).
pub(crate) type DevPtr = u64;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("kernel build: {0}")]
    Build(String),
    #[error("{0}")]
    Device(String),
}

/// One kernel argument, passed by value as the kernel declares it. Equal and hashed by its
/// exact bits (an f32 by `to_bits`), as a graph's recorded arguments are compared.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(DevPtr),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
}

impl Arg {
    /// (kind, bits): what the launch passes.
    fn bits(self) -> (u8, u64) {
        match self {
            Arg::Ptr(p) => (0, p),
            Arg::I32(v) => (1, v as u32 as u64),
            Arg::U32(v) => (2, v as u64),
            Arg::I64(v) => (3, v as u64),
            Arg::F32(v) => (4, v.to_bits() as u64),
        }
    }
}

impl PartialEq for Arg {
    fn eq(&self, o: &Arg) -> bool {
        self.bits() == o.bits()
    }
}
impl Eq for Arg {}
impl std::hash::Hash for Arg {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.bits().hash(h)
    }
}

/// Element type of the A and B operands of a GEMM (C and the accumulation are fp32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GemmInput {
    /// fp32 A and B (`cublasSgemmStridedBatched`); strides and leading dims in f32 elements.
    #[default]
    F32,
    /// bf16 A and B (`cublasGemmStridedBatchedEx` with CUDA_R_16BF inputs, CUDA_R_32F output,
    /// CUBLAS_COMPUTE_32F); strides and leading dims of A and B in bf16 elements (2 bytes),
    /// those of C in f32 elements.
    Bf16,
}

impl GemmInput {
    /// Bytes per element of A and B.
    pub fn size(self) -> usize {
        match self {
            GemmInput::F32 => 4,
            GemmInput::Bf16 => 2,
        }
    }
}

/// `C = alpha * op(A) @ op(B) + beta * C` for `batch` matrices, column-major as in
/// `cublasSgemmStridedBatched`: op(A) is `[m, k]`, op(B) `[k, n]`, C `[m, n]`; element (i, j)
/// of a matrix X lives at `x + i + j * ldx` (+ `b * stride_x` for batch b). With
/// `beta == 0` C is not read (so it may hold NaN). All matrices fp32. Equal and hashed by
/// exact bits (alpha and beta by `to_bits`).
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
    fn bits(&self) -> [u64; 17] {
        let u = |x: usize| x as u64;
        [
            self.trans_a as u64, self.trans_b as u64, u(self.m), u(self.n), u(self.k), self.alpha.to_bits() as u64, self.a, u(self.lda), u(self.stride_a), self.b,
            u(self.ldb), u(self.stride_b), self.beta.to_bits() as u64, self.c, u(self.ldc), u(self.stride_c), u(self.batch),
        ]
    }
}

impl PartialEq for Gemm {
    fn eq(&self, o: &Gemm) -> bool {
        self.bits() == o.bits()
    }
}
impl Eq for Gemm {}
impl std::hash::Hash for Gemm {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.bits().hash(h)
    }
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

/// One device operation as `Gpu::launch`, `Gpu::gemm_ex` and `Gpu::dtod` issue it: an entry
/// of a step's tape (graphs.rs), which `Gpu::graph_capture` turns into one graph.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Launch { module: String, kernel: String, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: Vec<Arg> },
    Gemm { g: Gemm, input: GemmInput },
    Dtod { dst: DevPtr, src: DevPtr, bytes: usize },
}

impl Op {
    /// Issues the operation on `gpu` now (on the current stream).
    pub(crate) fn issue<G: Gpu + ?Sized>(&self, gpu: &G) -> Result<(), GpuError> {
        match self {
            Op::Launch { module, kernel, grid, block, smem, args } => gpu.launch(module, kernel, *grid, *block, *smem, args),
            Op::Gemm { g, input } => gpu.gemm_ex(g, *input),
            Op::Dtod { dst, src, bytes } => gpu.dtod(*dst, *src, *bytes),
        }
    }
}

/// A captured graph (`Gpu::graph_capture`).
pub(crate) type GraphId = u64;

/// A stream: 0 is the default stream, others come from `stream_create`. Work on one stream
/// runs in issue order; work on different streams is ordered only through events.
pub(crate) type StreamId = u64;
/// A recorded point in a stream (`event_record`), to wait on or to time between.
pub(crate) type EventId = u64;

/// Device services. Launches and GEMMs go to the *current* stream (`set_stream`; initially
/// the default stream). Copies are synchronous and ordered after all earlier work (created
/// streams are blocking streams, which the default stream synchronises with).
pub trait Gpu: Send + Sync + 'static {
    fn name(&self) -> String;
    /// The architecture to compile for: the device's own `sm_XY` on a GPU (kernels are loaded
    /// as CUBIN), a virtual `compute_XY` on the simulator (which runs PTX).
    fn arch(&self) -> String;
    fn alloc(&self, bytes: usize) -> Result<DevPtr, GpuError>;
    fn free(&self, ptr: DevPtr);
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), GpuError>;
    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<(), GpuError>;
    /// Copies `bytes` bytes from `src` to `dst` on the device (ranges that do not overlap).
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), GpuError>;
    /// Makes the kernels of `image` launchable under the module name `module` (idempotent).
    fn load(&self, module: &str, image: &Image) -> Result<(), GpuError>;
    fn has_module(&self, module: &str) -> bool;
    #[allow(clippy::too_many_arguments)]
    fn launch(&self, module: &str, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[Arg]) -> Result<(), GpuError>;
    /// The GEMM `g` with fp32 A and B.
    fn gemm(&self, g: &Gemm) -> Result<(), GpuError>;
    /// The GEMM `g` with A and B of type `input` (C and accumulation fp32). The default
    /// handles fp32 only; `Sim` and `Cudarc` implement bf16.
    fn gemm_ex(&self, g: &Gemm, input: GemmInput) -> Result<(), GpuError> {
        match input {
            GemmInput::F32 => self.gemm(g),
            GemmInput::Bf16 => Err(GpuError::Device(format!("{}: no bf16 GEMM", self.name()))),
        }
    }

    // ---- streams and events ----

    /// A new stream.
    fn stream_create(&self) -> Result<StreamId, GpuError>;
    /// Sends subsequent launches and GEMMs to stream `s` (0 = the default stream).
    fn set_stream(&self, s: StreamId) -> Result<(), GpuError>;
    /// Records an event at the current end of stream `s`.
    fn event_record(&self, s: StreamId) -> Result<EventId, GpuError>;
    /// Makes later work on stream `s` wait until event `e` has happened.
    fn stream_wait_event(&self, s: StreamId, e: EventId) -> Result<(), GpuError>;
    /// Blocks the host until event `e` has happened.
    fn event_synchronize(&self, e: EventId) -> Result<(), GpuError>;
    /// Milliseconds between two completed events (of work on the device; on `Sim`, host
    /// time spent simulating).
    fn event_elapsed_ms(&self, start: EventId, end: EventId) -> Result<f32, GpuError>;
    fn event_destroy(&self, e: EventId);
    /// Blocks the host until all work on every stream is done.
    fn synchronize(&self) -> Result<(), GpuError>;

    /// Device memory free now, in bytes, where the device has its own (None on `Sim`, whose
    /// buffers are host memory).
    fn memory_free(&self) -> Option<u64> {
        None
    }

    // ---- graphs (the CUDA backend's decode steps, graphs.rs) ----

    /// Whether the CUDA backend replays its decode steps as graphs unless told otherwise
    /// (`IPO_CUDA_GRAPHS`, `CudaBackend::set_graphs`): on a GPU, where they save the launch
    /// overhead; not on the simulator, where they only change the order of nothing.
    fn graphs_by_default(&self) -> bool {
        false
    }
    /// Makes one graph of `ops` (what issuing them in order, on one stream, would do) without
    /// running them. The graph reads and writes the addresses in `ops`, whatever they hold
    /// when it is launched. Err where the device has no graphs (the default).
    fn graph_capture(&self, ops: &[Op]) -> Result<GraphId, GpuError> {
        let _ = ops;
        Err(GpuError::Device(format!("{}: no graphs", self.name())))
    }
    /// Runs graph `g` on the current stream, after the work issued before it, as one launch.
    fn graph_launch(&self, g: GraphId) -> Result<(), GpuError> {
        Err(GpuError::Device(format!("{}: no graph {g}", self.name())))
    }
    fn graph_destroy(&self, g: GraphId) {
        let _ = g;
    }

    // ---- data-parallel groups (`Backend::join_group`, `Backend::all_reduce_start` / `_wait`) ----

    /// Joins a group of `world` ranks as rank `rank` whose `group_all_reduce` sums device
    /// buffers (`Cudarc`: NCCL, nccl.rs), every wait bounded by `timeout`; `all_gather` is the
    /// group's host all-gather. Returns false where the device has no such group (the default,
    /// and `Sim`, which cannot run NCCL): sums then go through the host.
    fn join_group(&self, rank: usize, world: usize, timeout: std::time::Duration, all_gather: &mut dyn FnMut(Vec<u8>) -> Result<Vec<Vec<u8>>, String>) -> Result<bool, GpuError> {
        let _ = (rank, world, timeout, all_gather);
        Ok(false)
    }
    /// Starts summing `bufs` (address, f32 count) over the joined group, in place, after the
    /// work already issued on the current stream, and returns without waiting. Ok(false),
    /// doing nothing, when no group was joined.
    fn group_all_reduce_start(&self, bufs: &[(DevPtr, usize)]) -> Result<bool, GpuError> {
        let _ = bufs;
        Ok(false)
    }
    /// Starts summing each piece (f32) over the joined group into its root rank's copy, in
    /// place (ZeRO-1's reduce-scatter), like `group_all_reduce_start` and completed by
    /// `group_all_reduce_wait`. Ok(false), doing nothing, when no group was joined.
    fn group_reduce_start(&self, pieces: &[Piece]) -> Result<bool, GpuError> {
        let _ = pieces;
        Ok(false)
    }
    /// Copies each piece from its root rank to every rank, in place (ZeRO-1's all-gather of
    /// the updated weights), after the work already issued on the current stream, and waits
    /// for it. Ok(false), doing nothing, when no group was joined.
    fn group_broadcast(&self, pieces: &[Piece]) -> Result<bool, GpuError> {
        let _ = pieces;
        Ok(false)
    }
    /// Waits for the sums of every `group_all_reduce_start` and `group_reduce_start` so far
    /// (nothing without a group).
    fn group_all_reduce_wait(&self) -> Result<(), GpuError> {
        Ok(())
    }
}

/// A range of a device buffer in a group collective: `count` values at `ptr`, bf16 (2 bytes
/// each) or f32, and the rank that receives their sum (`Gpu::group_reduce_start`) or sends
/// them (`Gpu::group_broadcast`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub ptr: DevPtr,
    pub count: usize,
    pub bf16: bool,
    pub root: usize,
}

/// Device milliseconds of the work `f` issues on the current stream `s`, measured with a
/// pair of events (on a GPU: the kernels' time, not the host's launch overhead).
pub fn time_ms<G: Gpu + ?Sized>(gpu: &G, s: StreamId, f: impl FnOnce()) -> Result<f32, GpuError> {
    let a = gpu.event_record(s)?;
    f();
    let b = gpu.event_record(s)?;
    gpu.event_synchronize(b)?;
    let ms = gpu.event_elapsed_ms(a, b);
    gpu.event_destroy(a);
    gpu.event_destroy(b);
    ms
}
