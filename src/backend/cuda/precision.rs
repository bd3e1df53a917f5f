//! Mixed precision of `CudaBackend`: `Precision::F32` (default, every op fp32) or
//! `Precision::Bf16`, PyTorch-autocast style: buffers, master weights and optimizer state stay
//! fp32; `matmul` rounds its operands to bf16 (kernels/convert.cu, RNE) into scratch buffers
//! and runs a bf16 GEMM (bf16 A and B, fp32 C and accumulation: cublasGemmStridedBatchedEx on a
//! GPU, exact f64 sums of the bf16 products on `Sim`); the attention forward and backward run
//! on tensor cores (kernels/attention_mma.cu: Q/K/V (and dO) tiles rounded to bf16 in shared
//! memory, mma.sync bf16 -> fp32, softmax statistics in fp32, the same fp32 out and lse as
//! attn_fwd; the backward FA2-style with P recomputed from lse). Everything else (norms, RoPE,
//! SwiGLU, the lm-head's log-softmax, AdamW) stays fp32; the fused lm-head's GEMMs run in bf16
//! like every matmul. Frozen weights keep only their bf16 copy (`freeze_weight`), so do ZeRO-1's
//! sharded layer matrices (`shard_weight`: their fp32 values live in the master slices, and
//! `set_weight_slice` rounds the updated slices into them), and so do the saved activations
//! the transformer hands to `store_bf16`: those only bf16 matmuls and the
//! tensor-core attention read (xn1, xn2, act, q, k, v; the same bits those ops would round to,
//! so no result changes) and gate, up and the attention output, whose fp32 readers
//! (swiglu_bwd_bf16, attn_bwd_d_out_bf16) then compute on their bf16 rounding; and the paged KV
//! cache is bf16 (`kv_alloc`). Selected by `CudaBackend::with_precision` or `set_precision`
//! (`CudaBackend::new` is fp32); the commands' `--precision` flag picks it, bf16 by default on a
//! real GPU (`workflow::device`).

use super::gpu::{Arg, DevPtr, Gemm, GemmInput, Gpu, GpuError};
use super::{grid1, CudaBackend, CudaBuf, BLOCK};
use crate::backend::{AttnDims, AttnLayout};

pub use crate::backend::Precision;

impl Precision {
    pub(super) fn to_u8(self) -> u8 {
        self as u8
    }

    pub(super) fn from_u8(v: u8) -> Precision {
        if v == Precision::Bf16 as u8 {
            Precision::Bf16
        } else if v == Precision::Q8 as u8 {
            Precision::Q8
        } else if v == Precision::Q4 as u8 {
            Precision::Q4
        } else {
            Precision::F32
        }
    }
}

/// A bf16 matmul operand: a weight's cached copy (its lock held for the GEMM), a frozen
/// weight itself, or scratch.
pub(super) enum Bf16Operand<'a, G: Gpu> {
    Cached(std::sync::MutexGuard<'a, Option<CudaBuf<G>>>),
    Frozen(DevPtr),
    Fresh(CudaBuf<G>),
}

impl<G: Gpu> Bf16Operand<'_, G> {
    pub(super) fn ptr(&self) -> DevPtr {
        match self {
            Bf16Operand::Cached(g) => g.as_ref().expect("filled by bf16_of").ptr,
            Bf16Operand::Frozen(p) => *p,
            Bf16Operand::Fresh(b) => b.ptr,
        }
    }
}

