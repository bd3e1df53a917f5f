//! The SIMT executor: CTAs of warps of 32 lanes. Each warp runs its lowest-PC group of lanes
//! (min-PC reconvergence: divergent lanes wait until the others reach their PC), warps are
//! interleaved in seeded random slices between barriers, and every memory access is bounds-,
//! alignment- and (for shared memory) race-checked.
//!
//! This file: the launch, the CTA scheduler with its barriers, and the warp loop (`run_warp`:
//! scheduling of lane groups, calls and returns). `inst`: what each instruction does;
//! `memory`: state-space accesses and the race detector.

use crate::ir::*;
use crate::mem::Memory;
use crate::parse::{Func, Module};
use crate::{Error, LaunchOptions, LaunchStats};

/// Generic-address window of shared memory (cvta.shared adds this; the parser adds it to
/// shared variables used as generic addresses).
pub(crate) const SHARED_WIN: u64 = 0x0000_7000_0000_0000;
/// Generic-address window of local memory.
pub(crate) const LOCAL_WIN: u64 = 0x0000_7100_0000_0000;
const WIN_SIZE: u64 = 1 << 32;
/// Shared-state-space offset of `extern .shared` (dynamic) arrays; static shared lives below.
pub(crate) const DYN_SHARED: u32 = 0x0100_0000;

/// No PC (`Warp::next_wait` when no lane waits).
const NONE: u32 = u32::MAX;

/// Scheduler state of a warp.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WState {
    Run,
    /// Every lane that has not exited waits at CTA barrier `id`.
    Bar(u8),
    Done,
}

/// A caller's state, saved by `call` and restored by `return_from_call`.
#[derive(Clone)]
struct Frame {
    ret_pc: u32,
    /// The `call` instruction (its operands name where return values go).
    call_pc: u32,
    waiting: u32,
    lane_pc: [u32; 32],
    returned: u32,
    func: u32,
    rbase: u32,
    fbase: u32,
    lbase: u32,
}

/// A `cp.async` whose source has been read and whose shared-memory store waits for
/// `cp.async.wait_group` (or the warp's end): `len` bytes to shared address `dst`.
struct Pending {
    /// Commit group (`Warp::cp_group` when issued).
    group: u32,
    dst: u64,
    len: u8,
    bytes: [u8; 16],
    /// Issuing PTX line and lane, for errors of the store.
    line: u32,
    lane: u8,
}

/// One warp of the current CTA. Lane sets are bit masks (bit l: lane l).
struct Warp {
    /// Warp index in the CTA.
    id: u32,
    /// Registers, 32 lanes per register row: the frames of the call stack one after another
    /// (the current one at `rbase`), then scratch rows for operands (`inst::row`).
    regs: Vec<u64>,
    /// Per-lane `.param` space of `.func` calls (lane `l` at `l * fparam_total`).
    fparam: Vec<u8>,
    /// Per-lane `.local` memory (lane `l` at `l * local_total`).
    local: Vec<u8>,
    /// PC of the active lanes.
    pc: u32,
    /// Lanes running now, all at `pc`.
    active: u32,
    /// Lanes of the current frame that wait to run at their `lane_pc` (diverged or released).
    waiting: u32,
    /// Lanes that have exited, or do not exist (past the block size).
    exited: u32,
    /// Lanes parked at a CTA barrier, resuming at their `lane_pc`.
    at_bar: u32,
    /// Lanes that have returned from the current call and wait for its other lanes.
    returned: u32,
    /// Lowest `lane_pc` of the waiting lanes (`NONE` if none): at that PC the groups merge.
    next_wait: u32,
    /// Resume PC of each lane that is not active.
    lane_pc: [u32; 32],
    /// The call stack (callers of the current function).
    frames: Vec<Frame>,
    /// The current function and its frame's bases in `regs` (register rows), `fparam` and
    /// `local` (bytes).
    func: u32,
    rbase: u32,
    fbase: u32,
    lbase: u32,
    /// `%tid.{x,y,z}` of each lane.
    tid: [[u32; 32]; 3],
    state: WState,
    /// A `bar.red` waiting for its barrier: (0 popc / 1 and / 2 or, destination register,
    /// count of executing lanes whose predicate holds).
    bar_red: Option<(u8, Reg, u32)>,
    /// Thread count of the barrier being waited on or arrived at (0 = whole CTA).
    bar_cnt: u32,
    /// A `bar.arrive` to account for: barrier id.
    arrive: Option<u8>,
    /// Queued `cp.async` stores, in issue order.
    cp_pending: Vec<Pending>,
    /// Number of `cp.async.commit_group`s so far: the group of new `cp.async`s.
    cp_group: u32,
    /// Lanes parked at a `bar.warp.sync` (resume PC in `lane_pc`) and the mask each waits on.
    at_wsync: u32,
    wsync_mask: [u32; 32],
}

