//! End-to-end kernel tests: CUDA C++ in tests/kernels compiled by NVRTC for compute_80 and
//! compute_90, run in ptxsim on seeded random inputs, compared with Rust references.

mod common;
use common::*;
use half::{bf16, f16};
use ptxsim::{Device, ParamValue as P};

#[test]
fn saxpy_matches_reference() {
    for arch in ARCHS {
        let Some(m) = module("saxpy.cu", arch) else { return };
        let mut rng = Rng(7);
        let n = 5000;
        let x = rng.vec_f32(n);
        let y = rng.vec_f32(n);
        let a = 1.75f32;
        let mut dev = Device::new();
        let (dx, dy) = (dev.upload(&x), dev.upload(&y));
        let st = dev.launch(&m, "saxpy", (8, 1, 1), (128, 1, 1), 0, &[P::I32(n as i32), P::F32(a), P::Ptr(dx), P::Ptr(dy)], &opts(1)).unwrap();
        let out: Vec<f32> = dev.read_vec(dy, n).unwrap();
        for i in 0..n {
            assert_eq!(out[i].to_bits(), a.mul_add(x[i], y[i]).to_bits(), "{arch} i={i}");
        }
        assert_eq!(st.global_bytes_loaded(), 8 * n as u64);
        assert_eq!(st.global_bytes_stored(), 4 * n as u64);
    }
}

#[test]
fn block_sum_with_shuffles_and_atomics() {
    for arch in ARCHS {
        let Some(m) = module("reduce.cu", arch) else { return };
        let mut rng = Rng(11);
        let n = 20000;
        let x = rng.vec_f32(n);
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let blocks = 12;
        let part = dev.alloc(4 * blocks);
        let total = dev.alloc(4);
        let st = dev.launch(&m, "block_sum", (blocks as u32, 1, 1), (256, 1, 1), 0, &[P::Ptr(dx), P::I32(n as i32), P::Ptr(part), P::Ptr(total)], &opts(3)).unwrap();
        let p: Vec<f32> = dev.read_vec(part, blocks as usize).unwrap();
        // reference per block in f64; the kernel's order differs so compare with a bound
        let stride = blocks as usize * 256;
        for b in 0..blocks as usize {
            let mut s = 0f64;
            let mut abs = 0f64;
            for t in 0..256 {
                let mut i = b * 256 + t;
                while i < n {
                    s += x[i] as f64;
                    abs += x[i].abs() as f64;
                    i += stride;
                }
            }
            assert!((p[b] as f64 - s).abs() <= abs * 1e-6, "{arch} block {b}: {} vs {s}", p[b]);
        }
        let t: Vec<f32> = dev.read_vec(total, 1).unwrap();
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        let abs: f64 = x.iter().map(|&v| v.abs() as f64).sum();
        assert!((t[0] as f64 - want).abs() <= abs * 1e-6, "{arch} total");
        assert_eq!(st.barriers, blocks);
        assert!(st.by_class[ptxsim::Class::Warp as usize] > 0);
    }
}

#[test]
fn tree_sum_in_dynamic_shared_memory() {
    for arch in ARCHS {
        let Some(m) = module("reduce.cu", arch) else { return };
        let mut rng = Rng(5);
        let (blocks, bs) = (6usize, 128usize);
        let x: Vec<i32> = (0..blocks * bs).map(|_| (rng.u64() % 2001) as i32 - 1000).collect();
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let out = dev.alloc(4 * blocks as u64);
        for seed in 0..3 {
            dev.launch(&m, "tree_sum_int", (blocks as u32, 1, 1), (bs as u32, 1, 1), (bs * 4) as u32, &[P::Ptr(dx), P::Ptr(out)], &opts(seed)).unwrap();
            let o: Vec<i32> = dev.read_vec(out, blocks).unwrap();
            for b in 0..blocks {
                assert_eq!(o[b], x[b * bs..(b + 1) * bs].iter().sum::<i32>(), "{arch} block {b}");
            }
        }
    }
}

