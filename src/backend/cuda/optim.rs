//! Host side of the optimizer ops of `CudaBackend` (kernels/optim.cu): the f64 sum of squares
//! behind the global gradient norm (per-block partial sums on the device, added on the host
//! in block order: deterministic, no atomics), and AdamW / SGD updates of the fp32 master
//! weights and moments in place (also ZeRO-1's: the squares of slices, AdamW on a master
//! slice). The `Backend` impl in mod.rs delegates here.

use super::gpu::{Arg, DevPtr, Gpu};
use super::{grid1, CudaBackend, CudaBuf, BLOCK};
use crate::backend::AdamwStep;
use std::ops::Range;

impl<G: Gpu> CudaBackend<G> {
    /// `sum_i x[i]^2` in f64: `sum_squares_partial` writes one f64 per block into a scratch
    /// buffer `[grid]` f64, which the host sums in block order.
    pub(super) fn sum_squares_dev(&self, x: &CudaBuf<G>) -> f64 {
        if x.len == 0 {
            return 0.0;
        }
        let grid = grid1(x.len);
        let blocks = grid.0 as usize;
        let partial = self.alloc(2 * blocks); // [blocks] f64 as 2 x 4-byte elements each
        self.launch("optim.cu", &[], "sum_squares_partial", grid, BLOCK, 0, &[Arg::Ptr(x.ptr), Arg::Ptr(partial.ptr), Arg::I64(x.len as i64)]);
        let mut bytes = vec![0u8; 8 * blocks];
        self.sync_point();
        self.gpu.dtoh(partial.ptr, &mut bytes).unwrap_or_else(|e| panic!("sum_squares: download of {blocks} partial sums: {e}"));
        bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).sum()
    }

    /// `sum_squares_dev` of every buffer with one download (`sum_squares_ranges`).
    pub(super) fn sum_squares_many_dev(&self, xs: &[&CudaBuf<G>]) -> Vec<f64> {
        self.sum_squares_ranges(&xs.iter().map(|x| (x.at(0), x.len)).collect::<Vec<_>>())
    }

    /// `Backend::sum_squares_slices`: `sum_squares_ranges` of `x[range]` of each buffer (equal,
    /// bit for bit, to `sum_squares_dev` of a buffer holding just those elements).
    pub(super) fn sum_squares_slices_dev(&self, xs: &[(&CudaBuf<G>, Range<usize>)]) -> Vec<f64> {
        let ranges: Vec<(DevPtr, usize)> = xs
            .iter()
            .map(|(x, r)| {
                assert!(r.start <= r.end && r.end <= x.len, "sum_squares_slices: {r:?} of a buffer of {}", x.len);
                (x.at(r.start), r.len())
            })
            .collect();
        self.sum_squares_ranges(&ranges)
    }

    /// `sum_i x[i]^2` in f64 of each `(address, f32 count)` with one download: each range's
    /// block partials (`sum_squares_dev`'s kernel and grid) go to its own part of one scratch
    /// buffer, then the host sums each part in block order (so each result equals
    /// `sum_squares_dev` of a buffer holding that range, bit for bit).
    fn sum_squares_ranges(&self, xs: &[(DevPtr, usize)]) -> Vec<f64> {
        let blocks: Vec<usize> = xs.iter().map(|&(_, n)| if n == 0 { 0 } else { grid1(n).0 as usize }).collect();
        let total: usize = blocks.iter().sum();
        if total == 0 {
            return vec![0.0; xs.len()];
        }
        let partial = self.alloc(2 * total); // [total] f64
        let mut off = 0;
        for (&(x, n), &nb) in xs.iter().zip(&blocks) {
            if nb > 0 {
                self.launch("optim.cu", &[], "sum_squares_partial", grid1(n), BLOCK, 0, &[Arg::Ptr(x), Arg::Ptr(partial.ptr + 8 * off as u64), Arg::I64(n as i64)]);
            }
            off += nb;
        }
        let mut bytes = vec![0u8; 8 * total];
        self.sync_point();
        self.gpu.dtoh(partial.ptr, &mut bytes).unwrap_or_else(|e| panic!("sum_squares_many: download of {total} partial sums: {e}"));
        let parts: Vec<f64> = bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
        let mut off = 0;
        blocks
            .iter()
            .map(|&nb| {
                // An empty buffer is 0.0, as in sum_squares_dev (an empty f64 sum is -0.0).
                let s = if nb == 0 { 0.0 } else { parts[off..off + nb].iter().sum() };
                off += nb;
                s
            })
            .collect()
    }

    /// One AdamW step in place on `p[at..at + n]` and m, v `[n]` with gradient `g[at..at + n]`
    /// (see `AdamwStep`; `at` > 0 or n < len: a ZeRO-1 slice, the kernel gets the offset
    /// pointers).
    pub(super) fn adamw_dev(&self, p: &mut CudaBuf<G>, g: &CudaBuf<G>, at: usize, m: &mut CudaBuf<G>, v: &mut CudaBuf<G>, h: &AdamwStep) {
        self.weights_changed(p);
        let n = m.len;
        assert!(
            g.len == p.len && v.len == n && at + n <= p.len,
            "adamw: p [{}], g [{}], m [{n}], v [{}] at {at} do not fit", p.len, g.len, v.len
        );
        self.adamw_launch(p.at(at), g.at(at), m, v, h);
    }

    /// `Backend::adamw_slice`: AdamW in place on the master slice p and m, v `[n]` with the
    /// gradient `g[at..at + n]` (ZeRO-1; the weight itself is written by `set_weight_slice`).
    pub(super) fn adamw_slice_dev(&self, p: &mut CudaBuf<G>, g: &CudaBuf<G>, at: usize, m: &mut CudaBuf<G>, v: &mut CudaBuf<G>, h: &AdamwStep) {
        let n = p.len;
        assert!(m.len == n && v.len == n && at + n <= g.len, "adamw_slice: p, m, v [{n}] at {at} of g [{}]", g.len);
        self.weights_changed(p);
        self.adamw_launch(p.at(0), g.at(at), m, v, h);
    }

    /// adamw_step on `p[..n]`, `g[..n]` and m, v `[n]`. The f32 coefficients are rounded here
    /// from f64, as the CPU reference rounds them.
    fn adamw_launch(&self, p: DevPtr, g: DevPtr, m: &mut CudaBuf<G>, v: &mut CudaBuf<G>, h: &AdamwStep) {
        let n = m.len;
        if n == 0 {
            return;
        }
        let [gs, b1, b2, decay, step, bc2_sqrt, eps] = h.coefficients().map(|c| c as f32);
        let (omb1, omb2) = (1.0f32 - b1, 1.0f32 - b2);
        self.launch(
            "optim.cu", &[], "adamw_step", grid1(n), BLOCK, 0,
            &[
                Arg::Ptr(p), Arg::Ptr(g), Arg::Ptr(m.at(0)), Arg::Ptr(v.at(0)), Arg::I64(n as i64), Arg::F32(gs), Arg::F32(b1), Arg::F32(omb1),
                Arg::F32(b2), Arg::F32(omb2), Arg::F32(decay), Arg::F32(step), Arg::F32(bc2_sqrt), Arg::F32(eps),
            ],
        );
    }

    /// One SGD step in place: `p -= lr * (g * grad_scale + weight_decay * p)`; p, g `[n]`.
    pub(super) fn sgd_dev(&self, p: &mut CudaBuf<G>, g: &CudaBuf<G>, lr: f64, weight_decay: f64, grad_scale: f64) {
        self.weights_changed(p);
        assert_eq!(p.len, g.len, "sgd: p [{}] and g [{}] must have one length", p.len, g.len);
        if p.len > 0 {
            self.launch(
                "optim.cu", &[], "sgd_step", grid1(p.len), BLOCK, 0,
                &[Arg::Ptr(p.ptr), Arg::Ptr(g.ptr), Arg::I64(p.len as i64), Arg::F32(lr as f32), Arg::F32(weight_decay as f32), Arg::F32(grad_scale as f32)],
            );
        }
    }
}