/// Query tile (BQ) of attn_fwd_mma and attn_bwd_dq_mma, key tile (BKV) and query step (BQ2)
/// of attn_bwd_dkdv_mma, and the shared-memory geometry of kernels/attention_mma.cu (HDP,
/// LDQ, LDV, LDQ2, BK there).
const MMA_BQ: usize = 64;
const MMA_BK: usize = 32;
const MMA_BKV: usize = 64;
const MMA_BQ2: usize = 32;
fn mma_smem_bytes(head_dim: usize) -> usize {
    let hdp = head_dim.div_ceil(16) * 16;
    let (ldq, ldv) = (hdp + 8, MMA_BK + 8);
    (MMA_BQ * ldq + MMA_BK * ldq + hdp * ldv) * 2
}
/// Dynamic shared memory of paged_attn_mma (kernels/kv_cache.cu): the same tiles as
/// attn_fwd_mma (PA_BQ = 64 rows of queries x heads, PA_BK = 32 keys, PA_HDP, PA_LDQ, PA_LDV
/// there), so the same bytes: 36352 at head_dim 128, under the 48 KiB needing no opt-in.
pub(super) fn paged_mma_smem_bytes(head_dim: usize) -> usize {
    mma_smem_bytes(head_dim)
}
/// Query heads of one KV group that one paged_attn_mma block covers (`hb` there): the largest
/// divisor of `group` up to 8, so a block reads each K/V tile once for that many heads, and
/// still covers `MMA_BQ / hb` >= 8 queries (a 16-row warp spans at least 2 queries; the mma M
/// dimension is queries x heads).
pub(super) fn paged_mma_heads(group: usize) -> usize {
    (1..=group.min(8)).rev().find(|d| group.is_multiple_of(*d)).unwrap_or(1)
}
/// Queries per paged_attn_mma tile when a block covers `hb` heads.
pub(super) fn paged_mma_queries(hb: usize) -> usize {
    MMA_BQ / hb
}
/// Query tiles of attn_fwd_mma and attn_bwd_dq_mma: int2 [n_tiles] = (span, first query),
/// `MMA_BQ` queries each.
fn mma_qtiles(layout: &AttnLayout) -> Vec<i32> {
    let mut qt = Vec::new();
    for (i, s) in layout.spans.iter().enumerate() {
        for j in (0..s.len).step_by(MMA_BQ) {
            qt.extend([i as i32, j as i32]);
        }
    }
    qt
}
fn mma_dq_smem_bytes(head_dim: usize) -> usize {
    let hdp = head_dim.div_ceil(16) * 16;
    let (ldq, ldv) = (hdp + 8, MMA_BK + 8);
    (2 * MMA_BQ * ldq + 2 * MMA_BK * ldq + hdp * ldv) * 2
}
fn mma_dkdv_smem_bytes(head_dim: usize) -> usize {
    let hdp = head_dim.div_ceil(16) * 16;
    let (ldq, ldq2) = (hdp + 8, MMA_BQ2 + 8);
    (2 * MMA_BKV * ldq + 2 * MMA_BQ2 * ldq + 2 * hdp * ldq2) * 2 + 2 * MMA_BQ2 * 4
}

/// The attention_mma.cu kernel `name` for q, k, v in fp32, or its `_qkv_bf16` variant for
/// q, k, v stored in bf16 (`Backend::store_bf16`: the same bits the fp32 variant stages).
fn qkv_kernel<G: Gpu>(name: &str, q: &CudaBuf<G>, k: &CudaBuf<G>, v: &CudaBuf<G>) -> String {
    assert!(q.bf16_only == k.bf16_only && k.bf16_only == v.bf16_only, "{name}: q, k and v stored in different precisions");
    if q.bf16_only {
        format!("{name}_qkv_bf16")
    } else {
        name.to_string()
    }
}

impl<G: Gpu> CudaBackend<G> {
    /// The CUDA backend on `gpu` in precision `p`.
    pub fn with_precision(gpu: G, p: Precision) -> Result<Self, GpuError> {
        Self::new_with(gpu, p)
    }