#[test]
fn missing_barrier_is_reported_as_race() {
    for arch in ARCHS {
        let Some(m) = module("reduce.cu", arch) else { return };
        let x: Vec<i32> = (0..256).map(|i| i * 3 - 100).collect();
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let out = dev.alloc(8);
        let e = dev.launch(&m, "tree_sum_racy", (2, 1, 1), (128, 1, 1), 512, &[P::Ptr(dx), P::Ptr(out)], &opts(9)).unwrap_err().to_string();
        assert!(e.contains("shared-memory race") && e.contains("tree_sum_racy") && e.contains("PTX line"), "{e}");
        // without the race detector the varied warp order gives wrong sums for some seed
        let mut wrong = false;
        for seed in 0..8 {
            let o = ptxsim::LaunchOptions { seed, race_check: false, ..Default::default() };
            dev.launch(&m, "tree_sum_racy", (2, 1, 1), (128, 1, 1), 512, &[P::Ptr(dx), P::Ptr(out)], &o).unwrap();
            let r: Vec<i32> = dev.read_vec(out, 2).unwrap();
            wrong |= r[0] != x[..128].iter().sum::<i32>() || r[1] != x[128..].iter().sum::<i32>();
        }
        assert!(wrong, "{arch}: racy kernel always produced the right sums");
    }
}

#[test]
fn warp_shuffles_votes_redux() {
    for arch in ARCHS {
        let Some(m) = module("reduce.cu", arch) else { return };
        let mut rng = Rng(21);
        let x: Vec<i32> = (0..64).map(|_| (rng.u64() % 2000) as i32 - 700).collect();
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let out = dev.alloc(64 * 8 * 4);
        dev.launch(&m, "warp_ops", (1, 1, 1), (64, 1, 1), 0, &[P::Ptr(dx), P::Ptr(out)], &opts(2)).unwrap();
        let o: Vec<i32> = dev.read_vec(out, 64 * 8).unwrap();
        for t in 0..64usize {
            let w = t / 32 * 32;
            let lane = t % 32;
            let v = |l: usize| x[w + l];
            let r = &o[t * 8..t * 8 + 8];
            assert_eq!(r[0], v((lane * 7 + 3) & 31), "idx t={t}");
            assert_eq!(r[1], if lane >= 3 { v(lane - 3) } else { v(lane) }, "up t={t}");
            assert_eq!(r[2], if lane + 5 < 32 { v(lane + 5) } else { v(lane) }, "down t={t}");
            // xor within 16-lane segments
            let j = lane ^ 6;
            assert_eq!(r[3], if j / 16 == lane / 16 { v(j) } else { v(lane) }, "xor width 16 t={t}");
            let ballot = (0..32).filter(|&l| v(l) > 0).fold(0u32, |b, l| b | 1 << l);
            assert_eq!(r[4] as u32, ballot, "ballot t={t}");
            let any = (0..32).any(|l| v(l) > 1000) as i32;
            assert_eq!(r[5], any + 2, "any/all t={t}");
            let sum: i32 = (0..32).map(v).sum();
            let max = (0..32).map(|l| v(l) as u32).max().unwrap();
            assert_eq!(r[6], sum ^ max as i32, "redux t={t}");
            let odd = (0..32).filter(|&l| v(l) & 1 != 0).fold(0u32, |b, l| b | 1 << l);
            assert_eq!(r[7] as u32, if v(lane) & 1 != 0 { odd } else { 0 }, "activemask t={t}");
        }
    }
}

