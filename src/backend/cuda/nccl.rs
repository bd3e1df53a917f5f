//! NCCL for data-parallel training on several GPUs (DESIGN.md section 5): `libnccl.so.2`,
//! loaded at run time and only when a `--device cuda` run has more than one rank, and the
//! device communicator (`Comm`) that `Cudarc` keeps for `Gpu::group_all_reduce_start` / `_wait`
//! and ZeRO-1's `Gpu::group_reduce_start` / `group_broadcast`.
//!
//! Types and constants come from cudarc's `nccl` feature (`cudarc::nccl::sys`, nccl.h); the
//! library is opened by our own search, as cuBLAS is (cublas.rs): cudarc's loader tries
//! `libnccl.so`, `libnccl.so.12`, `libnccl.so.11`, ... but never `libnccl.so.2`, the only name
//! the `nvidia-nccl-cu12` / `nvidia-nccl-cu13` wheels and the system's libnccl2 package ship,
//! and it panics when nothing opens. Search order (`candidates`), the first that opens wins:
//! 1. `$IPO_NCCL`, a file path: the only candidate when set;
//! 2. the setup-cuda.sh prefixes (`$IPO_CUDA_DEPS`, `<workspace>/.deps/cuda`): the wheels'
//!    lib folders `nvidia/nccl/lib`, `nvidia/cu13/lib`;
//! 3. `$CUDA_HOME`, `$CUDA_PATH` (lib64, lib, targets/x86_64-linux/lib), /usr/local/cuda/lib64 and /usr/local/cuda-X.Y/lib64;
//! 4. the wheels' lib folders under the site-packages of the machine's Pythons (where PyTorch's
//!    nvidia-nccl-cu12 lives);
//! 5. the bare soname, through the dynamic loader (libnccl2 in /usr/lib, LD_LIBRARY_PATH).
//!
//! This is `ptxsim::cudalib`'s search (that of NVRTC and cuBLAS) with NCCL's own soname major
//! (`Spec::majors`: 2) and wheel folders; it also looks in /usr/local/cuda-X.Y/lib64.
//!
//! Rendezvous (`join`): every rank loads the library and rank 0 makes the unique id
//! (ncclGetUniqueId, 128 bytes); one host all-gather (the TCP group) then gives every rank
//! every rank's status and rank 0's id, so a rank without libnccl fails the join on every rank,
//! named; then ncclCommInitRankConfig on the current device with a non-blocking communicator
//! (`config`: NCCL_CONFIG_INITIALIZER with `blocking = 0`), which returns at once; the host polls
//! ncclCommGetAsyncError until the init leaves ncclInProgress, for at most the group's timeout
//! (IPO_DIST_TIMEOUT), and on a timeout aborts the communicator and fails naming the rank, the
//! world and the timeout: a rank that dies or never arrives no longer hangs the others inside
//! the init. A library without ncclCommInitRankConfig (before NCCL 2.14) gets the blocking
//! ncclCommInitRank, without that bound; so does NCCL_COMM_BLOCKING=1, which NCCL lets override
//! the config.
//!
//! Non-blocking for every call, not only the init: whether a communicator blocks is fixed when
//! it is made, so one made non-blocking for a bounded init stays so. NCCL's rule for such a
//! communicator (docs: `ncclCommGetAsyncError`, "Nonblocking group operation"): any call may
//! return ncclInProgress, and then nothing may be called on it, nor the stream relied on, until
//! ncclCommGetAsyncError reports it left ncclInProgress. Here every ncclGroupEnd goes through
//! `Comm::settle` (ncclInProgress: poll to completion, bounded by the timeout, so a peer that
//! stalls while the group connects is a timeout too, not a hang); the collectives between
//! ncclGroupStart and ncclGroupEnd are only queued (ncclInProgress counts as queued there).
//!
//! All-reduce (`Comm::all_reduce_start`, `Comm::all_reduce_wait`): in place, f32 sum, on the
//! communicator's own non-blocking stream. The trainer starts each decoder layer's gradients
//! as soon as the last micro-batch's backward has finished that layer (layers last to first),
//! then the rest (embeddings, final norm, lm-head) after the backward, and waits before the
//! norm and the update. Started buffers collect until they fill a bucket of 25 MiB (PyTorch
//! DDP's size; a larger buffer alone), which is then enqueued after an event recorded on the
//! compute stream at that call (each bucket one ncclGroupStart/End around one ncclAllReduce per
//! buffer, which NCCL launches together); the wait enqueues what is left. So the all-reduce is
//! overlapped with the backward of the earlier layers: the compute stream does not wait for
//! the NCCL stream, and the backward never touches a layer's gradients again once it is
//! started. The host then waits for that stream, polling ncclCommGetAsyncError, for at most the
//! group's timeout (IPO_DIST_TIMEOUT) counted from the wait: a rank that dies or stalls makes
//! the others abort the communicator and fail, not hang.
//!
//! ZeRO-1 (`train::zero`): the reduce-scatter of the gradients (`Comm::reduce_start`) is one
//! in-place ncclReduce (f32, sum) per non-empty piece to the rank that owns it, queued with the
//! all-reduce's buffers into the same 25 MiB buckets (by elements) and groups, and completed by
//! `Comm::all_reduce_wait`; each rank receives its own slices' sums only. The all-gather of the
//! updated weights (`Comm::broadcast`) is one in-place ncclBroadcast per non-empty piece from
//! its owner, in one group (ncclBfloat16 for weights kept in bf16 only, else ncclFloat32),
//! after an event on the compute stream, and waited for (timeout-bounded) before it returns.
//!
//! Proven without a GPU: the search and its errors, the rendezvous's error paths, the config's
//! fields, and (with a libnccl present, e.g. `IPO_NCCL`) ncclGetVersion, ncclGetUniqueId and the
//! binding of every symbol. Unproven here: the non-blocking init and its timeout, the
//! all-reduce, its overlap with the backward, the reduces and the broadcasts (they need GPUs;
//! which buffers are started when, and the results of the host paths, are tested on cpu/sim).

