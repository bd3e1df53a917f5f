//! `__syncwarp()` (`bar.warp.sync`): tests/kernels/warpsync.cu compiled by NVRTC for
//! compute_80 and compute_90, run in ptxsim on seeded random inputs with several launch
//! seeds, compared with Rust references (bit-exact). Also: NVRTC's PTX for the kernels
//! declares no vector registers (`.reg .v4`), which ptxsim does not implement.

mod common;
use common::*;
use ptxsim::{Device, ParamValue as P};

#[test]
fn syncwarp_inside_divergent_branches() {
    for arch in ARCHS {
        let Some(m) = module("warpsync.cu", arch) else { return };
        let mut rng = Rng(21);
        let n = 1000usize;
        let x = rng.vec_f32(n);
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let dy = dev.upload(&vec![f32::NAN; n]);
        let v = |i: usize| if i < n { x[i] } else { 0.0 };
        for seed in 0..3 {
            let st = dev.launch(&m, "swap_halves", (4, 1, 1), (256, 1, 1), 0, &[P::Ptr(dx), P::Ptr(dy), P::I32(n as i32)], &opts(seed)).unwrap();
            let y: Vec<f32> = dev.read_vec(dy, n).unwrap();
            for i in 0..n {
                let want = if i % 32 < 16 { (v(i + 16) + 1.0) - v(i) } else { (2.0 * v(i - 16)) * v(i) };
                assert_eq!(y[i].to_bits(), want.to_bits(), "{arch} seed {seed} i={i}: {} vs {want}", y[i]);
            }
            assert!(st.by_class[ptxsim::Class::Barrier as usize] >= 4 * 256, "{arch}: bar.warp.sync counted");
        }
    }
}

#[test]
fn syncwarp_with_half_warp_masks() {
    for arch in ARCHS {
        let Some(m) = module("warpsync.cu", arch) else { return };
        let mut rng = Rng(22);
        let (blocks, bs) = (3usize, 128usize);
        let x: Vec<i32> = (0..blocks * bs).map(|_| (rng.u64() % 2001) as i32 - 1000).collect();
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let dy = dev.upload(&vec![i32::MIN; blocks * bs]);
        // the kernel's tree sum per half-warp: h[j] += mult * h[j + o] for j < o, o = 8, 4, 2, 1
        let half = |h: &[i32], mult: i32| {
            let mut h = h.to_vec();
            for o in [8, 4, 2, 1] {
                let a: Vec<i32> = (0..16).map(|j| if j < o { h[j + o] } else { 0 }).collect();
                for j in 0..o {
                    h[j] += a[j] * mult;
                }
            }
            h[0]
        };
        for seed in 0..3 {
            dev.launch(&m, "half_warp_sums", (blocks as u32, 1, 1), (bs as u32, 1, 1), 0, &[P::Ptr(dx), P::Ptr(dy)], &opts(seed)).unwrap();
            let y: Vec<i32> = dev.read_vec(dy, blocks * bs).unwrap();
            for i in 0..blocks * bs {
                let base = i / 16 * 16;
                let want = half(&x[base..base + 16], if i % 32 < 16 { 1 } else { 3 });
                assert_eq!(y[i], want, "{arch} seed {seed} i={i}");
            }
        }
    }
}

#[test]
fn syncwarp_does_not_wait_for_exited_lanes() {
    for arch in ARCHS {
        let Some(m) = module("warpsync.cu", arch) else { return };
        let mut rng = Rng(23);
        let n = 2 * 256;
        let x = rng.vec_f32(n);
        assert!(x.iter().any(|&v| v < 0.0) && x.iter().any(|&v| v >= 0.0));
        let mut dev = Device::new();
        let dx = dev.upload(&x);
        let dy = dev.upload(&vec![f32::NAN; n]);
        dev.launch(&m, "sync_after_exit", (2, 1, 1), (256, 1, 1), 0, &[P::Ptr(dx), P::Ptr(dy)], &opts(4)).unwrap();
        let y: Vec<f32> = dev.read_vec(dy, n).unwrap();
        for i in 0..n {
            let nb = (i & !31) | ((i + 1) & 31);
            if x[i] < 0.0 {
                assert!(y[i].is_nan(), "{arch} i={i}: exited lane wrote");
            } else {
                let want = if x[nb] < 0.0 { 0.0 } else { x[nb] };
                assert_eq!(y[i].to_bits(), want.to_bits(), "{arch} i={i}");
            }
        }
    }
}

#[test]
fn syncwarp_errors() {
    for arch in ARCHS {
        let Some(m) = module("warpsync.cu", arch) else { return };
        let mut dev = Device::new();
        let dy = dev.alloc(4 * 64);
        let e = dev.launch(&m, "bad_mask", (1, 1, 1), (64, 1, 1), 0, &[P::Ptr(dy)], &opts(1)).unwrap_err().to_string();
        assert!(e.contains("not in the mask") && e.contains("bad_mask"), "{arch}: {e}");
        let e = dev.launch(&m, "wsync_deadlock", (1, 1, 1), (64, 1, 1), 0, &[P::Ptr(dy)], &opts(1)).unwrap_err().to_string();
        assert!(e.contains("deadlock") && e.contains("bar.warp.sync"), "{arch}: {e}");
    }
}

/// ptxsim does not implement vector registers (`.reg .v4 .f32 %v;`); NVRTC 12.9 does not
/// declare any for our kernels or for code built on float4/double2/half2 values.
#[test]
fn nvrtc_declares_no_vector_registers() {
    for arch in ARCHS {
        for file in ["warpsync.cu", "gemm.cu", "mma.cu", "bf16.cu", "misc.cu"] {
            let Some(p) = ptx(file, arch) else { return };
            assert!(!p.lines().any(|l| l.trim_start().starts_with(".reg .v")), "{arch} {file}: vector register declaration");
        }
    }
}

/// Float `redux.sync` (`redux.sync.max.f32`) is not implemented: ptxas rejects it for sm_80
/// and sm_90 (it needs sm_100a), so NVRTC cannot build it for the archs we run.
#[test]
fn float_redux_is_rejected_before_sm100a() {
    let nv = match ptxsim::nvrtc::Nvrtc::load() {
        Ok(n) => n,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => return eprintln!("skipping: {e}"),
        Err(e) => panic!("NVRTC is required under CI=true: {e}"),
    };
    let src = r#"extern "C" __global__ void k(const float* x, float* y) {
        float v = x[threadIdx.x], r;
        asm volatile("redux.sync.max.f32 %0, %1, 0xffffffff;" : "=f"(r) : "f"(v));
        y[threadIdx.x] = r;
    }"#;
    for arch in ["sm_80", "sm_90"] {
        let e = nv.compile_cubin("redux_f32.cu", src, &[format!("--gpu-architecture={arch}")]).unwrap_err().to_string();
        assert!(e.contains("redux.f32") && e.contains("not supported"), "{arch}: {e}");
    }
}
