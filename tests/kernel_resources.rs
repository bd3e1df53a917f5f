//! Kernel resources from ptxas: every kernel file in `build::SOURCES` (so files added later are
//! covered), with the defines used at run time (HEAD_DIM 64 and 128 for attention.cu and
//! kv_cache.cu), compiled by NVRTC for a real sm_80 and sm_90 to a CUBIN with
//! `--ptxas-options=-v`. Asserts that no kernel spills (0 bytes spill stores/loads) and that
//! every declared `__global__` kernel is in the report, then prints the markdown table of
//! docs/KERNELS.md:
//!
//! `cargo test --release --test kernel_resources -- --nocapture`
//!
//! Without NVRTC the test prints a skip notice, or fails under CI=true.

mod common;

use ipo::backend::cuda::resources::{self, KernelResources, ARCHS};
use ptxsim::nvrtc::Nvrtc;

#[test]
fn no_kernel_spills_on_sm80_or_sm90() {
    let Some(nv) = common::required("NVRTC", Nvrtc::load()) else { return };
    let mut all: Vec<KernelResources> = Vec::new();
    for arch in ARCHS {
        let rows = resources::resource_report(&nv, arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        all.extend(rows);
    }
    println!("{}", resources::format_table(&all));

    // Every declared kernel of every file and define set is in the report, for every arch,
    // with a register count (so the log was parsed).
    let mut n_expected = 0;
    for file in resources::kernel_files() {
        let declared = resources::declared_kernels(&resources::kernel_source(file).unwrap());
        assert!(!declared.is_empty(), "{file}: no kernels found");
        for defs in resources::variants(file).unwrap() {
            let d: Vec<String> = defs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let d = d.join(" ");
            for arch in ARCHS {
                for k in &declared {
                    n_expected += 1;
                    let r = all
                        .iter()
                        .find(|r| r.file == file && r.defines == d && r.arch == *arch && &r.kernel == k)
                        .unwrap_or_else(|| panic!("{file} [{d}] {arch}: kernel {k} missing from the ptxas report"));
                    assert!(r.entry, "{file} {k}: not reported as an entry function");
                    assert!(r.registers > 0 && r.registers <= 255, "{file} [{d}] {arch} {k}: {} registers", r.registers);
                }
            }
        }
    }
    assert!(all.iter().filter(|r| r.entry).count() >= n_expected);

    let spills: Vec<String> = all
        .iter()
        .filter(|r| r.spills())
        .map(|r| format!("{} [{}] {} {}: {} B spill stores, {} B spill loads, {} B stack", r.file, r.defines, r.arch, r.kernel, r.spill_stores, r.spill_loads, r.stack_frame))
        .collect();
    assert!(spills.is_empty(), "kernels spill registers to local memory:\n{}", spills.join("\n"));
}

/// The CUBIN path returns a real ELF and fails with the log on a compile error; a compute_XY
/// target (PTX only) is refused rather than returning an empty CUBIN.
#[test]
fn compile_cubin_reports_errors_and_needs_a_real_arch() {
    let Some(nv) = common::required("NVRTC", Nvrtc::load()) else { return };
    let src = "extern \"C\" __global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }";
    let (cubin, log) = nv.compile_cubin("k.cu", src, &["--gpu-architecture=sm_80".into(), "--ptxas-options=-v".into()]).unwrap();
    assert_eq!(&cubin[..4], b"\x7fELF");
    let r = resources::parse_ptxas_log(&log, "k.cu", "", "sm_80");
    assert_eq!(r.len(), 1, "{log}");
    assert!(r[0].entry && r[0].registers > 0 && !r[0].spills(), "{log}");
    let bad = nv.compile_cubin("bad.cu", "extern \"C\" __global__ void k() { undeclared(); }", &["--gpu-architecture=sm_80".into()]);
    let e = bad.unwrap_err().to_string();
    assert!(e.contains("undeclared"), "{e}");
    assert!(nv.compile_cubin("k.cu", src, &["--gpu-architecture=compute_80".into()]).is_err());
}
