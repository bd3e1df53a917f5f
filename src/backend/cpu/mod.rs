//! The CPU reference backend. Generic over the scalar: `CpuBackend<f32>` is the reference
//! every other backend is compared with, `CpuBackend<f64>` makes finite-difference gradient
//! checks exact enough to be tight. Threads come from rayon; GEMMs from the `gemm` crate.

pub(crate) mod attention;
pub(crate) mod dpo;
mod gemv;
pub(crate) mod kv;
mod lm_head;
pub(crate) mod optim;
pub(crate) mod sample;

use super::{AttnDims, AttnLayout, Backend, KvGeom, PagedSeq};
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
    _scalar: PhantomData<F>,
}

impl<F> CpuBackend<F> {
    pub fn new() -> Self {
        Self { _scalar: PhantomData }
    }
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

const ROW_CHUNK: usize = 16;

impl<F: Elem> Backend for CpuBackend<F> {
    type Buf = Vec<F>;

    fn name(&self) -> String {
        format!("cpu-{}", std::any::type_name::<F>())
    }
    fn zeros(&self, n: usize) -> Vec<F> {
        vec![F::zero(); n]
    }
    fn upload(&self, host: &[f32]) -> Vec<F> {
        host.par_iter().map(|&x| cast(x as f64)).collect()
    }
    fn download(&self, buf: &Vec<F>) -> Vec<f32> {
        buf.par_iter().map(|x| x.to_f32().unwrap_or(f32::NAN)).collect()
    }
    fn download_f64(&self, buf: &Vec<F>) -> Vec<f64> {
        buf.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).collect()
    }
    fn len(&self, buf: &Vec<F>) -> usize {
        buf.len()
    }

