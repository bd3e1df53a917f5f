//! The SIMT executor: CTAs of warps of 32 lanes. Each warp runs its lowest-PC group of lanes
//! (min-PC reconvergence: divergent lanes wait until the others reach their PC), warps are
//! interleaved in seeded random slices between barriers, and every memory access is bounds-,
//! alignment- and (for shared memory) race-checked.

use crate::alu;
use crate::ir::*;
use crate::mem::Memory;
use crate::parse::{Func, Module};
use crate::{Error, LaunchOptions, LaunchStats};

/// Generic-address window of shared memory (cvta.shared adds this).
pub(crate) const SHARED_WIN: u64 = 0x0000_7000_0000_0000;
pub(crate) const SHARED_SYM_GENERIC: u64 = SHARED_WIN;
/// Generic-address window of local memory.
pub(crate) const LOCAL_WIN: u64 = 0x0000_7100_0000_0000;
const WIN_SIZE: u64 = 1 << 32;
/// Shared-state-space offset of `extern .shared` (dynamic) arrays; static shared lives below.
pub(crate) const DYN_SHARED: u32 = 0x0100_0000;

const NONE: u32 = u32::MAX;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WState {
    Run,
    Bar(u8),
    Done,
}

#[derive(Clone)]
struct Frame {
    ret_pc: u32,
    call_pc: u32,
    waiting: u32,
    lane_pc: [u32; 32],
    returned: u32,
    func: u32,
    rbase: u32,
    fbase: u32,
    lbase: u32,
}

struct Pending {
    group: u32,
    dst: u64,
    len: u8,
    bytes: [u8; 16],
    line: u32,
    lane: u8,
}

struct Warp {
    id: u32,
    regs: Vec<u64>,
    fparam: Vec<u8>,
    local: Vec<u8>,
    pc: u32,
    active: u32,
    waiting: u32,
    exited: u32,
    at_bar: u32,
    returned: u32,
    next_wait: u32,
    lane_pc: [u32; 32],
    frames: Vec<Frame>,
    func: u32,
    rbase: u32,
    fbase: u32,
    lbase: u32,
    tid: [[u32; 32]; 3],
    state: WState,
    bar_red: Option<(u8, Reg, u32)>,
    /// Thread count of the barrier being waited on or arrived at (0 = whole CTA).
    bar_cnt: u32,
    /// A `bar.arrive` to account for: barrier id.
    arrive: Option<u8>,
    cp_pending: Vec<Pending>,
    cp_group: u32,
    /// Lanes parked at a `bar.warp.sync` (resume PC in `lane_pc`) and the mask each waits on.
    at_wsync: u32,
    wsync_mask: [u32; 32],
}

#[derive(Default, Clone, Copy)]
struct Barrier {
    arrived: u32,
    expected: u32,
    waiters: u64,
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
    pub m: &'a Module,
    pub kernel: &'a Func,
    pub kname: &'a str,
    pub gaddr: &'a [u64],
    pub params: Vec<u8>,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dyn_smem: u32,
    pub opts: &'a LaunchOptions,
}

struct Ctx<'a> {
    l: &'a Launch<'a>,
    mem: &'a mut Memory,
    stats: LaunchStats,
    ctaid: [u32; 3],
    rng: u64,
    epoch: u32,
    regs_total: u32,
    fparam_total: u32,
    local_total: u32,
    nwarps: u32,
    nthreads: u32,
    budget_left: u64,
}

#[inline(always)]
fn lanes(mut m: u32) -> impl Iterator<Item = usize> {
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

    fn err(&self, w: &Warp, lane: usize, line: u32, msg: String) -> Error {
        Error::Exec {
            kernel: self.l.kname.to_string(),
            line,
            ctaid: self.ctaid,
            tid: [w.tid[0][lane], w.tid[1][lane], w.tid[2][lane]],
            msg,
        }
    }

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
macro_rules! set {
    ($w:expr, $d:expr, $lane:expr, $v:expr) => {
        $w.regs[($w.rbase + $d) as usize * 32 + $lane] = $v
    };
}

/// Index of the first lane of a source operand in `w.regs`: registers are read in place;
/// other operands are materialised into scratch row `k` (past the register file).
#[inline(always)]
fn row(cx: &Ctx, w: &mut Warp, s: Src, k: usize) -> usize {
    match s {
        Src::R(r) => (w.rbase + r) as usize * 32,
        Src::I(v) => {
            let b = (cx.regs_total as usize + k) * 32;
            w.regs[b..b + 32].fill(v);
            b
        }
        _ => {
            let b = (cx.regs_total as usize + k) * 32;
            for l in 0..32 {
                let v = get!(cx, w, s, l);
                w.regs[b + l] = v;
            }
            b
        }
    }
}

/// All 32 lanes of a source operand.
#[inline(always)]
fn fetch(cx: &Ctx, w: &Warp, s: Src, out: &mut [u64; 32]) {
    match s {
        Src::R(r) => {
            let b = (w.rbase + r) as usize * 32;
            out.copy_from_slice(&w.regs[b..b + 32]);
        }
        Src::I(v) => *out = [v; 32],
        _ => {
            for (l, o) in out.iter_mut().enumerate() {
                *o = get!(cx, w, s, l);
            }
        }
    }
}

/// Fast path for a warp-wide access: if every active lane's `total`-byte access is aligned and
/// inside one region (one allocation, or one shared region), return (region, region base
/// address, concrete space). Otherwise None and the caller goes lane by lane for exact errors.
#[inline(always)]
fn region<'s>(mem: &'s mut Memory, sh: &'s mut Shared, sp: Space, addrs: &[u64; 32], mask: u32, total: usize) -> Option<(&'s mut [u8], u64, Space)> {
    let (mut lo, mut hi, mut or) = (u64::MAX, 0u64, 0u64);
    for l in lanes(mask) {
        let a = addrs[l];
        lo = lo.min(a);
        hi = hi.max(a);
        or |= a;
    }
    if or % total as u64 != 0 && (or & (total as u64 - 1)) != 0 {
        return None;
    }
    if !total.is_power_of_two() {
        return None;
    }
    let end = hi.checked_add(total as u64)?;
    let sp = match sp {
        Space::Generic => {
            let (s1, _) = resolve(sp, lo);
            let (s2, _) = resolve(sp, hi);
            if s1 != s2 {
                return None;
            }
            s1
        }
        Space::Const => Space::Global,
        s => s,
    };
    match sp {
        Space::Global => {
            let (i, o) = mem.find(lo, end - lo)?;
            let a = &mut mem.allocs[i];
            Some((&mut a.data[..], lo - o as u64, sp))
        }
        Space::Shared => {
            let (lo, end, win) = if addrs[mask.trailing_zeros() as usize] >= SHARED_WIN { (lo - SHARED_WIN, end - SHARED_WIN, SHARED_WIN) } else { (lo, end, 0) };
            if end <= sh.stat.len() as u64 {
                Some((&mut sh.stat[..], win, sp))
            } else if lo >= DYN_SHARED as u64 && end - DYN_SHARED as u64 <= sh.dynm.len() as u64 {
                Some((&mut sh.dynm[..], win + DYN_SHARED as u64, sp))
            } else {
                None
            }
        }
        _ => None,
    }
}

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
}