    pub fn precision(&self) -> Precision {
        Precision::from_u8(self.precision.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Switches the precision of subsequent ops (buffers are fp32 in both, so nothing is
    /// converted).
    pub fn set_precision(&self, p: Precision) {
        self.precision.store(p.to_u8(), std::sync::atomic::Ordering::Relaxed);
    }

    /// `[n]` bf16 scratch (2 bytes each, in 4-byte elements) holding `src[n]` rounded RNE.
    pub(super) fn to_bf16(&self, src: DevPtr, n: usize) -> CudaBuf<G> {
        self.to_bf16_in(src, n, self.alloc(n.div_ceil(2).max(1)))
    }

    /// `to_bf16` into `dst` (`[n.div_ceil(2)]` 4-byte elements at least).
    fn to_bf16_in(&self, src: DevPtr, n: usize, dst: CudaBuf<G>) -> CudaBuf<G> {
        if n > 0 {
            self.launch("convert.cu", &[], "f32_to_bf16", grid1(n), BLOCK, 0, &[Arg::Ptr(src), Arg::Ptr(dst.ptr), Arg::I64(n as i64)]);
        }
        dst
    }

    /// The bf16 rounding of `x[..n]`: for a weight used whole, its cached copy (made on first
    /// use); otherwise a fresh scratch.
    pub(super) fn bf16_of<'a>(&self, x: &'a CudaBuf<G>, n: usize) -> Bf16Operand<'a, G> {
        if x.bf16_only {
            // Its first n values: every row-major operand view starts at the buffer's start.
            assert!(n <= x.len, "bf16 operand of {n} values from a frozen weight of {}", x.len);
            return Bf16Operand::Frozen(x.ptr);
        }
        match &x.bf16 {
            Some(cell) if n == x.len => {
                let mut guard = cell.lock().unwrap();
                if guard.is_none() {
                    // Kept past the step that may be making it: not in a step arena.
                    *guard = Some(self.to_bf16_in(x.ptr, x.len, self.alloc_persistent(x.len.div_ceil(2).max(1))));
                }
                Bf16Operand::Cached(guard)
            }
            _ => Bf16Operand::Fresh(self.to_bf16(x.ptr, n)),
        }
    }

    /// Drops the cached bf16 copy of a weight that is about to change in place.
    pub(super) fn weights_changed(&self, x: &CudaBuf<G>) {
        assert!(!x.bf16_only, "a frozen bf16 weight changed in place");
        if let Some(cell) = &x.bf16 {
            *cell.lock().unwrap() = None;
        }
    }

    /// `Backend::weight_slice`: a new fp32 buffer `[n]` copied on the device from elements
    /// `at..at + n` of the fp32 weight `w`.
    pub(super) fn weight_slice_dev(&self, w: &CudaBuf<G>, at: usize, n: usize) -> CudaBuf<G> {
        assert!(!w.bf16_only, "weight_slice of a weight kept in bf16 only (master slices are taken before shard_weight)");
        assert!(at + n <= w.len, "weight_slice: [{n}] at {at} of a weight of {}", w.len);
        let s = self.alloc(n);
        if n > 0 {
            self.dtod(s.ptr, w.at(at), 4 * n);
        }
        s
    }

    /// `Backend::set_weight_slice`: the f32 `src` `[n]` into elements `at..at + n` of the
    /// weight `w`, rounded to bf16 (f32_to_bf16, RNE: one 2-byte store per value, so any `at`)
    /// where `shard_weight` left bf16 only, else copied and w's cached bf16 copy dropped.
    pub(super) fn set_weight_slice_dev(&self, w: &mut CudaBuf<G>, at: usize, src: &CudaBuf<G>) {
        let n = src.len;
        assert!(at + n <= w.len, "set_weight_slice: [{n}] at {at} of a weight of {}", w.len);
        if n == 0 {
            return;
        }
        if w.bf16_only {
            self.launch("convert.cu", &[], "f32_to_bf16", grid1(n), BLOCK, 0, &[Arg::Ptr(src.at(0)), Arg::Ptr(w.ptr + 2 * at as u64), Arg::I64(n as i64)]);
        } else {
            self.weights_changed(w);
            self.dtod(w.at(at), src.at(0), 4 * n);
        }
    }

    /// `Backend::matmul_scaled` in bf16: a `[m * k]` and b `[k * n]` rounded to bf16 scratch,
    /// then the bf16 GEMM (fp32 accumulation, `alpha` in fp32) into the fp32 c.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matmul_bf16(&self, a: &CudaBuf<G>, ta: bool, b: &CudaBuf<G>, tb: bool, c: &mut CudaBuf<G>, m: usize, n: usize, k: usize, alpha: f32, accumulate: bool) {
        assert!(a.len >= m * k && b.len >= k * n && c.len >= m * n, "matmul shapes");
        if m == 0 || n == 0 {
            return;
        }
        // [m * k] and [k * n] bf16: weights from their cached copy, the rest converted now
        let a16 = self.bf16_of(a, m * k);
        // The same weight on both sides: one lock, one copy.
        let b16 = if std::ptr::eq(a, b) && m * k == k * n { None } else { Some(self.bf16_of(b, k * n)) };
        let b_ptr = b16.as_ref().map_or_else(|| a16.ptr(), |b| b.ptr());
        let g = Gemm { alpha, ..Gemm::row_major(a16.ptr(), ta, b_ptr, tb, c.ptr, m, n, k, accumulate) };
        self.gemm_ex(g, GemmInput::Bf16);
    }

