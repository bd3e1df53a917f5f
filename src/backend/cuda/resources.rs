//! Per-kernel resources (registers, shared memory, stack frame, spills) of every kernel file
//! in `build::SOURCES`, from ptxas's verbose report: NVRTC compiles each file for a real
//! `sm_XY` to a CUBIN with `--ptxas-options=-v`, and the program log carries one block per
//! function:
//!
//! ```text
//! ptxas info    : Compiling entry function 'rmsnorm_fwd' for 'sm_80'
//! ptxas info    : Function properties for rmsnorm_fwd
//! ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
//! ptxas info    : Used 20 registers, used 1 barriers, 128 bytes smem, 392 bytes cmem[0]
//! ```
//!
//! Used by tests/kernel_resources.rs (which asserts no kernel spills) and
//! `ipo selftest --resources`; docs/KERNELS.md has the table.

use super::build;
use super::gpu::GpuError;
use ptxsim::nvrtc::Nvrtc;

/// Head dims compiled for the HEAD_DIM-specialised files (attention.cu, kv_cache.cu), as
/// `CudaBackend::prepare` does for the supported models (64: Qwen2 0.5B, SmolLM2; 128: Llama,
/// Qwen3).
pub(crate) const HEAD_DIMS: &[usize] = &[64, 128];

/// Real architectures of the report.
pub const ARCHS: &[&str] = &["sm_80", "sm_90"];

/// Resources of one kernel (or non-inlined device function) for one arch and define set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub file: String,
    /// The `-D` defines of this build, as `NAME=value` separated by spaces ("" for none).
    pub defines: String,
    pub kernel: String,
    /// `true` for a `__global__` entry, `false` for a device function ptxas kept as a call.
    pub entry: bool,
    pub arch: String,
    pub registers: u32,
    pub barriers: u32,
    /// Static shared memory (bytes); dynamic shared memory is a launch parameter.
    pub smem: u32,
    pub stack_frame: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

impl KernelResources {
    pub fn spills(&self) -> bool {
        self.spill_stores > 0 || self.spill_loads > 0
    }
}

/// File names of every kernel file (`build::SOURCES`, so files added later are included).
pub fn kernel_files() -> Vec<&'static str> {
    build::SOURCES.iter().map(|(f, _)| *f).collect()
}

/// Full source of a kernel file, `common.cuh` pasted in (what NVRTC compiles).
pub fn kernel_source(file: &str) -> Result<String, GpuError> {
    build::source(file)
}

/// The define sets a file is built with at run time: `HEAD_DIM` in [`HEAD_DIMS`] for the files
/// `CudaBackend::prepare` specialises (attention*, kv_cache*) or whose source requires it
/// (`#ifndef HEAD_DIM`), none otherwise.
pub fn variants(file: &str) -> Result<Vec<Vec<(&'static str, usize)>>, GpuError> {
    let src = kernel_source(file)?;
    if file.starts_with("kv_cache") {
        // fp32 and bf16 caches (KV_BF16) at each head_dim
        Ok(HEAD_DIMS.iter().flat_map(|&hd| [vec![("HEAD_DIM", hd)], vec![("HEAD_DIM", hd), ("KV_BF16", 1)]]).collect())
    } else if file.starts_with("attention") || src.contains("#ifndef HEAD_DIM") {
        Ok(HEAD_DIMS.iter().map(|&hd| vec![("HEAD_DIM", hd)]).collect())
    } else {
        Ok(vec![vec![]])
    }
}

/// Names of the `__global__` kernels declared in `src` (`extern "C" __global__ void NAME(`,
/// optionally with `__launch_bounds__(...)`).
pub fn declared_kernels(src: &str) -> Vec<String> {
    let mut v = declared_kernels_in_order(src);
    v.sort();
    v.dedup();
    v
}