enum Stop {
    Budget,
    Blocked,
}

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

fn run_cta(cx: &mut Ctx, warps: &mut [Warp], sh: &mut Shared, kidx: u32) -> Result<(), Error> {
    let l = cx.l;
    let start = l.kernel.start;
    sh.stat.fill(0);
    sh.dynm.fill(0);
    for w in warps.iter_mut() {
        w.regs.fill(0);
        w.local.fill(0);
        w.fparam.fill(0);
        let mut valid = 0u32;
        for lane in 0..32u32 {
            let t = w.id * 32 + lane;
            if t < cx.nthreads {
                valid |= 1 << lane;
                w.tid[0][lane as usize] = t % l.block[0];
                w.tid[1][lane as usize] = (t / l.block[0]) % l.block[1];
                w.tid[2][lane as usize] = t / (l.block[0] * l.block[1]);
            }
        }
        w.pc = start;
        w.active = valid;
        w.waiting = 0;
        w.exited = !valid;
        w.at_bar = 0;
        w.returned = 0;
        w.next_wait = NONE;
        w.frames.clear();
        w.func = kidx;
        w.rbase = 0;
        w.fbase = 0;
        w.lbase = 0;
        w.state = WState::Run;
        w.bar_red = None;
        w.bar_cnt = 0;
        w.arrive = None;
        w.cp_pending.clear();
        w.cp_group = 0;
        w.at_wsync = 0;
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
            let line = l.m.code[w.pc as usize].line;
            return Err(cx.err(w, lane, line, "deadlock: warps wait at a barrier that the remaining threads never reach".into()));
        }
        let r = cx.rand();
        let wi = runnable[(r % runnable.len() as u64) as usize];
        let budget = 8 + ((r >> 32) % 120) as u32;
        let stop = run_warp(cx, &mut warps[wi], sh, budget)?;
        if let Stop::Blocked = stop {
            let w = &mut warps[wi];
            if w.state == WState::Done {
                if !w.cp_pending.is_empty() {
                    flush_cp(cx, w, sh, u32::MAX)?;
                }
            }
            // arrival at barrier / exit changes barrier counts
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
                b.arrived += if b.expected != 0 { 32 } else { n };
                b.waiters |= 1 << wi;
                if let Some((kind, _, cnt)) = w.bar_red {
                    let _ = kind;
                    b.red_popc += cnt;
                    b.red_any_false |= cnt != n;
                    b.red_or |= cnt > 0;
                }
            }
            let live: u32 = warps.iter().map(|w| (!w.exited).count_ones()).sum();
            for (id, b) in bars.iter_mut().enumerate() {
                if b.waiters == 0 && b.arrived == 0 {
                    continue;
                }
                let expected = if b.expected != 0 { b.expected } else { live };
                if b.arrived >= expected {
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
        }
    }
}

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

/// Translate an address in state space `sp` to a concrete space and offset.
#[inline(always)]
fn resolve(sp: Space, a: u64) -> (Space, u64) {
    match sp {
        Space::Generic => {
            if a.wrapping_sub(SHARED_WIN) < WIN_SIZE {
                (Space::Shared, a - SHARED_WIN)
            } else if a.wrapping_sub(LOCAL_WIN) < WIN_SIZE {
                (Space::Local, a - LOCAL_WIN)
            } else {
                (Space::Global, a)
            }
        }
        Space::Const => (Space::Global, a),
        s => (s, a),
    }
}

const SP_IDX: [usize; 7] = [0, 1, 2, 3, 3, 4, 0];

/// Bytes of memory for one lane's access: returns a mutable slice or an error message.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mem_slice<'s>(cx: &'s mut Ctx, w: &'s mut Warp, sh: &'s mut Shared, sp: Space, a: u64, size: usize, lane: usize, store: bool) -> Result<(&'s mut [u8], Space, u64), String> {
    let (sp, a) = resolve(sp, a);
    if a % size as u64 != 0 && sp != Space::FParam && sp != Space::Param {
        return Err(format!("misaligned {}-byte {} {} at address {:#x}", size, sp.name(), if store { "store" } else { "load" }, a));
    }
    match sp {
        Space::Global => match cx.mem.find(a, size as u64) {
            Some((i, o)) => Ok((&mut cx.mem.allocs[i].data[o..o + size], sp, a)),
            None => Err(format!("out-of-bounds {}-byte global {} at address {:#x} ({})", size, if store { "store" } else { "load" }, a, cx.mem.describe(a))),
        },
        Space::Shared => {
            let (sl, dl) = (sh.stat.len(), sh.dynm.len());
            let (buf, o) = if a < DYN_SHARED as u64 { (&mut sh.stat, a) } else { (&mut sh.dynm, a - DYN_SHARED as u64) };
            if o + size as u64 > buf.len() as u64 {
                return Err(format!(
                    "out-of-bounds {}-byte shared {} at shared address {:#x} (static shared {} bytes, dynamic {} bytes at {:#x})",
                    size,
                    if store { "store" } else { "load" },
                    a,
                    sl,
                    dl,
                    DYN_SHARED
                ));
            }
            Ok((&mut buf[o as usize..o as usize + size], sp, a))
        }
        Space::Local => {
            let lt = cx.local_total as u64;
            if a + size as u64 > lt {
                return Err(format!("out-of-bounds {}-byte local access at local address {:#x} (frame {} bytes)", size, a, lt));
            }
            let o = lane * lt as usize + a as usize;
            Ok((&mut w.local[o..o + size], sp, a))
        }
        Space::FParam => {
            let ft = cx.fparam_total as u64;
            let a2 = a + w.fbase as u64;
            if a2 + size as u64 > ft {
                return Err(format!("param access at {:#x} outside the call frame", a));
            }
            let o = lane * ft as usize + a2 as usize;
            Ok((&mut w.fparam[o..o + size], sp, a))
        }
        Space::Param => {
            if store {
                return Err("store to kernel parameter space".into());
            }
            let p = &cx.l.params;
            if a + size as u64 > p.len() as u64 {
                return Err(format!("kernel parameter load at offset {:#x} past the {}-byte parameter buffer", a, p.len()));
            }
            Err("atomic or store on kernel parameter space".into())
        }
        _ => Err("unsupported state space".into()),
    }
}

