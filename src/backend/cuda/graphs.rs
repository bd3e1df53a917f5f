//! Decode steps replayed as graphs: at batch 1 a small model's step is hundreds of kernel
//! launches and GEMMs (about 24 per layer) of a few microseconds each, so issuing them costs
//! more than running them. Between `Backend::step_begin` and `step_end` (`Transformer::forward_cached`) the CUDA
//! backend records the step instead of issuing it:
//!
//! - allocations come from the step arena, chunks of device memory kept from step to step, so
//!   the same sequence of allocations and frees gets the same addresses: a buffer freed in the
//!   step is reused by a later one of the same size (the device runs the step in order), and
//!   the rest comes from a bump pointer (index uploads, whose lengths grow with the context,
//!   get a power-of-two capacity so their addresses move only when it doubles);
//! - uploads (the step's inputs: ids, positions, slots, block tables, RoPE tables) are written
//!   at once, so they always get memory no earlier operation of the step used (bump only,
//!   never reused; frees of buffers outside the arena wait until the step's work is issued);
//! - kernel launches, GEMMs and device copies go to the tape (`Op`: kernel, grid, block,
//!   shared memory, exact argument bytes).
//!
//! At the end, a tape equal to one captured before (hash, then full comparison) is replayed as
//! that graph: one launch, after the uploads on the same stream order. A tape seen for the
//! first time is issued op by op (a warm-up: modules, cuBLAS kernels and the arena are then
//! loaded and grown outside any capture) and remembered; seen again, it is captured
//! (`Gpu::graph_capture`), kept (at most `GRAPHS_KEPT`, least recently used evicted) and
//! launched. Two tapes are equal only if every operation and argument is, so replaying is
//! issuing the same work: a graph is never run on other addresses, sizes or grids than its
//! own. What changes a decode tape: the batch (a sequence joining or finishing), the
//! paged_decode grid (padded to a power of two of items) and a block table's capacity
//! doubling; each such step just captures another graph.
//!
//! Never wrong, sometimes ungraphed: a step that needs the host mid-way (a download, a
//! collective) issues its tape so far and runs the rest op by op; a step of more than
//! `GRAPH_MAX_TOKENS` tokens (prefill chunks) runs ungraphed with ordinary allocations, as does
//! one that begins while a buffer of the previous step's arena is still alive (its data would
//! be overwritten); a capture that fails turns graphs off (with a warning). The returned
//! logits live in the arena: valid until the next step begins, which checks that none is left
//! (see above).
//!
//! Off with `IPO_CUDA_GRAPHS=0` (on with `=1`); by default on where `Gpu::graphs_by_default`
//! (a GPU), off on the simulator, where tests turn it on (`CudaBackend::set_graphs`).

use super::gpu::{DevPtr, Gpu, GraphId, Op};
use crate::backend::StepStats;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Bytes of an arena chunk at least (a bigger request gets a chunk of its own size).
const ARENA_CHUNK: u64 = 64 << 20;
/// Alignment of arena buffers (cuMemAlloc's).
const ARENA_ALIGN: u64 = 256;
/// Graphs kept (each a few hundred nodes); tapes remembered after one sighting.
const GRAPHS_KEPT: usize = 16;
const TAPES_SEEN: usize = 8;
/// Steps of more tokens than this run ungraphed, with ordinary allocations: long prefill
/// chunks, whose launches are not what limits them (and whose activations would grow the
/// arena besides the memory pool). Decode batches up to this many sequences are graphed.
const GRAPH_MAX_TOKENS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Outside a step: every operation is issued at once.
    Idle,
    /// Recording a step's tape, allocating from the arena.
    Recording,
    /// In a step that runs op by op: from the arena (after a mid-step host sync) or not.
    Direct { arena: bool },
}

struct Graph {
    hash: u64,
    tape: Vec<Op>,
    id: GraphId,
    used: u64,
}

struct State {
    mode: Mode,
    tape: Vec<Op>,
    /// Frees of non-arena buffers while recording: done once the tape is issued.
    deferred: Vec<DevPtr>,
    /// Arena chunks (address, bytes), and where the next bump allocation goes (chunk, offset).
    chunks: Vec<(DevPtr, u64)>,
    at: (usize, u64),
    /// This step's arena buffers alive (address -> bytes) and those freed, by size (reused
    /// last freed first).
    sizes: HashMap<DevPtr, u64>,
    free: HashMap<u64, Vec<DevPtr>>,
    graphs: Vec<Graph>,
    /// Tapes issued op by op once (hash, tape), most recent last.
    seen: Vec<(u64, Vec<Op>)>,
    tick: u64,
    stats: StepStats,
}

