//! The CPU reference backend. Generic over the scalar: `CpuBackend<f32>` is the reference
//! every other backend is compared with, `CpuBackend<f64>` makes finite-difference gradient
//! checks exact enough to be tight. Threads come from rayon; GEMMs from the `gemm` crate.

pub(crate) mod attention;
mod buf;
pub(crate) mod dpo;
mod gemv;
pub(crate) mod kv;
pub(crate) mod matmul;
mod q4;
mod q8;
mod simd;
mod team;
mod lm_head;
pub(crate) mod optim;
pub(crate) mod sample;

pub use buf::CpuBuf;

use super::{AttnDims, AttnLayout, Backend, KvGeom, PagedSeq, Precision};
use buf::Derived;
use matmul::Kind;
use num_traits::{Float, FromPrimitive, ToPrimitive};
use rayon::prelude::*;
use std::fmt::Debug;
use std::iter::Sum;
use std::marker::PhantomData;
use std::ops::AddAssign;

/// The scalar types the CPU backend computes in.
pub trait Elem:
    Float + FromPrimitive + ToPrimitive + AddAssign + Sum + Default + Debug + Send + Sync + 'static
{
    /// `x . y` (the small-batch matmul's inner loop); summation order is the implementation's.
    fn dot(x: &[Self], y: &[Self]) -> Self {
        gemv::dot_generic(x, y)
    }
}
impl Elem for f32 {
    fn dot(x: &[f32], y: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            assert_eq!(x.len(), y.len());
            // SAFETY: AVX2 and FMA are present (checked above); equal lengths.
            return unsafe { gemv::dot_f32_avx2(x, y) };
        }
        gemv::dot_generic(x, y)
    }
}
impl Elem for f64 {}