/// Race-check one shared access of `size` bytes at shared address `a`.
#[allow(clippy::too_many_arguments)]
fn race(cx: &Ctx, w: &Warp, sh: &mut Shared, a: u64, size: usize, store: bool, lane: usize, line: u32) -> Result<(), Error> {
    let base = if a < DYN_SHARED as u64 { a as usize } else { sh.stat.len() + (a - DYN_SHARED as u64) as usize };
    let me = w.id + 1;
    let ep = cx.epoch;
    for i in base..base + size {
        let wr = sh.w[i];
        if wr >> 6 == ep && (wr & 63) != me {
            return Err(cx.err(w, lane, line, format!(
                "shared-memory race at shared address {:#x}: {} by warp {} conflicts with a write by warp {} at PTX line {} with no barrier between",
                a, if store { "write" } else { "read" }, w.id, (wr & 63) - 1, sh.wline[i]
            )));
        }
        if store {
            if sh.r_epoch[i] == ep && sh.r_mask[i] & !(1u64 << w.id) != 0 {
                let other = (sh.r_mask[i] & !(1u64 << w.id)).trailing_zeros();
                return Err(cx.err(w, lane, line, format!(
                    "shared-memory race at shared address {:#x}: write by warp {} conflicts with a read by warp {} at PTX line {} with no barrier between",
                    a, w.id, other, sh.rline[i]
                )));
            }
            sh.w[i] = (ep << 6) | me;
            sh.wline[i] = line;
        } else {
            if sh.r_epoch[i] != ep {
                sh.r_epoch[i] = ep;
                sh.r_mask[i] = 0;
            }
            sh.r_mask[i] |= 1 << w.id;
            sh.rline[i] = line;
        }
    }
    Ok(())
}

#[inline(always)]
fn rd(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(x)
}

fn sext(v: u64, size: usize) -> u64 {
    let s = 64 - 8 * size as u32;
    (((v << s) as i64) >> s) as u64
}

