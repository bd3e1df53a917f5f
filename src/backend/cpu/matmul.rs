//! The CPU backend's own GEMM: packed operands, an AVX-512 microkernel in f32 (FMA) and one in
//! bf16 (AVX512_BF16 `vdpbf16ps`: products of bf16 pairs summed into f32), with portable
//! kernels for CPUs without them. The layout is BLIS's: `A [m, k]` is packed into panels of
//! `MR` rows, `B [k, n]` into panels of `NR` columns, both with the k axis outermost inside a
//! panel, so the microkernel streams two contiguous buffers and keeps an `MR x NR` tile of C in
//! registers (24 of the 32 zmm registers).
//!
//! Why our own and not the `gemm` crate for these: a weight is packed once per weight version
//! and kept beside it (`super::buf::WeightCache`), where `gemm` packs its operands on every
//! call; and Zen 4 runs `vdpbf16ps` at several times the f32 FMA rate, which no crate
//! here offers.
//!
//! Rounding: f32 sums each k block of `KC` in order (FMA), then adds the block into C; bf16
//! rounds A and B to bf16 (round to nearest even, as PyTorch and the CUDA backend's
//! `f32_to_bf16`), and `vdpbf16ps` adds the two products of a pair to the f32 accumulator.
//! The order depends on k only, never on the thread count.

use rayon::prelude::*;

/// Rows of A per panel (the tile height).
pub(crate) const MR: usize = 12;
/// Columns of B per panel (the tile width: two zmm registers of 16 f32).
pub(crate) const NR: usize = 32;
/// Depth (k for f32, k pairs for bf16) of one block: one B panel block is `KC * NR * 4`
/// bytes = 32 KiB, what stays hot in L1/L2 while the A panels of a task stream past it.
const KC: usize = 256;
/// A task covers up to `TASK_M` A panels x `TASK_N` B panels.
const TASK_M: usize = 8;
const TASK_N: usize = 4;
/// Products smaller than this (m * n * k) run on the calling thread.
const PAR_MIN: usize = 1 << 18;
/// Rows of A up to which the tasks run on the decode team (team.rs) rather than rayon: the
/// products of a decode step, about 210 per step of the default model, each too short to
/// pay for a rayon region. Larger ones (prefill, training) keep rayon.
const TEAM_MAX_M: usize = 64;

/// What a packed operand holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// f32 bits, one per k.
    F32,
    /// Two bf16 per u32 (k = 2d in the low half, 2d + 1 in the high half; 0 past the end).
    Bf16,
}

impl Kind {
    /// Entries along k of a packed panel.
    fn depth(self, k: usize) -> usize {
        match self {
            Kind::F32 => k,
            Kind::Bf16 => k.div_ceil(2),
        }
    }
}

/// A packed GEMM operand: panels of `width` rows (A: rows of A; B: columns of B), each
/// `[depth][width]` u32, zero-padded past the last row and past k.
pub(crate) struct Packed {
    kind: Kind,
    width: usize,
    rows: usize,
    k: usize,
    data: Vec<u32>,
}

impl Packed {
    fn panel(&self, p: usize) -> &[u32] {
        let len = self.kind.depth(self.k) * self.width;
        &self.data[p * len..(p + 1) * len]
    }

    /// The whole operand as a `View`.
    pub(crate) fn all(&self) -> View<'_> {
        View { p: self, panel0: 0, rows: self.rows, d0: 0, k: self.k }
    }

    /// Rows `rows` over k `ks` of the operand: a product can read a block of a packed weight
    /// (the lm-head's vocabulary tiles) without packing it again. `rows` starts at a panel
    /// boundary; for bf16, `ks` starts at an even k and ends at an even k or at the end (a pair
    /// must not straddle the range).
    pub(crate) fn view(&self, rows: std::ops::Range<usize>, ks: std::ops::Range<usize>) -> View<'_> {
        assert!(rows.start.is_multiple_of(self.width) && rows.start <= rows.end && rows.end <= self.rows, "packed view rows {rows:?} of {}", self.rows);
        assert!(ks.start <= ks.end && ks.end <= self.k, "packed view k {ks:?} of {}", self.k);
        if self.kind == Kind::Bf16 {
            assert!(ks.start.is_multiple_of(2) && (ks.end.is_multiple_of(2) || ks.end == self.k), "bf16 view k {ks:?} splits a pair");
        }
        View { p: self, panel0: rows.start / self.width, rows: rows.len(), d0: self.kind.depth(ks.start), k: ks.len() }
    }
}