    /// `Backend::attention` (forward) on tensor cores: attn_fwd_mma over query tiles of
    /// `MMA_BQ` rows; same spans, outputs and lse as attn_fwd (the backward:
    /// `attention_bwd_bf16`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_bf16(&self, q: &CudaBuf<G>, k: &CudaBuf<G>, v: &CudaBuf<G>, layout: &AttnLayout, dims: AttnDims, out: &mut CudaBuf<G>, lse: &mut CudaBuf<G>) {
        let (hd, nh, nkv) = (dims.head_dim, dims.n_heads, dims.n_kv_heads);
        let t = layout.num_tokens();
        assert!(q.len >= t * nh * hd && k.len >= t * nkv * hd && v.len >= t * nkv * hd && out.len >= t * nh * hd && lse.len >= t * nh, "attention shapes");
        assert!(nkv > 0 && nh % nkv == 0, "attention: n_heads {nh} not a multiple of n_kv_heads {nkv}");
        let (spans, _) = self.span_tables(layout);
        let qt = mma_qtiles(layout);
        if qt.is_empty() {
            return;
        }
        let qt_d = self.upload_i32(&qt);
        self.launch(
            "attention_mma.cu", &[("HEAD_DIM", hd)], &qkv_kernel("attn_fwd_mma", q, k, v), ((qt.len() / 2) as u32, nh as u32, 1), 128, mma_smem_bytes(hd),
            &[
                Arg::Ptr(q.ptr), Arg::Ptr(k.ptr), Arg::Ptr(v.ptr), Arg::Ptr(out.ptr), Arg::Ptr(lse.ptr), Arg::Ptr(spans.ptr), Arg::Ptr(qt_d.ptr),
                Arg::I32(nh as i32), Arg::I32(nkv as i32), Arg::F32((1.0 / (hd as f64).sqrt()) as f32),
            ],
        );
    }
}

