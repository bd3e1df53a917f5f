//! Kernel build: the sources of kernels/*.cu embedded at compile time (so `cargo build` needs
//! no CUDA), compiled at run time by NVRTC, specialised by `#define`s: to a CUBIN for a real
//! device's exact `sm_XY` (never PTX for the driver to JIT), to PTX for a virtual `compute_XY`
//! (the simulator). Cached on disk by a hash of source + options (which carry the arch) +
//! NVRTC version, as `.cubin` or `.ptx` ($IPO_KERNEL_CACHE, else $XDG_CACHE_HOME/ipo/kernels,
//! else ~/.cache/ipo/kernels).
//!
//! No kernel uses a Hopper-only instruction (wgmma, setmaxnreg, ...; attention_mma.cu's
//! mma.sync m16n8k16 bf16 is sm_80+), so sm_90 is built as plain `sm_90`, not `sm_90a`.

use super::gpu::{GpuError, Image};
use ptxsim::nvrtc::Nvrtc;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

const COMMON: &str = include_str!("../../../kernels/common.cuh");
/// The tensor-core kernels' fragment helpers and online-softmax step.
const MMA: &str = include_str!("../../../kernels/mma.cuh");

/// (file name, source) of every kernel file.
pub(crate) const SOURCES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("../../../kernels/elementwise.cu")),
    ("rmsnorm.cu", include_str!("../../../kernels/rmsnorm.cu")),
    ("embedding.cu", include_str!("../../../kernels/embedding.cu")),
    ("lm_head.cu", include_str!("../../../kernels/lm_head.cu")),
    ("lm_head_mma.cu", include_str!("../../../kernels/lm_head_mma.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
    ("attention_mma.cu", include_str!("../../../kernels/attention_mma.cu")),
    ("convert.cu", include_str!("../../../kernels/convert.cu")),
    ("kv_cache.cu", include_str!("../../../kernels/kv_cache.cu")),
    ("dpo.cu", include_str!("../../../kernels/dpo.cu")),
    ("sampling.cu", include_str!("../../../kernels/sampling.cu")),
    ("optim.cu", include_str!("../../../kernels/optim.cu")),
];

/// The full source of a kernel file: `#include "common.cuh"` and `#include "mma.cuh"` replaced
/// by the headers' text (NVRTC is given no include path for our own headers).
pub(crate) fn source(file: &str) -> Result<String, GpuError> {
    let src = SOURCES.iter().find(|(f, _)| *f == file).map(|(_, s)| *s).ok_or_else(|| GpuError::Build(format!("no kernel file {file}")))?;
    Ok(src.replace("#include \"common.cuh\"", COMMON).replace("#include \"mma.cuh\"", MMA))
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("IPO_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("ipo/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ipo/kernels"))
}

/// NVRTC options for `arch` and the `(name, value)` defines.
pub(crate) fn options(arch: &str, defines: &[(&str, usize)]) -> Vec<String> {
    let mut o = vec![format!("--gpu-architecture={arch}"), "-std=c++17".to_string()];
    o.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    o.extend(ptxsim::nvrtc::include_dirs().into_iter().map(|d| format!("-I{d}")));
    o
}

/// The architecture to build for on a device of `arch`: `arch` itself when NVRTC can build a
/// CUBIN for it (or `arch` is virtual); for a real device newer than NVRTC knows
/// (nvrtcGetSupportedArchs), PTX for the newest `compute_XY` NVRTC supports, which the driver
/// JIT-compiles, said once on stderr.
pub(crate) fn target_arch(nvrtc: &Nvrtc, arch: &str) -> Result<String, GpuError> {
    let Some(n) = arch.strip_prefix("sm_").and_then(|x| x.parse::<i32>().ok()) else { return Ok(arch.to_string()) };
    let supported = nvrtc.supported_archs().map_err(|e| GpuError::Build(e.to_string()))?;
    match supported.last() {
        Some(&newest) if !supported.contains(&n) && newest < n => {
            let (maj, min) = nvrtc.version().map_err(|e| GpuError::Build(e.to_string()))?;
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                eprintln!("note: NVRTC {maj}.{min} does not know {arch} (newest: sm_{newest}); building PTX for compute_{newest}, which the driver JIT-compiles (a newer NVRTC builds CUBINs)")
            });
            Ok(format!("compute_{newest}"))
        }
        _ => Ok(arch.to_string()),
    }
}