#[inline]
pub(crate) fn cast<F: Elem>(x: f64) -> F {
    F::from_f64(x).expect("finite f64 fits the scalar type")
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend<F = f32> {
    precision: Precision,
    _scalar: PhantomData<F>,
}

impl<F> CpuBackend<F> {
    /// The reference: every product in `F`.
    pub fn new() -> Self {
        keep_freed_memory();
        Self { precision: Precision::F32, _scalar: PhantomData }
    }
    pub fn precision(&self) -> Precision {
        self.precision
    }
}

impl CpuBackend<f32> {
    /// The backend with products in precision `p` (`Precision` says what each means here).
    pub fn with_precision(p: Precision) -> Self {
        keep_freed_memory();
        Self { precision: p, _scalar: PhantomData }
    }
}

impl<F: Elem> CpuBackend<F> {
    /// `c[m, n] = alpha * op(a) @ op(b) (+ c)` in this backend's precision (see `Precision`):
    /// decode-sized products (`m <= 8` rows against a weight stored `[n, k]`) read the weight's
    /// rows directly (f32, bf16, 8-bit or 4-bit); the rest run on the packed GEMM (matmul.rs), with a
    /// weight's packed copy kept beside it (buf.rs). f64, and f32 on CPUs without AVX-512,
    /// use the `gemm` crate.
    #[allow(clippy::too_many_arguments)]
    fn product(&self, a: &CpuBuf<F>, ta: bool, b: &CpuBuf<F>, tb: bool, c: &mut CpuBuf<F>, m: usize, n: usize, k: usize, alpha: f64, accumulate: bool) {
        assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "matmul shapes");
        let kind = match self.precision {
            Precision::F32 => Kind::F32,
            Precision::Bf16 | Precision::Q8 | Precision::Q4 => Kind::Bf16,
        };
        let decode = !ta && tb && (1..=gemv::MAX_ROWS).contains(&m) && k > 0;
        let f32_ops = (as_f32(&a[..]), as_f32(&b[..]));
        let (Some(af), Some(bf), true) = (f32_ops.0, f32_ops.1, kind == Kind::Bf16 || matmul::has_simd(Kind::F32)) else {
            // The generic path: f64, or f32 without AVX-512 (precision f32 only).
            if decode && alpha == 1.0 {
                return gemv::matmul_bt(&a[..m * k], &b[..n * k], &mut c[..m * n], m, n, k, accumulate);
            }
            let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
            let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
            // SAFETY: the asserted lengths cover both strided operands and c's [m, n].
            unsafe { gemm_strided(m, n, k, c.as_mut_ptr(), n as isize, 1, accumulate, a.as_ptr(), a_rs, a_cs, b.as_ptr(), b_rs, b_cs, cast(alpha), true) };
            return;
        };
        // F is f32 from here on.
        let cf: &mut [f32] = unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr() as *mut f32, m * n) };
        let whole_weight = b.cache().filter(|_| b.len() == k * n);
        if decode && alpha == 1.0 {
            match (self.precision, whole_weight) {
                (Precision::F32, _) => return gemv::matmul_bt(&af[..m * k], &bf[..n * k], cf, m, n, k, accumulate),
                (Precision::Q8, Some(cache)) => {
                    let (q, x) = (cache.q8_rows(bf, k), q8::Q8Act::quantize(af, m, k));
                    return gemv::matmul_bt_with(cf, m, n, accumulate, |j, i| q.dot(j, &x, i));
                }
                (Precision::Q4, Some(cache)) => {
                    let (q, x) = (cache.q4_rows(bf, k), q8::Q8Act::quantize(af, m, k));
                    return gemv::matmul_bt_with(cf, m, n, accumulate, |j, i| q.dot(j, &x, i));
                }
                (_, cache) => {
                    let rows = match cache {
                        Some(cache) => cache.bf16_rows(bf),
                        None => std::sync::Arc::new(bf[..n * k].iter().map(|&x| matmul::bf16_bits(x)).collect()),
                    };
                    let (x, stride) = (gemv::bf16_rows(af, m, k), gemv::bf16_stride(k));
                    return gemv::matmul_bt_with(cf, m, n, accumulate, |j, i| gemv::dot_bf16(&rows[j * k..(j + 1) * k], &x[i * stride..(i + 1) * stride]));
                }
            }
        }
        let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
        // SAFETY (both packs): the asserted lengths cover the strided operands.
        let pack_b = |src: &[f32]| unsafe { matmul::pack_b(kind, k, n, src.as_ptr(), b_rs, b_cs, true) };
        let pb = match whole_weight {
            Some(cache) => {
                let which = if tb { Derived::PackedT(kind) } else { Derived::Packed(kind) };
                cache.packed(which, || match self.precision {
                    // The GEMMs of q8 and q4 read the same 8-bit or 4-bit weights as their decode products.
                    Precision::Q8 => pack_b(&cache.q8_rows(bf, if tb { k } else { n }).dequantize()),
                    Precision::Q4 => pack_b(&cache.q4_rows(bf, if tb { k } else { n }).dequantize()),
                    _ => pack_b(bf),
                })
            }
            None => std::sync::Arc::new(pack_b(bf)),
        };
        let pa = unsafe { matmul::pack_a(kind, m, k, af.as_ptr(), a_rs, a_cs, true) };
        // SAFETY: cf is c's [m, n], disjoint from the packed copies.
        unsafe { matmul::multiply(&pa, &pb, cf.as_mut_ptr(), n as isize, 1, accumulate, alpha as f32, true) };
    }
}

impl<F> CpuBackend<F> {
    /// The lm-head weight's derived copies, for the lm-head to read its packs from: not at q8
    /// or q4, whose packs of a weight hold its 8-bit or 4-bit values (`product`), where the lm-head's products
    /// are bf16 of the f32 weights.
    fn head_cache<'a>(&self, w: &'a CpuBuf<F>, dim: usize) -> Option<&'a buf::WeightCache> {
        w.cache().filter(|_| !matches!(self.precision, Precision::Q8 | Precision::Q4) && dim > 0 && w.len().is_multiple_of(dim))
    }
}

/// Keeps freed memory in the process for reuse (glibc only, once per process). By default glibc
/// hands blocks above its mmap threshold back to the OS on free, and trims the heap's top above
/// its trim threshold, so the activations of a training step (hundreds per step, 0.1-3 MiB each)
/// kept arriving as fresh pages: the kernel's page faults and zeroing took 6-8% of a step of the
/// default model (87k minor faults per forward + backward; 20k after). A fixed 32 MiB mmap
/// threshold (glibc's largest dynamic value, which it otherwise reaches only after such a free)
/// and no trimming keep them in the heap. The step's peak RSS is unchanged (2.14 vs 2.15 GB);
/// the process no longer gives memory back below its peak.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            extern "C" {
                fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
            }
            const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
            const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
            // SAFETY: mallopt only sets allocator parameters; both values are in range.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, std::ffi::c_int::MAX);
            }
        });
    }
}

