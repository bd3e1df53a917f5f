//! Kernel build: the sources of kernels/*.cu embedded at compile time (so `cargo build` needs
//! no CUDA), compiled at run time by NVRTC for the device's architecture, specialised by
//! `#define`s, and cached on disk by a hash of source + options + NVRTC version
//! ($IPO_KERNEL_CACHE, else $XDG_CACHE_HOME/ipo/kernels, else ~/.cache/ipo/kernels).

use super::gpu::GpuError;
use ptxsim::nvrtc::Nvrtc;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// (file name, source) of every kernel file.
pub(crate) const SOURCES: &[(&str, &str)] = &[
    ("elementwise.cu", include_str!("../../../kernels/elementwise.cu")),
    ("rmsnorm.cu", include_str!("../../../kernels/rmsnorm.cu")),
    ("embedding.cu", include_str!("../../../kernels/embedding.cu")),
    ("lm_head.cu", include_str!("../../../kernels/lm_head.cu")),
    ("attention.cu", include_str!("../../../kernels/attention.cu")),
    ("attention_mma.cu", include_str!("../../../kernels/attention_mma.cu")),
    ("convert.cu", include_str!("../../../kernels/convert.cu")),
    ("kv_cache.cu", include_str!("../../../kernels/kv_cache.cu")),
    ("dpo.cu", include_str!("../../../kernels/dpo.cu")),
    ("sampling.cu", include_str!("../../../kernels/sampling.cu")),
    ("optim.cu", include_str!("../../../kernels/optim.cu")),
];

/// The full source of a kernel file: `#include "common.cuh"` replaced by the header text
/// (NVRTC is given no include path for our own headers).
pub(crate) fn source(file: &str) -> Result<String, GpuError> {
    let src = SOURCES.iter().find(|(f, _)| *f == file).map(|(_, s)| *s).ok_or_else(|| GpuError::Build(format!("no kernel file {file}")))?;
    Ok(src.replace("#include \"common.cuh\"", COMMON))
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

/// PTX of `file` for `arch` with `defines`, from the disk cache or NVRTC (whose log is in
/// the error on failure).
pub(crate) fn ptx(nvrtc: &Nvrtc, file: &str, arch: &str, defines: &[(&str, usize)]) -> Result<String, GpuError> {
    let src = source(file)?;
    let opts = options(arch, defines);
    let ver = nvrtc.version().map_err(|e| GpuError::Build(e.to_string()))?;
    let mut h = Sha256::new();
    h.update(src.as_bytes());
    for o in &opts {
        h.update([0u8]);
        h.update(o.as_bytes());
    }
    h.update(format!("nvrtc {}.{}", ver.0, ver.1).as_bytes());
    let hash: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    let path = cache_dir().map(|d| d.join(format!("{}-{hash}.ptx", file.trim_end_matches(".cu"))));
    if let Some(p) = &path {
        if let Ok(s) = std::fs::read_to_string(p) {
            return Ok(s);
        }
    }
    let ptx = nvrtc.compile(file, &src, &opts).map_err(|e| GpuError::Build(e.to_string()))?;
    if let Some(p) = &path {
        // Best effort: a read-only cache only costs a recompile. Temp + rename is atomic.
        if std::fs::create_dir_all(p.parent().unwrap()).is_ok() {
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            if std::fs::write(&tmp, &ptx).is_ok() {
                let _ = std::fs::rename(&tmp, p);
            }
        }
    }
    Ok(ptx)
}