/// Load `size` bytes for one lane.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn load(cx: &mut Ctx, w: &mut Warp, sh: &mut Shared, sp: Space, a: u64, size: usize, lane: usize, line: u32) -> Result<u64, Error> {
    if sp == Space::Param {
        let p = &cx.l.params;
        if a + size as u64 > p.len() as u64 {
            return Err(cx.err(w, lane, line, format!("kernel parameter load at offset {:#x} past the {}-byte parameter buffer", a, p.len())));
        }
        cx.stats.bytes_loaded[3] += size as u64;
        return Ok(rd(&p[a as usize..a as usize + size]));
    }
    let race_on = cx.l.opts.race_check;
    let r = mem_slice(cx, w, sh, sp, a, size, lane, false);
    match r {
        Ok((s, rsp, ra)) => {
            let v = rd(s);
            cx.stats.bytes_loaded[SP_IDX[rsp as usize]] += size as u64;
            if race_on && rsp == Space::Shared {
                race(cx, w, sh, ra, size, false, lane, line)?;
            }
            Ok(v)
        }
        Err(msg) => Err(cx.err(w, lane, line, msg)),
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn store(cx: &mut Ctx, w: &mut Warp, sh: &mut Shared, sp: Space, a: u64, size: usize, v: u64, lane: usize, line: u32) -> Result<(), Error> {
    let race_on = cx.l.opts.race_check;
    match mem_slice(cx, w, sh, sp, a, size, lane, true) {
        Ok((s, rsp, ra)) => {
            s.copy_from_slice(&v.to_le_bytes()[..size]);
            cx.stats.bytes_stored[SP_IDX[rsp as usize]] += size as u64;
            if race_on && rsp == Space::Shared {
                race(cx, w, sh, ra, size, true, lane, line)?;
            }
            Ok(())
        }
        Err(msg) => Err(cx.err(w, lane, line, msg)),
    }
}

fn atom_apply(op: AtomOp, ty: Ty, old: u64, b: u64, c: u64) -> u64 {
    use crate::num::*;
    match (op, ty) {
        (AtomOp::Add, Ty::F32) => b32(f32_of(old) + f32_of(b)),
        (AtomOp::Add, Ty::F64) => b64(f64_of(old) + f64_of(b)),
        (AtomOp::Add, Ty::F16) => half::f16::from_f32(h2f(old) + h2f(b)).to_bits() as u64,
        (AtomOp::Add, Ty::BF16) => half::bf16::from_f32(bh2f(old) + bh2f(b)).to_bits() as u64,
        (AtomOp::Add, Ty::F16x2) => {
            let lo = half::f16::from_f32(h2f(old) + h2f(b)).to_bits() as u64;
            let hi = half::f16::from_f32(h2f(old >> 16) + h2f(b >> 16)).to_bits() as u64;
            lo | (hi << 16)
        }
        (AtomOp::Add, Ty::BF16x2) => {
            let lo = half::bf16::from_f32(bh2f(old) + bh2f(b)).to_bits() as u64;
            let hi = half::bf16::from_f32(bh2f(old >> 16) + bh2f(b >> 16)).to_bits() as u64;
            lo | (hi << 16)
        }
        (AtomOp::Add, _) => old.wrapping_add(b),
        (AtomOp::Min | AtomOp::Max, Ty::F32) => {
            let (x, y) = (f32_of(old), f32_of(b));
            b32(if op == AtomOp::Min { x.min(y) } else { x.max(y) })
        }
        (AtomOp::Min, t) if t.signed() => {
            let bits = t.bytes() * 8;
            if crate::alu::sext_i(old, bits) <= crate::alu::sext_i(b, bits) { old } else { b }
        }
        (AtomOp::Max, t) if t.signed() => {
            let bits = t.bytes() * 8;
            if crate::alu::sext_i(old, bits) >= crate::alu::sext_i(b, bits) { old } else { b }
        }
        (AtomOp::Min, _) => old.min(b),
        (AtomOp::Max, _) => old.max(b),
        (AtomOp::Inc, _) => if old >= b { 0 } else { old + 1 },
        (AtomOp::Dec, _) => if old == 0 || old > b { b } else { old - 1 },
        (AtomOp::And, _) => old & b,
        (AtomOp::Or, _) => old | b,
        (AtomOp::Xor, _) => old ^ b,
        (AtomOp::Exch, _) => b,
        (AtomOp::Cas, _) => if old == b { c } else { old },
    }
}

/// Perform queued cp.async copies of committed groups older than the newest `keep` ones
/// (`keep` = u32::MAX: everything, also uncommitted copies). Queue order is kept.
fn flush_cp(cx: &mut Ctx, w: &mut Warp, sh: &mut Shared, keep: u32) -> Result<(), Error> {
    let all = keep == u32::MAX;
    let limit = if all { u32::MAX } else { w.cp_group.saturating_sub(keep) };
    let mut i = 0;
    while i < w.cp_pending.len() {
        if all || w.cp_pending[i].group < limit {
            let p = w.cp_pending.remove(i);
            // element-wise stores of up to 8 bytes
            let mut off = 0usize;
            while off < p.len as usize {
                let n = (p.len as usize - off).min(8);
                store(cx, w, sh, Space::Shared, p.dst + off as u64, n, rd(&p.bytes[off..off + n]), p.lane as usize, p.line)?;
                off += n;
            }
        } else {
            i += 1;
        }
    }
    Ok(())
}

fn run_warp(cx: &mut Ctx, w: &mut Warp, sh: &mut Shared, budget: u32) -> Result<Stop, Error> {
    let code = &cx.l.m.code[..];
    for _ in 0..budget {
        if w.active == 0 && !w.resched() {
            // nothing runnable in this frame
            if w.at_wsync != 0 {
                // lanes parked at bar.warp.sync whose missing members have exited go on
                let r = wsync_release(w);
                if r != 0 {
                    w.waiting |= r;
                    continue;
                }
                if w.at_bar == 0 {
                    return Err(wsync_deadlock(cx, w, "the lanes it waits for have finished this frame"));
                }
            }
            if w.returned != 0 && !w.frames.is_empty() && w.at_bar == 0 {
                pop_frame(cx, w)?;
                continue;
            }
            if w.at_bar != 0 {
                return Ok(Stop::Blocked);
            }
            if w.frames.is_empty() || w.returned == 0 {
                w.state = WState::Done;
                w.exited = !0;
                return Ok(Stop::Blocked);
            }
        }
        let inst = &code[w.pc as usize];
        let mut mask = w.active;
        if let Some((p, neg)) = inst.guard {
            let mut pm = 0u32;
            for l in lanes(mask) {
                if (w.regs[(w.rbase + p) as usize * 32 + l] & 1 != 0) != neg {
                    pm |= 1 << l;
                }
            }
            mask = pm;
        }
        let n = mask.count_ones() as u64;
        cx.stats.warp_instructions += 1;
        cx.stats.lane_instructions += n;
        cx.stats.by_class[inst.class as usize] += n;
        if cx.budget_left == 0 {
            return Err(cx.err(w, w.active.trailing_zeros() as usize, inst.line, format!("instruction limit of {} warp-instructions reached (infinite loop?)", cx.l.opts.max_instructions)));
        }
        cx.budget_left -= 1;
        let line = inst.line;
        match &inst.op {
            Op::Alu { f, m, d, a, b, c } => {
                // each lane reads its own sources before writing its own destination, so
                // sources can be read in place even when they alias the destination
                let (ab, bb, cb) = (row(cx, w, *a, 0), row(cx, w, *b, 1), row(cx, w, *c, 2));
                let db = (w.rbase + d) as usize * 32;
                let r = &mut w.regs[..];
                if mask == !0 {
                    for l in 0..32 {
                        r[db + l] = f(*m, r[ab + l], r[bb + l], r[cb + l]);
                    }
                } else {
                    for l in lanes(mask) {
                        r[db + l] = f(*m, r[ab + l], r[bb + l], r[cb + l]);
                    }
                }
            }
            Op::Mov { d, a, mask: mk } => {
                let ab = row(cx, w, *a, 0);
                let db = (w.rbase + d) as usize * 32;
                let r = &mut w.regs[..];
                for l in lanes(mask) {
                    r[db + l] = r[ab + l] & mk;
                }
            }
            Op::Setp { f, m, d, dn, a, b, comb } => {
                for l in lanes(mask) {
                    let mut v = f(*m, get!(cx, w, *a, l), get!(cx, w, *b, l), 0) != 0;
                    let mut vn = !v;
                    if let Some((op, c, neg)) = comb {
                        let cv = (get!(cx, w, *c, l) & 1 != 0) != *neg;
                        let apply = |x: bool| match op {
                            BoolOp::And => x && cv,
                            BoolOp::Or => x || cv,
                            BoolOp::Xor => x ^ cv,
                        };
                        v = apply(v);
                        vn = apply(vn);
                    }
                    set!(w, *d, l, v as u64);
                    if let Some(dn) = dn {
                        set!(w, *dn, l, vn as u64);
                    }
                }
            }
            Op::Selp { d, a, b, p } => {
                for l in lanes(mask) {
                    let v = if get!(cx, w, *p, l) & 1 != 0 { get!(cx, w, *a, l) } else { get!(cx, w, *b, l) };
                    set!(w, *d, l, v);
                }
            }
            Op::Pack { d, parts, bits } => {
                let mk = if *bits >= 64 { !0 } else { (1u64 << bits) - 1 };
                for l in lanes(mask) {
                    let mut v = 0u64;
                    for (k, p) in parts.iter().enumerate() {
                        v |= (get!(cx, w, *p, l) & mk) << (k as u32 * bits);
                    }
                    set!(w, *d, l, v);
                }
            }
            Op::Unpack { ds, a, bits } => {
                let mk = if *bits >= 64 { !0 } else { (1u64 << bits) - 1 };
                for l in lanes(mask) {
                    let v = get!(cx, w, *a, l);
                    for (k, d) in ds.iter().enumerate() {
                        if let Some(d) = d {
                            set!(w, *d, l, (v >> (k as u32 * bits)) & mk);
                        }
                    }
                }
            }
            Op::Cvt { d, a, spec } => {
                for l in lanes(mask) {
                    let v = alu::cvt(spec, get!(cx, w, *a, l));
                    set!(w, *d, l, v);
                }
            }
            Op::CvtPack { d, a, b, bf, relu, rnd } => {
                for l in lanes(mask) {
                    let one = |x: u64| {
                        let f = crate::num::f32_of(x);
                        let f = if *relu && f < 0.0 { 0.0 } else { f };
                        (if f.is_nan() { 0x7fff } else if *bf { crate::num::f32_to_bf16(f, *rnd) } else { crate::num::f32_to_f16(f, *rnd) }) as u64
                    };
                    let v = (one(get!(cx, w, *a, l)) << 16) | one(get!(cx, w, *b, l));
                    set!(w, *d, l, v);
                }
            }
            Op::Cvta { to, sp, d, a } => {
                let win = match sp {
                    Space::Shared => SHARED_WIN,
                    Space::Local => LOCAL_WIN,
                    _ => 0,
                };
                for l in lanes(mask) {
                    let x = get!(cx, w, *a, l);
                    let v = if *to { x.wrapping_sub(win) } else { x.wrapping_add(win) };
                    set!(w, *d, l, v);
                }
            }
            Op::Ld { sp, size, signed, ds, addr } => {
                let size = *size as usize;
                let total = size * ds.len();
                let mut addrs = [0u64; 32];
                fetch(cx, w, addr.base, &mut addrs);
                for a in addrs.iter_mut() {
                    *a = a.wrapping_add(addr.off as u64);
                }
                if mask != 0 && matches!(sp, Space::Global | Space::Shared | Space::Generic | Space::Const) {
                    if let Some((buf, base, rsp)) = region(cx.mem, sh, *sp, &addrs, mask, total) {
                        for l in lanes(mask) {
                            let o = (addrs[l] - base) as usize;
                            for (k, d) in ds.iter().enumerate() {
                                let v = rd(&buf[o + k * size..o + (k + 1) * size]);
                                let v = if *signed { sext(v, size) } else { v };
                                if let Some(d) = d {
                                    set!(w, *d, l, v);
                                }
                            }
                        }
                        cx.stats.bytes_loaded[SP_IDX[rsp as usize]] += (total as u32 * mask.count_ones()) as u64;
                        if rsp == Space::Shared && cx.l.opts.race_check {
                            for l in lanes(mask) {
                                let a = if addrs[l] >= SHARED_WIN { addrs[l] - SHARED_WIN } else { addrs[l] };
                                race(cx, w, sh, a, total, false, l, line)?;
                            }
                        }
                        w.pc += 1;
                        if w.pc >= w.next_wait {
                            w.resched();
                        }
                        continue;
                    }
                }
                for l in lanes(mask) {
                    let a = get!(cx, w, addr.base, l).wrapping_add(addr.off as u64);
                    if total > size && a % total as u64 != 0 && *sp != Space::Param && *sp != Space::FParam {
                        return Err(cx.err(w, l, line, format!("misaligned {}-byte vector load at address {:#x}", total, a)));
                    }
                    for (k, d) in ds.iter().enumerate() {
                        let v = load(cx, w, sh, *sp, a + (k * size) as u64, size, l, line)?;
                        let v = if *signed { sext(v, size) } else { v };
                        if let Some(d) = d {
                            set!(w, *d, l, v);
                        }
                    }
                }
            }
            Op::St { sp, size, vals, addr } => {
                let size = *size as usize;
                let total = size * vals.len();
                let mut addrs = [0u64; 32];
                fetch(cx, w, addr.base, &mut addrs);
                for a in addrs.iter_mut() {
                    *a = a.wrapping_add(addr.off as u64);
                }
                if mask != 0 && vals.len() <= 8 && matches!(sp, Space::Global | Space::Shared | Space::Generic) {
                    let mut vv = [[0u64; 32]; 8];
                    for (k, v) in vals.iter().enumerate() {
                        fetch(cx, w, *v, &mut vv[k]);
                    }
                    if let Some((buf, base, rsp)) = region(cx.mem, sh, *sp, &addrs, mask, total) {
                        for l in lanes(mask) {
                            let o = (addrs[l] - base) as usize;
                            for k in 0..vals.len() {
                                let x = vv[k][l];
                                buf[o + k * size..o + (k + 1) * size].copy_from_slice(&x.to_le_bytes()[..size]);
                            }
                        }
                        cx.stats.bytes_stored[SP_IDX[rsp as usize]] += (total as u32 * mask.count_ones()) as u64;
                        if rsp == Space::Shared && cx.l.opts.race_check {
                            for l in lanes(mask) {
                                let a = if addrs[l] >= SHARED_WIN { addrs[l] - SHARED_WIN } else { addrs[l] };
                                race(cx, w, sh, a, total, true, l, line)?;
                            }
                        }
                        w.pc += 1;
                        if w.pc >= w.next_wait {
                            w.resched();
                        }
                        continue;
                    }
                }
                for l in lanes(mask) {
                    let a = get!(cx, w, addr.base, l).wrapping_add(addr.off as u64);
                    if total > size && a % total as u64 != 0 && *sp != Space::FParam {
                        return Err(cx.err(w, l, line, format!("misaligned {}-byte vector store at address {:#x}", total, a)));
                    }
                    for (k, v) in vals.iter().enumerate() {
                        let x = get!(cx, w, *v, l);
                        store(cx, w, sh, *sp, a + (k * size) as u64, size, x, l, line)?;
                    }
                }
            }
            Op::Atom { sp, op, ty, d, addr, b, c } => {
                let size = ty.bytes() as usize;
                let mk = if size == 8 { !0 } else { (1u64 << (8 * size)) - 1 };
                for l in lanes(mask) {
                    let a = get!(cx, w, addr.base, l).wrapping_add(addr.off as u64);
                    let (bv, cv) = (get!(cx, w, *b, l) & mk, get!(cx, w, *c, l) & mk);
                    let old = match mem_slice(cx, w, sh, *sp, a, size, l, true) {
                        Ok((s, rsp, _)) => {
                            let old = rd(s);
                            let new = atom_apply(*op, *ty, old, bv, cv) & mk;
                            s.copy_from_slice(&new.to_le_bytes()[..size]);
                            cx.stats.bytes_loaded[SP_IDX[rsp as usize]] += size as u64;
                            cx.stats.bytes_stored[SP_IDX[rsp as usize]] += size as u64;
                            old
                        }
                        Err(msg) => return Err(cx.err(w, l, line, msg)),
                    };
                    if let Some(d) = d {
                        let v = if ty.signed() { sext(old, size) } else { old };
                        set!(w, *d, l, v);
                    }
                }
            }
            Op::Bra { t } => {
                let taken = mask;
                if taken == w.active {
                    w.pc = *t;
                } else if taken == 0 {
                    w.pc += 1;
                } else {
                    for l in lanes(taken) {
                        w.lane_pc[l] = *t;
                    }
                    for l in lanes(w.active & !taken) {
                        w.lane_pc[l] = w.pc + 1;
                    }
                    w.waiting |= w.active;
                    w.active = 0;
                    w.resched();
                    continue;
                }
                if w.pc >= w.next_wait {
                    w.resched();
                }
                continue;
            }
            Op::Exit | Op::Ret => {
                let is_exit = matches!(inst.op, Op::Exit) || w.frames.is_empty();
                if mask == 0 {
                    w.pc += 1;
                } else {
                    if is_exit {
                        w.exited |= mask;
                    } else {
                        w.returned |= mask;
                    }
                    w.active &= !mask;
                    if w.active != 0 {
                        w.pc += 1;
                    }
                    if is_exit && w.frames.is_empty() && w.active == 0 && w.waiting == 0 && w.at_bar == 0 && w.at_wsync == 0 {
                        w.state = WState::Done;
                        if !w.cp_pending.is_empty() {
                            flush_cp(cx, w, sh, u32::MAX)?;
                        }
                        return Ok(Stop::Blocked);
                    }
                    if is_exit && w.active == 0 && w.waiting == 0 {
                        // lanes exited while others wait at a barrier: barrier counts change
                        if w.at_bar != 0 {
                            return Ok(Stop::Blocked);
                        }
                    }
                    continue;
                }
            }
            Op::Call { func, rets: _, args } => {
                if mask != w.active {
                    return Err(cx.err(w, mask.trailing_zeros() as usize, line, "predicated call with a partial mask is not supported".into()));
                }
                if w.at_wsync != 0 {
                    return Err(cx.err(w, mask.trailing_zeros() as usize, line, format!("call while lanes {:#010x} wait at bar.warp.sync is not supported", w.at_wsync)));
                }
                let callee = &cx.l.m.funcs[*func as usize];
                let caller = &cx.l.m.funcs[w.func as usize];
                let fr = Frame {
                    ret_pc: w.pc + 1,
                    call_pc: w.pc,
                    waiting: w.waiting,
                    lane_pc: w.lane_pc,
                    returned: w.returned,
                    func: w.func,
                    rbase: w.rbase,
                    fbase: w.fbase,
                    lbase: w.lbase,
                };
                let nf = w.fbase + caller.fparam_size;
                let ft = cx.fparam_total as usize;
                for l in lanes(mask) {
                    for (k, (off, size)) in args.iter().enumerate() {
                        let Some(p) = callee.params.get(k) else { break };
                        let n = (*size).min(p.size) as usize;
                        let src = l * ft + (w.fbase + off) as usize;
                        let dst = l * ft + (nf + p.offset) as usize;
                        w.fparam.copy_within(src..src + n, dst);
                    }
                }
                w.rbase += caller.nregs;
                w.fbase = nf;
                w.lbase += caller.local_size;
                w.func = *func;
                w.waiting = 0;
                w.returned = 0;
                w.next_wait = NONE;
                w.frames.push(fr);
                w.pc = callee.start;
                continue;
            }
            Op::Bar { id, cnt, arrive, red } => {
                let idv = get!(cx, w, *id, mask.trailing_zeros().min(31) as usize) as usize;
                if idv >= 16 {
                    return Err(cx.err(w, 0, line, format!("barrier id {idv} out of range")));
                }
                let l0 = mask.trailing_zeros().min(31) as usize;
                w.bar_cnt = match cnt {
                    Some(c) => {
                        let c = get!(cx, w, *c, l0) as u32;
                        if c == 0 || c % 32 != 0 || c > cx.nwarps * 32 {
                            return Err(cx.err(w, l0, line, format!("barrier thread count {c} must be a non-zero multiple of 32 up to the CTA size")));
                        }
                        c
                    }
                    None => 0,
                };
                if *arrive {
                    // counted now, no wait: the scheduler accounts for it before going on
                    w.arrive = Some(idv as u8);
                    w.pc += 1;
                    if w.pc >= w.next_wait {
                        w.resched();
                    }
                    return Ok(Stop::Blocked);
                }
                if let Some((kind, d, p, neg)) = red {
                    let mut c = 0;
                    for l in lanes(mask) {
                        if (get!(cx, w, *p, l) & 1 != 0) != *neg {
                            c += 1;
                        }
                    }
                    w.bar_red = Some((*kind, *d, c));
                }
                for l in lanes(w.active) {
                    w.lane_pc[l] = w.pc + 1;
                }
                w.at_bar |= w.active;
                w.active = 0;
                if w.resched() {
                    continue;
                }
                if w.at_wsync != 0 {
                    let r = wsync_release(w);
                    if r != 0 {
                        w.waiting |= r;
                        continue;
                    }
                    return Err(wsync_deadlock(cx, w, "lanes of its mask wait at a CTA barrier"));
                }
                w.state = WState::Bar(idv as u8);
                return Ok(Stop::Blocked);
            }
            Op::WarpSync { mask: mm } => {
                for l in lanes(mask) {
                    let m = get!(cx, w, *mm, l) as u32;
                    if m & (1 << l) == 0 {
                        return Err(cx.err(w, l, line, format!("bar.warp.sync with membermask {m:#010x} executed by lane {l}, which is not in the mask")));
                    }
                    w.wsync_mask[l] = m;
                    w.lane_pc[l] = w.pc + 1;
                }
                w.at_wsync |= mask;
                let r = wsync_release(w);
                if r == mask {
                    // the common case: every member is here (converged); go on together
                    w.pc += 1;
                    if w.pc >= w.next_wait {
                        w.resched();
                    }
                    continue;
                }
                // park the lanes still waiting; the released and guard-false lanes go on
                for l in lanes(w.active & !mask) {
                    w.lane_pc[l] = w.pc + 1;
                }
                w.waiting |= (w.active & !mask) | r;
                w.active = 0;
                w.resched();
                continue;
            }
            Op::Shfl { mode, d, dp, a, b, c, mask: mm } => {
                let l0 = mask.trailing_zeros().min(31) as usize;
                let member = get!(cx, w, *mm, l0) as u32;
                check_converged(cx, w, mask, member, line, "shfl.sync")?;
                let mut vals = [0u64; 32];
                for l in 0..32 {
                    vals[l] = w.regs[(w.rbase as usize + reg_of(a)) * 32 + l];
                }
                if !matches!(a, Src::R(_)) {
                    for (l, v) in vals.iter_mut().enumerate() {
                        *v = get!(cx, w, *a, l);
                    }
                }
                for l in lanes(mask) {
                    let bv = (get!(cx, w, *b, l) & 31) as i32;
                    let cv = get!(cx, w, *c, l) as u32;
                    let seg = ((cv >> 8) & 31) as i32;
                    let cl = (cv & 31) as i32;
                    let lane = l as i32;
                    let max_l = (lane & seg) | (cl & !seg);
                    let min_l = lane & seg;
                    let (j, ok) = match mode {
                        ShflMode::Up => (lane - bv, lane - bv >= max_l),
                        ShflMode::Down => (lane + bv, lane + bv <= max_l),
                        ShflMode::Bfly => (lane ^ bv, (lane ^ bv) <= max_l),
                        ShflMode::Idx => {
                            let j = min_l | (bv & !seg);
                            (j, j <= max_l)
                        }
                    };
                    let j = if ok { j as usize } else { l };
                    set!(w, *d, l, vals[j]);
                    if let Some(p) = dp {
                        set!(w, *p, l, ok as u64);
                    }
                }
            }
            Op::Vote { mode, d, a, neg, mask: mm } => {
                let l0 = mask.trailing_zeros().min(31) as usize;
                let member = get!(cx, w, *mm, l0) as u32;
                check_converged(cx, w, mask, member, line, "vote.sync")?;
                let part = mask & member;
                let mut ballot = 0u32;
                for l in lanes(part) {
                    if (get!(cx, w, *a, l) & 1 != 0) != *neg {
                        ballot |= 1 << l;
                    }
                }
                let v = match mode {
                    VoteMode::Ballot => ballot as u64,
                    VoteMode::All => (ballot == part) as u64,
                    VoteMode::Any => (ballot != 0) as u64,
                    VoteMode::Uni => (ballot == part || ballot == 0) as u64,
                };
                for l in lanes(mask) {
                    set!(w, *d, l, v);
                }
            }
            Op::Activemask { d } => {
                let v = w.active as u64;
                for l in lanes(mask) {
                    set!(w, *d, l, v);
                }
            }
            Op::Redux { op, signed, d, a, mask: mm } => {
                let l0 = mask.trailing_zeros().min(31) as usize;
                let member = get!(cx, w, *mm, l0) as u32;
                check_converged(cx, w, mask, member, line, "redux.sync")?;
                let part = mask & member;
                let mut acc: Option<u64> = None;
                for l in lanes(part) {
                    let x = get!(cx, w, *a, l) as u32 as u64;
                    acc = Some(match acc {
                        None => x,
                        Some(y) => match op {
                            AtomOp::Add => (x + y) & 0xffff_ffff,
                            AtomOp::Min => if *signed { (x as i32).min(y as i32) as u32 as u64 } else { x.min(y) },
                            AtomOp::Max => if *signed { (x as i32).max(y as i32) as u32 as u64 } else { x.max(y) },
                            AtomOp::And => x & y,
                            AtomOp::Or => x | y,
                            _ => x ^ y,
                        },
                    });
                }
                let v = acc.unwrap_or(0);
                for l in lanes(mask) {
                    set!(w, *d, l, v);
                }
            }
            Op::Match { all, wide, d, dp, a, mask: mm } => {
                let l0 = mask.trailing_zeros().min(31) as usize;
                let member = get!(cx, w, *mm, l0) as u32;
                check_converged(cx, w, mask, member, line, "match.sync")?;
                let part = mask & member;
                let mk = if *wide { !0 } else { 0xffff_ffff };
                let mut vals = [0u64; 32];
                for l in lanes(part) {
                    vals[l] = get!(cx, w, *a, l) & mk;
                }
                for l in lanes(mask) {
                    let mut same = 0u32;
                    for k in lanes(part) {
                        if vals[k] == vals[l] {
                            same |= 1 << k;
                        }
                    }
                    let v = if *all { if same == part { part } else { 0 } } else { same };
                    set!(w, *d, l, v as u64);
                    if let Some(p) = dp {
                        set!(w, *p, l, (same == part) as u64);
                    }
                }
            }
            Op::Nop => {}
            Op::Trap => {
                if mask != 0 {
                    return Err(cx.err(w, mask.trailing_zeros() as usize, line, "trap".into()));
                }
            }
            Op::Mma { bf, k, d, a, b, c } => {
                let full = !w.exited & !0;
                if mask != full {
                    return Err(cx.err(w, (full & !mask).trailing_zeros().min(31) as usize, line, format!("mma.sync.aligned executed by lanes {mask:#010x}, not the whole warp")));
                }
                let (mut fa, mut fb, mut fc) = ([[0u32; 4]; 32], [[0u32; 2]; 32], [[0f32; 4]; 32]);
                for l in 0..32 {
                    for i in 0..4 {
                        fa[l][i] = get!(cx, w, a[i], l) as u32;
                        fc[l][i] = f32::from_bits(get!(cx, w, c[i], l) as u32);
                    }
                    for i in 0..2 {
                        fb[l][i] = get!(cx, w, b[i], l) as u32;
                    }
                }
                let out = crate::tensor::mma(*bf, *k as usize, &fa, &fb, &fc);
                for l in 0..32 {
                    for i in 0..4 {
                        set!(w, d[i], l, out[l][i].to_bits() as u64);
                    }
                }
            }
            Op::Ldmatrix { num, trans, ds, addr, sp } => {
                let full = !w.exited & !0;
                if mask != full {
                    return Err(cx.err(w, (full & !mask).trailing_zeros().min(31) as usize, line, format!("ldmatrix.sync.aligned executed by lanes {mask:#010x}, not the whole warp")));
                }
                let mut out = [[0u64; 4]; 32];
                for mi in 0..*num as usize {
                    let mut mat = [[0u16; 8]; 8];
                    for r in 0..8 {
                        let src = mi * 8 + r;
                        let a = get!(cx, w, addr.base, src).wrapping_add(addr.off as u64);
                        if a % 16 != 0 {
                            return Err(cx.err(w, src, line, format!("ldmatrix row address {a:#x} is not 16-byte aligned")));
                        }
                        for half in 0..2 {
                            let v = load(cx, w, sh, *sp, a + 8 * half as u64, 8, src, line)?;
                            for e in 0..4 {
                                mat[r][half * 4 + e] = (v >> (16 * e)) as u16;
                            }
                        }
                    }
                    for (l, o) in out.iter_mut().enumerate() {
                        let mut v = 0u64;
                        for h in 0..2 {
                            let (r, c) = crate::tensor::ldm_pos(l, h, *trans);
                            v |= (mat[r][c] as u64) << (16 * h);
                        }
                        o[mi] = v;
                    }
                }
                for l in 0..32 {
                    for mi in 0..*num as usize {
                        set!(w, ds[mi], l, out[l][mi]);
                    }
                }
            }
            Op::Stmatrix { num, trans, vals, addr, sp } => {
                let full = !w.exited & !0;
                if mask != full {
                    return Err(cx.err(w, (full & !mask).trailing_zeros().min(31) as usize, line, format!("stmatrix.sync.aligned executed by lanes {mask:#010x}, not the whole warp")));
                }
                for mi in 0..*num as usize {
                    let mut mat = [[0u16; 8]; 8];
                    for l in 0..32 {
                        let v = get!(cx, w, vals[mi], l);
                        for h in 0..2 {
                            let (r, c) = crate::tensor::ldm_pos(l, h, *trans);
                            mat[r][c] = (v >> (16 * h)) as u16;
                        }
                    }
                    for r in 0..8 {
                        let src = mi * 8 + r;
                        let a = get!(cx, w, addr.base, src).wrapping_add(addr.off as u64);
                        if a % 16 != 0 {
                            return Err(cx.err(w, src, line, format!("stmatrix row address {a:#x} is not 16-byte aligned")));
                        }
                        for half in 0..2 {
                            let mut v = 0u64;
                            for e in 0..4 {
                                v |= (mat[r][half * 4 + e] as u64) << (16 * e);
                            }
                            store(cx, w, sh, *sp, a + 8 * half as u64, 8, v, src, line)?;
                        }
                    }
                }
            }
            Op::CpAsync { dst, src, size, src_size } => {
                for l in lanes(mask) {
                    let s = get!(cx, w, src.base, l).wrapping_add(src.off as u64);
                    let d = get!(cx, w, dst.base, l).wrapping_add(dst.off as u64);
                    let n = *size as usize;
                    let valid = match src_size {
                        Some(x) => (get!(cx, w, *x, l) as usize).min(n),
                        None => n,
                    };
                    if s % n as u64 != 0 || d % n as u64 != 0 {
                        return Err(cx.err(w, l, line, format!("cp.async of {n} bytes from {s:#x} to shared {d:#x} is misaligned")));
                    }
                    let mut bytes = [0u8; 16];
                    let mut off = 0;
                    while off < valid {
                        let c = (valid - off).min(8).min(n - off);
                        let c = if c >= 8 { 8 } else if c >= 4 { 4 } else if c >= 2 { 2 } else { 1 };
                        let v = load(cx, w, sh, Space::Global, s + off as u64, c, l, line)?;
                        bytes[off..off + c].copy_from_slice(&v.to_le_bytes()[..c]);
                        off += c;
                    }
                    w.cp_pending.push(Pending { group: w.cp_group, dst: d, len: n as u8, bytes, line, lane: l as u8 });
                }
            }
            Op::CpCommit => {
                w.cp_group += 1;
            }
            Op::CpWait { n } => {
                flush_cp(cx, w, sh, *n)?;
            }
        }
        w.pc += 1;
        if w.pc >= w.next_wait {
            w.resched();
        }
    }
    Ok(Stop::Budget)
}

fn reg_of(s: &Src) -> usize {
    match s {
        Src::R(r) => *r as usize,
        _ => 0,
    }
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

fn check_converged(cx: &Ctx, w: &Warp, mask: u32, member: u32, line: u32, what: &str) -> Result<(), Error> {
    let missing = member & !mask & !w.exited;
    if missing != 0 || mask & !member != 0 {
        let l = if missing != 0 { missing.trailing_zeros() } else { (mask & !member).trailing_zeros() } as usize;
        return Err(cx.err(w, l, line, format!(
            "{what} with membermask {member:#010x} executed by lanes {mask:#010x}: lane {l} is {}",
            if missing != 0 { "in the mask but not converged here" } else { "executing but not in the mask" }
        )));
    }
    Ok(())
}

fn pop_frame(cx: &mut Ctx, w: &mut Warp) -> Result<(), Error> {
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
    Ok(())
}