    fn matmul(&self, a: &Vec<F>, ta: bool, b: &Vec<F>, tb: bool, c: &mut Vec<F>, m: usize, n: usize, k: usize, accumulate: bool) {
        assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "matmul shapes");
        if !ta && tb && (1..=gemv::MAX_ROWS).contains(&m) && k > 0 {
            return gemv::matmul_bt(&a[..m * k], &b[..n * k], &mut c[..m * n], m, n, k, accumulate);
        }
        let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
        unsafe {
            gemm_strided(m, n, k, c.as_mut_ptr(), n as isize, 1, accumulate, a.as_ptr(), a_rs, a_cs, b.as_ptr(), b_rs, b_cs, F::one(), true);
        }
    }

    fn matmul_scaled(&self, a: &Vec<F>, ta: bool, b: &Vec<F>, tb: bool, c: &mut Vec<F>, m: usize, n: usize, k: usize, alpha: f64, accumulate: bool) {
        let alpha: F = cast(alpha);
        if accumulate {
            let mut p = vec![F::zero(); m * n]; // [m, n] = op(a) @ op(b)
            self.matmul(a, ta, b, tb, &mut p, m, n, k, false);
            c[..m * n].par_iter_mut().zip(p.par_iter()).for_each(|(o, &x)| *o += x * alpha);
        } else {
            self.matmul(a, ta, b, tb, c, m, n, k, false);
            c[..m * n].par_iter_mut().for_each(|o| *o = *o * alpha);
        }
    }

    fn add_assign(&self, x: &mut Vec<F>, y: &Vec<F>) {
        assert_eq!(x.len(), y.len());
        x.par_iter_mut().zip(y.par_iter()).for_each(|(a, &b)| *a += b);
    }

    fn embedding(&self, table: &Vec<F>, ids: &[u32], dim: usize, out: &mut Vec<F>) {
        out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(row, &id)| {
            let id = id as usize;
            row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
        });
    }

    fn embedding_bwd(&self, dout: &Vec<F>, ids: &[u32], dim: usize, dtable: &mut Vec<F>) {
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            for (d, &g) in dtable[id * dim..(id + 1) * dim].iter_mut().zip(&dout[t * dim..(t + 1) * dim]) {
                *d += g;
            }
        }
    }

    fn rmsnorm(&self, x: &Vec<F>, w: &Vec<F>, dim: usize, eps: f32, out: &mut Vec<F>, rstd: &mut Vec<F>) {
        out.par_chunks_mut(dim)
            .zip(x.par_chunks(dim))
            .zip(rstd.par_iter_mut())
            .for_each(|((o, xr), r)| {
                let ss: f64 = xr.iter().map(|&v| {
                    let v = v.to_f64().unwrap();
                    v * v
                }).sum();
                let rs: F = cast(1.0 / (ss / dim as f64 + eps as f64).sqrt());
                *r = rs;
                for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w.iter()) {
                    *o = xv * rs * wv;
                }
            });
    }

    fn rmsnorm_bwd(&self, dy: &Vec<F>, x: &Vec<F>, w: &Vec<F>, rstd: &Vec<F>, dim: usize, dx: &mut Vec<F>, dw: &mut Vec<F>) {
        // y = w * x * r, r = (mean(x^2) + eps)^-1/2
        // dx_i = r * w_i dy_i - (r^3 / dim) * x_i * sum_j w_j dy_j x_j ;  dw_i = sum_rows dy_i x_i r
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

    fn bias_add(&self, y: &mut Vec<F>, b: &Vec<F>, dim: usize) {
        y.par_chunks_mut(dim).for_each(|row| {
            for (v, &bb) in row.iter_mut().zip(b.iter()) {
                *v += bb;
            }
        });
    }

    fn bias_bwd(&self, dy: &Vec<F>, dim: usize, db: &mut Vec<F>) {
        for row in dy.chunks(dim) {
            for (d, &g) in db.iter_mut().zip(row) {
                *d += g;
            }
        }
    }

    fn rope(&self, x: &mut Vec<F>, positions: &[u32], n_heads: usize, head_dim: usize, inv_freq: &[f64], inverse: bool) {
        let half = head_dim / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        x.par_chunks_mut(n_heads * head_dim).zip(positions.par_iter()).for_each(|(row, &pos)| {
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
        });
    }

    fn swiglu(&self, gate: &Vec<F>, up: &Vec<F>, out: &mut Vec<F>) {
        out.par_iter_mut().zip(gate.par_iter().zip(up.par_iter())).for_each(|(o, (&g, &u))| {
            let s = F::one() / (F::one() + (-g).exp());
            *o = g * s * u;
        });
    }

    fn swiglu_bwd(&self, dout: &Vec<F>, gate: &Vec<F>, up: &Vec<F>, dgate: &mut Vec<F>, dup: &mut Vec<F>) {
        dgate.par_iter_mut().zip(dup.par_iter_mut()).enumerate().for_each(|(i, (dg, du))| {
            let (g, u, d) = (gate[i], up[i], dout[i]);
            let s = F::one() / (F::one() + (-g).exp());
            *du = d * g * s;
            *dg = d * u * (s + g * s * (F::one() - s));
        });
    }

    fn attention(&self, q: &Vec<F>, k: &Vec<F>, v: &Vec<F>, layout: &AttnLayout, dims: AttnDims, out: &mut Vec<F>, lse: &mut Vec<F>) {
        attention::forward(q, k, v, layout, dims, out, lse)
    }

    fn attention_bwd(&self, dout: &Vec<F>, q: &Vec<F>, k: &Vec<F>, v: &Vec<F>, out: &Vec<F>, lse: &Vec<F>, layout: &AttnLayout, dims: AttnDims, dq: &mut Vec<F>, dk: &mut Vec<F>, dv: &mut Vec<F>) {
        attention::backward(dout, q, k, v, out, lse, layout, dims, dq, dk, dv)
    }

    fn lm_head_logprobs(&self, h: &Vec<F>, w: &Vec<F>, dim: usize, rows: &[u32], targets: &[u32]) -> (Vec<F>, Vec<F>) {
        lm_head::logprobs(h, w, dim, rows, targets)
    }

    fn lm_head_bwd(&self, h: &Vec<F>, w: &Vec<F>, dim: usize, rows: &[u32], targets: &[u32], lse: &Vec<F>, dlogp: &[f32], dh: &mut Vec<F>, dw: &mut Vec<F>) {
        lm_head::backward(h, w, dim, rows, targets, lse, dlogp, dh, dw)
    }

    fn kv_write(&self, cache: &mut Vec<F>, k: &Vec<F>, v: &Vec<F>, slots: &[u32], geom: KvGeom) {
        kv::write(cache, k, v, slots, geom)
    }

    fn kv_copy_blocks(&self, cache: &mut Vec<F>, pairs: &[(u32, u32)], geom: KvGeom) {
        kv::copy_blocks(cache, pairs, geom)
    }

    fn paged_attention(&self, q: &Vec<F>, cache: &Vec<F>, seqs: &[PagedSeq], block_table: &[u32], geom: KvGeom, dims: AttnDims, out: &mut Vec<F>) {
        kv::attention(q, cache, seqs, block_table, geom, dims, out)
    }

    fn sum_squares(&self, x: &Vec<F>) -> f64 {
        optim::sum_squares(x)
    }

    fn adamw(&self, p: &mut Vec<F>, g: &Vec<F>, m: &mut Vec<F>, v: &mut Vec<F>, h: &crate::backend::AdamwStep) {
        optim::adamw(p, g, m, v, h)
    }

    fn sgd(&self, p: &mut Vec<F>, g: &Vec<F>, lr: f64, weight_decay: f64, grad_scale: f64) {
        optim::sgd(p, g, lr, weight_decay, grad_scale)
    }
}
