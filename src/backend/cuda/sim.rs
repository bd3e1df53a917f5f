//! `Sim`: the `Gpu` on the CPU. Kernels run in ptxsim (bounds, alignment and shared-memory
//! race checks on every launch, warp order varied by a per-launch seed); GEMMs are computed
//! on the host from cuBLAS's documented column-major semantics (f64 sums, one rounding), with
//! fp32 or bf16 A and B (bf16 products are exact in f64, so a bf16 GEMM is computed exactly
//! from the bf16 values and rounded once to f32).

use super::gpu::{Arg, DevPtr, EventId, Gemm, GemmInput, Gpu, GpuError, GraphId, Image, Op, StreamId};
use ptxsim::{Device, LaunchOptions, LaunchStats, Module, ParamValue};
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
struct State {
    dev: Device,
    modules: HashMap<String, Module>,
    launches: u64,
    /// Per kernel name: (launches, summed counters).
    stats: HashMap<String, (u64, LaunchStats)>,
    /// Streams created so far (ids 1..=streams; 0 is the default stream).
    streams: u64,
    current_stream: StreamId,
    /// Recorded events: the host time at which all work issued before them had finished
    /// (launches run to completion when issued, which is one valid schedule of any streams).
    events: HashMap<EventId, std::time::Instant>,
    next_event: EventId,
    /// Bytes of each live allocation, and their sum (for `memory_free`).
    sizes: HashMap<DevPtr, u64>,
    live: u64,
    /// Captured graphs: their operations, run in order by `graph_launch`.
    graphs: HashMap<GraphId, Vec<Op>>,
    next_graph: GraphId,
    issued: Issued,
}

/// What the host has issued to the simulated device since it was made: kernel launches,
/// GEMMs and device copies issued one by one, and graph launches (each of which runs its
/// captured operations without the host issuing them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Issued {
    pub launches: u64,
    pub gemms: u64,
    pub copies: u64,
    pub graph_launches: u64,
}

impl Issued {
    /// Operations the host issued, graph launches included (each is one).
    pub fn total(&self) -> u64 {
        self.launches + self.gemms + self.copies + self.graph_launches
    }
}

/// The simulated device (one, behind a mutex: launches are serial, like one stream).
#[derive(Default)]
pub struct Sim {
    state: Mutex<State>,
    /// Refuse every `graph_capture`, as a driver that cannot capture some work would (tests
    /// of the backend's fallback: `Sim::refuse_captures`).
    refuse_captures: std::sync::atomic::AtomicBool,
    /// The memory the simulated device pretends to have (`IPO_SIM_MEMORY_GB`, GiB), so that
    /// what a GPU's size decides (`ipo train`'s memory check) can be tried on a CPU; None: the
    /// buffers are host memory and `memory_free` reports nothing, as before.
    memory: Option<u64>,
}

fn err(e: impl std::fmt::Display) -> GpuError {
    GpuError::Device(e.to_string())
}

impl Sim {
    pub fn new() -> Sim {
        let gib = std::env::var("IPO_SIM_MEMORY_GB").ok().and_then(|v| v.trim().parse::<f64>().ok()).filter(|g| *g > 0.0);
        Sim { memory: gib.map(|g| (g * (1u64 << 30) as f64) as u64), ..Sim::default() }
    }

    /// Launch counts and summed counters per kernel since the start (for the benches).
    pub fn stats(&self) -> Vec<(String, u64, LaunchStats)> {
        let st = self.state.lock().unwrap();
        let mut v: Vec<_> = st.stats.iter().map(|(k, (n, s))| (k.clone(), *n, s.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }


    /// Makes every later `graph_capture` fail (or work again).
    pub fn refuse_captures(&self, refuse: bool) {
        self.refuse_captures.store(refuse, std::sync::atomic::Ordering::Relaxed);
    }

    /// The operations the host has issued so far (see `Issued`).
    pub fn issued(&self) -> Issued {
        self.state.lock().unwrap().issued
    }

    fn check_stream(st: &State, s: StreamId) -> Result<(), GpuError> {
        if s > st.streams {
            return Err(err(format!("stream {s} was never created")));
        }
        Ok(())
    }

    fn event(st: &State, e: EventId) -> Result<std::time::Instant, GpuError> {
        st.events.get(&e).copied().ok_or_else(|| err(format!("event {e} was never recorded or was destroyed")))
    }

    fn read_f32(dev: &mut Device, p: DevPtr, n: usize) -> Result<Vec<f32>, GpuError> {
        dev.read_vec::<f32>(p, n).map_err(err)
    }

    /// `n` GEMM operand elements of type `t` at `p`, widened to f32 (exact for bf16).
    fn read_operand(dev: &mut Device, p: DevPtr, n: usize, t: GemmInput) -> Result<Vec<f32>, GpuError> {
        match t {
            GemmInput::F32 => Self::read_f32(dev, p, n),
            GemmInput::Bf16 => {
                let bytes = dev.read(p, 2 * n).map_err(err)?;
                Ok(bytes.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect())
            }
        }
    }
}

/// Number of elements spanned by a column-major `[rows, cols]` matrix with leading dim `ld`.
fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (cols - 1) * ld + rows
    }
}

