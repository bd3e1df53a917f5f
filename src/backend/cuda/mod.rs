//! `CudaBackend<G: Gpu>`: the `Backend` ops as CUDA kernels (kernels/*.cu, built by
//! `build`) plus cuBLAS-semantics GEMMs, over any `Gpu`: `Cudarc` on a real device, `Sim`
//! (ptxsim) on a CPU. Buffers are fp32 (correctness first; bf16 storage is a later step).
//! Host-side index arrays (ids, positions, spans, rows, targets, slots) are uploaded per call.

mod build;
mod cublas;
mod dpo;
mod driver;
mod gpu;
mod graphs;
mod lm_head_mma;
mod nccl;
mod optim;
pub mod parity;
mod precision;
pub mod resources;
mod sampling;
mod sim;

pub use driver::Cudarc;
pub use gpu::{time_ms, Gemm, Gpu};
pub(crate) use gpu::{Arg, DevPtr, GpuError};
pub use gpu::GemmInput;
pub use precision::Precision;
pub use sim::{Issued, Sim};

use super::{AttnDims, AttnLayout, Backend, KvGeom, PagedSeq};
use ptxsim::nvrtc::Nvrtc;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A device buffer of `len` 4-byte elements (f32 for `Backend::Buf`; u32/i32 for the index
/// arrays uploaded per call). Freed on drop.
pub struct CudaBuf<G: Gpu> {
    ptr: DevPtr,
    len: usize,
    gpu: Arc<G>,
    mem: Arc<MemCounter>,
    /// The backend's step recorder (graphs.rs), which sees every free, and whether `ptr` is
    /// in its step arena (freed with the arena, never on its own).
    steps: Arc<graphs::Steps>,
    arena: bool,
    /// Weights only (`Backend::upload_weight`): the bf16 copy `Precision::Bf16` matmuls read,
    /// made on first use and dropped when the weights change in place (optimizer steps).
    bf16: Option<Box<Mutex<Option<CudaBuf<G>>>>>,
    /// `ptr` holds `len` bf16 values (in `len.div_ceil(2)` 4-byte elements) and no fp32
    /// ones: a frozen weight (`Backend::freeze_weight` under `Precision::Bf16`; read by the
    /// bf16 matmuls and `download`, written by nothing), a ZeRO-1 sharded weight
    /// (`Backend::shard_weight`: a frozen weight that `set_weight_slice` and
    /// `all_gather_slices` still write, in bf16), a saved activation
    /// (`Backend::store_bf16`; read by the bf16 matmuls, the tensor-core attention's
    /// `_qkv_bf16` kernels, swiglu_bwd_bf16, attn_bwd_d_out_bf16 and `download`) or a bf16 KV
    /// cache (`Backend::kv_alloc` under bf16; the kv_cache.cu kernels' KV_BF16 variant).
    bf16_only: bool,
}

impl<G: Gpu> CudaBuf<G> {
    /// Address of element `i`.
    fn at(&self, i: usize) -> DevPtr {
        assert!(!self.bf16_only, "a frozen bf16 weight read as fp32");
        self.ptr + 4 * i as u64
    }

    /// Bytes of its allocation.
    fn bytes(&self) -> u64 {
        4 * if self.bf16_only { self.len.div_ceil(2).max(1) } else { self.len } as u64
    }
}

impl<G: Gpu> Drop for CudaBuf<G> {
    fn drop(&mut self) {
        self.steps.release(&*self.gpu, self.ptr, self.arena);
        self.mem.live.fetch_sub(self.bytes(), Ordering::Relaxed);
    }
}

/// Bytes of the live buffers of one backend and their high-water mark (what the backend asked
/// for; the device's allocator may round up). Always on: two atomic adds per buffer.
#[derive(Default)]
struct MemCounter {
    live: AtomicU64,
    peak: AtomicU64,
}

pub struct CudaBackend<G: Gpu> {
    gpu: Arc<G>,
    nvrtc: Nvrtc,
    /// What kernels are built for: the device's `sm_XY` (CUBIN) or a `compute_XY` (PTX).
    arch: String,
    loaded: Mutex<HashSet<String>>,
    /// `Precision` of matmul and the attention forward (precision.rs), as its u8.
    precision: std::sync::atomic::AtomicU8,
    /// The last rope cos/sin table and what it was built from: every layer's q and k, forward
    /// and backward, rotate the same positions, so one table serves a whole step.
    rope_table: Mutex<Option<RopeTable<G>>>,
    mem: Arc<MemCounter>,
    /// Decode steps recorded and replayed as graphs (graphs.rs).
    steps: Arc<graphs::Steps>,
    /// Keys per split of a decode context (`DECODE_SPLIT`; tests set fewer).
    decode_split: AtomicUsize,
    /// Under `Precision::Bf16`, whether the lm-head forward runs on kernels/lm_head_mma.cu
    /// (true: `IPO_LM_HEAD` unset or `mma`) or on the cuBLAS GEMM + lse_rows (`cublas`);
    /// lm_head_mma.rs.
    lm_head_mma: std::sync::atomic::AtomicBool,
    /// Whether `alloc` fills what it hands out with NaN (`set_poison_allocs`; tests).
    poison_allocs: std::sync::atomic::AtomicBool,
}

impl<G: Gpu> Drop for CudaBackend<G> {
    fn drop(&mut self) {
        self.rope_table.lock().unwrap().take();
        self.steps.clear(&*self.gpu);
    }
}

/// A device `[tokens, half, 2]` (cos, sin) table for `positions`, `inv_freq` and the sign.
struct RopeTable<G: Gpu> {
    positions: Vec<u32>,
    inv_freq: Vec<f64>,
    inverse: bool,
    table: CudaBuf<G>,
}

/// How the CUDA libraries were found, one line each (printed by `ipo selftest`; for any command):
/// NVRTC (path, rule, version), cuBLAS (path, rule), NCCL (path, rule, version), the driver
/// (cuDriverGetVersion). A library that is missing gets a line saying how many places were
/// tried, or for NCCL what to install (the error of the backend that needs it lists them).
pub(crate) fn library_report() -> Vec<String> {
    let missing = |name: &str, e: &ptxsim::cudalib::NotFound, var: &str| match e.tried.as_slice() {
        [one] => format!("{name}: not found: {one}"),
        all => format!("{name}: not found ({} places tried; set {var})", all.len()),
    };
    let nvrtc = match Nvrtc::load() {
        Ok(n) => {
            let v = n.version().map(|(a, b)| format!("version {a}.{b}")).unwrap_or_else(|e| e.to_string());
            format!("nvrtc: {}, {v}", n.library().describe())
        }
        Err(ptxsim::nvrtc::NvrtcError::NotFound(e)) => missing("nvrtc", &e, "IPO_NVRTC"),
        Err(e) => format!("nvrtc: {e}"),
    };
    let cublas = match ptxsim::cudalib::load(&cublas::CUBLAS) {
        Ok(l) => format!("cublas: {}", l.describe()),
        Err(e) => missing("cublas", &e, "IPO_CUBLAS"),
    };
    let nccl = match nccl::Nccl::load() {
        Ok(n) => match n.version() {
            Ok((a, b, c)) => format!("nccl: {}, version {a}.{b}.{c}", n.describe()),
            Err(e) => format!("nccl: {}: {e}", n.describe()),
        },
        Err(_) => "nccl: libnccl.so.2 not found (needed only by --device cuda with more than one rank; pip install nvidia-nccl-cu12, or set IPO_NCCL)".into(),
    };
    let driver = match driver::driver_version() {
        Ok((a, b)) => format!("driver: CUDA {a}.{b} (cuDriverGetVersion)"),
        Err(e) => format!("driver: {e}"),
    };
    let dirs = ptxsim::nvrtc::include_dirs();
    let headers = if dirs.is_empty() {
        "cuda headers: none found (NVRTC's built-in ones only; set IPO_CUDA_INCLUDE to a folder with cuda_bf16.h)".to_string()
    } else {
        format!("cuda headers: {}", dirs.join(":"))
    };
    vec![nvrtc, cublas, nccl, driver, headers]
}

/// Threads per block of the 1-D grid-stride kernels, and their grid for `n` elements.
const BLOCK: u32 = 256;
fn grid1(n: usize) -> (u32, u32, u32) {
    ((n.div_ceil(BLOCK as usize)).clamp(1, 4096) as u32, 1, 1)
}

/// The register-resident RMSNorm kernels (kernels/rmsnorm.cu) for `rows` x `dim`: the forward
/// and backward kernels `rmsnorm_{fwd,bwd}_v<V>` (V columns per thread, the smallest power of two up to 16 with
/// dim <= 256 V), the grid (about 4 rows per block, at most 512 blocks, so w is read once per
/// block) and the block (dim / V rounded up to a warp, at most 256: rmsnorm_bwd_v16 takes 143
/// registers at sm_90, so 512 threads would not fit an SM's 64K). `None` for rows wider than
/// 16 x 256 (the one-row-per-block kernels).
fn rmsnorm_launch(rows: usize, dim: usize) -> Option<([&'static str; 3], (u32, u32, u32), u32)> {
    // forward, backward, backward of an x stored in bf16 (`Backend::store_bf16`)
    const NAMES: [[&str; 3]; 5] = [
        ["rmsnorm_fwd_v1", "rmsnorm_bwd_v1", "rmsnorm_bwd_v1_xbf16"],
        ["rmsnorm_fwd_v2", "rmsnorm_bwd_v2", "rmsnorm_bwd_v2_xbf16"],
        ["rmsnorm_fwd_v4", "rmsnorm_bwd_v4", "rmsnorm_bwd_v4_xbf16"],
        ["rmsnorm_fwd_v8", "rmsnorm_bwd_v8", "rmsnorm_bwd_v8_xbf16"],
        ["rmsnorm_fwd_v16", "rmsnorm_bwd_v16", "rmsnorm_bwd_v16_xbf16"],
    ];
    let v = dim.div_ceil(256).next_power_of_two().min(16);
    let block = dim.div_ceil(v).next_multiple_of(32);
    (block <= 256).then(|| (NAMES[v.trailing_zeros() as usize], (rows.div_ceil(4).clamp(1, 512) as u32, 1, 1), block as u32))
}
/// Query tile of attn_fwd / attn_bwd_dq / paged_attn (QW in the kernels) and key tile of
/// attn_bwd_dkdv (KT).
const QW: usize = 4;
const KT: usize = 32;
/// Scratch budget of the lm-head logits chunk, `[chunk, vocab]` f32 elements: at least this
/// (the simulator, which reports no free memory, always uses it)...
const LM_CHUNK_ELEMS: usize = 1 << 22;
/// ...and on a device up to this (1 GiB) or a sixteenth of the free memory. Each chunk's GEMM
/// reads the whole `[vocab, dim]` head, so small chunks make the head memory-bound: on an
/// H200, 32-row chunks of a 128256 x 2048 head ran at 18 TFLOP/s where fp32 GEMM reaches 51.
const LM_CHUNK_ELEMS_MAX: usize = 1 << 28;

/// Groups positions by index value (CSR): `(dst_row[g], off[groups + 1], members)`, members
/// in increasing position order within a group, for the deterministic scatter-add.
fn csr(idx: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..idx.len() as u32).collect();
    order.sort_by_key(|&i| (idx[i as usize], i));
    let (mut dst, mut off) = (Vec::new(), vec![0u32]);
    for (n, &i) in order.iter().enumerate() {
        if n == 0 || idx[i as usize] != idx[order[n - 1] as usize] {
            if n > 0 {
                off.push(n as u32);
            }
            dst.push(idx[i as usize]);
        }
    }
    if !order.is_empty() {
        off.push(order.len() as u32);
    }
    (dst, off, order)
}

impl CudaBackend<Sim> {
    /// The CUDA backend on the PTX simulator.
    pub fn sim() -> Result<Self, GpuError> {
        Self::new(Sim::new())
    }
}

impl CudaBackend<Cudarc> {
    /// The CUDA backend on device `ordinal`.
    pub fn cuda(ordinal: usize) -> Result<Self, GpuError> {
        Self::new(Cudarc::new(ordinal)?)
    }
}

impl<G: Gpu> CudaBackend<G> {
    /// The backend on `gpu` in fp32, the parity reference (`with_precision` for bf16; the
    /// commands choose bf16 on a real GPU, `workflow::device`).
    pub fn new(gpu: G) -> Result<Self, GpuError> {
        Self::new_with(gpu, Precision::F32)
    }

    fn new_with(gpu: G, p: Precision) -> Result<Self, GpuError> {
        if let Precision::Q8 | Precision::Q4 = p {
            let bits = if p == Precision::Q8 { 8 } else { 4 };
            return Err(GpuError::Device(format!("precision {p} ({bits}-bit weights) exists on the CPU backend only; use bf16 or f32 on cuda")));
        }
        let nvrtc = Nvrtc::load().map_err(|e| GpuError::Build(format!("{e} (set IPO_NVRTC, or run scripts/setup-cuda.sh)")))?;
        let arch = build::target_arch(&nvrtc, &gpu.arch())?;
        let steps = Arc::new(graphs::Steps::new(gpu.graphs_by_default()));
        Ok(Self {
            gpu: Arc::new(gpu),
            nvrtc,
            arch,
            loaded: Mutex::new(HashSet::new()),
            precision: std::sync::atomic::AtomicU8::new(p.to_u8()),
            rope_table: Mutex::new(None),
            mem: Arc::default(),
            steps,
            decode_split: AtomicUsize::new(DECODE_SPLIT),
            lm_head_mma: std::sync::atomic::AtomicBool::new(lm_head_mma::from_env()?),
            poison_allocs: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn gpu(&self) -> &G {
        &self.gpu
    }

    /// Turns decode-step graphs on or off (graphs.rs; default: `IPO_CUDA_GRAPHS`, else on a GPU
    /// and off on the simulator).
    pub fn set_graphs(&self, on: bool) {
        self.steps.set_on(on)
    }

    pub fn graphs(&self) -> bool {
        self.steps.on()
    }

    /// Counters of the decode steps (graphs.rs).
    pub fn step_stats(&self) -> crate::backend::StepStats {
        self.steps.stats()
    }

    /// Keys per split of a decode context in `paged_attention` (default `DECODE_SPLIT`, 256):
    /// tests set a few, so that short contexts cross split boundaries.
    pub fn set_decode_split(&self, keys: usize) {
        assert!(keys > 0, "a decode split of 0 keys");
        self.decode_split.store(keys, Ordering::Relaxed);
    }

    /// The host is about to read device results or to hand the device to work outside a
    /// step's tape: a step being recorded issues what it has (graphs.rs).
    fn sync_point(&self) {
        self.steps.sync(&*self.gpu);
    }

    /// Compiles (or finds in the cache) and loads every kernel file for `head_dims`, so that
    /// build errors surface here and not inside an op.
    pub fn prepare(&self, head_dims: &[usize]) -> Result<(), GpuError> {
        for (file, _) in build::SOURCES {
            if file.starts_with("attention") || file.starts_with("kv_cache") {
                for &hd in head_dims {
                    self.module(file, &[("HEAD_DIM", hd)])?;
                }
            } else {
                self.module(file, &[])?;
            }
        }
        Ok(())
    }

    /// The loaded module of `file` with `defines` (built on first use).
    fn module(&self, file: &str, defines: &[(&str, usize)]) -> Result<String, GpuError> {
        let key = defines.iter().fold(file.to_string(), |k, (n, v)| format!("{k} {n}={v}"));
        let mut loaded = self.loaded.lock().unwrap();
        if !loaded.contains(&key) {
            let image = build::image(&self.nvrtc, file, &self.arch, defines)?;
            self.gpu.load(&key, &image)?;
            loaded.insert(key.clone());
        }
        Ok(key)
    }

    /// Kernel launch from an op (which returns no `Result`): the module is normally built
    /// already (`prepare`, called when a model is put on the backend), so what can fail here is
    /// the launch itself or an op on a head_dim nobody prepared.
    #[allow(clippy::too_many_arguments)]
    fn launch(&self, file: &str, defines: &[(&str, usize)], kernel: &str, grid: (u32, u32, u32), block: u32, smem: usize, args: &[Arg]) {
        let m = self.module(file, defines).unwrap_or_else(|e| panic!("{e}"));
        let recorded = self.steps.record(|| gpu::Op::Launch {
            module: m.clone(),
            kernel: kernel.to_string(),
            grid,
            block: (block, 1, 1),
            smem: smem as u32,
            args: args.to_vec(),
        });
        if recorded {
            return;
        }
        self.gpu
            .launch(&m, kernel, grid, (block, 1, 1), smem as u32, args)
            .unwrap_or_else(|e| panic!("kernel {kernel} ({file}): {e}"));
    }

    /// Rows per lm-head chunk for `n` rows over `vocab` (see LM_CHUNK_ELEMS_MAX).
    fn lm_chunk(&self, vocab: usize, n: usize) -> usize {
        let budget = match self.gpu.memory_free() {
            Some(free) => ((free / 16 / 4) as usize).clamp(LM_CHUNK_ELEMS, LM_CHUNK_ELEMS_MAX),
            None => LM_CHUNK_ELEMS,
        };
        (budget / vocab.max(1)).clamp(1, n.max(1))
    }

    fn gemm(&self, g: Gemm) {
        self.gemm_ex(g, GemmInput::F32)
    }

    /// A GEMM with A and B of type `input`, recorded in a step or issued.
    fn gemm_ex(&self, g: Gemm, input: GemmInput) {
        if self.steps.record(|| gpu::Op::Gemm { g, input }) {
            return;
        }
        self.gpu.gemm_ex(&g, input).unwrap_or_else(|e| panic!("gemm {g:?} ({input:?}): {e}"));
    }

    /// A device copy, recorded in a step or issued.
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) {
        if self.steps.record(|| gpu::Op::Dtod { dst, src, bytes }) {
            return;
        }
        self.gpu.dtod(dst, src, bytes).unwrap_or_else(|e| panic!("copy of {bytes} bytes: {e}"));
    }

    /// `[len]` 4-byte elements: in a step, from its arena (graphs.rs), else a buffer of its own.
    fn alloc(&self, len: usize) -> CudaBuf<G> {
        let b = self.alloc_with(len, 4 * len as u64, Some(false));
        if self.poison_allocs.load(Ordering::Relaxed) {
            self.fill(&b, f32::NAN);
        }
        b
    }

    /// From now on `alloc` (outputs and scratch of the ops; not uploads) fills its buffers with
    /// NaN, so a test sees any element an op forgets to write (the simulator's fresh memory is
    /// zero). Off by default.
    pub fn set_poison_allocs(&self, on: bool) {
        self.poison_allocs.store(on, Ordering::Relaxed);
    }

    /// `[len]` outside any step arena: a buffer that outlives the step making it (a weight's
    /// cached bf16 copy).
    fn alloc_persistent(&self, len: usize) -> CudaBuf<G> {
        self.alloc_with(len, 4 * len as u64, None)
    }

    /// `[len]` with `cap >= 4 len` bytes of room where it comes from a step arena: never
    /// (None), or memory fresh in the step (`Some(true)`: an upload) or any (`Some(false)`).
    fn alloc_with(&self, len: usize, cap: u64, arena: Option<bool>) -> CudaBuf<G> {
        let from_arena = arena.and_then(|fresh| self.steps.alloc(&*self.gpu, cap, fresh));
        let ptr = match from_arena {
            Some(p) => p,
            None => self.gpu.alloc(4 * len).unwrap_or_else(|e| panic!("alloc of {len} x 4 bytes: {e}")),
        };
        let live = self.mem.live.fetch_add(4 * len as u64, Ordering::Relaxed) + 4 * len as u64;
        self.mem.peak.fetch_max(live, Ordering::Relaxed);
        CudaBuf { ptr, len, gpu: self.gpu.clone(), mem: self.mem.clone(), steps: self.steps.clone(), arena: from_arena.is_some(), bf16: None, bf16_only: false }
    }

    /// A GEMM of the fused lm-head on the first rows of its chunk buffers: fp32 (cuBLAS
    /// SGEMM), or under `Precision::Bf16` on tensor cores (the weight's cached bf16 copy, the
    /// chunk's rows and logit gradients rounded into scratch, fp32 accumulation), as every
    /// other matmul of that mode.
    #[allow(clippy::too_many_arguments)]
    fn lm_gemm(&self, a: &CudaBuf<G>, ta: bool, b: &CudaBuf<G>, tb: bool, c: &mut CudaBuf<G>, m: usize, n: usize, k: usize, accumulate: bool) {
        if self.precision() == Precision::Bf16 {
            self.matmul_bf16(a, ta, b, tb, c, m, n, k, 1.0, accumulate);
        } else {
            self.gemm(Gemm::row_major(a.ptr, ta, b.ptr, tb, c.ptr, m, n, k, accumulate));
        }
    }

    /// Bytes of this backend's buffers alive now.
    pub fn memory_live(&self) -> u64 {
        self.mem.live.load(Ordering::Relaxed)
    }

    /// The most bytes of buffers alive at once since the backend was made or
    /// `reset_memory_peak` (the allocation high-water mark; `train::plan` estimates it).
    pub fn memory_peak(&self) -> u64 {
        self.mem.peak.load(Ordering::Relaxed)
    }

    /// Starts a new high-water mark from the bytes alive now.
    pub fn reset_memory_peak(&self) {
        self.mem.peak.store(self.memory_live(), Ordering::Relaxed);
    }

    fn upload_bytes(&self, len: usize, bytes: &[u8]) -> CudaBuf<G> {
        // In a step arena, room for a power of two of bytes: index arrays that grow with the
        // context (block tables) then keep their address, and the step's graph, until it doubles.
        let b = self.alloc_with(len, (4 * len as u64).next_power_of_two(), Some(true));
        if !bytes.is_empty() {
            self.gpu.htod(b.ptr, bytes).unwrap_or_else(|e| panic!("upload: {e}"));
        }
        b
    }

    /// Uploads u32 indices: `[idx.len()]` u32.
    fn upload_u32(&self, idx: &[u32]) -> CudaBuf<G> {
        let bytes: Vec<u8> = idx.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.upload_bytes(idx.len(), &bytes)
    }

    fn upload_i32(&self, v: &[i32]) -> CudaBuf<G> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.upload_bytes(v.len(), &bytes)
    }

    fn fill(&self, b: &CudaBuf<G>, v: f32) {
        if b.len > 0 {
            self.launch("elementwise.cu", &[], "fill", grid1(b.len), BLOCK, 0, &[Arg::Ptr(b.ptr), Arg::F32(v), Arg::I64(b.len as i64)]);
        }
    }

    /// `dst[dst_row[g]] += sum of src rows in group g` for the grouping of `idx` (src row i
    /// goes to dst row idx[i]).
    fn scatter_add_rows(&self, src: DevPtr, idx: &[u32], dim: usize, dst: DevPtr) {
        if idx.is_empty() || dim == 0 {
            return;
        }
        let (rows, off, members) = csr(idx);
        let (rows_d, off_d, mem_d) = (self.upload_u32(&rows), self.upload_u32(&off), self.upload_u32(&members));
        let groups = rows.len();
        self.launch(
            "embedding.cu", &[], "scatter_add_rows", (groups.min(65535) as u32, 1, 1), 128, 0,
            &[Arg::Ptr(src), Arg::Ptr(dst), Arg::Ptr(rows_d.ptr), Arg::Ptr(off_d.ptr), Arg::Ptr(mem_d.ptr), Arg::I32(groups as i32), Arg::I32(dim as i32)],
        );
    }

    fn gather_rows(&self, src: DevPtr, idx: &CudaBuf<G>, dim: usize, dst: DevPtr) {
        if idx.len > 0 {
            self.launch(
                "embedding.cu", &[], "gather_rows", grid1(idx.len * dim), BLOCK, 0,
                &[Arg::Ptr(src), Arg::Ptr(idx.ptr), Arg::Ptr(dst), Arg::I32(idx.len as i32), Arg::I32(dim as i32)],
            );
        }
    }

    /// spans int4 `[n_spans, 4]` and query tiles int2 `[n_tiles, 2]` of a packed layout.
    /// D `[rows]` (rows = tokens x heads) = rowsum(dout * out) over each head's `head_dim`:
    /// the attention backward's per-row term, for the fp32 and the tensor-core kernels; out
    /// fp32, or stored in bf16 (`Backend::store_bf16`: attn_bwd_d_out_bf16, fp32 math).
    fn attn_bwd_d(&self, dout: &CudaBuf<G>, out: &CudaBuf<G>, rows: usize, head_dim: usize) -> CudaBuf<G> {
        let d = self.alloc(rows);
        self.launch(
            "attention.cu", &[("HEAD_DIM", head_dim)], if out.bf16_only { "attn_bwd_d_out_bf16" } else { "attn_bwd_d" }, (rows.div_ceil(4) as u32, 1, 1), 128, 0,
            &[Arg::Ptr(dout.ptr), Arg::Ptr(out.ptr), Arg::Ptr(d.ptr), Arg::I32(rows as i32)],
        );
        d
    }

    fn span_tables(&self, layout: &AttnLayout) -> (CudaBuf<G>, Vec<i32>) {
        let sp: Vec<i32> = layout.spans.iter().flat_map(|s| [s.start as i32, s.len as i32, s.prefix_start as i32, s.prefix_len as i32]).collect();
        let mut qt = Vec::new();
        for (i, s) in layout.spans.iter().enumerate() {
            for j in (0..s.len).step_by(QW) {
                qt.extend([i as i32, j as i32]);
            }
        }
        (self.upload_i32(&sp), qt)
    }
}

/// Groups the non-empty spans into waves whose key rows (prefix and own rows) are disjoint,
/// so attn_bwd_dkdv can add into dk/dv without atomics. Greedy, first fit, in span order.
fn dkdv_waves(layout: &AttnLayout) -> Vec<Vec<usize>> {
    let rows = |i: usize| {
        let s = &layout.spans[i];
        [(s.prefix_start, s.prefix_start + s.prefix_len), (s.start, s.start + s.len)]
    };
    let overlap = |a: usize, b: usize| rows(a).iter().any(|&(a0, a1)| rows(b).iter().any(|&(b0, b1)| a0 < b1 && b0 < a1 && a0 < a1 && b0 < b1));
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for i in (0..layout.spans.len()).filter(|&i| layout.spans[i].len > 0) {
        match waves.iter_mut().find(|w| w.iter().all(|&j| !overlap(i, j))) {
            Some(w) => w.push(i),
            None => waves.push(vec![i]),
        }
    }
    waves
}

/// The key tiles of each wave of `dkdv_waves`: int2 [n_tiles] = (span, first visible key),
/// `tile` keys each.
pub(super) fn dkdv_wave_tiles(layout: &AttnLayout, tile: usize) -> Vec<Vec<i32>> {
    dkdv_waves(layout)
        .into_iter()
        .map(|wave| {
            let mut kt = Vec::new();
            for i in wave {
                let s = &layout.spans[i];
                for k0 in (0..s.prefix_len + s.len).step_by(tile) {
                    kt.extend([i as i32, k0 as i32]);
                }
            }
            kt
        })
        .collect()
}

impl<G: Gpu> Backend for CudaBackend<G> {
    type Buf = CudaBuf<G>;

    fn prepare(&self, head_dims: &[usize]) -> anyhow::Result<()> {
        Ok(CudaBackend::prepare(self, head_dims)?)
    }

    fn memory_free(&self) -> Option<u64> {
        self.gpu.memory_free()
    }

    fn precision(&self) -> Precision {
        CudaBackend::precision(self)
    }

    /// Records the step's work and runs it as a graph where it can (graphs.rs). The RoPE
    /// table cached from before is dropped at both ends: one made in the step lives in its
    /// arena.
    fn step_begin(&self, tokens: usize) {
        drop(self.rope_table.lock().unwrap().take());
        self.steps.begin(&*self.gpu, tokens);
    }

    fn step_end(&self) {
        drop(self.rope_table.lock().unwrap().take());
        self.steps.end(&*self.gpu);
    }

    fn step_graphs(&self) -> Option<bool> {
        Some(self.graphs())
    }

    fn set_step_graphs(&self, on: bool) {
        self.set_graphs(on)
    }

    fn step_stats(&self) -> crate::backend::StepStats {
        self.steps.stats()
    }

    /// On a GPU (`Cudarc`): NCCL (nccl.rs). On `Sim`: nothing, sums go through the host.
    fn join_group(&self, rank: usize, world: usize, timeout: std::time::Duration, all_gather: &mut dyn FnMut(Vec<u8>) -> anyhow::Result<Vec<Vec<u8>>>) -> anyhow::Result<()> {
        self.sync_point();
        self.gpu.join_group(rank, world, timeout, &mut |mine| all_gather(mine).map_err(|e| format!("{e:#}")))?;
        Ok(())
    }

    /// NCCL on the device buffers in place, enqueued on its own stream, when the GPU joined a
    /// group; else through the host, at once.
    fn all_reduce_start(&self, bufs: &mut [&mut CudaBuf<G>], host_sum: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>) -> anyhow::Result<()> {
        self.sync_point();
        let ptrs: Vec<(DevPtr, usize)> = bufs.iter().map(|b| (b.at(0), b.len)).collect();
        if self.gpu.group_all_reduce_start(&ptrs)? {
            return Ok(());
        }
        super::host_all_reduce(self, bufs, host_sum)
    }

    fn all_reduce_wait(&self) -> anyhow::Result<()> {
        self.sync_point();
        Ok(self.gpu.group_all_reduce_wait()?)
    }

    /// With a joined group: one in-place NCCL reduce per non-empty piece to its owner, queued
    /// like `all_reduce_start`'s buffers and completed by `all_reduce_wait`; else every element
    /// summed through the host, at once (the default's bits).
    fn reduce_scatter_start(
        &self,
        bufs: &mut [&mut CudaBuf<G>],
        owners: &[Vec<(std::ops::Range<usize>, usize)>],
        host_sum: &mut dyn FnMut(&mut [f32]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        assert_eq!(bufs.len(), owners.len(), "reduce_scatter_start: one owner list per buffer");
        self.sync_point();
        let mut pieces = Vec::new();
        for (b, o) in bufs.iter().zip(owners) {
            for (r, owner) in o.iter().filter(|(r, _)| !r.is_empty()) {
                assert!(r.end <= b.len, "reduce_scatter_start: piece {r:?} of a buffer of {}", b.len);
                pieces.push(gpu::Piece { ptr: b.at(r.start), count: r.len(), bf16: false, root: *owner });
            }
        }
        if self.gpu.group_reduce_start(&pieces)? {
            return Ok(());
        }
        super::host_all_reduce(self, bufs, host_sum)
    }

    /// With a joined group: one in-place NCCL broadcast per non-empty piece from its owner (in
    /// the weight's storage: bf16 where `shard_weight` left bf16 only), in one group, waited
    /// for; the fp32 weights written drop their cached bf16 copies. Else through the host.
    fn all_gather_slices(
        &self,
        rank: usize,
        bufs: &mut [&mut CudaBuf<G>],
        pieces: &[(usize, std::ops::Range<usize>, usize)],
        host_all_gather: &mut dyn FnMut(Vec<u8>) -> anyhow::Result<Vec<Vec<u8>>>,
    ) -> anyhow::Result<()> {
        self.sync_point();
        let dev: Vec<gpu::Piece> = pieces
            .iter()
            .filter(|p| !p.1.is_empty())
            .map(|(i, r, owner)| {
                let b = &bufs[*i];
                assert!(r.end <= b.len, "all_gather_slices: piece {r:?} of a buffer of {}", b.len);
                let ptr = if b.bf16_only { b.ptr + 2 * r.start as u64 } else { b.at(r.start) };
                gpu::Piece { ptr, count: r.len(), bf16: b.bf16_only, root: *owner }
            })
            .collect();
        if !self.gpu.group_broadcast(&dev)? {
            return super::host_all_gather_slices(self, rank, bufs, pieces, host_all_gather);
        }
        for (i, _, _) in pieces.iter().filter(|p| p.2 != rank && !p.1.is_empty()) {
            if !bufs[*i].bf16_only {
                self.weights_changed(bufs[*i]);
            }
        }
        Ok(())
    }

    fn sample(&self, logits: &CudaBuf<G>, vocab: usize, rows: &[super::SampleRow]) -> Vec<u32> {
        self.sample_tokens(logits, vocab, rows)
    }

    fn name(&self) -> String {
        format!("cuda-{} on {}", self.precision().name(), self.gpu.name())
    }
    fn zeros(&self, n: usize) -> CudaBuf<G> {
        let b = self.alloc(n);
        self.fill(&b, 0.0);
        b
    }
    fn upload_weight(&self, host: &[f32]) -> CudaBuf<G> {
        let mut b = self.upload(host);
        b.bf16 = Some(Box::new(Mutex::new(None)));
        b
    }

    /// Under `Precision::Bf16` a bf16 cache (half the bytes; K/V rounded RNE as they are
    /// written), else fp32.
    fn kv_alloc(&self, len: usize) -> CudaBuf<G> {
        if self.precision() != Precision::Bf16 {
            return self.zeros(len);
        }
        let mut b = self.zeros(len.div_ceil(2).max(1));
        b.len = len;
        b.bf16_only = true;
        b
    }

    fn kv_bytes_per_value(&self) -> usize {
        if self.precision() == Precision::Bf16 {
            2
        } else {
            4
        }
    }

    /// Under `Precision::Bf16`: replaces the weight by its bf16 copy (the cached one, or made
    /// now) and frees the fp32 values, halving its memory. Under fp32 nothing changes.
    fn freeze_weight(&self, w: &mut CudaBuf<G>) {
        if self.precision() != Precision::Bf16 || w.bf16_only {
            return;
        }
        let cached = w.bf16.as_ref().and_then(|c| c.lock().unwrap().take());
        let mut h = cached.unwrap_or_else(|| self.to_bf16(w.ptr, w.len));
        h.len = w.len;
        h.bf16_only = true;
        *w = h;
    }

    /// Under `Precision::Bf16`: `freeze_weight` (the bf16 values only, half the bytes), which
    /// `set_weight_slice` and `all_gather_slices` still write. Under fp32 nothing changes.
    fn shard_weight(&self, w: &mut CudaBuf<G>) {
        self.freeze_weight(w)
    }

    /// Under `Precision::Bf16`: replaces the activation by its bf16 rounding (f32_to_bf16, the
    /// rounding `matmul_bf16` and the attention_mma.cu kernels make of their operands) and
    /// frees the fp32 values, as `freeze_weight` does. Under fp32 nothing changes.
    fn store_bf16(&self, buf: &mut CudaBuf<G>) {
        self.freeze_weight(buf)
    }

    fn upload(&self, host: &[f32]) -> CudaBuf<G> {
        let bytes: Vec<u8> = host.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.upload_bytes(host.len(), &bytes)
    }
    fn download(&self, buf: &CudaBuf<G>) -> Vec<f32> {
        self.sync_point();
        if buf.bf16_only {
            let mut bytes = vec![0u8; 2 * buf.len];
            if buf.len > 0 {
                self.gpu.dtoh(buf.ptr, &mut bytes).unwrap_or_else(|e| panic!("download: {e}"));
            }
            return bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect();
        }
        let mut bytes = vec![0u8; 4 * buf.len];
        if buf.len > 0 {
            self.gpu.dtoh(buf.ptr, &mut bytes).unwrap_or_else(|e| panic!("download: {e}"));
        }
        bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }
    fn len(&self, buf: &CudaBuf<G>) -> usize {
        buf.len
    }

    fn matmul(&self, a: &CudaBuf<G>, ta: bool, b: &CudaBuf<G>, tb: bool, c: &mut CudaBuf<G>, m: usize, n: usize, k: usize, accumulate: bool) {
        self.matmul_scaled(a, ta, b, tb, c, m, n, k, 1.0, accumulate)
    }

    /// One GEMM with `alpha` (cuBLAS: `alpha * acc (+ c)`).
    fn matmul_scaled(&self, a: &CudaBuf<G>, ta: bool, b: &CudaBuf<G>, tb: bool, c: &mut CudaBuf<G>, m: usize, n: usize, k: usize, alpha: f64, accumulate: bool) {
        self.weights_changed(c);
        if self.precision() == Precision::Bf16 {
            return self.matmul_bf16(a, ta, b, tb, c, m, n, k, alpha as f32, accumulate);
        }
        assert!(!a.bf16_only && !b.bf16_only, "an fp32 matmul of a weight frozen in bf16 (the backend's precision changed after freeze_weight)");
        assert!(a.len >= m * k && b.len >= k * n && c.len >= m * n, "matmul shapes");
        if m == 0 || n == 0 {
            return;
        }
        self.gemm(Gemm { alpha: alpha as f32, ..Gemm::row_major(a.ptr, ta, b.ptr, tb, c.ptr, m, n, k, accumulate) });
    }

    fn add_assign(&self, x: &mut CudaBuf<G>, y: &CudaBuf<G>) {
        assert_eq!(x.len, y.len, "add_assign lengths");
        assert!(!y.bf16_only, "add_assign: a frozen bf16 weight read as fp32");
        self.weights_changed(x);
        if x.len > 0 {
            self.launch("elementwise.cu", &[], "add_assign", grid1(x.len), BLOCK, 0, &[Arg::Ptr(x.ptr), Arg::Ptr(y.ptr), Arg::I64(x.len as i64)]);
        }
    }

    fn embedding(&self, table: &CudaBuf<G>, ids: &[u32], dim: usize, out: &mut CudaBuf<G>) {
        assert!(out.len >= ids.len() * dim, "embedding: out too short");
        assert!(ids.iter().all(|&i| (i as usize + 1) * dim <= table.len), "embedding: id outside the table");
        let ids_d = self.upload_u32(ids);
        self.gather_rows(table.ptr, &ids_d, dim, out.ptr);
    }

    fn embedding_bwd(&self, dout: &CudaBuf<G>, ids: &[u32], dim: usize, dtable: &mut CudaBuf<G>) {
        assert!(dout.len >= ids.len() * dim && ids.iter().all(|&i| (i as usize + 1) * dim <= dtable.len), "embedding_bwd shapes");
        self.scatter_add_rows(dout.ptr, ids, dim, dtable.ptr);
    }

    fn rmsnorm(&self, x: &CudaBuf<G>, w: &CudaBuf<G>, dim: usize, eps: f32, out: &mut CudaBuf<G>, rstd: &mut CudaBuf<G>) {
        let rows = x.len / dim;
        assert!(w.len == dim && out.len == x.len && rstd.len >= rows, "rmsnorm shapes");
        assert!(!x.bf16_only, "rmsnorm of an input stored in bf16 (only rmsnorm_bwd reads one)");
        if rows == 0 {
            return;
        }
        match rmsnorm_launch(rows, dim) {
            Some(([name, ..], grid, block)) => self.launch(
                "rmsnorm.cu", &[], name, grid, block, 0,
                &[Arg::Ptr(x.ptr), Arg::Ptr(w.ptr), Arg::Ptr(out.ptr), Arg::Ptr(rstd.ptr), Arg::I32(rows as i32), Arg::I32(dim as i32), Arg::F32(eps)],
            ),
            None => self.launch(
                "rmsnorm.cu", &[], "rmsnorm_fwd", (rows as u32, 1, 1), 256, 0,
                &[Arg::Ptr(x.ptr), Arg::Ptr(w.ptr), Arg::Ptr(out.ptr), Arg::Ptr(rstd.ptr), Arg::I32(dim as i32), Arg::F32(eps)],
            ),
        }
    }

    fn rmsnorm_bwd(&self, dy: &CudaBuf<G>, x: &CudaBuf<G>, w: &CudaBuf<G>, rstd: &CudaBuf<G>, dim: usize, dx: &mut CudaBuf<G>, dw: &mut CudaBuf<G>) {
        let rows = x.len / dim;
        assert!(dy.len == x.len && dx.len == x.len && w.len == dim && dw.len == dim && rstd.len >= rows, "rmsnorm_bwd shapes");
        if rows == 0 {
            return;
        }
        // x fp32, or stored in bf16 (`Backend::store_bf16`: the residual stream under bf16);
        // fp32 math either way.
        let x16 = x.bf16_only;
        match rmsnorm_launch(rows, dim) {
            Some(([_, name, name16], grid, block)) => self.launch(
                "rmsnorm.cu", &[], if x16 { name16 } else { name }, grid, block, 0,
                &[Arg::Ptr(dy.ptr), Arg::Ptr(x.ptr), Arg::Ptr(w.ptr), Arg::Ptr(rstd.ptr), Arg::Ptr(dx.ptr), Arg::I32(rows as i32), Arg::I32(dim as i32)],
            ),
            None => self.launch(
                "rmsnorm.cu", &[], if x16 { "rmsnorm_bwd_xbf16" } else { "rmsnorm_bwd" }, (rows as u32, 1, 1), 256, 0,
                &[Arg::Ptr(dy.ptr), Arg::Ptr(x.ptr), Arg::Ptr(w.ptr), Arg::Ptr(rstd.ptr), Arg::Ptr(dx.ptr), Arg::I32(dim as i32)],
            ),
        }
        self.launch(
            "elementwise.cu", &[], if x16 { "col_sum_xbf16" } else { "col_sum" }, grid1(dim), BLOCK, 0,
            &[Arg::Ptr(dy.ptr), Arg::Ptr(x.ptr), Arg::Ptr(rstd.ptr), Arg::Ptr(dw.ptr), Arg::I32(rows as i32), Arg::I32(dim as i32)],
        );
    }

    fn bias_add(&self, y: &mut CudaBuf<G>, b: &CudaBuf<G>, dim: usize) {
        assert!(b.len == dim && y.len % dim == 0, "bias_add shapes");
        if y.len > 0 {
            self.launch("elementwise.cu", &[], "bias_add", grid1(y.len), BLOCK, 0, &[Arg::Ptr(y.ptr), Arg::Ptr(b.ptr), Arg::I64(y.len as i64), Arg::I32(dim as i32)]);
        }
    }

    fn bias_bwd(&self, dy: &CudaBuf<G>, dim: usize, db: &mut CudaBuf<G>) {
        assert!(db.len == dim && dy.len % dim == 0, "bias_bwd shapes");
        self.launch(
            "elementwise.cu", &[], "col_sum", grid1(dim), BLOCK, 0,
            &[Arg::Ptr(dy.ptr), Arg::Ptr(0), Arg::Ptr(0), Arg::Ptr(db.ptr), Arg::I32((dy.len / dim) as i32), Arg::I32(dim as i32)],
        );
    }

    fn rope(&self, x: &mut CudaBuf<G>, positions: &[u32], n_heads: usize, head_dim: usize, inv_freq: &[f64], inverse: bool) {
        let tokens = positions.len();
        let half = head_dim / 2;
        assert!(x.len == tokens * n_heads * head_dim && inv_freq.len() >= half, "rope shapes");
        if x.len == 0 {
            return;
        }
        // [tokens, half, 2] (cos, sin) of the signed angle, in f64 then rounded, as on the CPU;
        // built on the host (exactly the CPU's values) once per distinct positions/frequencies.
        let mut cached = self.rope_table.lock().unwrap();
        let hit = cached.as_ref().is_some_and(|c| c.inverse == inverse && c.positions == positions && c.inv_freq[..] == inv_freq[..half]);
        if !hit {
            let sign = if inverse { -1.0 } else { 1.0 };
            let cs: Vec<f32> = positions
                .iter()
                .flat_map(|&p| inv_freq[..half].iter().flat_map(move |&f| {
                    let a = p as f64 * f;
                    [a.cos() as f32, (sign * a.sin()) as f32]
                }))
                .collect();
            let table = self.upload(&cs);
            *cached = Some(RopeTable { positions: positions.to_vec(), inv_freq: inv_freq[..half].to_vec(), inverse, table });
        }
        let cs_d = &cached.as_ref().expect("just filled").table;
        self.launch(
            "elementwise.cu", &[], "rope", grid1(tokens * half), BLOCK, 0,
            &[Arg::Ptr(x.ptr), Arg::Ptr(cs_d.ptr), Arg::I32(tokens as i32), Arg::I32(n_heads as i32), Arg::I32(head_dim as i32)],
        );
    }

    fn swiglu(&self, gate: &CudaBuf<G>, up: &CudaBuf<G>, out: &mut CudaBuf<G>) {
        assert!(gate.len == up.len && out.len == up.len, "swiglu shapes");
        assert!(!gate.bf16_only && !up.bf16_only, "swiglu of gate, up stored in bf16 (store_bf16 comes after the forward's swiglu)");
        if out.len > 0 {
            self.launch("elementwise.cu", &[], "swiglu_fwd", grid1(out.len), BLOCK, 0, &[Arg::Ptr(gate.ptr), Arg::Ptr(up.ptr), Arg::Ptr(out.ptr), Arg::I64(out.len as i64)]);
        }
    }

    fn swiglu_bwd(&self, dout: &CudaBuf<G>, gate: &CudaBuf<G>, up: &CudaBuf<G>, dgate: &mut CudaBuf<G>, dup: &mut CudaBuf<G>) {
        let n = gate.len;
        assert!(dout.len == n && up.len == n && dgate.len == n && dup.len == n, "swiglu_bwd shapes");
        assert!(gate.bf16_only == up.bf16_only, "swiglu_bwd: gate and up stored in different precisions");
        if n > 0 {
            // gate and up fp32, or stored in bf16 (`Backend::store_bf16`): swiglu_bwd_bf16, fp32 math.
            self.launch(
                "elementwise.cu", &[], if gate.bf16_only { "swiglu_bwd_bf16" } else { "swiglu_bwd" }, grid1(n), BLOCK, 0,
                &[Arg::Ptr(dout.ptr), Arg::Ptr(gate.ptr), Arg::Ptr(up.ptr), Arg::Ptr(dgate.ptr), Arg::Ptr(dup.ptr), Arg::I64(n as i64)],
            );
        }
    }

    fn attention(&self, q: &CudaBuf<G>, k: &CudaBuf<G>, v: &CudaBuf<G>, layout: &AttnLayout, dims: AttnDims, out: &mut CudaBuf<G>, lse: &mut CudaBuf<G>) {
        if self.precision() == Precision::Bf16 {
            return self.attention_bf16(q, k, v, layout, dims, out, lse);
        }
        let (hd, nh, nkv) = (dims.head_dim, dims.n_heads, dims.n_kv_heads);
        let t = layout.num_tokens();
        assert!(q.len >= t * nh * hd && k.len >= t * nkv * hd && v.len >= t * nkv * hd && out.len >= t * nh * hd && lse.len >= t * nh, "attention shapes");
        assert!(!q.bf16_only && !k.bf16_only && !v.bf16_only, "fp32 attention of q, k, v stored in bf16 (the precision changed after store_bf16)");
        let (spans, qt) = self.span_tables(layout);
        if qt.is_empty() {
            return;
        }
        let qt_d = self.upload_i32(&qt);
        let smem = (2 * KT * (hd + 1) + QW * hd) * 4;
        self.launch(
            "attention.cu", &[("HEAD_DIM", hd)], "attn_fwd", ((qt.len() / 2) as u32, nh as u32, 1), (32 * QW) as u32, smem,
            &[
                Arg::Ptr(q.ptr), Arg::Ptr(k.ptr), Arg::Ptr(v.ptr), Arg::Ptr(out.ptr), Arg::Ptr(lse.ptr), Arg::Ptr(spans.ptr), Arg::Ptr(qt_d.ptr),
                Arg::I32(nh as i32), Arg::I32(nkv as i32), Arg::F32((1.0 / (hd as f64).sqrt()) as f32),
            ],
        );
    }

    fn attention_bwd(
        &self, dout: &CudaBuf<G>, q: &CudaBuf<G>, k: &CudaBuf<G>, v: &CudaBuf<G>, out: &CudaBuf<G>, lse: &CudaBuf<G>, layout: &AttnLayout, dims: AttnDims,
        dq: &mut CudaBuf<G>, dk: &mut CudaBuf<G>, dv: &mut CudaBuf<G>,
    ) {
        if self.precision() == Precision::Bf16 {
            return self.attention_bwd_bf16(dout, q, k, v, out, lse, layout, dims, dq, dk, dv);
        }
        let (hd, nh, nkv) = (dims.head_dim, dims.n_heads, dims.n_kv_heads);
        let t = layout.num_tokens();
        assert!(dout.len >= t * nh * hd && out.len >= t * nh * hd && lse.len >= t * nh && dq.len >= t * nh * hd, "attention_bwd shapes");
        assert!(dk.len >= t * nkv * hd && dv.len >= t * nkv * hd && k.len >= t * nkv * hd && v.len >= t * nkv * hd, "attention_bwd shapes");
        assert!(!q.bf16_only && !k.bf16_only && !v.bf16_only, "fp32 attention_bwd of q, k, v stored in bf16 (the precision changed after store_bf16)");
        self.fill(dk, 0.0);
        self.fill(dv, 0.0);
        let (spans, qt) = self.span_tables(layout);
        if qt.is_empty() {
            return;
        }
        let def = [("HEAD_DIM", hd)];
        let scale = Arg::F32((1.0 / (hd as f64).sqrt()) as f32);
        let d = self.attn_bwd_d(dout, out, t * nh, hd);
        let qt_d = self.upload_i32(&qt);
        let smem = (2 * KT * (hd + 1) + 2 * QW * hd) * 4;
        self.launch(
            "attention.cu", &def, "attn_bwd_dq", ((qt.len() / 2) as u32, nh as u32, 1), (32 * QW) as u32, smem,
            &[
                Arg::Ptr(q.ptr), Arg::Ptr(k.ptr), Arg::Ptr(v.ptr), Arg::Ptr(dout.ptr), Arg::Ptr(lse.ptr), Arg::Ptr(d.ptr), Arg::Ptr(dq.ptr),
                Arg::Ptr(spans.ptr), Arg::Ptr(qt_d.ptr), Arg::I32(nh as i32), Arg::I32(nkv as i32), scale,
            ],
        );
        for kt in dkdv_wave_tiles(layout, KT) {
            let kt_d = self.upload_i32(&kt);
            self.launch(
                "attention.cu", &def, "attn_bwd_dkdv", ((kt.len() / 2) as u32, nkv as u32, 1), 128, 0,
                &[
                    Arg::Ptr(q.ptr), Arg::Ptr(k.ptr), Arg::Ptr(v.ptr), Arg::Ptr(dout.ptr), Arg::Ptr(lse.ptr), Arg::Ptr(d.ptr), Arg::Ptr(dk.ptr), Arg::Ptr(dv.ptr),
                    Arg::Ptr(spans.ptr), Arg::Ptr(kt_d.ptr), Arg::I32(nh as i32), Arg::I32(nkv as i32), scale,
                ],
            );
        }
    }

    fn lm_head_logprobs(&self, h: &CudaBuf<G>, w: &CudaBuf<G>, dim: usize, rows: &[u32], targets: &[u32]) -> (CudaBuf<G>, CudaBuf<G>) {
        let vocab = w.len / dim;
        let n = rows.len();
        assert!(targets.len() == n && targets.iter().all(|&t| (t as usize) < vocab), "lm_head: targets");
        assert!(rows.iter().all(|&r| (r as usize + 1) * dim <= h.len), "lm_head: rows outside h");
        if self.precision() == Precision::Bf16 && self.lm_head_mma() {
            return self.lm_head_logprobs_mma(h, w, dim, rows, targets);
        }
        let (logp, lse) = (self.alloc(n), self.alloc(n));
        let chunk = self.lm_chunk(vocab, n);
        let (hc, mut logits) = (self.alloc(chunk * dim), self.alloc(chunk * vocab)); // [chunk, dim], [chunk, vocab]
        for c0 in (0..n).step_by(chunk) {
            let rc = chunk.min(n - c0);
            let (rows_d, tg_d) = (self.upload_u32(&rows[c0..c0 + rc]), self.upload_u32(&targets[c0..c0 + rc]));
            self.gather_rows(h.ptr, &rows_d, dim, hc.ptr);
            self.lm_gemm(&hc, false, w, true, &mut logits, rc, vocab, dim, false);
            self.launch(
                "lm_head.cu", &[], "lse_rows", (rc as u32, 1, 1), 256, 0,
                &[Arg::Ptr(logits.ptr), Arg::Ptr(tg_d.ptr), Arg::Ptr(logp.at(c0)), Arg::Ptr(lse.at(c0)), Arg::I32(vocab as i32)],
            );
        }
        (logp, lse)
    }

    fn lm_head_bwd(
        &self, h: &CudaBuf<G>, w: &CudaBuf<G>, dim: usize, rows: &[u32], targets: &[u32], lse: &CudaBuf<G>, dlogp: &[f32], dh: &mut CudaBuf<G>, dw: Option<&mut CudaBuf<G>>,
    ) {
        assert_eq!(dlogp.len(), rows.len(), "lm_head_bwd: dlogp length vs rows");
        self.lm_head_bwd_buf(h, w, dim, rows, targets, lse, &self.upload(dlogp), dh, dw)
    }

    fn lm_head_bwd_buf(
        &self, h: &CudaBuf<G>, w: &CudaBuf<G>, dim: usize, rows: &[u32], targets: &[u32], lse: &CudaBuf<G>, dl_d: &CudaBuf<G>, dh: &mut CudaBuf<G>, mut dw: Option<&mut CudaBuf<G>>,
    ) {
        let vocab = w.len / dim;
        let n = rows.len();
        assert!(targets.len() == n && dl_d.len == n && lse.len >= n && dw.as_ref().is_none_or(|d| d.len == w.len) && dh.len == h.len, "lm_head_bwd shapes");
        if n == 0 {
            return;
        }
        let chunk = self.lm_chunk(vocab, n);
        // [chunk, dim] gathered h, [chunk, vocab] logits then their gradient, [chunk, dim] dh rows
        let (hc, mut g, mut dhc) = (self.alloc(chunk * dim), self.alloc(chunk * vocab), self.alloc(chunk * dim));
        for c0 in (0..n).step_by(chunk) {
            let rc = chunk.min(n - c0);
            let (rows_d, tg_d) = (self.upload_u32(&rows[c0..c0 + rc]), self.upload_u32(&targets[c0..c0 + rc]));
            self.gather_rows(h.ptr, &rows_d, dim, hc.ptr);
            self.lm_gemm(&hc, false, w, true, &mut g, rc, vocab, dim, false);
            self.launch(
                "lm_head.cu", &[], "lm_head_grad", grid1(rc * vocab), BLOCK, 0,
                &[Arg::Ptr(g.ptr), Arg::Ptr(tg_d.ptr), Arg::Ptr(lse.at(c0)), Arg::Ptr(dl_d.at(c0)), Arg::I32(rc as i32), Arg::I32(vocab as i32)],
            );
            // dw[vocab, dim] += g^T @ hc ; dhc[rc, dim] = g @ w
            if let Some(dw) = dw.as_deref_mut() {
                self.lm_gemm(&g, true, &hc, false, dw, vocab, dim, rc, true);
            }
            self.lm_gemm(&g, false, w, false, &mut dhc, rc, dim, vocab, false);
            self.scatter_add_rows(dhc.ptr, &rows[c0..c0 + rc], dim, dh.ptr);
        }
    }

    fn segment_dpo(&self, logp: &CudaBuf<G>, pairs: &[super::SegmentPair], h: &super::SegmentDpo) -> (Vec<(f64, f64)>, CudaBuf<G>) {
        self.segment_dpo_dev(logp, pairs, h)
    }

    fn kv_write(&self, cache: &mut CudaBuf<G>, k: &CudaBuf<G>, v: &CudaBuf<G>, slots: &[u32], geom: KvGeom) {
        let row = geom.n_kv_heads * geom.head_dim;
        assert!(k.len >= slots.len() * row && v.len >= slots.len() * row, "kv_write: k/v shorter than slots");
        assert_eq!(cache.len, geom.layer_len(), "kv_write: cache length vs geometry");
        assert!(slots.iter().all(|&s| (s as usize) < geom.num_blocks * geom.block_size), "kv_write: slot outside the pool");
        if slots.is_empty() {
            return;
        }
        let slots_d = self.upload_u32(slots);
        self.launch(
            "kv_cache.cu", &kv_defines(geom.head_dim, cache), "kv_write", grid1(slots.len() * row), BLOCK, 0,
            &[Arg::Ptr(cache.ptr), Arg::Ptr(k.ptr), Arg::Ptr(v.ptr), Arg::Ptr(slots_d.ptr), Arg::I32(slots.len() as i32), Arg::I32(geom.n_kv_heads as i32), Arg::I32(geom.block_size as i32)],
        );
    }

    fn kv_copy_blocks(&self, cache: &mut CudaBuf<G>, pairs: &[(u32, u32)], geom: KvGeom) {
        let n = geom.block_len();
        assert_eq!(cache.len, geom.layer_len(), "kv_copy_blocks: cache length vs geometry");
        for &(src, dst) in pairs {
            assert!((src.max(dst) as usize + 1) * n <= cache.len, "kv_copy_blocks: block outside the pool");
            // One launch per pair keeps the CPU's sequential semantics when pairs chain.
            self.launch(
                "kv_cache.cu", &kv_defines(geom.head_dim, cache), "kv_copy_block", grid1(n), BLOCK, 0,
                &[Arg::Ptr(cache.ptr), Arg::U32(src), Arg::U32(dst), Arg::I64(n as i64)],
            );
        }
    }

    fn paged_attention(&self, q: &CudaBuf<G>, cache: &CudaBuf<G>, seqs: &[PagedSeq], block_table: &[u32], geom: KvGeom, dims: AttnDims, out: &mut CudaBuf<G>) {
        self.paged_attention_split(q, cache, seqs, block_table, geom, dims, out, self.decode_split.load(Ordering::Relaxed))
    }

    fn sum_squares(&self, x: &CudaBuf<G>) -> f64 {
        self.sum_squares_dev(x)
    }

    fn sum_squares_many(&self, xs: &[&CudaBuf<G>]) -> Vec<f64> {
        self.sum_squares_many_dev(xs)
    }

    fn adamw_at(&self, p: &mut CudaBuf<G>, g: &CudaBuf<G>, at: usize, m: &mut CudaBuf<G>, v: &mut CudaBuf<G>, h: &super::AdamwStep) {
        self.adamw_dev(p, g, at, m, v, h)
    }

    fn weight_slice(&self, w: &CudaBuf<G>, at: usize, n: usize) -> CudaBuf<G> {
        self.weight_slice_dev(w, at, n)
    }

    fn set_weight_slice(&self, w: &mut CudaBuf<G>, at: usize, src: &CudaBuf<G>) {
        self.set_weight_slice_dev(w, at, src)
    }

    fn adamw_slice(&self, p: &mut CudaBuf<G>, g: &CudaBuf<G>, at: usize, m: &mut CudaBuf<G>, v: &mut CudaBuf<G>, h: &super::AdamwStep) {
        self.adamw_slice_dev(p, g, at, m, v, h)
    }

    fn sum_squares_slices(&self, xs: &[(&CudaBuf<G>, std::ops::Range<usize>)]) -> Vec<f64> {
        self.sum_squares_slices_dev(xs)
    }

    fn sgd(&self, p: &mut CudaBuf<G>, g: &CudaBuf<G>, lr: f64, weight_decay: f64, grad_scale: f64) {
        self.sgd_dev(p, g, lr, weight_decay, grad_scale)
    }
}

/// Keys per paged_decode block (a split of a decode context): an 8k context spreads over 32
/// blocks per KV head, while the bytes a split adds besides its K/V (its queries, and its
/// partials written and read back: `group * (3 * head_dim + 4)` floats) stay small beside its
/// `2 * 256 * head_dim` K/V values: at a group of 8, under 5% of the K/V bytes of an fp32
/// cache, under 10% of a bf16 one.
const DECODE_SPLIT: usize = 256;
/// Warps per paged_decode block and query heads per block at most (DEC_WARPS, DEC_GMAX in
/// kernels/kv_cache.cu).
const DEC_WARPS: usize = 4;
const DEC_GMAX: usize = 8;

impl<G: Gpu> CudaBackend<G> {
    /// `Backend::paged_attention` with decode contexts cut into splits of `split` keys (tests
    /// force small splits on short contexts). Sequences with one query (a decode step) go to
    /// paged_decode (+ paged_decode_combine where a context has several splits), the others
    /// (prefill chunks) to paged_attn, or under `Precision::Bf16` to paged_attn_mma (tensor
    /// cores, `paged_mma_heads` query heads of a GQA group per block); the launches write
    /// disjoint rows of `out`.
    #[allow(clippy::too_many_arguments)]
    fn paged_attention_split(&self, q: &CudaBuf<G>, cache: &CudaBuf<G>, seqs: &[PagedSeq], block_table: &[u32], geom: KvGeom, dims: AttnDims, out: &mut CudaBuf<G>, split: usize) {
        let (hd, nh, nkv) = (dims.head_dim, dims.n_heads, dims.n_kv_heads);
        assert_eq!(hd, geom.head_dim, "paged_attention: head_dim vs cache geometry");
        assert!(nkv > 0 && nh.is_multiple_of(nkv) && nkv == geom.n_kv_heads && split > 0, "paged_attention: head geometry");
        assert!(geom.layer_len() / hd <= u32::MAX as usize, "paged_attention: cache rows past u32 (paged_decode's row index)");
        // paged_attn(_mma): sq int4 (q_start, q_len, ctx_len, table_start), qt int2 (seq, first
        // query) of tile_q queries: QW per paged_attn block, or for paged_attn_mma hb heads x
        // tile_q queries per block
        let (mut sq, mut qt) = (Vec::new(), Vec::new());
        let mma = self.precision() == Precision::Bf16;
        let hb = precision::paged_mma_heads(nh / nkv);
        let tile_q = if mma { precision::paged_mma_queries(hb) } else { QW };
        // paged_decode: ds int4 (q row, ctx_len, table_start, first partial or -1), items int2
        // (ds, split); cs the ds of several splits (paged_decode_combine), n_parts partials.
        let (mut ds, mut items, mut cs, mut n_parts) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for s in seqs {
            assert!(s.q_len <= s.ctx_len, "paged_attention: more queries than keys");
            assert!((s.q_start + s.q_len) * nh * hd <= q.len && out.len >= q.len, "paged_attention: q/out too short");
            let nb = s.ctx_len.div_ceil(geom.block_size);
            assert!(s.table_start + nb <= block_table.len(), "paged_attention: block table shorter than ctx_len");
            assert!(block_table[s.table_start..s.table_start + nb].iter().all(|&b| (b as usize) < geom.num_blocks), "paged_attention: block outside the pool");
            if s.q_len == 1 {
                let (i, ns) = ((ds.len() / 4) as i32, s.ctx_len.div_ceil(split));
                ds.extend([s.q_start as i32, s.ctx_len as i32, s.table_start as i32, if ns > 1 { n_parts as i32 } else { -1 }]);
                items.extend((0..ns as i32).flat_map(|j| [i, j]));
                if ns > 1 {
                    cs.push(i);
                    n_parts += ns;
                }
                continue;
            }
            sq.extend([s.q_start as i32, s.q_len as i32, s.ctx_len as i32, s.table_start as i32]);
            for j in (0..s.q_len).step_by(tile_q) {
                qt.extend([(sq.len() / 4 - 1) as i32, j as i32]);
            }
        }
        if qt.is_empty() && items.is_empty() {
            return;
        }
        let (defs, tb_d, scale) = (kv_defines(hd, cache), self.upload_u32(block_table), (1.0 / (hd as f64).sqrt()) as f32);
        if !qt.is_empty() {
            let (sq_d, qt_d) = (self.upload_i32(&sq), self.upload_i32(&qt));
            let common = [
                Arg::Ptr(q.ptr), Arg::Ptr(cache.ptr), Arg::Ptr(out.ptr), Arg::Ptr(sq_d.ptr), Arg::Ptr(qt_d.ptr), Arg::Ptr(tb_d.ptr),
                Arg::I32(nh as i32), Arg::I32(nkv as i32), Arg::I32(geom.block_size as i32),
            ];
            let n_tiles = (qt.len() / 2) as u32;
            if mma {
                let args: Vec<Arg> = common.iter().copied().chain([Arg::I32(hb as i32), Arg::F32(scale)]).collect();
                self.launch("kv_cache.cu", &defs, "paged_attn_mma", (n_tiles, (nh / hb) as u32, 1), 128, precision::paged_mma_smem_bytes(hd), &args);
            } else {
                let args: Vec<Arg> = common.iter().copied().chain([Arg::F32(scale)]).collect();
                self.launch("kv_cache.cu", &defs, "paged_attn", (n_tiles, nh as u32, 1), (32 * QW) as u32, 0, &args);
            }
        }
        if items.is_empty() {
            return;
        }
        // Items and combined sequences padded to a power of two with (-1, 0) and -1, which the
        // kernels skip, and the partials' room likewise: the grids and sizes then change only
        // when a count doubles, not each time a context crosses into a new split, so a decode
        // step keeps its graph (graphs.rs) over many steps at any batch.
        let n_items = (items.len() / 2).next_power_of_two();
        while items.len() < 2 * n_items {
            items.extend([-1, 0]);
        }
        if !cs.is_empty() {
            cs.resize(cs.len().next_power_of_two(), -1);
        }
        // [n_parts, n_heads, hd + 2] partials: unnormalised accumulator, max, sum
        let part = (n_parts > 0).then(|| self.alloc(n_parts.next_power_of_two() * nh * (hd + 2)));
        let part_ptr = part.as_ref().map_or(out.ptr, |p| p.ptr); // unused when there is no partial
        let (ds_d, it_d) = (self.upload_i32(&ds), self.upload_i32(&items));
        let chunks = (nh / nkv).div_ceil(DEC_GMAX) as u32;
        self.launch(
            "kv_cache.cu", &defs, "paged_decode", ((items.len() / 2) as u32, nkv as u32, chunks), (32 * DEC_WARPS) as u32, 0,
            &[
                Arg::Ptr(q.ptr), Arg::Ptr(cache.ptr), Arg::Ptr(out.ptr), Arg::Ptr(part_ptr), Arg::Ptr(ds_d.ptr), Arg::Ptr(it_d.ptr), Arg::Ptr(tb_d.ptr),
                Arg::I32(nh as i32), Arg::I32(nkv as i32), Arg::I32(geom.block_size as i32), Arg::I32(split as i32), Arg::F32(scale),
            ],
        );
        if !cs.is_empty() {
            let cs_d = self.upload_i32(&cs);
            self.launch(
                "kv_cache.cu", &defs, "paged_decode_combine", (cs.len() as u32, nh as u32, 1), 32, 0,
                &[Arg::Ptr(part_ptr), Arg::Ptr(out.ptr), Arg::Ptr(ds_d.ptr), Arg::Ptr(cs_d.ptr), Arg::I32(nh as i32), Arg::I32(split as i32)],
            );
        }
    }
}

/// The kv_cache.cu variant of a cache: fp32, or bf16 (`Backend::kv_alloc` under bf16).
fn kv_defines<G: Gpu>(head_dim: usize, cache: &CudaBuf<G>) -> Vec<(&'static str, usize)> {
    let mut d = vec![("HEAD_DIM", head_dim)];
    if cache.bf16_only {
        d.push(("KV_BF16", 1));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_groups_in_order() {
        let (rows, off, mem) = csr(&[3, 1, 3, 0, 1, 3]);
        assert_eq!(rows, vec![0, 1, 3]);
        assert_eq!(off, vec![0, 1, 3, 6]);
        assert_eq!(mem, vec![3, 1, 4, 0, 2, 5]);
    }

    #[test]
    fn waves_separate_spans_sharing_a_prefix() {
        use crate::backend::Span;
        let l = AttnLayout {
            spans: vec![
                Span { start: 0, len: 4, prefix_start: 0, prefix_len: 0 },
                Span { start: 4, len: 2, prefix_start: 0, prefix_len: 4 },
                Span { start: 6, len: 3, prefix_start: 0, prefix_len: 4 },
                Span { start: 9, len: 5, prefix_start: 9, prefix_len: 0 },
            ],
        };
        assert_eq!(dkdv_waves(&l), vec![vec![0, 3], vec![1], vec![2]]);
    }
}