/// One of the 16 CTA barriers while threads arrive.
#[derive(Default, Clone, Copy)]
struct Barrier {
    /// Threads counted so far.
    arrived: u32,
    /// Thread count given by the instruction; 0: every live thread of the CTA.
    expected: u32,
    /// Warps waiting (bit per warp index).
    waiters: u64,
    /// `bar.red` accumulators over the waiting warps.
    red_popc: u32,
    red_any_false: bool,
    red_or: bool,
}

/// Shared memory of one CTA plus the race shadow (per byte: writer, readers, epoch).
struct Shared {
    stat: Vec<u8>,
    dynm: Vec<u8>,
    // race shadow, indexed like `stat` followed by `dynm`
    w: Vec<u32>,
    wline: Vec<u32>,
    r_epoch: Vec<u32>,
    r_mask: Vec<u64>,
    rline: Vec<u32>,
}

/// Everything fixed for one launch.
pub(crate) struct Launch<'a> {
    pub(crate) m: &'a Module,
    pub(crate) kernel: &'a Func,
    pub(crate) kname: &'a str,
    pub(crate) gaddr: &'a [u64],
    pub(crate) params: Vec<u8>,
    pub(crate) grid: [u32; 3],
    pub(crate) block: [u32; 3],
    pub(crate) dyn_smem: u32,
    pub(crate) opts: &'a LaunchOptions,
}

/// The launch while it runs.
struct Ctx<'a> {
    l: &'a Launch<'a>,
    mem: &'a mut Memory,
    stats: LaunchStats,
    /// The CTA running now.
    ctaid: [u32; 3],
    /// Seeded random state (`rand`): CTA order and warp slices.
    rng: u64,
    /// Race-detector epoch: advances with every CTA and every completed barrier.
    epoch: u32,
    /// Per-lane needs of the deepest call chain: register rows (plus one), `.param` bytes and
    /// `.local` bytes.
    regs_total: u32,
    fparam_total: u32,
    local_total: u32,
    /// Warps and threads per CTA.
    nwarps: u32,
    nthreads: u32,
    /// Warp-instructions left before `LaunchOptions::max_instructions` is reached.
    budget_left: u64,
}

/// The lanes of mask `m`, lowest first.
#[inline(always)]
fn lanes(m: u32) -> impl Iterator<Item = usize> {
    lanes_u64(m as u64)
}

/// The set bits of `m` (lanes of a warp, warps of a barrier), lowest first.
#[inline(always)]
fn lanes_u64(mut m: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if m == 0 {
            None
        } else {
            let l = m.trailing_zeros() as usize;
            m &= m - 1;
            Some(l)
        }
    })
}

/// Per-lane (register rows, `.param` bytes, `.local` bytes) that function `f` needs with the
/// deepest chain of calls it makes.
fn frame_need(m: &Module, f: u32, depth: u32) -> Result<(u32, u32, u32), String> {
    if depth > 64 {
        return Err(format!("call depth over 64 (recursion through {}) is not supported", m.funcs[f as usize].name));
    }
    let func = &m.funcs[f as usize];
    let mut best = (0, 0, 0);
    for &c in &func.callees {
        let n = frame_need(m, c, depth + 1)?;
        best = (best.0.max(n.0), best.1.max(n.1), best.2.max(n.2));
    }
    Ok((func.nregs + best.0, func.fparam_size + best.1, func.local_size + best.2))
}