/// Whether the scalar `F` is f32 (the packed kernels' type).
pub(crate) fn is_f32<F: 'static>() -> bool {
    std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>()
}

/// `x` as the f32 slice it is, when `F` is f32.
fn as_f32<F: Elem>(x: &[F]) -> Option<&[f32]> {
    is_f32::<F>()
        // SAFETY: F is f32 (same type, checked above).
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

/// A raw pointer that may cross rayon tasks; each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<F>(pub *mut F);
unsafe impl<F> Send for SendPtr<F> {}
unsafe impl<F> Sync for SendPtr<F> {}
impl<F> SendPtr<F> {
    /// Taking `self` whole keeps closures capturing the wrapper, not the raw field.
    #[inline]
    pub(crate) fn get(self) -> *mut F {
        self.0
    }
}

/// `dst[m, n] (+)= lhs[m, k] @ rhs[k, n]` on strided matrices (row stride, column stride).
/// Multi-threaded only for large products and outside other parallel loops (`par`).
///
/// # Safety
/// The pointers and strides must describe valid, non-overlapping (dst vs inputs) regions.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided<F: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut F,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    lhs: *const F,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const F,
    rhs_rs: isize,
    rhs_cs: isize,
    scale: F,
    par: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.offset(i as isize * dst_rs + j as isize * dst_cs) = F::zero();
                }
            }
        }
        return;
    }
    if is_f32::<F>() && matmul::has_simd(Kind::F32) {
        return gemm_strided_f32(Kind::F32, m, n, k, dst as *mut f32, dst_rs, dst_cs, accumulate, lhs as *const f32, lhs_rs, lhs_cs, rhs as *const f32, rhs_rs, rhs_cs, scale.to_f32().unwrap_or(f32::NAN), par);
    }
    let parallelism = if par && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // gemm computes dst := alpha * dst + beta * lhs @ rhs (alpha read only if read_dst).
    gemm::gemm(
        m, n, k, dst, dst_cs, dst_rs, accumulate, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
        F::one(), scale, false, false, false, parallelism,
    );
}

/// `gemm_strided` on the packed kernels (matmul.rs) in `kind`, for f32 operands.
///
/// # Safety
/// As `gemm_strided`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided_f32(
    kind: Kind,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    dst_cs: isize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    scale: f32,
    par: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let pa = matmul::pack_a(kind, m, k, lhs, lhs_rs, lhs_cs, par);
    let pb = matmul::pack_b(kind, k, n, rhs, rhs_rs, rhs_cs, par);
    matmul::multiply(&pa, &pb, dst, dst_rs, dst_cs, accumulate, scale, par);
}

const ROW_CHUNK: usize = 16;

/// Elements per task of the vectorised element-wise ops (simd.rs): 64 KiB of f32 per operand.
const SIMD_CHUNK: usize = 1 << 14;

/// RoPE's `(cos, signed sin)` `[tokens, head_dim / 2]` for `positions`, kept for reuse: every
/// layer's q and k (forward) and dq and dk (backward) rotate by the same angles, and a sine and
/// cosine in f64 cost more than the rotation. The values are the reference's `cast(cos)`,
/// `cast(sign * sin)` of `pos * inv_freq[i]` (f64), so the bits do not change.
fn rope_table(positions: &[u32], inv_freq: &[f64], half: usize, inverse: bool) -> std::sync::Arc<(Vec<f32>, Vec<f32>)> {
    type Entry = (Vec<u32>, Vec<f64>, bool, std::sync::Arc<(Vec<f32>, Vec<f32>)>);
    static CACHE: std::sync::Mutex<Vec<Entry>> = std::sync::Mutex::new(Vec::new());
    let inv_freq = &inv_freq[..half];
    if let Some(e) = CACHE.lock().unwrap().iter().find(|e| e.2 == inverse && e.0 == positions && e.1 == inv_freq) {
        return e.3.clone();
    }
    let sign = if inverse { -1.0 } else { 1.0 };
    let (mut c, mut s) = (vec![0f32; positions.len() * half], vec![0f32; positions.len() * half]);
    let row = |((cr, sr), &pos): ((&mut [f32], &mut [f32]), &u32)| {
        for (i, &f) in inv_freq.iter().enumerate() {
            let angle = pos as f64 * f;
            (cr[i], sr[i]) = (angle.cos() as f32, (sign * angle.sin()) as f32);
        }
    };
    if positions.len() * 16 * half < PAR_MIN {
        c.chunks_mut(half).zip(s.chunks_mut(half)).zip(positions).for_each(row);
    } else {
        c.par_chunks_mut(half).zip(s.par_chunks_mut(half)).zip(positions.par_iter()).for_each(row);
    }
    let t = std::sync::Arc::new((c, s));
    let mut cache = CACHE.lock().unwrap();
    // A few entries: forward and inverse of the batch in flight (and of a decode step's).
    if cache.len() >= 4 {
        cache.remove(0);
    }
    cache.push((positions.to_vec(), inv_freq.to_vec(), inverse, t.clone()));
    t
}