/// The step recorder of one `CudaBackend`, shared with its buffers (whose drops it sees).
pub(super) struct Steps {
    state: Mutex<State>,
    /// Arena buffers alive now. The arena is reused only when none is.
    arena_live: AtomicUsize,
    on: AtomicBool,
}

fn hash_of(tape: &[Op]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tape.hash(&mut h);
    h.finish()
}

fn issue_all<G: Gpu + ?Sized>(gpu: &G, tape: &[Op]) {
    for op in tape {
        op.issue(gpu).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
}

impl Steps {
    pub(super) fn new(on: bool) -> Steps {
        let on = match std::env::var("IPO_CUDA_GRAPHS").ok().as_deref().map(str::trim) {
            Some("0") => false,
            Some("1") => true,
            _ => on,
        };
        Steps {
            state: Mutex::new(State {
                mode: Mode::Idle,
                tape: Vec::new(),
                deferred: Vec::new(),
                chunks: Vec::new(),
                at: (0, 0),
                sizes: HashMap::new(),
                free: HashMap::new(),
                graphs: Vec::new(),
                seen: Vec::new(),
                tick: 0,
                stats: StepStats::default(),
            }),
            arena_live: AtomicUsize::new(0),
            on: AtomicBool::new(on),
        }
    }

    pub(super) fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub(super) fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    pub(super) fn stats(&self) -> StepStats {
        let st = self.state.lock().unwrap();
        StepStats { graphs: st.graphs.len() as u64, ..st.stats }
    }

    /// Starts a step of `tokens` new tokens (a step left open, by a panic, is ended first).
    pub(super) fn begin<G: Gpu + ?Sized>(&self, gpu: &G, tokens: usize) {
        if self.state.lock().unwrap().mode != Mode::Idle {
            self.end(gpu);
        }
        let mut st = self.state.lock().unwrap();
        st.stats.steps += 1;
        st.mode = if !self.on() || tokens > GRAPH_MAX_TOKENS {
            Mode::Direct { arena: false }
        } else if self.arena_live.load(Ordering::Relaxed) > 0 {
            // A buffer of the last step is still alive: reusing the arena would overwrite it.
            st.stats.outputs_alive += 1;
            Mode::Direct { arena: false }
        } else {
            st.at = (0, 0);
            st.sizes.clear();
            st.free.clear();
            Mode::Recording
        };
        if st.mode != Mode::Recording {
            st.stats.ungraphed += 1;
        }
    }

    /// `bytes` from the arena when the step allocates there (None: allocate normally): memory
    /// freed earlier in the step unless `fresh` (an upload, written before the step's earlier
    /// work runs). A chunk that cannot be had ends the recording: the step goes on op by op,
    /// outside the arena.
    pub(super) fn alloc<G: Gpu + ?Sized>(&self, gpu: &G, bytes: u64, fresh: bool) -> Option<DevPtr> {
        let mut st = self.state.lock().unwrap();
        if !matches!(st.mode, Mode::Recording | Mode::Direct { arena: true }) {
            return None;
        }
        let need = bytes.max(4).next_multiple_of(ARENA_ALIGN);
        let reused = if fresh { None } else { st.free.get_mut(&need).and_then(Vec::pop) };
        if let Some(p) = reused {
            st.sizes.insert(p, need);
            self.arena_live.fetch_add(1, Ordering::Relaxed);
            return Some(p);
        }
        loop {
            let (c, off) = st.at;
            match st.chunks.get(c) {
                Some(&(base, size)) if off + need <= size => {
                    st.at = (c, off + need);
                    st.sizes.insert(base + off, need);
                    self.arena_live.fetch_add(1, Ordering::Relaxed);
                    return Some(base + off);
                }
                // A chunk too small for this buffer: on to the next (the same sequence of
                // allocations takes the same path every step).
                Some(_) => st.at = (c + 1, 0),
                None => match gpu.alloc(need.max(ARENA_CHUNK) as usize) {
                    Ok(p) => st.chunks.push((p, need.max(ARENA_CHUNK))),
                    Err(_) => {
                        self.leave_recording(gpu, &mut st);
                        st.mode = Mode::Direct { arena: false };
                        return None;
                    }
                },
            }
        }
    }

    /// Records `op` when recording (true), else leaves it to the caller to issue (false).
    pub(super) fn record(&self, op: impl FnOnce() -> Op) -> bool {
        let mut st = self.state.lock().unwrap();
        if st.mode != Mode::Recording {
            return false;
        }
        st.tape.push(op());
        true
    }

    /// A buffer's drop: an arena buffer's memory is reusable for the rest of its step (after
    /// it, until the next step begins, nothing is allocated there); a free outside the arena
    /// waits while recording.
    pub(super) fn release<G: Gpu + ?Sized>(&self, gpu: &G, ptr: DevPtr, arena: bool) {
        let mut st = self.state.lock().unwrap();
        if arena {
            self.arena_live.fetch_sub(1, Ordering::Relaxed);
            if matches!(st.mode, Mode::Recording | Mode::Direct { arena: true }) {
                if let Some(n) = st.sizes.remove(&ptr) {
                    st.free.entry(n).or_default().push(ptr);
                }
            }
            return;
        }
        if st.mode == Mode::Recording {
            st.deferred.push(ptr);
        } else {
            drop(st);
            gpu.free(ptr);
        }
    }

    /// The host is about to read device results (or to hand the device to something outside
    /// the tape): a recording step issues what it has and goes on op by op.
    pub(super) fn sync<G: Gpu + ?Sized>(&self, gpu: &G) {
        let mut st = self.state.lock().unwrap();
        if st.mode == Mode::Recording {
            self.leave_recording(gpu, &mut st);
            st.mode = Mode::Direct { arena: true };
            st.stats.synced += 1;
            st.stats.ungraphed += 1;
        }
    }

    fn leave_recording<G: Gpu + ?Sized>(&self, gpu: &G, st: &mut State) {
        let tape = std::mem::take(&mut st.tape);
        issue_all(gpu, &tape);
        for p in st.deferred.drain(..) {
            gpu.free(p);
        }
    }

    /// Ends the step: replays, captures or issues its tape (see the module doc).
    pub(super) fn end<G: Gpu + ?Sized>(&self, gpu: &G) {
        let mut st = self.state.lock().unwrap();
        if st.mode == Mode::Recording {
            let tape = std::mem::take(&mut st.tape);
            self.run(gpu, &mut st, tape);
            for p in st.deferred.drain(..) {
                gpu.free(p);
            }
        }
        st.mode = Mode::Idle;
    }

    fn run<G: Gpu + ?Sized>(&self, gpu: &G, st: &mut State, tape: Vec<Op>) {
        st.tick += 1;
        let (hash, tick) = (hash_of(&tape), st.tick);
        if let Some(g) = st.graphs.iter_mut().find(|g| g.hash == hash && g.tape == tape) {
            g.used = tick;
            gpu.graph_launch(g.id).unwrap_or_else(|e| panic!("graph launch of a decode step: {e}"));
            st.stats.replayed += 1;
            return;
        }
        let Some(i) = st.seen.iter().position(|(h, t)| *h == hash && *t == tape) else {
            // First sighting: op by op, remembered.
            issue_all(gpu, &tape);
            st.stats.first_seen += 1;
            if st.seen.len() == TAPES_SEEN {
                st.seen.remove(0);
            }
            st.seen.push((hash, tape));
            return;
        };
        st.seen.remove(i);
        match gpu.graph_capture(&tape) {
            Ok(id) => {
                if st.graphs.len() == GRAPHS_KEPT {
                    let lru = (0..st.graphs.len()).min_by_key(|&i| st.graphs[i].used).expect("kept graphs");
                    gpu.graph_destroy(st.graphs.swap_remove(lru).id);
                }
                gpu.graph_launch(id).unwrap_or_else(|e| panic!("graph launch of a decode step: {e}"));
                st.graphs.push(Graph { hash, tape, id, used: tick });
                st.stats.captured += 1;
            }
            Err(e) => {
                // Nothing of the tape ran: issue it. What failed once (a driver or library
                // that cannot capture this work) would fail again: graphs go off, once.
                eprintln!("warning: capturing a decode step as a CUDA graph failed ({e}); decode steps run launch by launch from now on");
                issue_all(gpu, &tape);
                st.stats.capture_failures += 1;
                st.stats.ungraphed += 1;
                self.set_on(false);
            }
        }
    }

    /// Destroys the graphs and frees the arena (the backend is going away; arena buffers
    /// still alive then must not be used, as any buffer of a dropped backend).
    pub(super) fn clear<G: Gpu + ?Sized>(&self, gpu: &G) {
        let mut st = self.state.lock().unwrap();
        for g in st.graphs.drain(..) {
            gpu.graph_destroy(g.id);
        }
        for (p, _) in st.chunks.drain(..) {
            gpu.free(p);
        }
        for p in st.deferred.drain(..) {
            gpu.free(p);
        }
    }
}