impl Ctx<'_> {
    fn rand(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// An execution error at `line`, naming the kernel, CTA and the thread of `lane`.
    fn err(&self, w: &Warp, lane: usize, line: u32, msg: String) -> Error {
        Error::Exec {
            kernel: self.l.kname.to_string(),
            line,
            ctaid: self.ctaid,
            tid: [w.tid[0][lane], w.tid[1][lane], w.tid[2][lane]],
            msg,
        }
    }

    /// Special register `s` of `lane`.
    #[inline(always)]
    fn sreg(&self, w: &Warp, s: Sreg, lane: usize) -> u64 {
        let l = lane as u32;
        (match s {
            Sreg::Tid(d) => w.tid[d as usize][lane],
            Sreg::Ntid(d) => self.l.block[d as usize],
            Sreg::Ctaid(d) => self.ctaid[d as usize],
            Sreg::Nctaid(d) => self.l.grid[d as usize],
            Sreg::Laneid => l,
            Sreg::Warpid => w.id,
            Sreg::Nwarpid => self.nwarps,
            Sreg::LanemaskEq => 1 << l,
            Sreg::LanemaskLt => (1u32 << l) - 1,
            Sreg::LanemaskLe => ((1u64 << (l + 1)) - 1) as u32,
            Sreg::LanemaskGt => !(((1u64 << (l + 1)) - 1) as u32),
            Sreg::LanemaskGe => !((1u32 << l) - 1),
            Sreg::Clock | Sreg::Clock64 => return self.stats.warp_instructions,
            Sreg::Smid => 0,
            Sreg::DynSmem => self.l.dyn_smem,
            Sreg::TotalSmem => self.l.m.shared_static + self.l.dyn_smem,
        }) as u64
    }
}

/// `get!(cx, w, src, lane)`: the value of source operand `src` in `lane`.
macro_rules! get {
    ($cx:expr, $w:expr, $s:expr, $lane:expr) => {
        match $s {
            Src::R(r) => $w.regs[($w.rbase + r) as usize * 32 + $lane],
            Src::I(v) => v,
            Src::S(s) => $cx.sreg(&$w, s, $lane),
            Src::G(g) => $cx.l.gaddr[g as usize],
            Src::L(o) => ($w.lbase + o) as u64,
        }
    };
}

/// `set!(w, reg, lane, value)`: writes register `reg` (of the current frame) of `lane`.
macro_rules! set {
    ($w:expr, $d:expr, $lane:expr, $v:expr) => {
        $w.regs[($w.rbase + $d) as usize * 32 + $lane] = $v
    };
}

// declared after the `get!`/`set!` macros, which they use
mod inst;
mod memory;
use inst::Exec;
use memory::flush_cp;

impl Warp {
    fn new(id: u32) -> Warp {
        Warp {
            id,
            regs: Vec::new(),
            fparam: Vec::new(),
            local: Vec::new(),
            pc: 0,
            active: 0,
            waiting: 0,
            exited: 0,
            at_bar: 0,
            returned: 0,
            next_wait: NONE,
            lane_pc: [0; 32],
            frames: Vec::with_capacity(8),
            func: 0,
            rbase: 0,
            fbase: 0,
            lbase: 0,
            tid: [[0; 32]; 3],
            state: WState::Run,
            bar_red: None,
            bar_cnt: 0,
            arrive: None,
            cp_pending: Vec::new(),
            cp_group: 0,
            at_wsync: 0,
            wsync_mask: [0; 32],
        }
    }