/// Elements below which an element-wise op runs on the calling thread: a rayon region costs
/// tens of microseconds when the caller is outside the pool, more than a decode step's
/// per-token ops (RMSNorm of 576, SwiGLU of 1536). Per-element results do not depend on it.
const PAR_MIN: usize = 1 << 14;

/// `rmsnorm_bwd` in f32 on the vectorised rows (simd.rs): rows in chunks of `ROW_CHUNK`, each
/// chunk's dw partial summed in chunk order (the same bits whatever the threads did).
fn rmsnorm_bwd_f32(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dim: usize, dx: &mut [f32], dw: &mut [f32]) {
    let rows = rstd.len().min(dx.len() / dim);
    let chunk = |((dxc, dyc), xc): ((&mut [f32], &[f32]), &[f32]), rc: &[f32]| {
        let mut dwp = vec![0f32; dim];
        for (((dxr, dyr), xr), &r) in dxc.chunks_mut(dim).zip(dyc.chunks(dim)).zip(xc.chunks(dim)).zip(rc) {
            simd::rmsnorm_bwd_row(dyr, xr, w, r, dxr, &mut dwp);
        }
        dwp
    };
    let (dx, dy, x) = (&mut dx[..rows * dim], &dy[..rows * dim], &x[..rows * dim]);
    let partial: Vec<Vec<f32>> = if rows * dim < PAR_MIN {
        dx.chunks_mut(dim * ROW_CHUNK).zip(dy.chunks(dim * ROW_CHUNK)).zip(x.chunks(dim * ROW_CHUNK)).zip(rstd.chunks(ROW_CHUNK)).map(|(a, rc)| chunk(a, rc)).collect()
    } else {
        dx.par_chunks_mut(dim * ROW_CHUNK).zip(dy.par_chunks(dim * ROW_CHUNK)).zip(x.par_chunks(dim * ROW_CHUNK)).zip(rstd.par_chunks(ROW_CHUNK)).map(|(a, rc)| chunk(a, rc)).collect()
    };
    let mut sum = vec![0f32; dim];
    for p in partial {
        simd::add_assign(&mut sum, &p);
    }
    simd::add_assign(&mut dw[..dim], &sum);
}

/// Seeded values in [-1, 1) for the kernels' unit tests (an LCG: reproducible, never zeros).
#[cfg(test)]
pub(crate) fn test_vals(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64) * 2.0 - 1.0
        })
        .collect()
}

impl<F: Elem> Backend for CpuBackend<F> {
    type Buf = CpuBuf<F>;

