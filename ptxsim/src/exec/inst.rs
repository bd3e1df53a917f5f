//! What each instruction does to a warp: `Exec::op` dispatches on the decoded operation to one
//! handler per instruction (register ops, memory, control flow, barriers, warp-level and tensor
//! ops, async copies); each returns the `Flow` that the warp loop follows.

use super::memory::*;
use super::*;
use crate::alu;

/// One instruction executing on a warp: the launch state, the warp, the CTA's shared memory, the
/// lanes that execute it (active, guard true) and its PTX line for errors. Each handler below
/// takes it by value and returns what the warp does next.
pub(super) struct Exec<'e, 'l> {
    cx: &'e mut Ctx<'l>,
    w: &'e mut Warp,
    sh: &'e mut Shared,
    mask: u32,
    line: u32,
}

impl<'e, 'l> Exec<'e, 'l> {
    #[inline(always)]
    pub(super) fn new(cx: &'e mut Ctx<'l>, w: &'e mut Warp, sh: &'e mut Shared, mask: u32, line: u32) -> Self {
        Exec { cx, w, sh, mask, line }
    }

    /// Dispatch on the operation.
    #[inline(always)]
    pub(super) fn op(self, op: &Op) -> Result<Flow, Error> {
        match op {
            Op::Alu { f, m, d, a, b, c } => self.alu(*f, *m, *d, *a, *b, *c),
            Op::Mov { d, a, mask } => self.mov(*d, *a, *mask),
            Op::Setp { f, m, d, dn, a, b, comb } => self.setp(*f, *m, *d, *dn, *a, *b, *comb),
            Op::Selp { d, a, b, p } => self.selp(*d, *a, *b, *p),
            Op::Pack { d, parts, bits } => self.pack(*d, parts, *bits),
            Op::Unpack { ds, a, bits } => self.unpack(ds, *a, *bits),
            Op::Cvt { d, a, spec } => self.cvt(*d, *a, spec),
            Op::CvtPack { d, a, b, bf, relu, rnd } => self.cvt_pack(*d, *a, *b, *bf, *relu, *rnd),
            Op::Cvta { to, sp, d, a } => self.cvta(*to, *sp, *d, *a),
            Op::Ld { sp, size, signed, ds, addr } => self.ld(*sp, *size as usize, *signed, ds, *addr),
            Op::St { sp, size, vals, addr } => self.st(*sp, *size as usize, vals, *addr),
            Op::Atom { sp, op, ty, d, addr, b, c } => self.atom(*sp, *op, *ty, *d, *addr, *b, *c),
            Op::Bra { t } => self.bra(*t),
            Op::Exit => self.exit_or_ret(true),
            Op::Ret => self.exit_or_ret(false),
            Op::Call { func, rets: _, args } => self.call(*func, args),
            Op::Bar { id, cnt, arrive, red } => self.bar(*id, *cnt, *arrive, *red),
            Op::WarpSync { mask } => self.warp_sync(*mask),
            Op::Shfl { mode, d, dp, a, b, c, mask } => self.shfl(*mode, *d, *dp, *a, *b, *c, *mask),
            Op::Vote { mode, d, a, neg, mask } => self.vote(*mode, *d, *a, *neg, *mask),
            Op::Activemask { d } => self.activemask(*d),
            Op::Redux { op, signed, d, a, mask } => self.redux(*op, *signed, *d, *a, *mask),
            Op::Match { all, wide, d, dp, a, mask } => self.match_sync(*all, *wide, *d, *dp, *a, *mask),
            Op::Nop => Ok(Flow::Next),
            Op::Trap => self.trap(),
            Op::Mma { bf, k, d, a, b, c } => self.mma(*bf, *k as usize, d, a, b, c),
            Op::Ldmatrix { num, trans, ds, addr, sp } => self.ldmatrix(*num as usize, *trans, ds, *addr, *sp),
            Op::Stmatrix { num, trans, vals, addr, sp } => self.stmatrix(*num as usize, *trans, vals, *addr, *sp),
            Op::CpAsync { dst, src, size, src_size } => self.cp_async(*dst, *src, *size as usize, *src_size),
            Op::CpCommit => {
                self.w.cp_group += 1;
                Ok(Flow::Next)
            }
            Op::CpWait { n } => {
                flush_cp(self.cx, self.w, self.sh, *n)?;
                Ok(Flow::Next)
            }
        }
    }