    /// Resets the warp for a new CTA: zeroed registers and memory, thread ids, every valid lane
    /// active at `start` in the kernel's frame.
    fn start_cta(&mut self, block: [u32; 3], nthreads: u32, start: u32, kernel: u32) {
        self.regs.fill(0);
        self.local.fill(0);
        self.fparam.fill(0);
        let mut valid = 0u32;
        for lane in 0..32u32 {
            let t = self.id * 32 + lane;
            if t < nthreads {
                valid |= 1 << lane;
                self.tid[0][lane as usize] = t % block[0];
                self.tid[1][lane as usize] = (t / block[0]) % block[1];
                self.tid[2][lane as usize] = t / (block[0] * block[1]);
            }
        }
        self.pc = start;
        self.active = valid;
        self.waiting = 0;
        self.exited = !valid;
        self.at_bar = 0;
        self.returned = 0;
        self.next_wait = NONE;
        self.frames.clear();
        self.func = kernel;
        self.rbase = 0;
        self.fbase = 0;
        self.lbase = 0;
        self.state = WState::Run;
        self.bar_red = None;
        self.bar_cnt = 0;
        self.arrive = None;
        self.cp_pending.clear();
        self.cp_group = 0;
        self.at_wsync = 0;
    }

    /// Put the active lanes back with the waiting ones and make the lowest-PC group active.
    /// Returns false if no lane can run (all exited, returned, or parked at a barrier).
    fn resched(&mut self) -> bool {
        if self.active != 0 {
            for l in lanes(self.active) {
                self.lane_pc[l] = self.pc;
            }
            self.waiting |= self.active;
            self.active = 0;
        }
        if self.waiting == 0 {
            self.next_wait = NONE;
            return false;
        }
        let mut min = NONE;
        for l in lanes(self.waiting) {
            min = min.min(self.lane_pc[l]);
        }
        let mut next = NONE;
        let mut act = 0;
        for l in lanes(self.waiting) {
            let p = self.lane_pc[l];
            if p == min {
                act |= 1 << l;
            } else {
                next = next.min(p);
            }
        }
        self.active = act;
        self.waiting &= !act;
        self.pc = min;
        self.next_wait = next;
        true
    }

    /// Moves the active lanes to the next instruction; at the PC where other lanes wait, all
    /// regroup (reconvergence).
    #[inline(always)]
    fn advance(&mut self) {
        self.pc += 1;
        if self.pc >= self.next_wait {
            self.resched();
        }
    }
}

/// Why `run_warp` returned.
enum Stop {
    /// Its slice of steps is used up; it can go on.
    Budget,
    /// The scheduler has to act before it goes on: it arrived or waits at a CTA barrier, lanes
    /// exited while others wait at one (barrier counts change), or it has finished.
    Blocked,
}