use super::gpu::{DevPtr, Piece};
use cudarc::driver::{result as drv, sys};
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclResult_t, ncclUniqueId};
use ptxsim::cudalib::{self, Env, Spec};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SONAME: &str = "libnccl.so.2";
/// What `Env::from_process` reads: the env var; the wheels' lib folders, relative to a
/// site-packages folder or a pip prefix.
const SPEC: Spec = Spec { name: "NCCL", stem: "libnccl", env: "IPO_NCCL", companions: &[], pip_dirs: &["nvidia/nccl/lib", "nvidia/cu13/lib"], majors: &[2] };
/// Bytes of gradients per all-reduce group (PyTorch DDP's default bucket).
const BUCKET_BYTES: usize = 25 << 20;

/// Every place to try, in search order, with the rule that gave it (files that may not exist;
/// the bare soname last): `cudalib`'s search with NCCL's soname and wheel folders.
#[cfg(test)]
fn candidates(env: &Env) -> Vec<(PathBuf, String)> {
    cudalib::candidates(&SPEC, env).into_iter().map(|c| (c.path, c.rule)).collect()
}

/// The error when no candidate opened: what to install, and every place tried.
fn not_found(tried: &[String]) -> String {
    format!(
        "{SONAME} (NCCL, needed by --device cuda with more than one rank) not found: install it with `pip install nvidia-nccl-cu12` \
         (CUDA 12) or `pip install nvidia-nccl-cu13` (CUDA 13), or the system's libnccl2 package, or set IPO_NCCL to the file; tried: {}",
        tried.join("; ")
    )
}

type Res = c_int;

/// A loaded libnccl: the calls we make.
pub(crate) struct Nccl {
    get_version: unsafe extern "C" fn(*mut c_int) -> Res,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> Res,
    comm_init_rank: unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> Res,
    /// (comm, nranks, id, rank, config): since NCCL 2.14; None before (the blocking init then).
    comm_init_rank_config: Option<unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t) -> Res>,
    /// (send, recv, count, ncclDataType_t, ncclRedOp_t, comm, cudaStream_t)
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, ncclComm_t, *mut c_void) -> Res,
    /// (send, recv, count, ncclDataType_t, ncclRedOp_t, root, comm, cudaStream_t)
    reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, c_int, ncclComm_t, *mut c_void) -> Res,
    /// (send, recv, count, ncclDataType_t, root, comm, cudaStream_t)
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, ncclComm_t, *mut c_void) -> Res,
    group_start: unsafe extern "C" fn() -> Res,
    group_end: unsafe extern "C" fn() -> Res,
    get_async_error: unsafe extern "C" fn(ncclComm_t, *mut Res) -> Res,
    comm_abort: unsafe extern "C" fn(ncclComm_t) -> Res,
    comm_destroy: unsafe extern "C" fn(ncclComm_t) -> Res,
    error_string: unsafe extern "C" fn(Res) -> *const c_char,
    pub(crate) path: PathBuf,
    pub(crate) rule: String,
    /// Kept open (last: the function pointers above point into it).
    _lib: cudalib::Loaded,
}