/// Some panels of a `Packed` over a range of its k (see `Packed::view`).
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    p: &'a Packed,
    /// First panel, rows, first depth entry and k of the view.
    panel0: usize,
    rows: usize,
    d0: usize,
    k: usize,
}

impl View<'_> {
    fn panel(&self, p: usize) -> &[u32] {
        let w = self.p.width;
        &self.p.panel(self.panel0 + p)[self.d0 * w..(self.d0 + self.p.kind.depth(self.k)) * w]
    }
}

/// bf16 bits of `x`, rounded to nearest even (NaN stays NaN).
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// `x` rounded to bf16, as an f32.
#[cfg(test)]
pub(crate) fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// Whether this CPU runs the AVX-512 kernel of `kind` (else the portable one runs).
pub(crate) fn has_simd(kind: Kind) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static F32: OnceLock<bool> = OnceLock::new();
        static BF16: OnceLock<bool> = OnceLock::new();
        let f32_ok = *F32.get_or_init(|| !portable_forced() && std::arch::is_x86_feature_detected!("avx512f"));
        match kind {
            Kind::F32 => f32_ok,
            Kind::Bf16 => *BF16.get_or_init(|| f32_ok && std::arch::is_x86_feature_detected!("avx512bf16")),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        false
    }
}

/// `IPO_CPU_PORTABLE=1` turns the AVX-512 kernels off (for comparing the two on one machine).
fn portable_forced() -> bool {
    std::env::var("IPO_CPU_PORTABLE").is_ok_and(|v| v == "1")
}

/// Packs a strided matrix of `rows` x `k` (element `(r, kk)` at `src[r * rs + kk * ks]`) into
/// panels of `width` rows. For A: `rows = m`, `rs`/`ks` its row/column strides. For B `[k, n]`:
/// `rows = n`, `rs` = B's column stride, `ks` = its row stride.
///
/// # Safety
/// `src` must be valid for every `(r, kk)` with `r < rows`, `kk < k`.
unsafe fn pack(kind: Kind, width: usize, rows: usize, k: usize, src: *const f32, rs: isize, ks: isize, par: bool, simd: bool) -> Packed {
    let depth = kind.depth(k);
    let panels = rows.div_ceil(width);
    let plen = depth * width;
    let mut data = vec![0u32; panels * plen];
    let src = super::SendPtr(src as *mut f32);
    let fill = |p: usize, out: &mut [u32]| {
        let src = src.get() as *const f32;
        let valid = width.min(rows - p * width);
        #[cfg(target_arch = "x86_64")]
        if simd && has_simd(kind) && (ks == 1 || rs == 1) && k > 0 {
            // SAFETY: AVX-512 (and BF16 for bf16) present; the panel's `valid` rows of k exist.
            x86::pack_panel(kind, src.offset((p * width) as isize * rs), valid, k, rs, ks, out.as_mut_ptr(), width);
            return;
        }
        for r in 0..valid {
            let row = src.offset((p * width + r) as isize * rs);
            match kind {
                Kind::F32 => {
                    for kk in 0..k {
                        out[kk * width + r] = (*row.offset(kk as isize * ks)).to_bits();
                    }
                }
                Kind::Bf16 => {
                    for d in 0..depth {
                        let lo = bf16_bits(*row.offset(2 * d as isize * ks)) as u32;
                        let hi = if 2 * d + 1 < k { bf16_bits(*row.offset((2 * d + 1) as isize * ks)) as u32 } else { 0 };
                        out[d * width + r] = lo | (hi << 16);
                    }
                }
            }
        }
    };
    if par && rows * k >= PAR_MIN / 8 && rows <= TEAM_MAX_M {
        let out = super::SendPtr(data.as_mut_ptr());
        // SAFETY: panel p is data[p * plen..(p + 1) * plen], one task each.
        super::team::for_each(panels, |p| fill(p, unsafe { std::slice::from_raw_parts_mut(out.get().add(p * plen), plen) }));
    } else if par && rows * k >= PAR_MIN / 8 {
        data.par_chunks_mut(plen.max(1)).enumerate().for_each(|(p, out)| fill(p, out));
    } else {
        data.chunks_mut(plen.max(1)).enumerate().for_each(|(p, out)| fill(p, out));
    }
    Packed { kind, width, rows, k, data }
}