#[test]
fn softmax_matches_reference() {
    for arch in ARCHS {
        let Some(m) = module("softmax.cu", arch) else { return };
        let mut rng = Rng(33);
        let (rows, cols) = (5usize, 300usize);
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 8.0).collect();
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let dy = dev.alloc((rows * cols * 4) as u64);
        let dl = dev.alloc((rows * 4) as u64);
        dev.write_slice(dy, &vec![f32::NAN; rows * cols]).unwrap();
        let st = dev.launch(&m, "softmax", (rows as u32, 1, 1), (128, 1, 1), 0, &[P::Ptr(dx), P::Ptr(dy), P::Ptr(dl), P::I32(cols as i32)], &opts(4)).unwrap();
        let y: Vec<f32> = dev.read_vec(dy, rows * cols).unwrap();
        let lse: Vec<f32> = dev.read_vec(dl, rows).unwrap();
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let mx = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let s: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
            for c in 0..cols {
                let want = (row[c] as f64 - mx).exp() / s;
                // __expf is ex2.approx (hardware: 2 ulp) of a rounded product: 1e-5 relative
                assert!((y[r * cols + c] as f64 - want).abs() <= 1e-5 * want + 1e-12, "{arch} ({r},{c}): {} vs {want}", y[r * cols + c]);
            }
            let want_lse = mx + s.ln();
            assert!((lse[r] as f64 - want_lse).abs() <= 1e-5 * want_lse.abs().max(1.0), "{arch} lse {r}");
        }
        assert!(st.by_class[ptxsim::Class::Sfu as usize] >= (rows * cols * 2) as u64);
    }
}

#[test]
fn bf16_and_f16_conversions() {
    for arch in ARCHS {
        let Some(m) = module("bf16.cu", arch) else { return };
        let mut rng = Rng(44);
        let n = 1000;
        let mut x: Vec<f32> = (0..n).map(|_| rng.f32() * 1000.0).collect();
        x[0] = 1.0 + 2f32.powi(-8); // ties
        x[1] = 1.0 + 3.0 * 2f32.powi(-8);
        x[2] = 70000.0; // f16 overflow
        x[3] = 1e-6; // f16 subnormal
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let (db, dback, dh, dhb) = (dev.alloc(2 * n as u64), dev.alloc(4 * n as u64), dev.alloc(2 * n as u64), dev.alloc(4 * n as u64));
        dev.launch(&m, "bf16_conv", (4, 1, 1), (256, 1, 1), 0, &[P::Ptr(dx), P::Ptr(db), P::Ptr(dback), P::Ptr(dh), P::Ptr(dhb), P::I32(n as i32)], &opts(1)).unwrap();
        let b: Vec<bf16> = dev.read_vec(db, n).unwrap();
        let back: Vec<f32> = dev.read_vec(dback, n).unwrap();
        let h: Vec<f16> = dev.read_vec(dh, n).unwrap();
        let hb: Vec<f32> = dev.read_vec(dhb, n).unwrap();
        for i in 0..n {
            assert_eq!(b[i].to_bits(), bf16::from_f32(x[i]).to_bits(), "{arch} bf16 {i}");
            assert_eq!(back[i], bf16::from_f32(x[i]).to_f32(), "{arch} bf16->f32 {i}");
            assert_eq!(h[i].to_bits(), f16::from_f32(x[i]).to_bits(), "{arch} f16 {i}");
            assert_eq!(hb[i].to_bits(), f16::from_f32(x[i]).to_f32().to_bits(), "{arch} f16->f32 {i}");
        }
    }
}

#[test]
fn packed_half_arithmetic() {
    for arch in ARCHS {
        let Some(m) = module("bf16.cu", arch) else { return };
        let mut rng = Rng(45);
        let n = 700;
        let gen = |rng: &mut Rng| -> Vec<bf16> { (0..2 * n).map(|_| bf16::from_f32(rng.f32() * 4.0)).collect() };
        let (a, b, c) = (gen(&mut rng), gen(&mut rng), gen(&mut rng));
        let ha: Vec<f16> = (0..2 * n).map(|_| f16::from_f32(rng.f32() * 50.0)).collect();
        let mut dev = Device::new();
        let (da, dbb, dc, dha) = (dev.upload(&a), dev.upload(&b), dev.upload(&c), dev.upload(&ha));
        let dhc = dev.alloc(4 * n as u64);
        dev.launch(&m, "bf16x2_fma", (3, 1, 1), (256, 1, 1), 0, &[P::Ptr(da), P::Ptr(dbb), P::Ptr(dc), P::Ptr(dha), P::Ptr(dhc), P::I32(n as i32)], &opts(1)).unwrap();
        let out: Vec<bf16> = dev.read_vec(dc, 2 * n).unwrap();
        let hc: Vec<f16> = dev.read_vec(dhc, 2 * n).unwrap();
        for i in 0..2 * n {
            // fma with one rounding: the exact product-sum of bf16 values fits in f64
            let want = bf16::from_f64(a[i].to_f64() * b[i].to_f64() + c[i].to_f64());
            assert_eq!(out[i].to_bits(), want.to_bits(), "{arch} bf16 fma {i}");
            let s = f16::from_f64(ha[i].to_f64() * 2.0);
            let want = f16::from_f64(s.to_f64() * ha[i].to_f64());
            assert_eq!(hc[i].to_bits(), want.to_bits(), "{arch} f16 {i}");
        }
    }
}