impl Nccl {
    /// The first libnccl.so.2 of this process's search (`candidates`) that opens.
    pub(crate) fn load() -> Result<Nccl, String> {
        Self::load_in(&Env::from_process(&SPEC))
    }

    pub(crate) fn load_in(env: &Env) -> Result<Nccl, String> {
        Self::bind(cudalib::load_in(&SPEC, env).map_err(|e| not_found(&e.tried))?)
    }

    fn bind(lib: cudalib::Loaded) -> Result<Nccl, String> {
        macro_rules! sym {
            ($n:literal) => {
                unsafe { *lib.lib.get($n).map_err(|e| format!("NCCL {}: {e}", lib.describe()))? }
            };
        }
        Ok(Nccl {
            get_version: sym!(b"ncclGetVersion\0"),
            get_unique_id: sym!(b"ncclGetUniqueId\0"),
            comm_init_rank: sym!(b"ncclCommInitRank\0"),
            comm_init_rank_config: unsafe { lib.lib.get(b"ncclCommInitRankConfig\0").ok().map(|f| *f) },
            all_reduce: sym!(b"ncclAllReduce\0"),
            reduce: sym!(b"ncclReduce\0"),
            broadcast: sym!(b"ncclBroadcast\0"),
            group_start: sym!(b"ncclGroupStart\0"),
            group_end: sym!(b"ncclGroupEnd\0"),
            get_async_error: sym!(b"ncclCommGetAsyncError\0"),
            comm_abort: sym!(b"ncclCommAbort\0"),
            comm_destroy: sym!(b"ncclCommDestroy\0"),
            error_string: sym!(b"ncclGetErrorString\0"),
            path: lib.path.clone(),
            rule: lib.rule.clone(),
            _lib: lib,
        })
    }

    /// "/path (found via RULE)".
    pub(crate) fn describe(&self) -> String {
        format!("{} (found via {})", self.path.display(), self.rule)
    }

    fn check(&self, call: &str, r: Res) -> Result<(), String> {
        if r == ncclResult_t::ncclSuccess as Res {
            return Ok(());
        }
        let p = unsafe { (self.error_string)(r) };
        let what = if p.is_null() { "?".into() } else { unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned() };
        Err(format!("{call} returned ncclResult_t {r}: {what}"))
    }

    /// (major, minor, patch) of the library (ncclGetVersion; no GPU needed).
    pub(crate) fn version(&self) -> Result<(i32, i32, i32), String> {
        let v = self.version_code()?;
        // NCCL_VERSION_CODE: X*10000 + Y*100 + Z since 2.9, X*1000 + Y*100 + Z before.
        Ok(if v >= 20900 { (v / 10000, v % 10000 / 100, v % 100) } else { (v / 1000, v % 1000 / 100, v % 100) })
    }

    /// The library's NCCL_VERSION_CODE (ncclGetVersion).
    fn version_code(&self) -> Result<i32, String> {
        let mut v = 0;
        self.check("ncclGetVersion", unsafe { (self.get_version)(&mut v) })?;
        Ok(v)
    }

    /// A new unique id for a communicator (rank 0; no GPU needed, it opens a bootstrap socket).
    pub(crate) fn unique_id(&self) -> Result<[u8; 128], String> {
        let mut id = ncclUniqueId { internal: [0; 128] };
        self.check("ncclGetUniqueId", unsafe { (self.get_unique_id)(&mut id) })?;
        Ok(id.internal.map(|c| c as u8))
    }
}