    fn precision(&self) -> Precision {
        self.precision
    }
    fn name(&self) -> String {
        match self.precision {
            Precision::F32 => format!("cpu-{}", std::any::type_name::<F>()),
            p => format!("cpu-{}", p.name()),
        }
    }
    fn zeros(&self, n: usize) -> CpuBuf<F> {
        keep_freed_memory();
        CpuBuf::new(vec![F::zero(); n])
    }
    fn upload(&self, host: &[f32]) -> CpuBuf<F> {
        CpuBuf::new(host.par_iter().map(|&x| cast(x as f64)).collect())
    }
    fn upload_weight(&self, host: &[f32]) -> CpuBuf<F> {
        CpuBuf::weight(self.upload(host).into_vec())
    }
    fn download(&self, buf: &CpuBuf<F>) -> Vec<f32> {
        buf.par_iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).collect()
    }
    fn download_f64(&self, buf: &CpuBuf<F>) -> Vec<f64> {
        buf.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).collect()
    }
    fn len(&self, buf: &CpuBuf<F>) -> usize {
        buf.len()
    }

    fn matmul(&self, a: &CpuBuf<F>, ta: bool, b: &CpuBuf<F>, tb: bool, c: &mut CpuBuf<F>, m: usize, n: usize, k: usize, accumulate: bool) {
        self.product(a, ta, b, tb, c, m, n, k, 1.0, accumulate)
    }

    /// At q4 the lm head runs as at q8: its 8-bit blocks keep the logits about as close to f32
    /// as q8's (on the default model the mean |d log-prob| per token was 3x q8's with a 4-bit
    /// head, tests/cpu_precision.rs), for 21% of the weights.
    fn lm_head_logits(&self, h: &CpuBuf<F>, w: &CpuBuf<F>, logits: &mut CpuBuf<F>, r: usize, vocab: usize, hidden: usize) {
        let be = match self.precision {
            Precision::Q4 => &CpuBackend { precision: Precision::Q8, _scalar: PhantomData },
            _ => self,
        };
        be.product(h, false, w, true, logits, r, vocab, hidden, 1.0, false)
    }

    fn matmul_scaled(&self, a: &CpuBuf<F>, ta: bool, b: &CpuBuf<F>, tb: bool, c: &mut CpuBuf<F>, m: usize, n: usize, k: usize, alpha: f64, accumulate: bool) {
        if self.precision != Precision::F32 {
            // One rounding of the scaled sum, as the GEMM of the other precisions does it.
            return self.product(a, ta, b, tb, c, m, n, k, alpha, accumulate);
        }
        let alpha: F = cast(alpha);
        if accumulate {
            let mut p = CpuBuf::new(vec![F::zero(); m * n]); // [m, n] = op(a) @ op(b)
            self.matmul(a, ta, b, tb, &mut p, m, n, k, false);
            c[..m * n].par_iter_mut().zip(p.par_iter()).for_each(|(o, &x)| *o += x * alpha);
        } else {
            self.matmul(a, ta, b, tb, c, m, n, k, false);
            c[..m * n].par_iter_mut().for_each(|o| *o = *o * alpha);
        }
    }

    fn add_assign(&self, x: &mut CpuBuf<F>, y: &CpuBuf<F>) {
        assert_eq!(x.len(), y.len());
        if let (Some(xf), Some(yf)) = (simd::f32s_mut(&mut x[..]), simd::f32s(y)) {
            if xf.len() < PAR_MIN {
                return simd::add_assign(xf, yf);
            }
            return xf.par_chunks_mut(SIMD_CHUNK).zip(yf.par_chunks(SIMD_CHUNK)).for_each(|(a, b)| simd::add_assign(a, b));
        }
        if x.len() < PAR_MIN {
            return x.iter_mut().zip(y.iter()).for_each(|(a, &b)| *a += b);
        }
        x.par_iter_mut().zip(y.par_iter()).for_each(|(a, &b)| *a += b);
    }

    fn embedding(&self, table: &CpuBuf<F>, ids: &[u32], dim: usize, out: &mut CpuBuf<F>) {
        let row = |(row, &id): (&mut [F], &u32)| {
            let id = id as usize;
            row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
        };
        if ids.len() * dim < PAR_MIN {
            return out.chunks_mut(dim).zip(ids.iter()).for_each(row);
        }
        out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(row);
    }

    fn embedding_bwd(&self, dout: &CpuBuf<F>, ids: &[u32], dim: usize, dtable: &mut CpuBuf<F>) {
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            for (d, &g) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(&dout[t * dim..(t + 1) * dim]) {
                *d += g;
            }
        }
    }

    fn rmsnorm(&self, x: &CpuBuf<F>, w: &CpuBuf<F>, dim: usize, eps: f32, out: &mut CpuBuf<F>, rstd: &mut CpuBuf<F>) {
        if let (Some(xf), Some(wf), Some(of), Some(rf)) = (simd::f32s(x), simd::f32s(w), simd::f32s_mut(&mut out[..]), simd::f32s_mut(&mut rstd[..])) {
            let row = |((o, xr), r): ((&mut [f32], &[f32]), &mut f32)| *r = simd::rmsnorm_row(xr, wf, eps, o);
            if xf.len() < PAR_MIN {
                return of.chunks_mut(dim).zip(xf.chunks(dim)).zip(rf.iter_mut()).for_each(row);
            }
            return of.par_chunks_mut(dim).zip(xf.par_chunks(dim)).zip(rf.par_iter_mut()).for_each(row);
        }
        let row = |((o, xr), r): ((&mut [F], &[F]), &mut F)| {
            let ss: f64 = xr.iter().map(|&v| {
                let v = v.to_f64().unwrap();
                v * v
            }).sum();
            let rs: F = cast(1.0 / (ss / dim as f64 + eps as f64).sqrt());
            *r = rs;
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w.iter()) {
                *o = xv * rs * wv;
            }
        };
        if x.len() < PAR_MIN {
            return out.chunks_mut(dim).zip(x.chunks(dim)).zip(rstd.iter_mut()).for_each(row);
        }
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(rstd.par_iter_mut()).for_each(row);
    }

    fn rmsnorm_bwd(&self, dy: &CpuBuf<F>, x: &CpuBuf<F>, w: &CpuBuf<F>, rstd: &CpuBuf<F>, dim: usize, dx: &mut CpuBuf<F>, dw: &mut CpuBuf<F>) {
        // y = w * x * r, r = (mean(x^2) + eps)^-1/2
        // dx_i = r * w_i dy_i - (r^3 / dim) * x_i * sum_j w_j dy_j x_j ;  dw_i = sum_rows dy_i x_i r
        if let (Some(dyf), Some(xf), Some(wf), Some(rf), Some(dxf), Some(dwf)) = (simd::f32s(dy), simd::f32s(x), simd::f32s(w), simd::f32s(rstd), simd::f32s_mut(&mut dx[..]), simd::f32s_mut(&mut dw[..])) {
            return rmsnorm_bwd_f32(dyf, xf, wf, rf, dim, dxf, dwf);
        }
        let partial: Vec<F> = dx
            .par_chunks_mut(dim * ROW_CHUNK)
            .zip(dy.par_chunks(dim * ROW_CHUNK))
            .zip(x.par_chunks(dim * ROW_CHUNK))
            .zip(rstd.par_chunks(ROW_CHUNK))
            .map(|(((dxc, dyc), xc), rc)| {
                let mut dwp = vec![F::zero(); dim];
                for (((dxr, dyr), xr), &r) in dxc.chunks_mut(dim).zip(dyc.chunks(dim)).zip(xc.chunks(dim)).zip(rc) {
                    let dot: F = dyr.iter().zip(xr).zip(w.iter()).map(|((&g, &xv), &wv)| g * xv * wv).sum();
                    let c = r * r * r * dot / cast(dim as f64);
                    for i in 0..dim {
                        dxr[i] = r * w[i] * dyr[i] - c * xr[i];
                        dwp[i] += dyr[i] * xr[i] * r;
                    }
                }
                dwp
            })
            .collect::<Vec<_>>()
            .into_iter()
            // Partials summed in chunk order: the same bits whatever the threads did.
            .reduce(|mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            })
            .unwrap_or_else(|| vec![F::zero(); dim]);
        for (d, p) in dw.iter_mut().zip(partial) {
            *d += p;
        }
    }

    fn bias_add(&self, y: &mut CpuBuf<F>, b: &CpuBuf<F>, dim: usize) {
        let row = |row: &mut [F]| {
            for (v, &bb) in row.iter_mut().zip(b.iter()) {
                *v += bb;
            }
        };
        if y.len() < PAR_MIN {
            return y.chunks_mut(dim).for_each(row);
        }
        y.par_chunks_mut(dim).for_each(row);
    }

    fn bias_bwd(&self, dy: &CpuBuf<F>, dim: usize, db: &mut CpuBuf<F>) {
        for row in dy.chunks(dim) {
            for (d, &g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
    }

    fn rope(&self, x: &mut CpuBuf<F>, positions: &[u32], n_heads: usize, head_dim: usize, inv_freq: &[f64], inverse: bool) {
        let half = head_dim / 2;
        if let Some(xf) = simd::f32s_mut(&mut x[..]) {
            let table = rope_table(positions, inv_freq, half, inverse);
            let (cs, sn) = (&table.0, &table.1);
            let width = n_heads * head_dim;
            let row = |(t, row): (usize, &mut [f32])| simd::rope_row(row, head_dim, &cs[t * half..(t + 1) * half], &sn[t * half..(t + 1) * half]);
            if positions.len() * width < PAR_MIN {
                return xf[..positions.len() * width].chunks_mut(width).enumerate().for_each(row);
            }
            return xf[..positions.len() * width].par_chunks_mut(width).enumerate().for_each(row);
        }
        let sign = if inverse { -1.0 } else { 1.0 };
        let row = |(row, &pos): (&mut [F], &u32)| {
            for (i, &f) in inv_freq.iter().enumerate().take(half) {
                let angle = pos as f64 * f;
                let (c, s): (F, F) = (cast(angle.cos()), cast(sign * angle.sin()));
                for h in 0..n_heads {
                    let base = h * head_dim;
                    let (x1, x2) = (row[base + i], row[base + i + half]);
                    row[base + i] = x1 * c - x2 * s;
                    row[base + i + half] = x2 * c + x1 * s;
                }
            }
        };
        // A row costs head_dim / 2 sines and cosines (in f64) besides its n_heads * head_dim
        // products.
        if positions.len() * (n_heads + 16) * head_dim < PAR_MIN {
            return x.chunks_mut(n_heads * head_dim).zip(positions.iter()).for_each(row);
        }
        x.par_chunks_mut(n_heads * head_dim).zip(positions.par_iter()).for_each(row);
    }

    fn swiglu(&self, gate: &CpuBuf<F>, up: &CpuBuf<F>, out: &mut CpuBuf<F>) {
        if let (Some(g), Some(u), Some(o)) = (simd::f32s(gate), simd::f32s(up), simd::f32s_mut(&mut out[..])) {
            if o.len() < PAR_MIN {
                return simd::swiglu(g, u, o);
            }
            return o.par_chunks_mut(SIMD_CHUNK).zip(g.par_chunks(SIMD_CHUNK).zip(u.par_chunks(SIMD_CHUNK))).for_each(|(o, (g, u))| simd::swiglu(g, u, o));
        }
        let one = |(o, (&g, &u)): (&mut F, (&F, &F))| {
            let s = F::one() / (F::one() + (-g).exp());
            *o = g * s * u;
        };
        // An exp is worth about 8 additions.
        if out.len() * 8 < PAR_MIN {
            return out.iter_mut().zip(gate.iter().zip(up.iter())).for_each(one);
        }
        out.par_iter_mut().zip(gate.par_iter().zip(up.par_iter())).for_each(one);
    }

    fn swiglu_bwd(&self, dout: &CpuBuf<F>, gate: &CpuBuf<F>, up: &CpuBuf<F>, dgate: &mut CpuBuf<F>, dup: &mut CpuBuf<F>) {
        if let (Some(d), Some(g), Some(u), Some(dg), Some(du)) = (simd::f32s(dout), simd::f32s(gate), simd::f32s(up), simd::f32s_mut(&mut dgate[..]), simd::f32s_mut(&mut dup[..])) {
            let n = d.len();
            let (g, u, dg, du) = (&g[..n], &u[..n], &mut dg[..n], &mut du[..n]);
            if n < PAR_MIN {
                return simd::swiglu_bwd(d, g, u, dg, du);
            }
            let chunks = d.par_chunks(SIMD_CHUNK).zip(g.par_chunks(SIMD_CHUNK)).zip(u.par_chunks(SIMD_CHUNK));
            return chunks.zip(dg.par_chunks_mut(SIMD_CHUNK).zip(du.par_chunks_mut(SIMD_CHUNK))).for_each(|(((d, g), u), (dg, du))| simd::swiglu_bwd(d, g, u, dg, du));
        }
        dgate.par_iter_mut().zip(dup.par_iter_mut()).enumerate().for_each(|(i, (dg, du))| {
            let (g, u, d) = (gate[i], up[i], dout[i]);
            let s = F::one() / (F::one() + (-g).exp());
            *du = d * g * s;
            *dg = d * u * (s + g * s * (F::one() - s));
        });
    }

    fn attention(&self, q: &CpuBuf<F>, k: &CpuBuf<F>, v: &CpuBuf<F>, layout: &AttnLayout, dims: AttnDims, out: &mut CpuBuf<F>, lse: &mut CpuBuf<F>) {
        attention::forward(q, k, v, layout, dims, out, lse)
    }

    fn attention_bwd(&self, dout: &CpuBuf<F>, q: &CpuBuf<F>, k: &CpuBuf<F>, v: &CpuBuf<F>, out: &CpuBuf<F>, lse: &CpuBuf<F>, layout: &AttnLayout, dims: AttnDims, dq: &mut CpuBuf<F>, dk: &mut CpuBuf<F>, dv: &mut CpuBuf<F>) {
        attention::backward(dout, q, k, v, out, lse, layout, dims, dq, dk, dv)
    }

    fn lm_head_logprobs(&self, h: &CpuBuf<F>, w: &CpuBuf<F>, dim: usize, rows: &[u32], targets: &[u32]) -> (CpuBuf<F>, CpuBuf<F>) {
        let (logp, lse, kept) = lm_head::logprobs(self.precision != Precision::F32, h, w, dim, rows, targets, self.head_cache(w, dim));
        (CpuBuf::new(logp), CpuBuf::with_kept(lse, kept))
    }

    fn lm_head_bwd(&self, h: &CpuBuf<F>, w: &CpuBuf<F>, dim: usize, rows: &[u32], targets: &[u32], lse: &CpuBuf<F>, dlogp: &[f32], dh: &mut CpuBuf<F>, dw: Option<&mut CpuBuf<F>>) {
        let kept = lse.take_kept();
        lm_head::backward(self.precision != Precision::F32, h, w, dim, rows, targets, lse, dlogp, dh, dw.map(|d| &mut d[..]), self.head_cache(w, dim), kept)
    }

    fn kv_write(&self, cache: &mut CpuBuf<F>, k: &CpuBuf<F>, v: &CpuBuf<F>, slots: &[u32], geom: KvGeom) {
        kv::write(cache, k, v, slots, geom)
    }

    fn kv_copy_blocks(&self, cache: &mut CpuBuf<F>, pairs: &[(u32, u32)], geom: KvGeom) {
        kv::copy_blocks(cache, pairs, geom)
    }

    fn paged_attention(&self, q: &CpuBuf<F>, cache: &CpuBuf<F>, seqs: &[PagedSeq], block_table: &[u32], geom: KvGeom, dims: AttnDims, out: &mut CpuBuf<F>) {
        kv::attention(q, cache, seqs, block_table, geom, dims, out)
    }

    fn sum_squares(&self, x: &CpuBuf<F>) -> f64 {
        optim::sum_squares(x)
    }

    fn adamw_at(&self, p: &mut CpuBuf<F>, g: &CpuBuf<F>, at: usize, m: &mut CpuBuf<F>, v: &mut CpuBuf<F>, h: &crate::backend::AdamwStep) {
        let n = m.len();
        optim::adamw(&mut p[at..at + n], &g[at..at + n], m, v, h)
    }

    fn weight_slice(&self, w: &CpuBuf<F>, at: usize, n: usize) -> CpuBuf<F> {
        CpuBuf::new(w[at..at + n].to_vec())
    }

    fn set_weight_slice(&self, w: &mut CpuBuf<F>, at: usize, src: &CpuBuf<F>) {
        w[at..at + src.len()].copy_from_slice(src);
    }

    fn adamw_slice(&self, p: &mut CpuBuf<F>, g: &CpuBuf<F>, at: usize, m: &mut CpuBuf<F>, v: &mut CpuBuf<F>, h: &crate::backend::AdamwStep) {
        let n = p.len();
        assert!(m.len() == n && v.len() == n && at + n <= g.len(), "adamw_slice: p, m, v [{n}] at {at} of g [{}]", g.len());
        optim::adamw(p, &g[at..at + n], m, v, h)
    }

    fn sum_squares_slices(&self, xs: &[(&CpuBuf<F>, std::ops::Range<usize>)]) -> Vec<f64> {
        xs.iter().map(|(x, r)| optim::sum_squares(&x[r.clone()])).collect()
    }

    fn sgd(&self, p: &mut CpuBuf<F>, g: &CpuBuf<F>, lr: f64, weight_decay: f64, grad_scale: f64) {
        optim::sgd(p, g, lr, weight_decay, grad_scale)
    }
}