impl Gpu for Sim {
    fn name(&self) -> String {
        "sim (ptxsim)".to_string()
    }
    fn arch(&self) -> String {
        "compute_80".to_string()
    }
    fn alloc(&self, bytes: usize) -> Result<DevPtr, GpuError> {
        let mut st = self.state.lock().unwrap();
        let n = bytes.max(4) as u64;
        if let Some(total) = self.memory {
            if st.live + n > total {
                return Err(err(format!("out of memory: {n} bytes requested, {} of {total} free (IPO_SIM_MEMORY_GB)", total - st.live)));
            }
        }
        let p = st.dev.alloc(n);
        st.sizes.insert(p, n);
        st.live += n;
        Ok(p)
    }
    fn free(&self, ptr: DevPtr) {
        let mut st = self.state.lock().unwrap();
        if st.dev.free(ptr).is_ok() {
            let n = st.sizes.remove(&ptr).unwrap_or(0);
            st.live -= n;
        }
    }
    fn memory_free(&self) -> Option<u64> {
        let live = self.state.lock().unwrap().live;
        self.memory.map(|t| t.saturating_sub(live))
    }
    fn htod(&self, dst: DevPtr, src: &[u8]) -> Result<(), GpuError> {
        self.state.lock().unwrap().dev.write(dst, src).map_err(err)
    }
    fn dtoh(&self, src: DevPtr, dst: &mut [u8]) -> Result<(), GpuError> {
        let v = self.state.lock().unwrap().dev.read(src, dst.len()).map_err(err)?;
        dst.copy_from_slice(&v);
        Ok(())
    }
    fn dtod(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), GpuError> {
        let mut st = self.state.lock().unwrap();
        st.issued.copies += 1;
        Self::dtod_in(&mut st, dst, src, bytes)
    }
    fn load(&self, module: &str, image: &Image) -> Result<(), GpuError> {
        let Image::Ptx(ptx) = image else {
            return Err(GpuError::Build(format!("{module}: the simulator runs PTX, not a CUBIN")));
        };
        let mut st = self.state.lock().unwrap();
        if !st.modules.contains_key(module) {
            let m = Module::parse(ptx).map_err(|e| GpuError::Build(format!("{module}: {e}")))?;
            st.modules.insert(module.to_string(), m);
        }
        Ok(())
    }
    fn has_module(&self, module: &str) -> bool {
        self.state.lock().unwrap().modules.contains_key(module)
    }
    fn launch(&self, module: &str, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[Arg]) -> Result<(), GpuError> {
        let mut st = self.state.lock().unwrap();
        st.issued.launches += 1;
        Self::launch_in(&mut st, module, kernel, grid, block, smem, args)
    }
    fn graph_capture(&self, ops: &[Op]) -> Result<GraphId, GpuError> {
        if self.refuse_captures.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(err("capture refused (Sim::refuse_captures)"));
        }
        let mut st = self.state.lock().unwrap();
        // What a GPU's capture would refuse: a kernel of a module that was never loaded.
        for op in ops {
            if let Op::Launch { module, .. } = op {
                if !st.modules.contains_key(module) {
                    return Err(err(format!("capture: module {module} not loaded")));
                }
            }
        }
        st.next_graph += 1;
        let id = st.next_graph;
        st.graphs.insert(id, ops.to_vec());
        Ok(id)
    }
    fn graph_launch(&self, g: GraphId) -> Result<(), GpuError> {
        let mut st = self.state.lock().unwrap();
        st.issued.graph_launches += 1;
        let ops = st.graphs.get(&g).cloned().ok_or_else(|| err(format!("graph {g} was never captured or was destroyed")))?;
        for op in &ops {
            match op {
                Op::Launch { module, kernel, grid, block, smem, args } => Self::launch_in(&mut st, module, kernel, *grid, *block, *smem, args)?,
                Op::Gemm { g, input } => Self::gemm_in(&mut st, g, *input)?,
                Op::Dtod { dst, src, bytes } => Self::dtod_in(&mut st, *dst, *src, *bytes)?,
            }
        }
        Ok(())
    }
    fn graph_destroy(&self, g: GraphId) {
        self.state.lock().unwrap().graphs.remove(&g);
    }
    fn stream_create(&self) -> Result<StreamId, GpuError> {
        let mut st = self.state.lock().unwrap();
        st.streams += 1;
        Ok(st.streams)
    }
    fn set_stream(&self, s: StreamId) -> Result<(), GpuError> {
        let mut st = self.state.lock().unwrap();
        Self::check_stream(&st, s)?;
        st.current_stream = s;
        Ok(())
    }
    fn event_record(&self, s: StreamId) -> Result<EventId, GpuError> {
        let mut st = self.state.lock().unwrap();
        Self::check_stream(&st, s)?;
        st.next_event += 1;
        let e = st.next_event;
        st.events.insert(e, std::time::Instant::now());
        Ok(e)
    }
    fn stream_wait_event(&self, s: StreamId, e: EventId) -> Result<(), GpuError> {
        let st = self.state.lock().unwrap();
        Self::check_stream(&st, s)?;
        Self::event(&st, e).map(|_| ())
    }
    fn event_synchronize(&self, e: EventId) -> Result<(), GpuError> {
        Self::event(&self.state.lock().unwrap(), e).map(|_| ())
    }
    fn event_elapsed_ms(&self, start: EventId, end: EventId) -> Result<f32, GpuError> {
        let st = self.state.lock().unwrap();
        let (a, b) = (Self::event(&st, start)?, Self::event(&st, end)?);
        Ok(b.saturating_duration_since(a).as_secs_f32() * 1e3)
    }
    fn event_destroy(&self, e: EventId) {
        self.state.lock().unwrap().events.remove(&e);
    }
    fn synchronize(&self) -> Result<(), GpuError> {
        Ok(())
    }
    fn gemm(&self, g: &Gemm) -> Result<(), GpuError> {
        self.gemm_ex(g, GemmInput::F32)
    }
    fn gemm_ex(&self, g: &Gemm, input: GemmInput) -> Result<(), GpuError> {
        let mut st = self.state.lock().unwrap();
        st.issued.gemms += 1;
        Self::gemm_in(&mut st, g, input)
    }
}