/// The rendezvous before ncclCommInitRank: every rank's `loaded` (the library, and at rank 0
/// the unique id) or why not, all-gathered; on success this rank's library and rank 0's id,
/// else an error naming every rank that failed (the same on every rank).
fn handshake<T>(rank: usize, world: usize, loaded: Result<(T, Option<[u8; 128]>), String>, all_gather: &mut dyn FnMut(Vec<u8>) -> Result<Vec<Vec<u8>>, String>) -> Result<(T, [u8; 128]), String> {
    // [1 | rank 0's id] or [0 | why], per rank.
    let status = match &loaded {
        Ok((_, id)) => [&[1u8][..], id.as_ref().map_or(&[][..], |id| &id[..])].concat(),
        Err(e) => [&[0u8][..], e.as_bytes()].concat(),
    };
    let all = all_gather(status).map_err(|e| format!("NCCL rendezvous: {e}"))?;
    if all.len() != world {
        return Err(format!("NCCL rendezvous: {} ranks answered, expected {world}", all.len()));
    }
    let failed: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(_, s)| s.first() != Some(&1))
        .map(|(r, s)| format!("rank {r}: {}", String::from_utf8_lossy(s.get(1..).unwrap_or_default())))
        .collect();
    if !failed.is_empty() {
        return Err(format!("NCCL for --device cuda with {world} ranks (rank {rank} here): {}", failed.join("; ")));
    }
    let id: [u8; 128] = all[0].get(1..).and_then(|b| b.try_into().ok()).ok_or("NCCL rendezvous: rank 0 sent no 128-byte unique id")?;
    Ok((loaded.map_err(|e| e.to_string())?.0, id))
}

/// Joins the NCCL group of `world` ranks as `rank` on the current context's device (see the
/// module docs); every rank calls it together.
pub(crate) fn join(rank: usize, world: usize, timeout: Duration, all_gather: &mut dyn FnMut(Vec<u8>) -> Result<Vec<Vec<u8>>, String>) -> Result<Comm, String> {
    let loaded = Nccl::load().and_then(|n| {
        let id = if rank == 0 { Some(n.unique_id()?) } else { None };
        Ok((n, id))
    });
    let (nccl, id) = handshake(rank, world, loaded, all_gather)?;
    // A non-blocking stream: the compute stream (the legacy default stream unless the backend
    // set another) does not wait for it, so the backward runs on while it sums; it waits only
    // for the event that each enqueue records on the compute stream.
    let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).map_err(|e| format!("NCCL stream: {e:?}"))?;
    let mut c = Comm { nccl, comm: std::ptr::null_mut(), stream, timeout, pending: Vec::new(), failed: None };
    let id = ncclUniqueId { internal: id.map(|b| b as c_char) };
    let (call, r) = match c.nccl.comm_init_rank_config {
        Some(init) => {
            let mut cfg = config(c.nccl.version_code()?);
            ("ncclCommInitRankConfig", unsafe { init(&mut c.comm, world as c_int, id, rank as c_int, &mut cfg) })
        }
        None => ("ncclCommInitRank", unsafe { (c.nccl.comm_init_rank)(&mut c.comm, world as c_int, id, rank as c_int) }),
    };
    // A failed init may leave a communicator to abort (the error's state lives in it).
    let r = if c.comm.is_null() { c.nccl.check(call, r) } else { c.settle(call, r) };
    c.abort_on(r).map_err(|e| format!("NCCL communicator of rank {rank} of {world} (timeout {:.1} s, IPO_DIST_TIMEOUT; NCCL at {}): {e}", timeout.as_secs_f64(), c.nccl.describe()))?;
    Ok(c)
}