    // ---- register operations ----

    #[inline(always)]
    fn alu(self, f: AluFn, m: u8, d: Reg, a: Src, b: Src, c: Src) -> Result<Flow, Error> {
        let Exec { cx, w, mask, .. } = self;
        // each lane reads its own sources before writing its own destination, so
        // sources can be read in place even when they alias the destination
        let (ab, bb, cb) = (row(cx, w, a, 0), row(cx, w, b, 1), row(cx, w, c, 2));
        let db = (w.rbase + d) as usize * 32;
        let r = &mut w.regs[..];
        if mask == !0 {
            for l in 0..32 {
                r[db + l] = f(m, r[ab + l], r[bb + l], r[cb + l]);
            }
        } else {
            for l in lanes(mask) {
                r[db + l] = f(m, r[ab + l], r[bb + l], r[cb + l]);
            }
        }
        Ok(Flow::Next)
    }

    #[inline(always)]
    fn mov(self, d: Reg, a: Src, mk: u64) -> Result<Flow, Error> {
        let Exec { cx, w, mask, .. } = self;
        let ab = row(cx, w, a, 0);
        let db = (w.rbase + d) as usize * 32;
        let r = &mut w.regs[..];
        for l in lanes(mask) {
            r[db + l] = r[ab + l] & mk;
        }
        Ok(Flow::Next)
    }