impl Sim {
    #[allow(clippy::too_many_arguments)]
    fn launch_in(st: &mut State, module: &str, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[Arg]) -> Result<(), GpuError> {
        st.launches += 1;
        let params: Vec<ParamValue> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => ParamValue::Ptr(p),
                Arg::I32(v) => ParamValue::I32(v),
                Arg::U32(v) => ParamValue::U32(v),
                Arg::I64(v) => ParamValue::I64(v),
                Arg::F32(v) => ParamValue::F32(v),
            })
            .collect();
        let m = st.modules.get(module).ok_or_else(|| err(format!("module {module} not loaded")))?;
        let opts = LaunchOptions { seed: st.launches, ..Default::default() };
        let s = st.dev.launch(m, kernel, grid, block, smem, &params, &opts).map_err(err)?;
        let e = st.stats.entry(kernel.to_string()).or_default();
        e.0 += 1;
        e.1.ctas += s.ctas;
        e.1.warp_instructions += s.warp_instructions;
        e.1.lane_instructions += s.lane_instructions;
        for i in 0..5 {
            e.1.bytes_loaded[i] += s.bytes_loaded[i];
            e.1.bytes_stored[i] += s.bytes_stored[i];
        }
        for (x, y) in e.1.by_class.iter_mut().zip(s.by_class) {
            *x += y;
        }
        e.1.barriers += s.barriers;
        Ok(())
    }

    fn dtod_in(st: &mut State, dst: DevPtr, src: DevPtr, bytes: usize) -> Result<(), GpuError> {
        let v = st.dev.read(src, bytes).map_err(err)?;
        st.dev.write(dst, &v).map_err(err)
    }

    fn gemm_in(st: &mut State, g: &Gemm, input: GemmInput) -> Result<(), GpuError> {
        let es = input.size();
        let dev = &mut st.dev;
        let (ar, ac) = if g.trans_a { (g.k, g.m) } else { (g.m, g.k) };
        let (br, bc) = if g.trans_b { (g.n, g.k) } else { (g.k, g.n) };
        for bi in 0..g.batch {
            let a = Self::read_operand(dev, g.a + (es * bi * g.stride_a) as u64, extent(ar, ac, g.lda), input)?;
            let b = Self::read_operand(dev, g.b + (es * bi * g.stride_b) as u64, extent(br, bc, g.ldb), input)?;
            let cp = g.c + 4 * (bi * g.stride_c) as u64;
            let cn = extent(g.m, g.n, g.ldc);
            // beta == 0: C is write-only (cuBLAS does not read it).
            let mut c = if g.beta == 0.0 { vec![0f32; cn] } else { Self::read_f32(dev, cp, cn)? };
            let at = |i: usize, p: usize| if g.trans_a { a[p + i * g.lda] } else { a[i + p * g.lda] };
            let bt = |p: usize, j: usize| if g.trans_b { b[j + p * g.ldb] } else { b[p + j * g.ldb] };
            for j in 0..g.n {
                for i in 0..g.m {
                    let s: f64 = (0..g.k).map(|p| at(i, p) as f64 * bt(p, j) as f64).sum();
                    let o = &mut c[i + j * g.ldc];
                    *o = if g.beta == 0.0 { (g.alpha as f64 * s) as f32 } else { (g.alpha as f64 * s + g.beta as f64 * *o as f64) as f32 };
                }
            }
            if cn > 0 {
                // Write only the m x n elements, column by column (ldc may exceed m).
                for j in 0..g.n {
                    let col = &c[j * g.ldc..j * g.ldc + g.m];
                    let bytes: Vec<u8> = col.iter().flat_map(|x| x.to_le_bytes()).collect();
                    dev.write(cp + 4 * (j * g.ldc) as u64, &bytes).map_err(err)?;
                }
            }
        }
        Ok(())
    }
}