/// Packs A `[m, k]` (strides `rs`, `cs`).
///
/// # Safety
/// `a` must be valid for the `m x k` strided matrix.
pub(crate) unsafe fn pack_a(kind: Kind, m: usize, k: usize, a: *const f32, rs: isize, cs: isize, par: bool) -> Packed {
    pack(kind, MR, m, k, a, rs, cs, par, true)
}

/// Packs B `[k, n]` (strides `rs`, `cs`).
///
/// # Safety
/// `b` must be valid for the `k x n` strided matrix.
pub(crate) unsafe fn pack_b(kind: Kind, k: usize, n: usize, b: *const f32, rs: isize, cs: isize, par: bool) -> Packed {
    pack(kind, NR, n, k, b, cs, rs, par, true)
}

/// `dst[m, n] = alpha * A @ B (+ dst if accumulate)` from packed operands of the same kind and
/// depth; `dst` strided (`rs`, `cs`).
///
/// # Safety
/// `dst` must be valid for the `m x n` strided matrix and not overlap the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn multiply(a: &Packed, b: &Packed, dst: *mut f32, rs: isize, cs: isize, accumulate: bool, alpha: f32, par: bool) {
    multiply_with(a.all(), b.all(), dst, rs, cs, accumulate, alpha, par, has_simd(a.kind))
}

/// `multiply` on views of packed operands (same kind, same k).
///
/// # Safety
/// As `multiply`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn multiply_views(a: View, b: View, dst: *mut f32, rs: isize, cs: isize, accumulate: bool, alpha: f32, par: bool) {
    multiply_with(a, b, dst, rs, cs, accumulate, alpha, par, has_simd(a.p.kind))
}

