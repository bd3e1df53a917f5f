//! `Cudarc`: the `Gpu` on a real device through cudarc's thin checked driver calls and our
//! cuBLAS binding (cublas.rs). Deliberately parallel to `Sim`: the device's primary context
//! (CUDA 13 changed explicit context creation; the primary context is the same in 12 and 13),
//! kernels loaded as CUBIN for the device's `sm_XY` with cuModuleLoadData. Checks that libcuda
//! is loadable before touching it, so "no GPU" is an error, not a panic. fp32 GEMMs go through
//! cublasSgemmStridedBatched, bf16 ones through cublasGemmStridedBatchedEx. In a data-parallel
//! group (`Gpu::join_group`) it keeps an NCCL communicator for the gradient sums and ZeRO-1's
//! reduce-scatter and all-gather (nccl.rs).
//!
//! CUDA 13 drivers: every driver call here exists in libcuda.so.1 of a 13.x driver (cudarc is
//! built against the 12.9 headers; a 13.x driver keeps every 12.x entry point, e.g.
//! cuEventElapsedTime, which the 13.0 headers replaced by cuEventElapsedTime_v2). Checked on an
//! H200 with driver 580 (CUDA 13.0): the parity table and the timings ran.

use super::cublas::{self, Cublas};
use super::nccl;
use super::gpu::{Arg, DevPtr, EventId, Gemm, GemmInput, Gpu, GpuError, GraphId, Image, Op, Piece, StreamId};
use cudarc::driver::{result as drv, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::Mutex;

pub struct Cudarc {
    ctx: sys::CUcontext,
    blas: Cublas,
    handle: cublas::Handle,
    name: String,
    arch: String,
    /// Stream-ordered allocation (cuMemAllocAsync from the default pool) is supported.
    pools: bool,
    modules: Mutex<HashMap<String, sys::CUmodule>>,
    funcs: Mutex<HashMap<(String, String), sys::CUfunction>>,
    /// Created streams by id (0, the default stream, is the null stream) and the current one.
    streams: Mutex<(HashMap<StreamId, sys::CUstream>, StreamId)>,
    events: Mutex<(HashMap<EventId, sys::CUevent>, EventId)>,
    /// The NCCL communicator of a data-parallel group, once joined (`Gpu::join_group`).
    nccl: Mutex<Option<nccl::Comm>>,
    /// cuBLAS workspace of each stream GEMMs ran on (`CUBLAS_WORKSPACE` bytes, made on first
    /// use): every GEMM runs with one, captured or not, so that cuBLAS chooses the same
    /// algorithms in a graph as out of one, and allocates nothing under capture.
    workspaces: Mutex<HashMap<usize, DevPtr>>,
    /// The stream decode steps are captured on (`graph_capture`; made on first use) and the
    /// captured graphs by id: (graph, its executable).
    capture: Mutex<Option<sys::CUstream>>,
    graphs: Mutex<(HashMap<GraphId, (sys::CUgraph, sys::CUgraphExec)>, GraphId)>,
}

/// Bytes of a cuBLAS workspace: what the cuBLAS docs recommend for Hopper (32 MiB; 4 MiB
/// before it).
const CUBLAS_WORKSPACE: usize = 32 << 20;

// The context and handles are used under `set_current` on every call; the maps are locked.
unsafe impl Send for Cudarc {}
unsafe impl Sync for Cudarc {}

fn err(e: impl std::fmt::Debug) -> GpuError {
    GpuError::Device(format!("{e:?}"))
}

/// The CUDA version the driver supports (cuDriverGetVersion: 13000 for 13.0), or why not.
pub(crate) fn driver_version() -> Result<(i32, i32), String> {
    if !unsafe { sys::is_culib_present() } {
        return Err("libcuda.so (the NVIDIA driver) is not loadable".into());
    }
    let mut v = 0;
    let r = unsafe { sys::cuDriverGetVersion(&mut v) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuDriverGetVersion: {r:?}"));
    }
    Ok((v / 1000, v % 1000 / 10))
}

impl Cudarc {
    /// Opens device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Cudarc, GpuError> {
        if !unsafe { sys::is_culib_present() } {
            return Err(GpuError::NoDevice("libcuda.so (the NVIDIA driver) is not loadable; use --device cpu or sim".into()));
        }
        drv::init().map_err(|e| GpuError::NoDevice(format!("cuInit: {e:?}")))?;
        let count = drv::device::get_count().map_err(err)?;
        if ordinal as i32 >= count {
            return Err(GpuError::NoDevice(format!("device {ordinal} requested, {count} present")));
        }
        let dev = drv::device::get(ordinal as i32).map_err(err)?;
        let attr = |a| unsafe { drv::device::get_attribute(dev, a) }.map_err(err);
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let blas = Cublas::load().map_err(GpuError::NoDevice)?;
        let ctx = unsafe { drv::primary_ctx::retain(dev) }.map_err(err)?;
        unsafe { drv::ctx::set_current(ctx) }.map_err(err)?;
        let handle = blas.create().map_err(GpuError::Device)?;
        let name = drv::device::get_name(dev).map_err(err)?;
        // Stream-ordered allocation from the device's default pool, which keeps freed memory for
        // reuse (release threshold: never): cuMemFree synchronizes the device, and every op
        // frees the index arrays it uploads, so plain cuMemAlloc/cuMemFree serialized host and
        // GPU at every op.
        let pools = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)? != 0;
        if pools {
            let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
            unsafe { sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), dev) }.result().map_err(err)?;
            let mut threshold = u64::MAX;
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
            unsafe { sys::cuMemPoolSetAttribute(pool.assume_init(), attr, &mut threshold as *mut u64 as *mut c_void) }.result().map_err(err)?;
        }
        Ok(Cudarc {
            ctx,
            blas,
            handle,
            name: format!("cuda:{ordinal} ({name}, sm_{major}{minor})"),
            arch: format!("sm_{major}{minor}"),
            pools,
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
            streams: Mutex::new((HashMap::new(), 0)),
            events: Mutex::new((HashMap::new(), 0)),
            nccl: Mutex::new(None),
            workspaces: Mutex::new(HashMap::new()),
            capture: Mutex::new(None),
            graphs: Mutex::new((HashMap::new(), 0)),
        })
    }

    /// The cuBLAS workspace of `stream` (allocated on first use, synchronously: for the
    /// capture stream, before its capture begins).
    fn workspace(&self, stream: sys::CUstream) -> Result<DevPtr, GpuError> {
        let mut ws = self.workspaces.lock().unwrap();
        if let Some(&p) = ws.get(&(stream as usize)) {
            return Ok(p);
        }
        let p = unsafe { drv::malloc_sync(CUBLAS_WORKSPACE) }.map_err(err)?;
        ws.insert(stream as usize, p);
        Ok(p)
    }

    /// The capture stream: non-blocking, so that nothing on the legacy default stream (the
    /// uploads) joins a capture; captured work is launched on the current stream.
    fn capture_stream(&self) -> Result<sys::CUstream, GpuError> {
        let mut c = self.capture.lock().unwrap();
        if let Some(s) = *c {
            return Ok(s);
        }
        let s = drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(err)?;
        *c = Some(s);
        Ok(s)
    }

    /// `Gpu::launch` on `stream`.
    #[allow(clippy::too_many_arguments)]
    fn launch_on(&self, stream: sys::CUstream, module: &str, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[Arg]) -> Result<(), GpuError> {
        let key = (module.to_string(), kernel.to_string());
        let f = {
            let mut funcs = self.funcs.lock().unwrap();
            match funcs.get(&key) {
                Some(&f) => f,
                None => {
                    let m = *self.modules.lock().unwrap().get(module).ok_or_else(|| err(format!("module {module} not loaded")))?;
                    let f = unsafe { drv::module::get_function(m, CString::new(kernel).unwrap()) }.map_err(err)?;
                    funcs.insert(key, f);
                    f
                }
            }
        };
        if smem > 48 * 1024 {
            let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            unsafe { drv::function::set_function_attribute(f, attr, smem as i32) }.map_err(err)?;
        }
        // Each argument in its own 8-byte slot; the driver reads the kernel's declared size
        // from the slot's start (little-endian, so 4-byte values sit in the low bytes). Under
        // capture the driver copies the values into the graph's node.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => v as u32 as u64,
                Arg::U32(v) => v as u64,
                Arg::I64(v) => v as u64,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        let mut ptrs: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        unsafe { drv::launch_kernel(f, grid, block, smem, stream, &mut ptrs) }.map_err(|e| err(format!("{kernel}: {e:?}")))
    }

    /// `Gpu::gemm_ex` on `stream`, with that stream's workspace.
    fn gemm_on(&self, stream: sys::CUstream, g: &Gemm, input: GemmInput) -> Result<(), GpuError> {
        let ws = self.workspace(stream)?;
        self.blas.set_stream(self.handle, stream as *mut c_void).map_err(GpuError::Device)?;
        self.blas.set_workspace(self.handle, ws as *mut c_void, CUBLAS_WORKSPACE).map_err(GpuError::Device)?;
        let op = |t: bool| if t { cublas::OP_T } else { cublas::OP_N };
        let call = cublas::Call {
            ta: op(g.trans_a),
            tb: op(g.trans_b),
            m: g.m as i32,
            n: g.n as i32,
            k: g.k as i32,
            a: g.a as *const c_void,
            lda: g.lda.max(1) as i32,
            stride_a: g.stride_a as i64,
            b: g.b as *const c_void,
            ldb: g.ldb.max(1) as i32,
            stride_b: g.stride_b as i64,
            c: g.c as *mut c_void,
            ldc: g.ldc.max(1) as i32,
            stride_c: g.stride_c as i64,
            batch: g.batch as i32,
        };
        match input {
            GemmInput::F32 => self.blas.sgemm(self.handle, &call, g.alpha, g.beta),
            GemmInput::Bf16 => self.blas.gemm_ex(self.handle, &call, cublas::R_16BF, g.alpha, g.beta),
        }
        .map_err(GpuError::Device)
    }

    /// Issues `ops` on the capture stream `s`, which is capturing.
    fn issue_captured(&self, s: sys::CUstream, ops: &[Op]) -> Result<(), GpuError> {
        for op in ops {
            match op {
                Op::Launch { module, kernel, grid, block, smem, args } => self.launch_on(s, module, kernel, *grid, *block, *smem, args)?,
                Op::Gemm { g, input } => self.gemm_on(s, g, *input)?,
                Op::Dtod { dst, src, bytes } => unsafe { drv::memcpy_dtod_async(*dst, *src, *bytes, s) }.map_err(err)?,
            }
        }
        Ok(())
    }

    fn stream(&self, s: StreamId) -> Result<sys::CUstream, GpuError> {
        if s == 0 {
            return Ok(drv::stream::null());
        }
        self.streams.lock().unwrap().0.get(&s).copied().ok_or_else(|| err(format!("stream {s} was never created")))
    }

    fn current(&self) -> Result<sys::CUstream, GpuError> {
        let cur = self.streams.lock().unwrap().1;
        self.stream(cur)
    }

    fn event(&self, e: EventId) -> Result<sys::CUevent, GpuError> {
        self.events.lock().unwrap().0.get(&e).copied().ok_or_else(|| err(format!("event {e} was never recorded or was destroyed")))
    }

    fn bind(&self) -> Result<(), GpuError> {
        unsafe { drv::ctx::set_current(self.ctx) }.map_err(err)
    }
}