#[test]
fn histogram_and_atomics() {
    for arch in ARCHS {
        let Some(m) = module("atomics.cu", arch) else { return };
        let mut rng = Rng(55);
        let n = 6000;
        let nbins = 37;
        let x: Vec<u32> = (0..n).map(|_| rng.u64() as u32).collect();
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let hist = dev.alloc(4 * nbins);
        dev.launch(&m, "histogram", (5, 1, 1), (128, 1, 1), 4 * nbins as u32, &[P::Ptr(dx), P::I32(n as i32), P::Ptr(hist), P::I32(nbins as i32)], &opts(8)).unwrap();
        let h: Vec<u32> = dev.read_vec(hist, nbins as usize).unwrap();
        let mut want = vec![0u32; nbins as usize];
        for v in &x {
            want[(v % nbins as u32) as usize] += 1;
        }
        assert_eq!(h, want, "{arch}");

        let xi: Vec<i32> = (0..1000).map(|_| (rng.u64() % 100000) as i32 - 50000).collect();
        let dxi = dev.upload(&xi);
        let out = dev.upload(&[i32::MIN, i32::MAX, 0, 0, -1, 0, 0, 0]);
        let fo = dev.upload(&[0f32]);
        let dd = dev.upload(&[0f64]);
        dev.launch(&m, "atomic_misc", (4, 1, 1), (256, 1, 1), 0, &[P::Ptr(dxi), P::I32(1000), P::Ptr(out), P::Ptr(fo), P::Ptr(dd)], &opts(8)).unwrap();
        let o: Vec<i32> = dev.read_vec(out, 8).unwrap();
        assert_eq!(o[0], *xi.iter().max().unwrap());
        assert_eq!(o[1], *xi.iter().min().unwrap());
        assert_eq!(o[2], xi.iter().fold(0, |a, b| a ^ b));
        assert_eq!(o[3], xi.iter().fold(0, |a, b| a | (b & 0xff)));
        assert_eq!(o[4], xi.iter().fold(-1, |a, b| a & (b | 0xffff0000u32 as i32)));
        assert!(xi.contains(&o[5]), "cas stored one of the inputs");
        assert_eq!((o[6], o[7]), (5, 5));
        let d: Vec<f64> = dev.read_vec(dd, 1).unwrap();
        let want: f64 = xi.iter().map(|&v| v as f64 * 0.25).sum();
        assert_eq!(d[0], want, "f64 sums of quarter-integers are exact");
        let f: Vec<f32> = dev.read_vec(fo, 1).unwrap();
        assert!((f[0] as f64 - want * 2.0).abs() < 1e3, "{} vs {}", f[0], want * 2.0);
    }
}

#[test]
fn tiled_gemm_matches_reference() {
    for arch in ARCHS {
        let Some(m) = module("gemm.cu", arch) else { return };
        let mut rng = Rng(66);
        let (mm, nn, kk) = (37usize, 45usize, 50usize);
        let a = rng.vec_f32(mm * kk);
        let b = rng.vec_f32(kk * nn);
        let mut dev = Device::new();
        let (da, db) = (dev.upload(&a), dev.upload(&b));
        let dc = dev.upload(&vec![f32::NAN; mm * nn]);
        let st = dev.launch(&m, "gemm_tiled", (nn.div_ceil(16) as u32, mm.div_ceil(16) as u32, 1), (16, 16, 1), 0, &[P::Ptr(da), P::Ptr(db), P::Ptr(dc), P::I32(mm as i32), P::I32(nn as i32), P::I32(kk as i32)], &opts(6)).unwrap();
        let c: Vec<f32> = dev.read_vec(dc, mm * nn).unwrap();
        for i in 0..mm {
            for j in 0..nn {
                // same order as the kernel: fma over k ascending, zero-padded tiles add +0
                let mut acc = 0f32;
                for k in 0..kk.div_ceil(16) * 16 {
                    let (x, y) = if k < kk { (a[i * kk + k], b[k * nn + j]) } else { (0.0, 0.0) };
                    acc = x.mul_add(y, acc);
                }
                assert_eq!(c[i * nn + j].to_bits(), acc.to_bits(), "{arch} ({i},{j})");
            }
        }
        assert!(st.shared_bytes() > 0);
    }
}