/// `multiply` on the SIMD (`simd`, where `has_simd`) or the portable kernel.
#[allow(clippy::too_many_arguments)]
unsafe fn multiply_with(a: View, b: View, dst: *mut f32, rs: isize, cs: isize, accumulate: bool, alpha: f32, par: bool, simd: bool) {
    assert!(a.p.kind == b.p.kind && a.k == b.k && a.p.width == MR && b.p.width == NR, "matmul: mismatched packed operands");
    let (m, n, k, kind) = (a.rows, b.rows, a.k, a.p.kind);
    if m == 0 || n == 0 {
        return;
    }
    let depth = kind.depth(k);
    let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
    // Fewer B panels per task when there are few A panels, so that a decode-sized product
    // still makes about 4 tasks per thread. A tile's sums are the same in any task.
    let task_n = if mp <= TASK_M { (np / (4 * rayon::current_num_threads())).clamp(1, TASK_N) } else { TASK_N };
    let (tm, tn) = (mp.div_ceil(TASK_M), np.div_ceil(task_n));
    let simd = simd && has_simd(kind);
    let dst = super::SendPtr(dst);
    let task = |t: usize| {
        let (ti, tj) = (t / tn, t % tn);
        let mut tile = [0f32; MR * NR];
        let mut d0 = 0;
        loop {
            let kc = KC.min(depth - d0);
            let first = d0 == 0 && !accumulate;
            for jp in tj * task_n..np.min((tj + 1) * task_n) {
                let bp = &b.panel(jp)[d0 * NR..];
                for ip in ti * TASK_M..mp.min((ti + 1) * TASK_M) {
                    let ap = &a.panel(ip)[d0 * MR..];
                    let (mr, nr) = (MR.min(m - ip * MR), NR.min(n - jp * NR));
                    let d = dst.get().offset((ip * MR) as isize * rs + (jp * NR) as isize * cs);
                    #[cfg(target_arch = "x86_64")]
                    if simd && cs == 1 {
                        // SAFETY: `has_simd` checked the CPU features; the panels hold kc
                        // entries; d's mr x nr corner is inside dst.
                        assert!(ap.len() >= kc * MR && bp.len() >= kc * NR);
                        match kind {
                            Kind::F32 => x86::kernel_f32(kc, ap.as_ptr(), bp.as_ptr(), x86::Out { d, rs, mr, nr, first, alpha }),
                            Kind::Bf16 => x86::kernel_bf16(kc, ap.as_ptr(), bp.as_ptr(), x86::Out { d, rs, mr, nr, first, alpha }),
                        }
                        continue;
                    }
                    kernel(kind, simd, kc, ap, bp, &mut tile);
                    store(&tile, d, rs, cs, mr, nr, first, alpha);
                }
            }
            d0 += kc;
            if d0 >= depth {
                break;
            }
        }
    };
    if depth == 0 {
        // k = 0: the product is zero.
        for i in 0..m {
            for j in 0..n {
                let d = dst.get().offset(i as isize * rs + j as isize * cs);
                if !accumulate {
                    *d = 0.0;
                }
            }
        }
        return;
    }
    if par && m * n * k >= PAR_MIN && tm * tn > 1 && m <= TEAM_MAX_M {
        super::team::for_each(tm * tn, task);
    } else if par && m * n * k >= PAR_MIN && tm * tn > 1 {
        (0..tm * tn).into_par_iter().for_each(task);
    } else {
        (0..tm * tn).for_each(task);
    }
}

/// Adds (or writes, on the first k block without accumulation) `alpha * tile` into the
/// `mr x nr` corner of C at `d`.
#[inline(always)]
unsafe fn store(tile: &[f32; MR * NR], d: *mut f32, rs: isize, cs: isize, mr: usize, nr: usize, first: bool, alpha: f32) {
    for i in 0..mr {
        let row = d.offset(i as isize * rs);
        let t = &tile[i * NR..i * NR + nr];
        if cs == 1 {
            let out = std::slice::from_raw_parts_mut(row, nr);
            match (first, alpha == 1.0) {
                (true, true) => out.copy_from_slice(t),
                (true, false) => out.iter_mut().zip(t).for_each(|(o, &x)| *o = alpha * x),
                (false, true) => out.iter_mut().zip(t).for_each(|(o, &x)| *o += x),
                (false, false) => out.iter_mut().zip(t).for_each(|(o, &x)| *o += alpha * x),
            }
        } else {
            for (j, &x) in t.iter().enumerate() {
                let o = row.offset(j as isize * cs);
                *o = if first { alpha * x } else { *o + alpha * x };
            }
        }
    }
}

/// `tile[MR][NR] = sum over kc entries of a (x) b` (overwrites the tile).
#[inline(always)]
fn kernel(kind: Kind, simd: bool, kc: usize, a: &[u32], b: &[u32], tile: &mut [f32; MR * NR]) {
    assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `has_simd` checked the CPU features; the slices hold kc entries.
        unsafe {
            let out = x86::Out { d: tile.as_mut_ptr(), rs: NR as isize, mr: MR, nr: NR, first: true, alpha: 1.0 };
            match kind {
                Kind::F32 => x86::kernel_f32(kc, a.as_ptr(), b.as_ptr(), out),
                Kind::Bf16 => x86::kernel_bf16(kc, a.as_ptr(), b.as_ptr(), out),
            }
        }
        return;
    }
    let _ = simd;
    match kind {
        Kind::F32 => portable_f32(kc, a, b, tile),
        Kind::Bf16 => portable_bf16(kc, a, b, tile),
    }
}