impl Drop for Cudarc {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            drop(self.nccl.lock().unwrap().take());
            for (_, (g, exec)) in self.graphs.lock().unwrap().0.drain() {
                let _ = unsafe { drv::graph::exec_destroy(exec) };
                let _ = unsafe { drv::graph::destroy(g) };
            }
            if let Some(s) = self.capture.lock().unwrap().take() {
                let _ = unsafe { drv::stream::destroy(s) };
            }
            self.blas.destroy(self.handle);
            // After the handle, which may still hold one.
            for (_, p) in self.workspaces.lock().unwrap().drain() {
                let _ = unsafe { drv::free_sync(p) };
            }
        }
    }
}

impl Gpu for Cudarc {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn arch(&self) -> String {
        self.arch.clone()
    }
    // Allocation, free and upload are ordered on the legacy default stream, which every
    // blocking stream (all that `stream_create` makes) synchronizes with: a buffer freed there
    // is reused only after all work issued before the free, on any stream.
    fn alloc(&self, bytes: usize) -> Result<DevPtr, GpuError> {
        self.bind()?;
        if self.pools {
            unsafe { drv::malloc_async(drv::stream::null(), bytes.max(4)) }.map_err(err)
        } else {
            unsafe { drv::malloc_sync(bytes.max(4)) }.map_err(err)
        }
    }
    fn free(&self, ptr: DevPtr) {
        if self.bind().is_ok() {
            let _ = if self.pools { unsafe { drv::free_async(ptr, drv::stream::null()) } } else { unsafe { drv::free_sync(ptr) } };
        }
    }
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), GpuError> {
        self.bind()?;
        // From pageable memory the driver stages `src` before returning, so the caller may
        // drop it at once; the copy itself runs in stream order, without a device sync.
        unsafe { drv::memcpy_htod_async(dst, src, drv::stream::null()) }.map_err(err)
    }
    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<(), GpuError> {
        self.bind()?;
        unsafe { drv::memcpy_dtoh_sync(dst, src) }.map_err(err)
    }
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), GpuError> {
        self.bind()?;
        // On the legacy default stream, as `htod`: after all work issued so far on any stream.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, drv::stream::null()) }.map_err(err)
    }
    fn load(&self, module: &str, image: &Image) -> Result<(), GpuError> {
        self.bind()?;
        let mut mods = self.modules.lock().unwrap();
        if !mods.contains_key(module) {
            // cuModuleLoadData takes a CUBIN as bytes or PTX as NUL-terminated text.
            let ptx;
            let data = match image {
                Image::Cubin(b) => b.as_ptr() as *const c_void,
                Image::Ptx(p) => {
                    ptx = CString::new(p.as_str()).map_err(err)?;
                    ptx.as_ptr() as *const c_void
                }
            };
            let m = unsafe { drv::module::load_data(data) }.map_err(|e| GpuError::Build(format!("{module}: cuModuleLoadData: {e:?}")))?;
            mods.insert(module.to_string(), m);
        }
        Ok(())
    }
    fn has_module(&self, module: &str) -> bool {
        self.modules.lock().unwrap().contains_key(module)
    }
    fn launch(&self, module: &str, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[Arg]) -> Result<(), GpuError> {
        self.bind()?;
        let stream = self.current()?;
        self.launch_on(stream, module, kernel, grid, block, smem, args)
    }
    fn gemm(&self, g: &Gemm) -> Result<(), GpuError> {
        self.gemm_ex(g, GemmInput::F32)
    }
    fn gemm_ex(&self, g: &Gemm, input: GemmInput) -> Result<(), GpuError> {
        self.bind()?;
        let stream = self.current()?;
        self.gemm_on(stream, g, input)
    }
    fn graphs_by_default(&self) -> bool {
        true
    }
    fn graph_capture(&self, ops: &[Op]) -> Result<GraphId, GpuError> {
        self.bind()?;
        let s = self.capture_stream()?;
        // Its cuBLAS workspace now: cuMemAlloc is not allowed under capture.
        self.workspace(s)?;
        // Thread-local mode: a call of this thread that is unsafe under capture fails (and the
        // step then runs op by op) instead of silently escaping the graph.
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        unsafe { drv::stream::begin_capture(s, mode) }.map_err(err)?;
        let issued = self.issue_captured(s, ops);
        // End the capture whatever happened, so the stream can be used again.
        let graph = unsafe { drv::stream::end_capture(s) };
        let graph = match (issued, graph) {
            (Ok(()), Ok(g)) if !g.is_null() => g,
            (Ok(()), Ok(_)) => return Err(err("cuStreamEndCapture returned no graph")),
            (Err(e), Ok(g)) => {
                if !g.is_null() {
                    let _ = unsafe { drv::graph::destroy(g) };
                }
                return Err(e);
            }
            (Err(e), Err(_)) => return Err(e),
            (Ok(()), Err(e)) => return Err(err(e)),
        };
        let exec = match unsafe { drv::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) } {
            Ok(x) => x,
            Err(e) => {
                let _ = unsafe { drv::graph::destroy(graph) };
                return Err(err(e));
            }
        };
        let mut g = self.graphs.lock().unwrap();
        g.1 += 1;
        let id = g.1;
        g.0.insert(id, (graph, exec));
        Ok(id)
    }
    fn graph_launch(&self, id: GraphId) -> Result<(), GpuError> {
        self.bind()?;
        let exec = self.graphs.lock().unwrap().0.get(&id).map(|g| g.1).ok_or_else(|| err(format!("graph {id} was never captured or was destroyed")))?;
        let stream = self.current()?;
        unsafe { drv::graph::launch(exec, stream) }.map_err(err)
    }
    fn graph_destroy(&self, id: GraphId) {
        let Some((g, exec)) = self.graphs.lock().unwrap().0.remove(&id) else { return };
        if self.bind().is_ok() {
            let _ = unsafe { drv::graph::exec_destroy(exec) };
            let _ = unsafe { drv::graph::destroy(g) };
        }
    }
    fn stream_create(&self) -> Result<StreamId, GpuError> {
        self.bind()?;
        // A blocking stream: the default stream (used by the synchronous copies) waits for it.
        let st = drv::stream::create(drv::stream::StreamKind::Default).map_err(err)?;
        let mut g = self.streams.lock().unwrap();
        let id = g.0.len() as StreamId + 1;
        g.0.insert(id, st);
        Ok(id)
    }
    fn set_stream(&self, s: StreamId) -> Result<(), GpuError> {
        self.stream(s)?;
        self.streams.lock().unwrap().1 = s;
        Ok(())
    }
    fn event_record(&self, s: StreamId) -> Result<EventId, GpuError> {
        self.bind()?;
        let stream = self.stream(s)?;
        let ev = drv::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(err)?;
        unsafe { drv::event::record(ev, stream) }.map_err(err)?;
        let mut g = self.events.lock().unwrap();
        g.1 += 1;
        let id = g.1;
        g.0.insert(id, ev);
        Ok(id)
    }
    fn stream_wait_event(&self, s: StreamId, e: EventId) -> Result<(), GpuError> {
        self.bind()?;
        let (stream, ev) = (self.stream(s)?, self.event(e)?);
        unsafe { drv::stream::wait_event(stream, ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }.map_err(err)
    }
    fn event_synchronize(&self, e: EventId) -> Result<(), GpuError> {
        self.bind()?;
        let ev = self.event(e)?;
        unsafe { drv::event::synchronize(ev) }.map_err(err)
    }
    fn event_elapsed_ms(&self, start: EventId, end: EventId) -> Result<f32, GpuError> {
        self.bind()?;
        let (a, b) = (self.event(start)?, self.event(end)?);
        unsafe { drv::event::elapsed(a, b) }.map_err(err)
    }
    fn event_destroy(&self, e: EventId) {
        if let Some(ev) = self.events.lock().unwrap().0.remove(&e) {
            if self.bind().is_ok() {
                let _ = unsafe { drv::event::destroy(ev) };
            }
        }
    }
    fn synchronize(&self) -> Result<(), GpuError> {
        self.bind()?;
        drv::ctx::synchronize().map_err(err)
    }
    fn memory_free(&self) -> Option<u64> {
        self.bind().ok()?;
        drv::mem_get_info().ok().map(|(free, _)| free as u64)
    }
    fn join_group(&self, rank: usize, world: usize, timeout: std::time::Duration, all_gather: &mut dyn FnMut(Vec<u8>) -> Result<Vec<Vec<u8>>, String>) -> Result<bool, GpuError> {
        self.bind()?;
        let comm = nccl::join(rank, world, timeout, all_gather).map_err(GpuError::Device)?;
        *self.nccl.lock().unwrap() = Some(comm);
        Ok(true)
    }
    fn group_all_reduce_start(&self, bufs: &[(DevPtr, usize)]) -> Result<bool, GpuError> {
        self.with_comm(|c, s| c.all_reduce_start(bufs, s))
    }
    fn group_reduce_start(&self, pieces: &[Piece]) -> Result<bool, GpuError> {
        self.with_comm(|c, s| c.reduce_start(pieces, s))
    }
    fn group_broadcast(&self, pieces: &[Piece]) -> Result<bool, GpuError> {
        self.with_comm(|c, s| c.broadcast(pieces, s))
    }
    fn group_all_reduce_wait(&self) -> Result<(), GpuError> {
        self.with_comm(|c, s| c.all_reduce_wait(s)).map(|_| ())
    }
}

impl Cudarc {
    /// `f` on the NCCL communicator with the current stream; `Ok(false)` where no group was
    /// joined (the caller takes the host path).
    fn with_comm(&self, f: impl FnOnce(&mut nccl::Comm, sys::CUstream) -> Result<(), String>) -> Result<bool, GpuError> {
        let mut g = self.nccl.lock().unwrap();
        let Some(comm) = g.as_mut() else { return Ok(false) };
        self.bind()?;
        f(comm, self.current()?).map_err(GpuError::Device)?;
        Ok(true)
    }
}