#[test]
fn out_of_bounds_read_is_caught() {
    for arch in ARCHS {
        let Some(m) = module("gemm.cu", arch) else { return };
        let n = 100;
        let mut dev = Device::new();
        let a = dev.upload(&vec![1f32; n]);
        let out = dev.alloc(4 * n as u64);
        let e = dev.launch(&m, "oob_read", (1, 1, 1), (128, 1, 1), 0, &[P::Ptr(a), P::Ptr(out), P::I32(n as i32)], &opts(1)).unwrap_err().to_string();
        assert!(e.contains("oob_read") && e.contains("out-of-bounds 4-byte global load"), "{e}");
        assert!(e.contains("tid [100, 0, 0]") && e.contains(&format!("{:#x}", a + 4 * n as u64)), "{e}");
        assert!(e.contains("0 bytes past the end of the 400-byte allocation"), "{e}");
    }
}

fn bf16_gemm_ref(a: &[bf16], b: &[bf16], m: usize, n: usize, k: usize) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|kk| a[i * k + kk].to_f64() * b[kk * n + j].to_f64()).sum();
        }
    }
    c
}

#[test]
fn mma_gemm_with_ldmatrix_and_cp_async() {
    for arch in ARCHS {
        let Some(m) = module("mma.cu", arch) else { return };
        let mut rng = Rng(77);
        let (mm, nn, kk) = (64usize, 48usize, 80usize);
        let a: Vec<bf16> = (0..mm * kk).map(|_| bf16::from_f32(rng.f32())).collect();
        let b: Vec<bf16> = (0..kk * nn).map(|_| bf16::from_f32(rng.f32())).collect();
        let mut dev = Device::new();
        let (da, db) = (dev.upload(&a), dev.upload(&b));
        let dc = dev.upload(&vec![f32::NAN; mm * nn]);
        let args = [P::Ptr(da), P::Ptr(db), P::Ptr(dc), P::I32(mm as i32), P::I32(nn as i32), P::I32(kk as i32)];
        let st = dev.launch(&m, "mma_gemm", ((nn / 16) as u32, (mm / 32) as u32, 1), (128, 1, 1), 0, &args, &opts(12)).unwrap();
        let c: Vec<f32> = dev.read_vec(dc, mm * nn).unwrap();
        let want = bf16_gemm_ref(&a, &b, mm, nn, kk);
        for i in 0..mm * nn {
            // per 16-wide k step the sum is exact in f64 then rounded to f32: 5 roundings
            assert!((c[i] as f64 - want[i]).abs() <= 1e-5 * (1.0 + want[i].abs()), "{arch} {i}: {} vs {}", c[i], want[i]);
        }
        assert_eq!(st.by_class[ptxsim::Class::Tensor as usize], (mm / 16 * nn / 8 * kk / 16 * 32) as u64);
        // reading the tiles before cp.async.wait_group gives wrong results
        let dc2 = dev.upload(&vec![f32::NAN; mm * nn]);
        let args2 = [P::Ptr(da), P::Ptr(db), P::Ptr(dc2), P::I32(mm as i32), P::I32(nn as i32), P::I32(kk as i32)];
        let o = ptxsim::LaunchOptions { race_check: false, ..opts(12) };
        dev.launch(&m, "mma_gemm_nowait", ((nn / 16) as u32, (mm / 32) as u32, 1), (128, 1, 1), 0, &args2, &o).unwrap();
        let c2: Vec<f32> = dev.read_vec(dc2, mm * nn).unwrap();
        let bad = (0..mm * nn).filter(|&i| (c2[i] as f64 - want[i]).abs() > 1e-3).count();
        assert!(bad > mm * nn / 2, "{arch}: only {bad} wrong outputs without wait_group");
    }
}