impl<G: Gpu> CudaBackend<G> {
    /// `Backend::attention_bwd` on tensor cores (kernels/attention_mma.cu): D = rowsum(dO * O)
    /// as in fp32, then attn_bwd_dq_mma over query tiles of `MMA_BQ` and attn_bwd_dkdv_mma over
    /// key tiles of `MMA_BKV`, in waves of spans with disjoint key rows (as the fp32 path), so
    /// dK and dV are summed without atomics, deterministically.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_bwd_bf16(
        &self, dout: &CudaBuf<G>, q: &CudaBuf<G>, k: &CudaBuf<G>, v: &CudaBuf<G>, out: &CudaBuf<G>, lse: &CudaBuf<G>, layout: &AttnLayout, dims: AttnDims,
        dq: &mut CudaBuf<G>, dk: &mut CudaBuf<G>, dv: &mut CudaBuf<G>,
    ) {
        let (hd, nh, nkv) = (dims.head_dim, dims.n_heads, dims.n_kv_heads);
        let t = layout.num_tokens();
        assert!(dout.len >= t * nh * hd && out.len >= t * nh * hd && lse.len >= t * nh && dq.len >= t * nh * hd, "attention_bwd shapes");
        assert!(dk.len >= t * nkv * hd && dv.len >= t * nkv * hd && k.len >= t * nkv * hd && v.len >= t * nkv * hd, "attention_bwd shapes");
        assert!(nkv > 0 && nh % nkv == 0, "attention_bwd: n_heads {nh} not a multiple of n_kv_heads {nkv}");
        self.fill(dk, 0.0);
        self.fill(dv, 0.0);
        let (spans, _) = self.span_tables(layout);
        let qt = mma_qtiles(layout);
        if qt.is_empty() {
            return;
        }
        let def = [("HEAD_DIM", hd)];
        let scale = Arg::F32((1.0 / (hd as f64).sqrt()) as f32);
        let d = self.attn_bwd_d(dout, out, t * nh, hd); // D [tokens, n_heads]
        let qt_d = self.upload_i32(&qt);
        self.launch(
            "attention_mma.cu", &def, &qkv_kernel("attn_bwd_dq_mma", q, k, v), ((qt.len() / 2) as u32, nh as u32, 1), 128, mma_dq_smem_bytes(hd),
            &[
                Arg::Ptr(q.ptr), Arg::Ptr(k.ptr), Arg::Ptr(v.ptr), Arg::Ptr(dout.ptr), Arg::Ptr(lse.ptr), Arg::Ptr(d.ptr), Arg::Ptr(dq.ptr),
                Arg::Ptr(spans.ptr), Arg::Ptr(qt_d.ptr), Arg::I32(nh as i32), Arg::I32(nkv as i32), scale,
            ],
        );
        let dkdv = qkv_kernel("attn_bwd_dkdv_mma", q, k, v);
        for kt in super::dkdv_wave_tiles(layout, MMA_BKV) {
            let kt_d = self.upload_i32(&kt);
            self.launch(
                "attention_mma.cu", &def, &dkdv, ((kt.len() / 2) as u32, nkv as u32, 1), 128, mma_dkdv_smem_bytes(hd),
                &[
                    Arg::Ptr(q.ptr), Arg::Ptr(k.ptr), Arg::Ptr(v.ptr), Arg::Ptr(dout.ptr), Arg::Ptr(lse.ptr), Arg::Ptr(d.ptr), Arg::Ptr(dk.ptr), Arg::Ptr(dv.ptr),
                    Arg::Ptr(spans.ptr), Arg::Ptr(kt_d.ptr), Arg::I32(nh as i32), Arg::I32(nkv as i32), scale,
                ],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_precisions() {
        assert_eq!(Precision::parse("bf16").unwrap(), Precision::Bf16);
        assert_eq!(Precision::parse(" BFloat16 ").unwrap(), Precision::Bf16);
        assert_eq!(Precision::parse("f32").unwrap(), Precision::F32);
        assert_eq!(Precision::parse("FP32").unwrap(), Precision::F32);
        assert!(Precision::parse("fp16").unwrap_err().to_string().contains("expected f32, bf16, q8 or q4"));
        for p in [Precision::F32, Precision::Bf16] {
            assert_eq!(Precision::from_u8(p.to_u8()), p);
            assert_eq!(Precision::parse(p.name()).unwrap(), p);
        }
    }

    #[test]
    fn smem_matches_the_kernel_layout() {
        // (64 * 136 + 32 * 136 + 128 * 40) * 2 at HEAD_DIM 128; 64 pads nothing.
        assert_eq!(mma_smem_bytes(128), 36352);
        assert_eq!(mma_smem_bytes(64), (64 * 72 + 32 * 72 + 64 * 40) * 2);
        assert_eq!(mma_smem_bytes(5), mma_smem_bytes(16));
        assert_eq!(paged_mma_smem_bytes(80), (64 * 88 + 32 * 88 + 80 * 40) * 2);
    }

    #[test]
    fn paged_mma_heads_divide_the_group() {
        for (group, hb) in [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 8), (10, 5), (12, 6), (16, 8), (7 * 11, 7), (13, 1)] {
            assert_eq!(paged_mma_heads(group), hb, "group {group}");
            assert!(paged_mma_queries(hb) * hb <= MMA_BQ && paged_mma_queries(hb) >= 8);
        }
    }
}