/// Runs a launch: sizes the per-lane frames for the deepest call chain, then runs the CTAs one
/// after another in a seeded order.
pub(crate) fn launch(l: &Launch, mem: &mut Memory) -> Result<LaunchStats, Error> {
    let m = l.m;
    let kidx = m.func_idx[&l.kernel.name];
    let (regs_total, fparam_total, local_total) = frame_need(m, kidx, 0).map_err(Error::Launch)?;
    let nthreads = l.block[0] * l.block[1] * l.block[2];
    if nthreads == 0 || nthreads > 1024 {
        return Err(Error::Launch(format!("block {:?} has {nthreads} threads (1..=1024 allowed)", l.block)));
    }
    if l.grid.contains(&0) {
        return Err(Error::Launch(format!("grid {:?} is empty", l.grid)));
    }
    let nwarps = nthreads.div_ceil(32);
    let mut cx = Ctx {
        l,
        mem,
        stats: LaunchStats::default(),
        ctaid: [0; 3],
        rng: l.opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        epoch: 1,
        regs_total: regs_total + 1,
        fparam_total,
        local_total,
        nwarps,
        nthreads,
        budget_left: l.opts.max_instructions,
    };
    let stat = m.shared_static as usize;
    let dynm = l.dyn_smem as usize;
    let nsh = if l.opts.race_check { stat + dynm } else { 0 };
    let mut sh = Shared {
        stat: vec![0; stat],
        dynm: vec![0; dynm],
        w: vec![0; nsh],
        wline: vec![0; nsh],
        r_epoch: vec![0; nsh],
        r_mask: vec![0; nsh],
        rline: vec![0; nsh],
    };
    let mut warps: Vec<Warp> = (0..nwarps).map(Warp::new).collect();
    for w in warps.iter_mut() {
        w.regs = vec![0; (cx.regs_total as usize + 3) * 32];
        w.fparam = vec![0; fparam_total as usize * 32];
        w.local = vec![0; local_total as usize * 32];
    }
    let mut order: Vec<[u32; 3]> = Vec::new();
    for z in 0..l.grid[2] {
        for y in 0..l.grid[1] {
            for x in 0..l.grid[0] {
                order.push([x, y, z]);
            }
        }
    }
    // CTAs run one after another, in a seeded order
    for i in (1..order.len()).rev() {
        let j = (cx.rand() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    for ctaid in order {
        cx.ctaid = ctaid;
        run_cta(&mut cx, &mut warps, &mut sh, kidx)?;
        cx.stats.ctas += 1;
    }
    Ok(cx.stats)
}

/// Runs one CTA (`cx.ctaid`) to completion: warps run in seeded random slices; a warp that
/// stops at a barrier or finishes updates the barrier counts, and completed barriers release
/// their warps.
fn run_cta(cx: &mut Ctx, warps: &mut [Warp], sh: &mut Shared, kidx: u32) -> Result<(), Error> {
    sh.stat.fill(0);
    sh.dynm.fill(0);
    for w in warps.iter_mut() {
        w.start_cta(cx.l.block, cx.nthreads, cx.l.kernel.start, kidx);
    }
    let mut bars = [Barrier::default(); 16];
    cx.epoch += 1;
    let mut runnable: Vec<usize> = Vec::with_capacity(warps.len());
    loop {
        runnable.clear();
        runnable.extend(warps.iter().enumerate().filter(|(_, w)| w.state == WState::Run).map(|(i, _)| i));
        if runnable.is_empty() {
            if warps.iter().all(|w| w.state == WState::Done) {
                return Ok(());
            }
            let w = warps.iter().find(|w| w.state != WState::Done).unwrap();
            let lane = w.at_bar.trailing_zeros().min(31) as usize;
            let line = cx.l.m.code[w.pc as usize].line;
            return Err(cx.err(w, lane, line, "deadlock: warps wait at a barrier that the remaining threads never reach".into()));
        }
        let r = cx.rand();
        let wi = runnable[(r % runnable.len() as u64) as usize];
        let budget = 8 + ((r >> 32) % 120) as u32;
        if let Stop::Blocked = run_warp(cx, &mut warps[wi], sh, budget)? {
            let w = &mut warps[wi];
            if w.state == WState::Done && !w.cp_pending.is_empty() {
                flush_cp(cx, w, sh, u32::MAX)?;
            }
            count_arrival(&mut bars, w, wi);
            // also after an exit: fewer live threads can complete a barrier
            release_barriers(cx, warps, &mut bars);
        }
    }
}

/// Counts warp `wi`'s arrival at a barrier: a `bar.arrive`, or its lanes waiting at a
/// `bar.sync`/`bar.red` (with their `bar.red` predicate count).
fn count_arrival(bars: &mut [Barrier; 16], w: &mut Warp, wi: usize) {
    if let Some(id) = w.arrive.take() {
        let b = &mut bars[id as usize];
        b.expected = w.bar_cnt;
        b.arrived += 32;
    }
    if let WState::Bar(id) = w.state {
        let b = &mut bars[id as usize];
        let n = (!w.exited).count_ones();
        if w.bar_cnt != 0 {
            b.expected = w.bar_cnt;
        }
        // with a thread count, an arriving warp counts as 32 threads
        b.arrived += if b.expected != 0 { 32 } else { n };
        b.waiters |= 1 << wi;
        if let Some((_, _, cnt)) = w.bar_red {
            b.red_popc += cnt;
            b.red_any_false |= cnt != n;
            b.red_or |= cnt > 0;
        }
    }
}

/// Completes every barrier that all its expected threads (default: every live thread of the
/// CTA) have reached: its waiting warps get the `bar.red` result and run again, and a new
/// race-detector epoch begins.
fn release_barriers(cx: &mut Ctx, warps: &mut [Warp], bars: &mut [Barrier; 16]) {
    let live: u32 = warps.iter().map(|w| (!w.exited).count_ones()).sum();
    for (id, b) in bars.iter_mut().enumerate() {
        if b.waiters == 0 && b.arrived == 0 {
            continue;
        }
        let expected = if b.expected != 0 { b.expected } else { live };
        if b.arrived < expected {
            continue;
        }
        let (popc, and, or) = (b.red_popc, !b.red_any_false, b.red_or);
        for wi in lanes_u64(b.waiters) {
            let w = &mut warps[wi];
            debug_assert_eq!(w.state, WState::Bar(id as u8));
            if let Some((kind, d, _)) = w.bar_red.take() {
                let v = match kind {
                    0 => popc as u64,
                    1 => and as u64,
                    _ => or as u64,
                };
                for lane in lanes(w.at_bar) {
                    set!(w, d, lane, v);
                }
            }
            w.waiting |= w.at_bar;
            w.at_bar = 0;
            w.state = WState::Run;
        }
        *b = Barrier::default();
        cx.epoch += 1;
        cx.stats.barriers += 1;
    }
}

/// Runs warp `w` for up to `budget` steps. A step executes one instruction, or, when no lane of
/// the current frame can run, lets the warp go on another way (see `no_runnable_lanes`).
fn run_warp(cx: &mut Ctx, w: &mut Warp, sh: &mut Shared, budget: u32) -> Result<Stop, Error> {
    let code = &cx.l.m.code[..];
    for _ in 0..budget {
        if w.active == 0 && !w.resched() {
            if let Flow::Yield = no_runnable_lanes(cx, w)? {
                return Ok(Stop::Blocked);
            }
            continue;
        }
        let inst = &code[w.pc as usize];
        let mask = guard_mask(w, inst.guard);
        count_instruction(cx, w, inst, mask)?;
        match Exec::new(cx, w, sh, mask, inst.line).op(&inst.op)? {
            Flow::Next => w.advance(),
            Flow::Jumped => {}
            Flow::Yield => return Ok(Stop::Blocked),
        }
    }
    Ok(Stop::Budget)
}

/// No lane of the current frame can run: all have exited or returned, or are parked at a CTA
/// barrier or a `bar.warp.sync`. Releases `bar.warp.sync` lanes whose missing members have
/// exited, returns from a call once all its lanes have returned, or stops the warp (waiting at
/// its CTA barrier, or finished).
fn no_runnable_lanes(cx: &mut Ctx, w: &mut Warp) -> Result<Flow, Error> {
    if w.at_wsync != 0 {
        let r = wsync_release(w);
        if r != 0 {
            w.waiting |= r;
            return Ok(Flow::Jumped);
        }
        if w.at_bar == 0 {
            return Err(wsync_deadlock(cx, w, "the lanes it waits for have finished this frame"));
        }
    }
    if w.at_bar != 0 {
        return Ok(Flow::Yield);
    }
    if w.returned != 0 && !w.frames.is_empty() {
        return_from_call(cx, w);
        return Ok(Flow::Jumped);
    }
    // every lane has exited (in the kernel's own frame `ret` counts as `exit`)
    w.state = WState::Done;
    w.exited = !0;
    Ok(Flow::Yield)
}

/// The active lanes whose guard predicate (`@p` / `@!p`), if any, holds.
#[inline(always)]
fn guard_mask(w: &Warp, guard: Option<(Reg, bool)>) -> u32 {
    let Some((p, neg)) = guard else { return w.active };
    let mut pm = 0u32;
    for l in lanes(w.active) {
        if (w.regs[(w.rbase + p) as usize * 32 + l] & 1 != 0) != neg {
            pm |= 1 << l;
        }
    }
    pm
}

/// Counts one warp-instruction executed by the lanes of `mask` (also when `mask` is empty) and
/// charges it to the launch's instruction limit.
#[inline(always)]
fn count_instruction(cx: &mut Ctx, w: &Warp, inst: &Inst, mask: u32) -> Result<(), Error> {
    let n = mask.count_ones() as u64;
    cx.stats.warp_instructions += 1;
    cx.stats.lane_instructions += n;
    cx.stats.by_class[inst.class as usize] += n;
    if cx.budget_left == 0 {
        return Err(cx.err(w, w.active.trailing_zeros() as usize, inst.line, format!("instruction limit of {} warp-instructions reached (infinite loop?)", cx.l.opts.max_instructions)));
    }
    cx.budget_left -= 1;
    Ok(())
}

/// What the warp does after an instruction.
enum Flow {
    /// Go on with the next instruction (`Warp::advance`).
    Next,
    /// The instruction has set the PC or regrouped the lanes itself.
    Jumped,
    /// End the warp's slice: the scheduler has to act (see `Stop::Blocked`).
    Yield,
}

/// Releases the lanes parked at `bar.warp.sync` whose mask is complete: every non-exited lane
/// of the mask is parked with the same mask. Returns them (their resume PCs are in
/// `lane_pc`); the caller puts them back to `waiting` (or runs them).
fn wsync_release(w: &mut Warp) -> u32 {
    let mut seen = 0u32;
    let mut released = 0u32;
    for l in lanes(w.at_wsync) {
        if seen & (1 << l) != 0 {
            continue;
        }
        let m = w.wsync_mask[l];
        let mut group = 0u32;
        for k in lanes(w.at_wsync & m) {
            if w.wsync_mask[k] == m {
                group |= 1 << k;
            }
        }
        seen |= group;
        if m & !w.exited & !group == 0 {
            released |= group;
        }
    }
    w.at_wsync &= !released;
    released
}

fn wsync_deadlock(cx: &Ctx, w: &Warp, why: &str) -> Error {
    let l = w.at_wsync.trailing_zeros() as usize;
    let m = w.wsync_mask[l];
    let line = cx.l.m.code[(w.lane_pc[l] - 1) as usize].line;
    cx.err(w, l, line, format!(
        "deadlock: lanes {:#010x} wait at bar.warp.sync for lanes {:#010x} of membermask {m:#010x}, but {why}",
        w.at_wsync, m & !w.exited & !w.at_wsync
    ))
}

/// Every lane of the current call has returned (or exited): copies the return values back into
/// the caller's param frame, restores the caller's frame and lane state, and puts the returned
/// lanes at the instruction after the `call`.
fn return_from_call(cx: &Ctx, w: &mut Warp) {
    let fr = w.frames.pop().unwrap();
    let callee = &cx.l.m.funcs[w.func as usize];
    let ft = cx.fparam_total as usize;
    let ret_lanes = w.returned;
    if let Op::Call { rets, .. } = &cx.l.m.code[fr.call_pc as usize].op {
        for l in lanes(ret_lanes) {
            for (k, off) in rets.iter().enumerate() {
                let Some(p) = callee.rets.get(k) else { break };
                let src = l * ft + (w.fbase + p.offset) as usize;
                let dst = l * ft + (fr.fbase + off) as usize;
                w.fparam.copy_within(src..src + p.size as usize, dst);
            }
        }
    }
    w.func = fr.func;
    w.rbase = fr.rbase;
    w.fbase = fr.fbase;
    w.lbase = fr.lbase;
    w.lane_pc = fr.lane_pc;
    for l in lanes(ret_lanes) {
        w.lane_pc[l] = fr.ret_pc;
    }
    w.waiting = fr.waiting | ret_lanes;
    w.returned = fr.returned;
    w.active = 0;
    w.resched();
}