#[test]
fn calls_constants_locals_structs_and_divergence() {
    for arch in ARCHS {
        let Some(m) = module("misc.cu", arch) else { return };
        let mut rng = Rng(88);
        let n = 300usize;
        let x = rng.vec_f32(n);
        let idx = [3i32, 14, 7, 9];
        let (scale, shift) = (0.75f32, -0.125f32);
        let mut aff = Vec::new();
        aff.extend_from_slice(&scale.to_le_bytes());
        aff.extend_from_slice(&shift.to_le_bytes());
        for v in idx {
            aff.extend_from_slice(&v.to_le_bytes());
        }
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let dy = dev.upload(&vec![f32::NAN; n]);
        let flags = dev.alloc(4);
        let g = dev.symbol(&m, "gCounter").unwrap();
        dev.launch(&m, "misc", (3, 1, 1), (128, 1, 1), 0, &[P::Ptr(dx), P::Ptr(dy), P::Ptr(flags), P::Bytes(aff), P::I32(n as i32)], &opts(13)).unwrap();
        let table = [1f32, 2., 3., 5., 7., 11., 13., 17.];
        let poly = |x: f32, k: usize| (0..=k).fold(0f32, |r, i| r.mul_add(x, table[i & 7]));
        let mut v = vec![0f32; 384];
        for i in 0..384 {
            let loc = |j: usize| x[(i + j) % n] * (j + 1) as f32;
            if i < n {
                let xi = x[i];
                v[i] = if xi > 0.0 {
                    if xi > 0.5 { poly(xi, (i & 3) + 2) } else { loc(i & 15) + loc((i * 7) & 15) }
                } else {
                    -poly(-xi, 1) + loc(idx[i & 3] as usize & 15)
                };
            }
        }
        let y: Vec<f32> = dev.read_vec(dy, n).unwrap();
        for i in 0..n {
            // butterfly sum over the warp in the kernel's order
            let w = i / 32 * 32;
            let mut vals: Vec<f32> = v[w..w + 32].to_vec();
            for o in [16, 8, 4, 2, 1] {
                vals = (0..32).map(|l| vals[l] + vals[l ^ o]).collect();
            }
            let want = vals[i - w] * scale + shift;
            assert!((y[i] - want).abs() <= 1e-5 * (1.0 + want.abs()), "{arch} {i}: {} vs {want}", y[i]);
        }
        let f: Vec<i32> = dev.read_vec(flags, 1).unwrap();
        assert_eq!(f[0], 42, "{arch}: __device__ initialiser");
        assert_eq!(dev.read_vec::<i32>(g, 1).unwrap()[0], 43, "{arch}");
    }
}

#[test]
fn named_barriers_with_arrive() {
    for arch in ARCHS {
        let Some(m) = module("misc.cu", arch) else { return };
        let mut rng = Rng(99);
        let blocks = 4usize;
        let x: Vec<i32> = (0..blocks * 32).map(|_| (rng.u64() % 1000) as i32 - 500).collect();
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let out = dev.alloc((blocks * 3 * 32 * 4) as u64);
        for seed in 0..4 {
            dev.launch(&m, "named_barrier", (blocks as u32, 1, 1), (128, 1, 1), 0, &[P::Ptr(dx), P::Ptr(out)], &opts(seed)).unwrap();
            let o: Vec<i32> = dev.read_vec(out, blocks * 96).unwrap();
            for b in 0..blocks {
                for w in 1..4 {
                    for l in 0..32 {
                        assert_eq!(o[(b * 3 + w - 1) * 32 + l], x[b * 32 + ((l + w) & 31)] * 3 + w as i32, "{arch} seed {seed}");
                    }
                }
            }
        }
    }
}