fn declared_kernels_in_order(src: &str) -> Vec<String> {
    let re = regex::Regex::new(r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\(").unwrap();
    re.captures_iter(src).map(|c| c[1].to_string()).collect()
}

fn num_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// Parses a ptxas `-v` log into one record per function ("Function properties for" block).
/// `file`, `defines` and `arch` are copied into each record.
pub fn parse_ptxas_log(log: &str, file: &str, defines: &str, arch: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let mut entries: Vec<String> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            if let Some(name) = rest.split('\'').next() {
                entries.push(name.to_string());
            }
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let kernel = rest.trim().to_string();
            out.push(KernelResources {
                file: file.into(),
                defines: defines.into(),
                entry: entries.contains(&kernel),
                kernel,
                arch: arch.into(),
                ..Default::default()
            });
        } else if let Some(r) = out.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack_frame = num_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                r.registers = num_before(line, " registers").unwrap_or(0);
                r.barriers = num_before(line, " barriers").unwrap_or(0);
                r.smem = num_before(line, " bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// NVRTC options of the report: the run-time options of `build::options` for `arch`
/// (a real `sm_XY`) plus `--ptxas-options=-v`.
pub fn options(arch: &str, defines: &[(&str, usize)]) -> Vec<String> {
    let mut o = build::options(arch, defines);
    o.push("--ptxas-options=-v".to_string());
    o
}

/// Compiles one kernel file with `defines` for `arch` to a CUBIN and returns its resources
/// and the raw ptxas log.
pub(crate) fn file_report(nvrtc: &Nvrtc, file: &str, arch: &str, defines: &[(&str, usize)]) -> Result<(Vec<KernelResources>, String), GpuError> {
    let src = kernel_source(file)?;
    let (cubin, log) = nvrtc.compile_cubin(file, &src, &options(arch, defines)).map_err(|e| GpuError::Build(e.to_string()))?;
    if cubin.len() < 4 || &cubin[..4] != b"\x7fELF" {
        return Err(GpuError::Build(format!("{file} for {arch}: NVRTC returned no ELF CUBIN")));
    }
    let d: Vec<String> = defines.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut rows = parse_ptxas_log(&log, file, &d.join(" "), arch);
    // ptxas reports in reverse; list entries in source order, device functions after them.
    let declared = declared_kernels_in_order(&src);
    rows.sort_by_key(|r| declared.iter().position(|k| *k == r.kernel).unwrap_or(usize::MAX));
    Ok((rows, log))
}

/// Resources of every kernel of every file in `build::SOURCES`, for every run-time define set,
/// compiled for `arch`.
pub fn resource_report(nvrtc: &Nvrtc, arch: &str) -> Result<Vec<KernelResources>, GpuError> {
    let mut out = Vec::new();
    for file in kernel_files() {
        for defs in variants(file)? {
            out.extend(file_report(nvrtc, file, arch, &defs)?.0);
        }
    }
    Ok(out)
}

/// A markdown table with one row per (file, defines, kernel) and one column group per arch:
/// registers, static shared memory, stack frame, spill stores/loads.
pub fn format_table(rows: &[KernelResources]) -> String {
    let mut archs_sorted: Vec<&str> = rows.iter().map(|r| r.arch.as_str()).collect();
    archs_sorted.sort();
    archs_sorted.dedup();
    let mut keys: Vec<(&str, &str, &str)> = Vec::new();
    for r in rows {
        let k = (r.file.as_str(), r.defines.as_str(), r.kernel.as_str());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut s = String::from("| file | defines | kernel |");
    for a in &archs_sorted {
        s += &format!(" {a} regs | {a} smem | {a} stack | {a} spill st/ld |");
    }
    s += "\n|---|---|---|";
    for _ in &archs_sorted {
        s += "---|---|---|---|";
    }
    s += "\n";
    for (f, d, k) in keys {
        s += &format!("| {f} | {} | {k} |", if d.is_empty() { "-" } else { d });
        for a in &archs_sorted {
            match rows.iter().find(|r| r.file == f && r.defines == d && r.kernel == k && r.arch == *a) {
                Some(r) => s += &format!(" {} | {} | {} | {}/{} |", r.registers, r.smem, r.stack_frame, r.spill_stores, r.spill_loads),
                None => s += " - | - | - | - |",
            }
        }
        s += "\n";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_ptxas_log() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'rmsnorm_bwd' for 'sm_80'\n\
ptxas info    : Function properties for rmsnorm_bwd\n\
ptxas         .     8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n\
ptxas info    : Used 16 registers, used 1 barriers, 128 bytes smem, 396 bytes cmem[0]\n\
ptxas info    : Compile time = 15.034 ms\n\
ptxas info    : Function properties for helper\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Compiling entry function 'fill' for 'sm_90'\n\
ptxas info    : Function properties for fill\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 24 registers\n";
        let r = parse_ptxas_log(log, "x.cu", "HEAD_DIM=64", "sm_80");
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].kernel.as_str(), r[0].entry, r[0].registers, r[0].barriers, r[0].smem), ("rmsnorm_bwd", true, 16, 1, 128));
        assert_eq!((r[0].stack_frame, r[0].spill_stores, r[0].spill_loads), (8, 12, 16));
        assert!(r[0].spills());
        assert_eq!((r[1].kernel.as_str(), r[1].entry, r[1].registers), ("helper", false, 0));
        assert_eq!((r[2].kernel.as_str(), r[2].entry, r[2].registers, r[2].smem, r[2].barriers), ("fill", true, 24, 0, 0));
        assert!(!r[2].spills());
        assert_eq!(r[2].defines, "HEAD_DIM=64");
    }

    #[test]
    fn finds_declared_kernels() {
        let src = "extern \"C\" __global__ void a(int x) {}\n__device__ void b() {}\nextern \"C\" __global__ void __launch_bounds__(256) c (float* y) {}\nextern \"C\" __global__ __launch_bounds__(128, 2) void d() {}";
        assert_eq!(declared_kernels(src), vec!["a", "c", "d"]);
    }

    #[test]
    fn every_source_has_kernels_and_head_dim_variants() {
        for f in kernel_files() {
            let src = kernel_source(f).unwrap();
            assert!(!declared_kernels(&src).is_empty(), "{f}: no __global__ kernels found");
            let v = variants(f).unwrap();
            if f == "attention.cu" {
                assert_eq!(v.len(), HEAD_DIMS.len(), "{f}");
            }
            if f == "kv_cache.cu" {
                assert_eq!(v.len(), 2 * HEAD_DIMS.len(), "{f}: fp32 and bf16 caches");
            }
        }
    }
}