/// NCCL_CONFIG_INITIALIZER (nccl.h) with `blocking = 0`, for the library of NCCL_VERSION_CODE
/// `version`: `size` and `magic` as the macro sets them, every other field
/// NCCL_CONFIG_UNDEF_INT (INT_MIN) or NULL, which NCCL replaces by its defaults. The layout is
/// that of cudarc's headers (NCCL 2.30); NCCL copies `min(size, its own sizeof)` bytes, so an
/// older library reads the fields it knows and a newer one keeps its defaults for the rest.
fn config(version: i32) -> ncclConfig_t {
    const UNDEF: c_int = c_int::MIN;
    let null = std::ptr::null();
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: version as u32,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: null,
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: null,
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Consecutive runs of buffers of `lens` elements, at most `max` elements a run (a longer
/// buffer alone).
fn buckets(lens: &[usize], max: usize) -> Vec<Range<usize>> {
    let (mut out, mut start, mut size) = (Vec::new(), 0, 0);
    for (i, &n) in lens.iter().enumerate() {
        if i > start && size + n > max {
            out.push(start..i);
            (start, size) = (i, 0);
        }
        size += n;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

/// One rank's NCCL communicator and its stream. Used under `Cudarc`'s lock with its context
/// current.
pub(crate) struct Comm {
    nccl: Nccl,
    /// Null once aborted.
    comm: ncclComm_t,
    stream: sys::CUstream,
    timeout: Duration,
    /// Sums started (`all_reduce_start`, `reduce_start`) but not yet enqueued: less than a
    /// bucket so far.
    pending: Vec<Sum>,
    /// Set when a collective failed (the communicator is then aborted): later ones fail too.
    failed: Option<String>,
}

/// One in-place f32 sum over the group: `count` values at `ptr`, on every rank
/// (ncclAllReduce, `root` None) or on rank `root` (ncclReduce).
#[derive(Clone, Copy, Debug)]
struct Sum {
    ptr: DevPtr,
    count: usize,
    root: Option<usize>,
}

// The communicator and stream are used by one thread at a time (`Cudarc` keeps them locked).
unsafe impl Send for Comm {}

impl Comm {
    /// Starts summing `bufs` (address, f32 count) over the group in place, after the work
    /// issued so far on stream `after`: they join the pending sums, which are enqueued on the
    /// communicator's stream once they fill a bucket (see the module docs). Returns without
    /// waiting.
    pub(crate) fn all_reduce_start(&mut self, bufs: &[(DevPtr, usize)], after: sys::CUstream) -> Result<(), String> {
        self.start(bufs.iter().map(|&(ptr, count)| Sum { ptr, count, root: None }), after)
    }

    /// `all_reduce_start` of f32 `pieces`, each summed into its root's copy only (ncclReduce).
    pub(crate) fn reduce_start(&mut self, pieces: &[Piece], after: sys::CUstream) -> Result<(), String> {
        assert!(pieces.iter().all(|p| !p.bf16), "reduce_start: gradients are f32");
        self.start(pieces.iter().map(|p| Sum { ptr: p.ptr, count: p.count, root: Some(p.root) }), after)
    }

    fn start(&mut self, sums: impl Iterator<Item = Sum>, after: sys::CUstream) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.pending.extend(sums.filter(|s| s.count > 0));
        if self.pending.iter().map(|s| s.count).sum::<usize>() < BUCKET_BYTES / 4 {
            return Ok(());
        }
        let r = self.flush(after);
        self.abort_on(r)
    }

    /// Enqueues the pending sums (after the work issued so far on `after`) and waits for every
    /// sum started, at most the timeout (see the module docs).
    pub(crate) fn all_reduce_wait(&mut self, after: sys::CUstream) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.flush(after).and_then(|()| self.wait("NCCL all-reduce"));
        self.abort_on(r)
    }

    /// Copies each piece from its root to every rank in place (one ncclBroadcast each, in one
    /// group), after the pending sums and the work issued so far on `after`, and waits for
    /// it, at most the timeout.
    pub(crate) fn broadcast(&mut self, pieces: &[Piece], after: sys::CUstream) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.flush(after).and_then(|()| self.enqueue_broadcast(pieces, after)).and_then(|()| self.wait("NCCL all-gather"));
        self.abort_on(r)
    }

    /// On an error, aborts the communicator: every later call fails.
    fn abort_on(&mut self, r: Result<(), String>) -> Result<(), String> {
        if let Err(e) = &r {
            if !self.comm.is_null() {
                unsafe { (self.nccl.comm_abort)(self.comm) };
                self.comm = std::ptr::null_mut();
            }
            self.pending.clear();
            self.failed = Some(format!("the NCCL communicator was aborted after: {e}"));
        }
        r
    }

    fn flush(&mut self, after: sys::CUstream) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let sums = std::mem::take(&mut self.pending);
        self.enqueue(&sums, after)
    }

    /// Makes the communicator's stream wait for the work issued so far on `after`.
    fn after(&self, after: sys::CUstream) -> Result<(), String> {
        let dbg = |e: drv::DriverError| format!("NCCL stream ordering: {e:?}");
        let ev = drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(dbg)?;
        unsafe { drv::event::record(ev, after) }.map_err(dbg)?;
        unsafe { drv::stream::wait_event(self.stream, ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }.map_err(dbg)?;
        unsafe { drv::event::destroy(ev) }.map_err(dbg)
    }

    fn enqueue(&self, sums: &[Sum], after: sys::CUstream) -> Result<(), String> {
        self.after(after)?;
        let lens: Vec<usize> = sums.iter().map(|s| s.count).collect();
        let (f32_, sum) = (ncclDataType_t::ncclFloat32 as c_int, ncclRedOp_t::ncclSum as c_int);
        let stream = self.stream as *mut c_void;
        for b in buckets(&lens, BUCKET_BYTES / 4) {
            self.nccl.check("ncclGroupStart", unsafe { (self.nccl.group_start)() })?;
            for s in sums[b].iter().filter(|s| s.count > 0) {
                let p = s.ptr as *mut c_void;
                let (call, r) = match s.root {
                    None => ("ncclAllReduce", unsafe { (self.nccl.all_reduce)(p, p, s.count, f32_, sum, self.comm, stream) }),
                    Some(root) => ("ncclReduce", unsafe { (self.nccl.reduce)(p, p, s.count, f32_, sum, root as c_int, self.comm, stream) }),
                };
                self.nccl.check(call, queued(r))?;
            }
            self.settle("ncclGroupEnd", unsafe { (self.nccl.group_end)() })?;
        }
        Ok(())
    }

    fn enqueue_broadcast(&self, pieces: &[Piece], after: sys::CUstream) -> Result<(), String> {
        if pieces.iter().all(|p| p.count == 0) {
            return Ok(());
        }
        self.after(after)?;
        let stream = self.stream as *mut c_void;
        self.nccl.check("ncclGroupStart", unsafe { (self.nccl.group_start)() })?;
        for p in pieces.iter().filter(|p| p.count > 0) {
            let t = if p.bf16 { ncclDataType_t::ncclBfloat16 } else { ncclDataType_t::ncclFloat32 } as c_int;
            let ptr = p.ptr as *mut c_void;
            self.nccl.check("ncclBroadcast", queued(unsafe { (self.nccl.broadcast)(ptr, ptr, p.count, t, p.root as c_int, self.comm, stream) }))?;
        }
        self.settle("ncclGroupEnd", unsafe { (self.nccl.group_end)() })
    }

    /// The result `r` of `call`; where it is ncclInProgress (a non-blocking communicator, see
    /// the module docs), ncclCommGetAsyncError polled until the communicator leaves it, at
    /// most the timeout.
    fn settle(&self, call: &str, r: Res) -> Result<(), String> {
        let t0 = Instant::now();
        let mut r = r;
        while r == ncclResult_t::ncclInProgress as Res {
            if t0.elapsed() > self.timeout {
                return Err(format!("{call} did not finish within {:.1} s (IPO_DIST_TIMEOUT): a rank stalled, died or never joined", self.timeout.as_secs_f64()));
            }
            std::thread::sleep(Duration::from_micros(100));
            self.nccl.check("ncclCommGetAsyncError", unsafe { (self.nccl.get_async_error)(self.comm, &mut r) })?;
        }
        self.nccl.check(call, r)
    }

    /// Waits for the stream, at most `timeout`, checking NCCL's asynchronous errors; `what`
    /// names the collectives in the errors.
    fn wait(&self, what: &str) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            match unsafe { sys::cuStreamQuery(self.stream) } {
                sys::CUresult::CUDA_SUCCESS => return Ok(()),
                sys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(format!("{what} stream: {e:?}")),
            }
            let mut a: Res = 0;
            self.nccl.check("ncclCommGetAsyncError", unsafe { (self.nccl.get_async_error)(self.comm, &mut a) })?;
            if a != ncclResult_t::ncclSuccess as Res && a != ncclResult_t::ncclInProgress as Res {
                return self.nccl.check(&format!("{what} (a rank failed or left?)"), a);
            }
            if t0.elapsed() > self.timeout {
                return Err(format!("{what} did not finish within {:.1} s (IPO_DIST_TIMEOUT): a rank stalled, died or left", self.timeout.as_secs_f64()));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// A collective's result between ncclGroupStart and ncclGroupEnd: on a non-blocking
/// communicator ncclInProgress there means queued, like ncclSuccess (ncclGroupEnd settles).
fn queued(r: Res) -> Res {
    if r == ncclResult_t::ncclInProgress as Res {
        ncclResult_t::ncclSuccess as Res
    } else {
        r
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            unsafe { (self.nccl.comm_destroy)(self.comm) };
        }
        let _ = unsafe { drv::stream::destroy(self.stream) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"not a library").unwrap();
    }

    /// A fake tree: a setup-cuda.sh prefix, a CUDA_HOME and a site-packages folder, each with a
    /// (fake) libnccl.so.2 where its wheel or toolkit puts it.
    fn tree(name: &str) -> (tempfile::TempDir, Env) {
        let root = tempfile::Builder::new().prefix(name).tempdir().unwrap();
        let r = root.path();
        touch(&r.join("deps/nvidia/nccl/lib/libnccl.so.2"));
        touch(&r.join("cuda-home/lib64/libnccl.so.2"));
        touch(&r.join("site/nvidia/cu13/lib/libnccl.so.2"));
        let env = Env { deps: vec![r.join("deps")], cuda_homes: vec![r.join("cuda-home")], usr_local: r.join("usr/local"), site_packages: vec![r.join("site")], explicit: None };
        (root, env)
    }

    #[test]
    fn search_order_prefix_cuda_home_site_packages_then_loader() {
        let (root, env) = tree("nccl-order");
        let r = root.path();
        let c = candidates(&env);
        let existing: Vec<PathBuf> = c.iter().map(|c| c.0.clone()).filter(|p| p.exists()).collect();
        assert_eq!(existing, [r.join("deps/nvidia/nccl/lib/libnccl.so.2"), r.join("cuda-home/lib64/libnccl.so.2"), r.join("site/nvidia/cu13/lib/libnccl.so.2")]);
        assert!(c.iter().any(|c| c.0 == r.join("site/nvidia/nccl/lib/libnccl.so.2")), "the nvidia-nccl-cu12 wheel's folder");
        assert!(c.iter().any(|c| c.0 == r.join("usr/local/cuda/lib64/libnccl.so.2")));
        assert_eq!(c.last().unwrap(), &(PathBuf::from("libnccl.so.2"), "dynamic loader path".to_string()));
        // IPO_NCCL is the only candidate when set.
        let env = Env { explicit: Some(r.join("x/libnccl.so.2")), ..env };
        assert_eq!(candidates(&env), vec![(r.join("x/libnccl.so.2"), "$IPO_NCCL".to_string())]);
    }

    #[test]
    fn missing_library_is_an_error_naming_it_the_places_and_the_wheels() {
        let env = Env { explicit: Some(PathBuf::from("/nonexistent/libnccl.so.2")), ..Env::default() };
        let e = Nccl::load_in(&env).err().expect("no library there");
        for want in ["libnccl.so.2 (NCCL, needed by --device cuda with more than one rank) not found", "nvidia-nccl-cu12", "nvidia-nccl-cu13", "IPO_NCCL", "/nonexistent/libnccl.so.2 [$IPO_NCCL]: absent"] {
            assert!(e.contains(want), "{want:?} in {e}");
        }
        // Fake files are tried and named with the loader's reason; absent folders say so. (The
        // bare soname at the end may open a real NCCL on this machine: then the fakes were
        // still passed over, and the loaded one is the loader's.)
        let (root, env) = tree("nccl-missing");
        match Nccl::load_in(&env) {
            Err(e) => {
                let fake = root.path().join("deps/nvidia/nccl/lib/libnccl.so.2");
                assert!(e.contains(&format!("{} [setup-cuda.sh prefix", fake.display())), "{e}");
                assert!(!e.contains(&format!("{}]: absent", fake.display())), "{e}");
                assert!(e.contains("usr/local/cuda/lib64/libnccl.so.2 [toolkit /usr/local/cuda]: absent"), "{e}");
                assert!(e.contains("libnccl.so.2 [dynamic loader path]"), "{e}");
            }
            Ok(n) => assert_eq!(n.rule, "dynamic loader path"),
        }
    }

    #[test]
    fn rendezvous_fails_on_every_rank_naming_the_rank_without_nccl() {
        let run = |ok: [bool; 3]| {
            let hs: Vec<_> = crate::dist::Group::threads(3, Duration::from_secs(20))
                .into_iter()
                .map(|g| {
                    std::thread::spawn(move || {
                        use crate::dist::Comm as _;
                        let r = g.rank();
                        let loaded = if ok[r] { Ok((r, (r == 0).then_some([7u8; 128]))) } else { Err(not_found(&[format!("x/libnccl.so.2 [rank {r}]: absent")])) };
                        handshake(r, 3, loaded, &mut |m| g.all_gather(m).map_err(|e| e.to_string()))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        };
        for (r, out) in run([true; 3]).into_iter().enumerate() {
            assert_eq!(out.unwrap(), (r, [7u8; 128]), "every rank gets rank 0's id");
        }
        for out in run([true, false, true]) {
            let e = out.unwrap_err();
            assert!(e.starts_with("NCCL for --device cuda with 3 ranks (rank "), "{e}");
            assert!(e.contains("rank 1: libnccl.so.2 (NCCL, needed by --device cuda with more than one rank) not found"), "{e}");
            assert!(e.contains("nvidia-nccl-cu12") && !e.contains("rank 2:") && !e.contains("rank 0:"), "{e}");
        }
    }

    /// NCCL_CONFIG_INITIALIZER (nccl.h) with `blocking = 0`: NCCL rejects a config whose magic
    /// differs and reads `size` bytes of it; every field we do not set must be "undefined"
    /// (INT_MIN, NULL) so that NCCL picks its own default.
    #[test]
    fn config_is_the_initializer_with_blocking_off() {
        let c = config(22_803);
        assert_eq!((c.size, c.magic, c.version, c.blocking), (std::mem::size_of::<ncclConfig_t>(), 0xcafe_beef, 22_803, 0));
        let ints = [c.cgaClusterSize, c.minCTAs, c.maxCTAs, c.splitShare, c.trafficClass, c.collnetEnable, c.CTAPolicy, c.shrinkShare, c.nvlsCTAs];
        let ints2 = [c.nChannelsPerNetPeer, c.nvlinkCentricSched, c.graphUsageMode, c.numRmaCtx, c.maxP2pPeers];
        assert!(ints.iter().chain(&ints2).all(|&x| x == i32::MIN), "{c:?}");
        assert!(c.netName.is_null() && c.commName.is_null());
    }

    #[test]
    fn buckets_cut_at_the_size_and_keep_a_large_buffer_alone() {
        assert_eq!(buckets(&[], 10), Vec::<Range<usize>>::new());
        assert_eq!(buckets(&[4, 4, 4, 25, 1, 0, 9], 10), vec![0..2, 2..3, 3..4, 4..7]);
        assert_eq!(buckets(&[10, 10], 10), vec![0..1, 1..2]);
    }

    /// With a libnccl on this machine (`IPO_NCCL`, a wheel, the system's): every symbol binds
    /// (`Nccl::bind`), and the calls that need no GPU. CI has none (the nvidia-nccl-cu12 wheel
    /// is 350 MB), so it is skipped there unless IPO_REQUIRE_NCCL=1.
    #[test]
    fn real_library_reports_its_version_and_makes_unique_ids_without_a_gpu() {
        let n = match Nccl::load() {
            Ok(n) => n,
            Err(e) if std::env::var("IPO_REQUIRE_NCCL").as_deref() == Ok("1") => panic!("IPO_REQUIRE_NCCL=1: {e}"),
            Err(e) => return eprintln!("skipping: {e}"),
        };
        let (major, minor, _) = n.version().unwrap();
        assert!(major == 2 && minor >= 18, "NCCL {major}.{minor} at {}", n.describe());
        // Since 2.14: the bounded (non-blocking) init is the one taken.
        assert!(n.comm_init_rank_config.is_some(), "ncclCommInitRankConfig in NCCL {major}.{minor}");
        let (a, b) = (n.unique_id().unwrap(), n.unique_id().unwrap());
        assert!(a.iter().any(|&x| x != 0) && a != b, "two fresh ids");
    }
}
