//! Finding and loading the CUDA libraries (ptxsim::cudalib, src/backend/cuda/cublas.rs): every
//! failure is an error naming what was tried or what failed, never a panic. Each case runs the
//! `ipo` binary with its own environment (the variables are process-wide).

mod common;

use std::process::{Command, Output};

fn ipo(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ipo"));
    c.args(args).env_remove("LD_LIBRARY_PATH");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bogus_ipo_nvrtc_is_an_error_naming_the_path() {
    let o = ipo(&["selftest", "--device", "sim", "--ops", "add_assign"], &[("IPO_NVRTC", "/nonexistent/libnvrtc.so.13")]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(e.contains("/nonexistent/libnvrtc.so.13 [$IPO_NVRTC]: absent"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    // The report at the top says the same.
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("nvrtc: not found: /nonexistent/libnvrtc.so.13"), "{out}");
}

#[test]
fn bogus_ipo_cublas_is_named_in_the_report() {
    let o = ipo(&["selftest", "--device", "sim", "--ops", "nope"], &[("IPO_CUBLAS", "/nonexistent/libcublas.so.12")]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("cublas: not found: /nonexistent/libcublas.so.12 [$IPO_CUBLAS]: absent"), "{out}");
}

/// Without a GPU: one error line, exit non-zero. (On a GPU machine the table runs.)
#[test]
fn cuda_without_a_gpu_is_one_error_line() {
    let o = ipo(&["selftest", "--device", "cuda", "--ops", "add_assign", "--reps", "1"], &[]);
    let e = stderr(&o);
    if o.status.success() {
        return;
    }
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.starts_with("error: CUDA device: "), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// A kernel that does not compile (its CUDA headers missing) is an error naming the kernel
/// file, the NVRTC library and NVRTC's log, from the build up front, not a panic in an op.
#[test]
fn kernel_build_failure_is_an_error_with_the_log() {
    let Some(nv) = common::required("NVRTC", ptxsim::nvrtc::Nvrtc::load()) else { return };
    let nvrtc = nv.library().path.display().to_string();
    let empty = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let o = ipo(
        &["selftest", "--device", "sim", "--ops", "add_assign"],
        &[("IPO_NVRTC", nvrtc.as_str()), ("IPO_CUDA_INCLUDE", empty.path().to_str().unwrap()), ("IPO_KERNEL_CACHE", cache.path().to_str().unwrap())],
    );
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(e.contains("kernel build: ") && e.contains(".cu for compute_80 with NVRTC") && e.contains(&nvrtc), "{e}");
    assert!(e.contains("cuda_bf16.h"), "the NVRTC log: {e}");
}

/// `--precision bf16` (the default on a real GPU) does not turn the f32 parity rows into false
/// failures (on an H200 it did: 52 of 70 rows "failed" on bf16 rounding against fp32
/// tolerances); the table runs at fp32 and says so.
#[test]
fn selftest_under_bf16_precision_checks_f32_rows_at_fp32() {
    if common::required("NVRTC", ptxsim::nvrtc::Nvrtc::load()).is_none() {
        return;
    }
    let o = ipo(&["selftest", "--device", "sim", "--precision", "bf16", "--ops", "matmul,attention"], &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    assert!(out.contains("note: --precision bf16 applies to the timings"), "{out}");
    assert!(out.contains("checks pass") && !out.contains(" NO\n"), "{out}");
}