fn portable_f32(kc: usize, a: &[u32], b: &[u32], tile: &mut [f32; MR * NR]) {
    tile.fill(0.0);
    for d in 0..kc {
        let (ar, br) = (&a[d * MR..(d + 1) * MR], &b[d * NR..(d + 1) * NR]);
        for i in 0..MR {
            let x = f32::from_bits(ar[i]);
            for j in 0..NR {
                tile[i * NR + j] = x.mul_add(f32::from_bits(br[j]), tile[i * NR + j]);
            }
        }
    }
}

fn portable_bf16(kc: usize, a: &[u32], b: &[u32], tile: &mut [f32; MR * NR]) {
    let lo = |w: u32| f32::from_bits(w << 16);
    let hi = |w: u32| f32::from_bits(w & 0xFFFF_0000);
    tile.fill(0.0);
    for d in 0..kc {
        let (ar, br) = (&a[d * MR..(d + 1) * MR], &b[d * NR..(d + 1) * NR]);
        for i in 0..MR {
            let (x0, x1) = (lo(ar[i]), hi(ar[i]));
            for j in 0..NR {
                // Products of two bf16 are exact in f32.
                tile[i * NR + j] += x0 * lo(br[j]) + x1 * hi(br[j]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Kind, MR, NR};
    use std::arch::x86_64::*;

    /// One panel of `pack` for the two layouts products use: k contiguous within a row
    /// (`ks == 1`: A row-major, B = W^T) or rows contiguous at each k (`rs == 1`: A
    /// transposed, B row-major). `out` is the panel, `[depth][width]`, zeroed past `valid`.
    ///
    /// # Safety
    /// AVX-512F (+ BW and BF16 for bf16); `src` covers `valid` rows of `k`.
    pub(super) unsafe fn pack_panel(kind: Kind, src: *const f32, valid: usize, k: usize, rs: isize, ks: isize, out: *mut u32, width: usize) {
        match kind {
            Kind::F32 => pack_f32(src, valid, k, rs, ks, out, width),
            Kind::Bf16 => pack_bf16(src, valid, k, rs, ks, out, width),
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn pack_f32(src: *const f32, valid: usize, k: usize, rs: isize, ks: isize, out: *mut u32, width: usize) {
        if rs == 1 {
            // Each k: `valid` contiguous floats, copied in masked 16-wide pieces.
            for kk in 0..k {
                let row = src.offset(kk as isize * ks);
                let mut r = 0;
                while r < valid {
                    let m: __mmask16 = if valid - r >= 16 { !0 } else { (1u16 << (valid - r)) - 1 };
                    _mm512_mask_storeu_ps(out.add(kk * width + r) as *mut f32, m, _mm512_maskz_loadu_ps(m, row.add(r)));
                    r += 16;
                }
            }
        } else {
            // k contiguous within a row: blocks of 16 rows x 16 k, transposed in registers.
            for r0 in (0..valid).step_by(16) {
                let (rows, sm) = (16.min(valid - r0), lanes(width - r0));
                for c in (0..k).step_by(16) {
                    let (kl, mut v) = ((k - c).min(16), [_mm512_setzero_si512(); 16]);
                    for (j, vj) in v.iter_mut().enumerate().take(rows) {
                        *vj = _mm512_castps_si512(_mm512_maskz_loadu_ps(lanes(kl), src.offset((r0 + j) as isize * rs).add(c)));
                    }
                    transpose16(&mut v);
                    for (t, vt) in v.iter().enumerate().take(kl) {
                        _mm512_mask_storeu_epi32(out.add((c + t) * width + r0) as *mut i32, sm, *vt);
                    }
                }
            }
        }
    }

    /// The mask of the first `n.min(16)` lanes.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            !0
        } else {
            (1u16 << n) - 1
        }
    }

    /// Transposes the 16 x 16 matrix of 32-bit words whose rows are `r` (unpacks of 32 and 64
    /// bits within 128-bit lanes, then two rounds of lane shuffles).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(r: &mut [__m512i; 16]) {
        let mut t = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            // Rows 2i, 2i + 1: lane l holds words (a_4l, b_4l, a_4l+1, b_4l+1) and (.. + 2, + 3).
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for q in 0..4 {
            // Rows 4q..4q + 4: r[4q + j] lane l holds column 4l + j of those four rows.
            let b = 4 * q;
            r[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
            r[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
            r[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
            r[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
        }
        for h in 0..2 {
            // Rows 8h..8h + 8: t[8h + j] (j < 4) holds columns j, 8 + j; t[8h + 4 + j] columns
            // 4 + j, 12 + j (each: four rows, then the next four).
            let b = 8 * h;
            for j in 0..4 {
                t[b + j] = _mm512_shuffle_i32x4::<0x88>(r[b + j], r[b + 4 + j]);
                t[b + 4 + j] = _mm512_shuffle_i32x4::<0xdd>(r[b + j], r[b + 4 + j]);
            }
        }
        for j in 0..8 {
            // Column j from t[j] and t[8 + j]; column 8 + j from their other halves.
            r[j] = _mm512_shuffle_i32x4::<0x88>(t[j], t[8 + j]);
            r[8 + j] = _mm512_shuffle_i32x4::<0xdd>(t[j], t[8 + j]);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_bf16(src: *const f32, valid: usize, k: usize, rs: isize, ks: isize, out: *mut u32, width: usize) {
        let depth = k.div_ceil(2);
        if rs == 1 {
            // Pair d: rows r..r+16 of k = 2d and 2d + 1, rounded together, interleaved into
            // (lo, hi) words.
            let idx = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            for d in 0..depth {
                let (r0, has1) = (src.offset(2 * d as isize * ks), 2 * d + 1 < k);
                let r1 = src.offset((2 * d + 1) as isize * ks);
                let mut r = 0;
                while r < valid {
                    let m: __mmask16 = if valid - r >= 16 { !0 } else { (1u16 << (valid - r)) - 1 };
                    let x0 = _mm512_maskz_loadu_ps(m, r0.add(r));
                    let x1 = if has1 { _mm512_maskz_loadu_ps(m, r1.add(r)) } else { _mm512_setzero_ps() };
                    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
                    _mm512_mask_storeu_epi32(out.add(d * width + r) as *mut i32, m, _mm512_permutexvar_epi16(idx, both));
                    r += 16;
                }
            }
        } else {
            // k contiguous within a row: blocks of 16 rows x 32 k become 16 rows x 16 pairs,
            // transposed in registers.
            for r0 in (0..valid).step_by(16) {
                let (rows, sm) = (16.min(valid - r0), lanes(width - r0));
                for c in (0..k).step_by(32) {
                    let left = k - c;
                    let (m0, m1) = (lanes(left), lanes(left.saturating_sub(16)));
                    let mut v = [_mm512_setzero_si512(); 16];
                    for (j, vj) in v.iter_mut().enumerate().take(rows) {
                        let row = src.offset((r0 + j) as isize * rs);
                        let lo = _mm512_maskz_loadu_ps(m0, row.add(c));
                        let hi = _mm512_maskz_loadu_ps(m1, row.add(c + 16.min(left)));
                        *vj = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                    }
                    transpose16(&mut v);
                    for (t, vt) in v.iter().enumerate().take(left.div_ceil(2).min(16)) {
                        _mm512_mask_storeu_epi32(out.add((c / 2 + t) * width + r0) as *mut i32, sm, *vt);
                    }
                }
            }
        }
    }

    /// Where a kernel puts its `MR x NR` tile: the `mr x nr` corner of a row-major C at `d`
    /// (row stride `rs`), written (`first`) or added to, times `alpha`: `super::store`'s
    /// operations, in registers.
    pub(super) struct Out {
        pub d: *mut f32,
        pub rs: isize,
        pub mr: usize,
        pub nr: usize,
        pub first: bool,
        pub alpha: f32,
    }

    /// Stores the accumulators as `out` says.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn put(c: &[[__m512; 2]; MR], out: Out) {
        let m0: __mmask16 = if out.nr >= 16 { !0 } else { (1u16 << out.nr) - 1 };
        let m1: __mmask16 = if out.nr >= 32 { !0 } else if out.nr > 16 { (1u16 << (out.nr - 16)) - 1 } else { 0 };
        let alpha = _mm512_set1_ps(out.alpha);
        for (i, ci) in c.iter().enumerate().take(out.mr) {
            let row = out.d.offset(i as isize * out.rs);
            for (h, (&v, m)) in ci.iter().zip([m0, m1]).enumerate() {
                let p = row.add(16 * h);
                let v = if out.alpha == 1.0 { v } else { _mm512_mul_ps(alpha, v) };
                let v = if out.first { v } else { _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), v) };
                _mm512_mask_storeu_ps(p, m, v);
            }
        }
    }

    /// # Safety
    /// AVX-512F; `a` holds `kc * MR`, `b` `kc * NR` entries; `out` names valid memory.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel_f32(kc: usize, a: *const u32, b: *const u32, out: Out) {
        let (a, b) = (a as *const f32, b as *const f32);
        let mut c = [[_mm512_setzero_ps(); 2]; MR];
        for d in 0..kc {
            let b0 = _mm512_loadu_ps(b.add(d * NR));
            let b1 = _mm512_loadu_ps(b.add(d * NR + 16));
            for (i, ci) in c.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*a.add(d * MR + i));
                ci[0] = _mm512_fmadd_ps(x, b0, ci[0]);
                ci[1] = _mm512_fmadd_ps(x, b1, ci[1]);
            }
        }
        put(&c, out);
    }

    /// # Safety
    /// AVX-512F and AVX512_BF16; `a` holds `kc * MR`, `b` `kc * NR` entries; `out` names
    /// valid memory.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn kernel_bf16(kc: usize, a: *const u32, b: *const u32, out: Out) {
        let mut c = [[_mm512_setzero_ps(); 2]; MR];
        for d in 0..kc {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(d * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(d * NR + 16) as *const _));
            for (i, ci) in c.iter_mut().enumerate() {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(d * MR + i) as i32));
                ci[0] = _mm512_dpbf16_ps(ci[0], x, b0);
                ci[1] = _mm512_dpbf16_ps(ci[1], x, b1);
            }
        }
        put(&c, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        super::super::test_vals(n, seed).into_iter().map(|x| x as f32).collect()
    }

    /// Every layout (A and B each plain or transposed, C plain or transposed), odd shapes
    /// (tails in m, n and k, k odd for the bf16 pairs, k across a block), accumulate and alpha,
    /// both kinds, SIMD and portable kernels, against an f64 sum of the same (bf16-rounded for
    /// bf16) operands: within k + 2 f32 roundings of the sum of |products|.
    #[test]
    fn matches_f64_reference_at_odd_shapes() {
        for &(m, n, k) in &[(1, 1, 1), (13, 33, 7), (25, 70, 300), (37, 5, 513), (12, 32, 64)] {
            for kind in [Kind::F32, Kind::Bf16] {
                for (ta, tb, tc) in [(false, false, false), (false, true, false), (true, false, true), (true, true, false)] {
                    for (accumulate, alpha) in [(false, 1.0f32), (true, 0.5)] {
                        let (a, b, c0) = (vals(m * k, 1 + m as u64), vals(k * n, 2 + k as u64), vals(m * n, 3));
                        let r = |x: f32| if kind == Kind::Bf16 { round_bf16(x) } else { x } as f64;
                        let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
                        let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
                        let (c_rs, c_cs) = if tc { (1, m as isize) } else { (n as isize, 1) };
                        let at = |i: usize, p: usize| a[(i as isize * a_rs + p as isize * a_cs) as usize];
                        let bt = |p: usize, j: usize| b[(p as isize * b_rs + j as isize * b_cs) as usize];
                        let ci = |i: usize, j: usize| (i as isize * c_rs + j as isize * c_cs) as usize;
                        for simd in [true, false] {
                            if simd && !has_simd(kind) {
                                continue;
                            }
                            let mut c = c0.clone();
                            unsafe {
                                // The portable run packs with the scalar loops too.
                                let pa = pack(kind, MR, m, k, a.as_ptr(), a_rs, a_cs, true, simd);
                                let pb = pack(kind, NR, n, k, b.as_ptr(), b_cs, b_rs, true, simd);
                                multiply_with(pa.all(), pb.all(), c.as_mut_ptr(), c_rs, c_cs, accumulate, alpha, true, simd);
                            }
                            for i in 0..m {
                                for j in 0..n {
                                    let exact: f64 = (0..k).map(|p| r(at(i, p)) * r(bt(p, j))).sum();
                                    let mag: f64 = (0..k).map(|p| (r(at(i, p)) * r(bt(p, j))).abs()).sum::<f64>() + c0[ci(i, j)].abs() as f64;
                                    let want = alpha as f64 * exact + if accumulate { c0[ci(i, j)] as f64 } else { 0.0 };
                                    let got = c[ci(i, j)] as f64;
                                    assert!(
                                        (got - want).abs() <= (k as f64 + 2.0) * 6e-8 * mag.max(1e-30),
                                        "{kind:?} simd {simd} m{m} n{n} k{k} ta{ta} tb{tb} tc{tc} acc{accumulate} ({i},{j}): {got} vs {want}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// A view of a packed operand (a block of its panels over a range of k) multiplies to the
    /// bits of packing that block on its own, in both kinds and both kernels, with tails.
    #[test]
    fn views_give_the_bits_of_packing_the_block() {
        let (m, n, k) = (13, 100, 301);
        let b = vals(k * n, 7); // [k, n]
        for kind in [Kind::F32, Kind::Bf16] {
            for simd in [true, false] {
                if simd && !has_simd(kind) {
                    continue;
                }
                for (cols, ks) in [(32..96, 4..260), (64..100, 0..301), (0..100, 40..301), (96..100, 2..3)] {
                    if kind == Kind::Bf16 && ks == (2..3) {
                        continue; // would split a pair
                    }
                    let kv = ks.len();
                    let a = vals(m * kv, 8 + kv as u64);
                    unsafe {
                        let pb = pack(kind, NR, n, k, b.as_ptr(), 1, n as isize, true, simd);
                        let sub = pack(kind, NR, cols.len(), kv, b.as_ptr().add(ks.start * n + cols.start), 1, n as isize, true, simd);
                        let pa = pack(kind, MR, m, kv, a.as_ptr(), kv as isize, 1, true, simd);
                        let (mut c1, mut c2) = (vals(m * cols.len(), 9), vals(m * cols.len(), 9));
                        let rs = cols.len() as isize;
                        multiply_with(pa.all(), pb.view(cols.clone(), ks.clone()), c1.as_mut_ptr(), rs, 1, true, 1.0, true, simd);
                        multiply_with(pa.all(), sub.all(), c2.as_mut_ptr(), rs, 1, true, 1.0, true, simd);
                        let same = c1.iter().zip(&c2).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{kind:?} simd {simd} cols {cols:?} k {ks:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: ties to even (up).
        assert_eq!(bf16_bits(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(bf16_bits(-2.5), half::bf16::from_f32(-2.5).to_bits());
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        for x in vals(1000, 9) {
            assert_eq!(bf16_bits(x * 1e3), half::bf16::from_f32(x * 1e3).to_bits());
        }
    }
}