    /// `setp`: the comparison `f` into `d` (and its negation into `dn`), optionally combined
    /// with predicate `c` by a boolean op.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn setp(self, f: AluFn, m: u8, d: Reg, dn: Option<Reg>, a: Src, b: Src, comb: Option<(BoolOp, Src, bool)>) -> Result<Flow, Error> {
        let Exec { cx, w, mask, .. } = self;
        for l in lanes(mask) {
            let mut v = f(m, get!(cx, w, a, l), get!(cx, w, b, l), 0) != 0;
            let mut vn = !v;
            if let Some((op, c, neg)) = comb {
                let cv = (get!(cx, w, c, l) & 1 != 0) != neg;
                let apply = |x: bool| match op {
                    BoolOp::And => x && cv,
                    BoolOp::Or => x || cv,
                    BoolOp::Xor => x ^ cv,
                };
                v = apply(v);
                vn = apply(vn);
            }
            set!(w, d, l, v as u64);
            if let Some(dn) = dn {
                set!(w, dn, l, vn as u64);
            }
        }
        Ok(Flow::Next)
    }

    #[inline(always)]
    fn selp(self, d: Reg, a: Src, b: Src, p: Src) -> Result<Flow, Error> {
        let Exec { cx, w, mask, .. } = self;
        for l in lanes(mask) {
            let v = if get!(cx, w, p, l) & 1 != 0 { get!(cx, w, a, l) } else { get!(cx, w, b, l) };
            set!(w, d, l, v);
        }
        Ok(Flow::Next)
    }

    /// `mov` of a vector `{a, b, ..}` into one wide register: part k at bit k * `bits`.
    fn pack(self, d: Reg, parts: &[Src], bits: u32) -> Result<Flow, Error> {
        let Exec { cx, w, mask, .. } = self;
        let mk = if bits >= 64 { !0 } else { (1u64 << bits) - 1 };
        for l in lanes(mask) {
            let mut v = 0u64;
            for (k, p) in parts.iter().enumerate() {
                v |= (get!(cx, w, *p, l) & mk) << (k as u32 * bits);
            }
            set!(w, d, l, v);
        }
        Ok(Flow::Next)
    }

    /// `mov` of one wide register into a vector `{a, _, ..}`: the inverse of `pack`.
    fn unpack(self, ds: &[Option<Reg>], a: Src, bits: u32) -> Result<Flow, Error> {
        let Exec { cx, w, mask, .. } = self;
        let mk = if bits >= 64 { !0 } else { (1u64 << bits) - 1 };
        for l in lanes(mask) {
            let v = get!(cx, w, a, l);
            for (k, d) in ds.iter().enumerate() {
                if let Some(d) = d {
                    set!(w, *d, l, (v >> (k as u32 * bits)) & mk);
                }
            }
        }
        Ok(Flow::Next)
    }

    #[inline(always)]
    fn cvt(self, d: Reg, a: Src, spec: &CvtSpec) -> Result<Flow, Error> {
        let Exec { cx, w, mask, .. } = self;
        for l in lanes(mask) {
            let v = alu::cvt(spec, get!(cx, w, a, l));
            set!(w, d, l, v);
        }
        Ok(Flow::Next)
    }

    /// `cvt.{bf16x2,f16x2}.f32 d, a, b`: d = cvt(a) << 16 | cvt(b).
    fn cvt_pack(self, d: Reg, a: Src, b: Src, bf: bool, relu: bool, rnd: crate::num::Rnd) -> Result<Flow, Error> {
        let Exec { cx, w, mask, .. } = self;
        for l in lanes(mask) {
            let one = |x: u64| {
                let f = crate::num::f32_of(x);
                let f = if relu && f < 0.0 { 0.0 } else { f };
                (if f.is_nan() { 0x7fff } else if bf { crate::num::f32_to_bf16(f, rnd) } else { crate::num::f32_to_f16(f, rnd) }) as u64
            };
            let v = (one(get!(cx, w, a, l)) << 16) | one(get!(cx, w, b, l));
            set!(w, d, l, v);
        }
        Ok(Flow::Next)
    }

    /// `cvta[.to]`: between a state-space address and its generic-address window.
    fn cvta(self, to: bool, sp: Space, d: Reg, a: Src) -> Result<Flow, Error> {
        let Exec { cx, w, mask, .. } = self;
        let win = match sp {
            Space::Shared => SHARED_WIN,
            Space::Local => LOCAL_WIN,
            _ => 0,
        };
        for l in lanes(mask) {
            let x = get!(cx, w, a, l);
            let v = if to { x.wrapping_sub(win) } else { x.wrapping_add(win) };
            set!(w, d, l, v);
        }
        Ok(Flow::Next)
    }

    // ---- memory ----

    /// `ld` of `ds.len()` elements of `size` bytes per lane (a vector load when more than one).
    /// Fast path: the whole warp's access lies in one region (`region`); otherwise lane by lane,
    /// so the first bad access is reported exactly.
    #[inline(always)]
    fn ld(self, sp: Space, size: usize, signed: bool, ds: &[Option<Reg>], addr: Addr) -> Result<Flow, Error> {
        let Exec { cx, w, sh, mask, line } = self;
        let total = size * ds.len();
        let addrs = lane_addrs(cx, w, addr);
        if mask != 0 && matches!(sp, Space::Global | Space::Shared | Space::Generic | Space::Const) {
            if let Some((buf, base, rsp)) = region(cx.mem, sh, sp, &addrs, mask, total) {
                for l in lanes(mask) {
                    let o = (addrs[l] - base) as usize;
                    for (k, d) in ds.iter().enumerate() {
                        let v = rd(&buf[o + k * size..o + (k + 1) * size]);
                        let v = if signed { sext(v, size) } else { v };
                        if let Some(d) = d {
                            set!(w, *d, l, v);
                        }
                    }
                }
                cx.stats.bytes_loaded[SP_IDX[rsp as usize]] += (total as u32 * mask.count_ones()) as u64;
                if rsp == Space::Shared && cx.l.opts.race_check {
                    race_lanes(cx, w, sh, &addrs, mask, total, false, line)?;
                }
                return Ok(Flow::Next);
            }
        }
        for l in lanes(mask) {
            let a = get!(cx, w, addr.base, l).wrapping_add(addr.off as u64);
            if total > size && a % total as u64 != 0 && sp != Space::Param && sp != Space::FParam {
                return Err(cx.err(w, l, line, format!("misaligned {}-byte vector load at address {:#x}", total, a)));
            }
            for (k, d) in ds.iter().enumerate() {
                let v = load(cx, w, sh, sp, a + (k * size) as u64, size, l, line)?;
                let v = if signed { sext(v, size) } else { v };
                if let Some(d) = d {
                    set!(w, *d, l, v);
                }
            }
        }
        Ok(Flow::Next)
    }

    /// `st` of `vals.len()` elements of `size` bytes per lane; fast path and fallback as in `ld`.
    #[inline(always)]
    fn st(self, sp: Space, size: usize, vals: &[Src], addr: Addr) -> Result<Flow, Error> {
        let Exec { cx, w, sh, mask, line } = self;
        let total = size * vals.len();
        let addrs = lane_addrs(cx, w, addr);
        if mask != 0 && vals.len() <= 8 && matches!(sp, Space::Global | Space::Shared | Space::Generic) {
            let mut vv = [[0u64; 32]; 8];
            for (k, v) in vals.iter().enumerate() {
                fetch(cx, w, *v, &mut vv[k]);
            }
            if let Some((buf, base, rsp)) = region(cx.mem, sh, sp, &addrs, mask, total) {
                for l in lanes(mask) {
                    let o = (addrs[l] - base) as usize;
                    for k in 0..vals.len() {
                        let x = vv[k][l];
                        buf[o + k * size..o + (k + 1) * size].copy_from_slice(&x.to_le_bytes()[..size]);
                    }
                }
                cx.stats.bytes_stored[SP_IDX[rsp as usize]] += (total as u32 * mask.count_ones()) as u64;
                if rsp == Space::Shared && cx.l.opts.race_check {
                    race_lanes(cx, w, sh, &addrs, mask, total, true, line)?;
                }
                return Ok(Flow::Next);
            }
        }
        for l in lanes(mask) {
            let a = get!(cx, w, addr.base, l).wrapping_add(addr.off as u64);
            if total > size && a % total as u64 != 0 && sp != Space::FParam {
                return Err(cx.err(w, l, line, format!("misaligned {}-byte vector store at address {:#x}", total, a)));
            }
            for (k, v) in vals.iter().enumerate() {
                let x = get!(cx, w, *v, l);
                store(cx, w, sh, sp, a + (k * size) as u64, size, x, l, line)?;
            }
        }
        Ok(Flow::Next)
    }

    /// `atom`: read-modify-write lane by lane (in lane order); `d` gets the old value.
    #[allow(clippy::too_many_arguments)]
    fn atom(self, sp: Space, op: AtomOp, ty: Ty, d: Option<Reg>, addr: Addr, b: Src, c: Src) -> Result<Flow, Error> {
        let Exec { cx, w, sh, mask, line } = self;
        let size = ty.bytes() as usize;
        let mk = if size == 8 { !0 } else { (1u64 << (8 * size)) - 1 };
        for l in lanes(mask) {
            let a = get!(cx, w, addr.base, l).wrapping_add(addr.off as u64);
            let (bv, cv) = (get!(cx, w, b, l) & mk, get!(cx, w, c, l) & mk);
            let old = match mem_slice(cx, w, sh, sp, a, size, l, true) {
                Ok((s, rsp, _)) => {
                    let old = rd(s);
                    let new = atom_apply(op, ty, old, bv, cv) & mk;
                    s.copy_from_slice(&new.to_le_bytes()[..size]);
                    cx.stats.bytes_loaded[SP_IDX[rsp as usize]] += size as u64;
                    cx.stats.bytes_stored[SP_IDX[rsp as usize]] += size as u64;
                    old
                }
                Err(msg) => return Err(cx.err(w, l, line, msg)),
            };
            if let Some(d) = d {
                let v = if ty.signed() { sext(old, size) } else { old };
                set!(w, d, l, v);
            }
        }
        Ok(Flow::Next)
    }

    // ---- control flow ----

    /// `bra`: the executing lanes go to `target`. If only some of the active lanes take it, the
    /// warp diverges: both groups wait at their PCs and the lowest-PC group runs (`resched`).
    #[inline(always)]
    fn bra(self, target: u32) -> Result<Flow, Error> {
        let Exec { w, mask: taken, .. } = self;
        if taken == w.active {
            w.pc = target;
        } else if taken == 0 {
            w.pc += 1;
        } else {
            for l in lanes(taken) {
                w.lane_pc[l] = target;
            }
            for l in lanes(w.active & !taken) {
                w.lane_pc[l] = w.pc + 1;
            }
            w.waiting |= w.active;
            w.active = 0;
            w.resched();
            return Ok(Flow::Jumped);
        }
        if w.pc >= w.next_wait {
            w.resched();
        }
        Ok(Flow::Jumped)
    }

    /// `exit`, or `ret` (`exit` is the kernel's own frame): the executing lanes leave for good,
    /// or wait until the call's other lanes have returned too (`return_from_call`).
    fn exit_or_ret(self, exit: bool) -> Result<Flow, Error> {
        let Exec { cx, w, sh, mask, .. } = self;
        let is_exit = exit || w.frames.is_empty();
        if mask == 0 {
            // No lane's guard holds: fall through (`Flow::Next` advances the PC).
            return Ok(Flow::Next);
        }
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
            // the whole warp has finished; its outstanding async copies land now
            w.state = WState::Done;
            if !w.cp_pending.is_empty() {
                flush_cp(cx, w, sh, u32::MAX)?;
            }
            return Ok(Flow::Yield);
        }
        if is_exit && w.active == 0 && w.waiting == 0 && w.at_bar != 0 {
            // lanes exited while the others wait at a barrier: barrier counts change
            return Ok(Flow::Yield);
        }
        Ok(Flow::Jumped)
    }

    /// `call` (whole active group only): saves the caller's frame and lane state, copies the
    /// arguments into the callee's param frame and starts the callee with the same lanes.
    fn call(self, func: u32, args: &[(u32, u32)]) -> Result<Flow, Error> {
        let Exec { cx, w, mask, line, .. } = self;
        if mask != w.active {
            return Err(cx.err(w, mask.trailing_zeros() as usize, line, "predicated call with a partial mask is not supported".into()));
        }
        if w.at_wsync != 0 {
            return Err(cx.err(w, mask.trailing_zeros() as usize, line, format!("call while lanes {:#010x} wait at bar.warp.sync is not supported", w.at_wsync)));
        }
        let callee = &cx.l.m.funcs[func as usize];
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
        w.func = func;
        w.waiting = 0;
        w.returned = 0;
        w.next_wait = NONE;
        w.frames.push(fr);
        w.pc = callee.start;
        Ok(Flow::Jumped)
    }

    fn trap(self) -> Result<Flow, Error> {
        let Exec { cx, w, mask, line, .. } = self;
        if mask != 0 {
            return Err(cx.err(w, mask.trailing_zeros() as usize, line, "trap".into()));
        }
        Ok(Flow::Next)
    }

    // ---- barriers ----

    /// `bar.sync` / `bar.red` / `bar.arrive` on CTA barrier `id` (with an optional thread
    /// count). `bar.arrive` only registers the arrival. Otherwise the whole active group parks
    /// at the barrier; the warp stops when no other lane group can run, and the scheduler
    /// (`count_arrival`, `release_barriers`) resumes it.
    fn bar(self, id: Src, cnt: Option<Src>, arrive: bool, red: Option<(u8, Reg, Src, bool)>) -> Result<Flow, Error> {
        let Exec { cx, w, mask, line, .. } = self;
        let idv = get!(cx, w, id, mask.trailing_zeros().min(31) as usize) as usize;
        if idv >= 16 {
            return Err(cx.err(w, 0, line, format!("barrier id {idv} out of range")));
        }
        let l0 = mask.trailing_zeros().min(31) as usize;
        w.bar_cnt = match cnt {
            Some(c) => {
                let c = get!(cx, w, c, l0) as u32;
                if c == 0 || c % 32 != 0 || c > cx.nwarps * 32 {
                    return Err(cx.err(w, l0, line, format!("barrier thread count {c} must be a non-zero multiple of 32 up to the CTA size")));
                }
                c
            }
            None => 0,
        };
        if arrive {
            // counted now, no wait: the scheduler accounts for it before going on
            w.arrive = Some(idv as u8);
            w.advance();
            return Ok(Flow::Yield);
        }
        if let Some((kind, d, p, neg)) = red {
            let mut c = 0;
            for l in lanes(mask) {
                if (get!(cx, w, p, l) & 1 != 0) != neg {
                    c += 1;
                }
            }
            w.bar_red = Some((kind, d, c));
        }
        for l in lanes(w.active) {
            w.lane_pc[l] = w.pc + 1;
        }
        w.at_bar |= w.active;
        w.active = 0;
        if w.resched() {
            return Ok(Flow::Jumped);
        }
        if w.at_wsync != 0 {
            let r = wsync_release(w);
            if r != 0 {
                w.waiting |= r;
                return Ok(Flow::Jumped);
            }
            return Err(wsync_deadlock(cx, w, "lanes of its mask wait at a CTA barrier"));
        }
        w.state = WState::Bar(idv as u8);
        Ok(Flow::Yield)
    }

    /// `bar.warp.sync` (`__syncwarp`): the executing lanes park with their member masks and
    /// are released when their masks are complete (`wsync_release`).
    fn warp_sync(self, mm: Src) -> Result<Flow, Error> {
        let Exec { cx, w, mask, line, .. } = self;
        for l in lanes(mask) {
            let m = get!(cx, w, mm, l) as u32;
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
            return Ok(Flow::Next);
        }
        // park the lanes still waiting; the released and guard-false lanes go on
        for l in lanes(w.active & !mask) {
            w.lane_pc[l] = w.pc + 1;
        }
        w.waiting |= (w.active & !mask) | r;
        w.active = 0;
        w.resched();
        Ok(Flow::Jumped)
    }

    // ---- warp-level operations (membermask must be converged) ----

    #[allow(clippy::too_many_arguments)]
    fn shfl(self, mode: ShflMode, d: Reg, dp: Option<Reg>, a: Src, b: Src, c: Src, mm: Src) -> Result<Flow, Error> {
        let Exec { cx, w, mask, line, .. } = self;
        member_mask(cx, w, mask, mm, line, "shfl.sync")?;
        let mut vals = [0u64; 32];
        fetch(cx, w, a, &mut vals);
        for l in lanes(mask) {
            let bv = (get!(cx, w, b, l) & 31) as i32;
            let cv = get!(cx, w, c, l) as u32;
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
            set!(w, d, l, vals[j]);
            if let Some(p) = dp {
                set!(w, p, l, ok as u64);
            }
        }
        Ok(Flow::Next)
    }

    fn vote(self, mode: VoteMode, d: Reg, a: Src, neg: bool, mm: Src) -> Result<Flow, Error> {
        let Exec { cx, w, mask, line, .. } = self;
        let part = mask & member_mask(cx, w, mask, mm, line, "vote.sync")?;
        let mut ballot = 0u32;
        for l in lanes(part) {
            if (get!(cx, w, a, l) & 1 != 0) != neg {
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
            set!(w, d, l, v);
        }
        Ok(Flow::Next)
    }

    fn activemask(self, d: Reg) -> Result<Flow, Error> {
        let Exec { w, mask, .. } = self;
        let v = w.active as u64;
        for l in lanes(mask) {
            set!(w, d, l, v);
        }
        Ok(Flow::Next)
    }

    /// `redux.sync` on 32-bit values, folded in lane order.
    fn redux(self, op: AtomOp, signed: bool, d: Reg, a: Src, mm: Src) -> Result<Flow, Error> {
        let Exec { cx, w, mask, line, .. } = self;
        let part = mask & member_mask(cx, w, mask, mm, line, "redux.sync")?;
        let mut acc: Option<u64> = None;
        for l in lanes(part) {
            let x = get!(cx, w, a, l) as u32 as u64;
            acc = Some(match acc {
                None => x,
                Some(y) => match op {
                    AtomOp::Add => (x + y) & 0xffff_ffff,
                    AtomOp::Min => if signed { (x as i32).min(y as i32) as u32 as u64 } else { x.min(y) },
                    AtomOp::Max => if signed { (x as i32).max(y as i32) as u32 as u64 } else { x.max(y) },
                    AtomOp::And => x & y,
                    AtomOp::Or => x | y,
                    _ => x ^ y,
                },
            });
        }
        let v = acc.unwrap_or(0);
        for l in lanes(mask) {
            set!(w, d, l, v);
        }
        Ok(Flow::Next)
    }

    /// `match.{any,all}.sync` on 32- or 64-bit (`wide`) values.
    fn match_sync(self, all: bool, wide: bool, d: Reg, dp: Option<Reg>, a: Src, mm: Src) -> Result<Flow, Error> {
        let Exec { cx, w, mask, line, .. } = self;
        let part = mask & member_mask(cx, w, mask, mm, line, "match.sync")?;
        let mk = if wide { !0 } else { 0xffff_ffff };
        let mut vals = [0u64; 32];
        for l in lanes(part) {
            vals[l] = get!(cx, w, a, l) & mk;
        }
        for l in lanes(mask) {
            let mut same = 0u32;
            for k in lanes(part) {
                if vals[k] == vals[l] {
                    same |= 1 << k;
                }
            }
            let v = if all { if same == part { part } else { 0 } } else { same };
            set!(w, d, l, v as u64);
            if let Some(p) = dp {
                set!(w, p, l, (same == part) as u64);
            }
        }
        Ok(Flow::Next)
    }

    // ---- tensor core (whole warp) ----

    /// `mma.sync.aligned.m16n8k{8,16}` with f32 accumulators (fragment layout in `tensor`).
    fn mma(self, bf: bool, k: usize, d: &[Reg; 4], a: &[Src; 4], b: &[Src; 2], c: &[Src; 4]) -> Result<Flow, Error> {
        let Exec { cx, w, mask, line, .. } = self;
        check_whole_warp(cx, w, mask, line, "mma")?;
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
        let out = crate::tensor::mma(bf, k, &fa, &fb, &fc);
        for l in 0..32 {
            for i in 0..4 {
                set!(w, d[i], l, out[l][i].to_bits() as u64);
            }
        }
        Ok(Flow::Next)
    }

    /// `ldmatrix.sync.aligned` of `num` 8x8 b16 matrices: lanes 8i..8i+7 give the row addresses
    /// of matrix i; each lane receives its fragment (`tensor::ldm_pos`).
    fn ldmatrix(self, num: usize, trans: bool, ds: &[Reg; 4], addr: Addr, sp: Space) -> Result<Flow, Error> {
        let Exec { cx, w, sh, mask, line } = self;
        check_whole_warp(cx, w, mask, line, "ldmatrix")?;
        let mut out = [[0u64; 4]; 32];
        for mi in 0..num {
            let mut mat = [[0u16; 8]; 8];
            for r in 0..8 {
                let src = mi * 8 + r;
                let a = get!(cx, w, addr.base, src).wrapping_add(addr.off as u64);
                if a % 16 != 0 {
                    return Err(cx.err(w, src, line, format!("ldmatrix row address {a:#x} is not 16-byte aligned")));
                }
                for half in 0..2 {
                    let v = load(cx, w, sh, sp, a + 8 * half as u64, 8, src, line)?;
                    for e in 0..4 {
                        mat[r][half * 4 + e] = (v >> (16 * e)) as u16;
                    }
                }
            }
            for (l, o) in out.iter_mut().enumerate() {
                let mut v = 0u64;
                for h in 0..2 {
                    let (r, c) = crate::tensor::ldm_pos(l, h, trans);
                    v |= (mat[r][c] as u64) << (16 * h);
                }
                o[mi] = v;
            }
        }
        for l in 0..32 {
            for mi in 0..num {
                set!(w, ds[mi], l, out[l][mi]);
            }
        }
        Ok(Flow::Next)
    }

    /// `stmatrix.sync.aligned`: the inverse of `ldmatrix`.
    fn stmatrix(self, num: usize, trans: bool, vals: &[Src; 4], addr: Addr, sp: Space) -> Result<Flow, Error> {
        let Exec { cx, w, sh, mask, line } = self;
        check_whole_warp(cx, w, mask, line, "stmatrix")?;
        for mi in 0..num {
            let mut mat = [[0u16; 8]; 8];
            for l in 0..32 {
                let v = get!(cx, w, vals[mi], l);
                for h in 0..2 {
                    let (r, c) = crate::tensor::ldm_pos(l, h, trans);
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
                    store(cx, w, sh, sp, a + 8 * half as u64, 8, v, src, line)?;
                }
            }
        }
        Ok(Flow::Next)
    }

    // ---- async copies ----

    /// `cp.async` of `size` bytes (of which the first `src_size` are read, the rest zero) from
    /// global to shared: the source is read now, the shared store is queued until a
    /// `cp.async.wait_group` (or the warp's end) flushes it (`flush_cp`).
    fn cp_async(self, dst: Addr, src: Addr, size: usize, src_size: Option<Src>) -> Result<Flow, Error> {
        let Exec { cx, w, sh, mask, line } = self;
        for l in lanes(mask) {
            let s = get!(cx, w, src.base, l).wrapping_add(src.off as u64);
            let d = get!(cx, w, dst.base, l).wrapping_add(dst.off as u64);
            let n = size;
            let valid = match src_size {
                Some(x) => (get!(cx, w, x, l) as usize).min(n),
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
        Ok(Flow::Next)
    }
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

/// All 32 lanes' addresses of `[base+off]`.
#[inline(always)]
fn lane_addrs(cx: &Ctx, w: &Warp, addr: Addr) -> [u64; 32] {
    let mut addrs = [0u64; 32];
    fetch(cx, w, addr.base, &mut addrs);
    for a in addrs.iter_mut() {
        *a = a.wrapping_add(addr.off as u64);
    }
    addrs
}

/// The membermask of a warp-level `.sync` op (read from the first executing lane), after
/// checking that the executing lanes are exactly its non-exited lanes.
fn member_mask(cx: &Ctx, w: &Warp, mask: u32, mm: Src, line: u32, what: &str) -> Result<u32, Error> {
    let l0 = mask.trailing_zeros().min(31) as usize;
    let member = get!(cx, w, mm, l0) as u32;
    check_converged(cx, w, mask, member, line, what)?;
    Ok(member)
}

/// Errors unless the executing lanes (`mask`) are exactly the non-exited lanes of `member`.
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

/// `.sync.aligned` tensor-core ops need every non-exited lane of the warp.
fn check_whole_warp(cx: &Ctx, w: &Warp, mask: u32, line: u32, what: &str) -> Result<(), Error> {
    let full = !w.exited;
    if mask != full {
        return Err(cx.err(w, (full & !mask).trailing_zeros().min(31) as usize, line, format!("{what}.sync.aligned executed by lanes {mask:#010x}, not the whole warp")));
    }
    Ok(())
}