/// `file` built for `arch` (`sm_XY`: CUBIN, `compute_XY`: PTX) with `defines`, from the disk
/// cache or NVRTC. A failed build is an error naming the file, the NVRTC library and the log.
pub(crate) fn image(nvrtc: &Nvrtc, file: &str, arch: &str, defines: &[(&str, usize)]) -> Result<Image, GpuError> {
    let src = source(file)?;
    let opts = options(arch, defines);
    let ver = nvrtc.version().map_err(|e| GpuError::Build(e.to_string()))?;
    let cubin = arch.starts_with("sm_");
    let mut h = Sha256::new();
    h.update(src.as_bytes());
    for o in &opts {
        h.update([0u8]);
        h.update(o.as_bytes());
    }
    h.update(format!("nvrtc {}.{} {arch}", ver.0, ver.1).as_bytes());
    let hash: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    let ext = if cubin { "cubin" } else { "ptx" };
    let path = cache_dir().map(|d| d.join(format!("{}-{hash}.{ext}", file.trim_end_matches(".cu"))));
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        if cubin {
            return Ok(Image::Cubin(bytes));
        }
        if let Ok(s) = String::from_utf8(bytes) {
            return Ok(Image::Ptx(s));
        }
    }
    let failed = |e: ptxsim::nvrtc::NvrtcError| {
        let lib = nvrtc.library();
        GpuError::Build(format!("{file} for {arch} with NVRTC {}.{} at {}: {e}", ver.0, ver.1, lib.describe()))
    };
    let (image, bytes) = if cubin {
        let (b, _log) = nvrtc.compile_cubin(file, &src, &opts).map_err(failed)?;
        (Image::Cubin(b.clone()), b)
    } else {
        let p = nvrtc.compile(file, &src, &opts).map_err(failed)?;
        let b = p.clone().into_bytes();
        (Image::Ptx(p), b)
    };
    if let Some(p) = &path {
        // Best effort: a read-only cache only costs a recompile. Temp + rename is atomic.
        if std::fs::create_dir_all(p.parent().unwrap()).is_ok() {
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &bytes).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC, or `None` with a notice (a panic under CI=true, as tests/common does).
    fn nvrtc() -> Option<Nvrtc> {
        match Nvrtc::load() {
            Ok(n) => Some(n),
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("CI=true and NVRTC is unavailable: {e}"),
            Err(e) => {
                eprintln!("skipping: NVRTC is unavailable: {e}");
                None
            }
        }
    }

    #[test]
    fn real_arch_builds_a_cubin_virtual_arch_ptx() {
        let Some(nv) = nvrtc() else { return };
        match image(&nv, "elementwise.cu", "sm_80", &[]).unwrap() {
            Image::Cubin(b) => assert_eq!(&b[..4], b"\x7fELF"),
            Image::Ptx(_) => panic!("sm_80 gave PTX"),
        }
        match image(&nv, "elementwise.cu", "compute_80", &[]).unwrap() {
            Image::Ptx(p) => assert!(p.contains(".target sm_80")),
            Image::Cubin(_) => panic!("compute_80 gave a CUBIN"),
        }
    }

    #[test]
    fn device_newer_than_nvrtc_falls_back_to_ptx() {
        let Some(nv) = nvrtc() else { return };
        let newest = *nv.supported_archs().unwrap().last().expect("NVRTC lists its archs");
        assert_eq!(target_arch(&nv, "sm_80").unwrap(), "sm_80");
        assert_eq!(target_arch(&nv, "compute_80").unwrap(), "compute_80");
        assert_eq!(target_arch(&nv, "sm_990").unwrap(), format!("compute_{newest}"));
    }
}
