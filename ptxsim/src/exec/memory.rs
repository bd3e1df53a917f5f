//! Memory accesses of one lane or a whole warp: state-space resolution (generic windows),
//! bounds and alignment checks with exact error messages, the byte counters, the shared-memory
//! race detector, atomics, and the queued `cp.async` copies.

use super::*;

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

/// `LaunchStats` byte-counter index of each `Space` (by discriminant), used after `resolve` has
/// turned const and generic addresses into global, shared or local ones.
pub(super) const SP_IDX: [usize; 7] = [0, 1, 2, 3, 3, 4, 0];

/// Fast path for a warp-wide access: if every active lane's `total`-byte access is aligned and
/// inside one region (one allocation, or one shared region), return (region, region base
/// address, concrete space). Otherwise None and the caller goes lane by lane for exact errors.
#[inline(always)]
pub(super) fn region<'s>(mem: &'s mut Memory, sh: &'s mut Shared, sp: Space, addrs: &[u64; 32], mask: u32, total: usize) -> Option<(&'s mut [u8], u64, Space)> {
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

/// Bytes of memory for one lane's access: returns a mutable slice or an error message.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn mem_slice<'s>(cx: &'s mut Ctx, w: &'s mut Warp, sh: &'s mut Shared, sp: Space, a: u64, size: usize, lane: usize, store: bool) -> Result<(&'s mut [u8], Space, u64), String> {
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

/// Race-checks a warp-wide shared access of `total` bytes per lane at `addrs` (shared-space or
/// generic addresses), lane by lane.
#[allow(clippy::too_many_arguments)]
pub(super) fn race_lanes(cx: &Ctx, w: &Warp, sh: &mut Shared, addrs: &[u64; 32], mask: u32, total: usize, store: bool, line: u32) -> Result<(), Error> {
    for l in lanes(mask) {
        let a = if addrs[l] >= SHARED_WIN { addrs[l] - SHARED_WIN } else { addrs[l] };
        race(cx, w, sh, a, total, store, l, line)?;
    }
    Ok(())
}

/// Little-endian value of up to 8 bytes.
#[inline(always)]
pub(super) fn rd(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(x)
}

/// Sign-extends the low `size` bytes of `v`.
pub(super) fn sext(v: u64, size: usize) -> u64 {
    let s = 64 - 8 * size as u32;
    (((v << s) as i64) >> s) as u64
}

/// Load `size` bytes for one lane.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn load(cx: &mut Ctx, w: &mut Warp, sh: &mut Shared, sp: Space, a: u64, size: usize, lane: usize, line: u32) -> Result<u64, Error> {
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

/// Store the low `size` bytes of `v` for one lane.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn store(cx: &mut Ctx, w: &mut Warp, sh: &mut Shared, sp: Space, a: u64, size: usize, v: u64, lane: usize, line: u32) -> Result<(), Error> {
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

/// The new value of an atomic `op` on `old` with operands `b` (and `c` for `cas`).
pub(super) fn atom_apply(op: AtomOp, ty: Ty, old: u64, b: u64, c: u64) -> u64 {
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
pub(super) fn flush_cp(cx: &mut Ctx, w: &mut Warp, sh: &mut Shared, keep: u32) -> Result<(), Error> {
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
