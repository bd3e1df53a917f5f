//! Test helpers: NVRTC compilation of tests/kernels/*.cu (skip or fail per CI), seeded random
//! inputs, and float comparison.
#![allow(dead_code)]

use ptxsim::nvrtc::Nvrtc;
use std::sync::OnceLock;

static NVRTC: OnceLock<Option<Nvrtc>> = OnceLock::new();

/// PTX for a test kernel file, or None (with a notice) when NVRTC is unavailable outside CI.
pub fn ptx(file: &str, arch: &str) -> Option<String> {
    let nv = NVRTC.get_or_init(|| match Nvrtc::load() {
        Ok(n) => Some(n),
        Err(e) => {
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("NVRTC is required under CI=true: {e}");
            }
            eprintln!("skipping NVRTC kernel tests: {e}");
            None
        }
    });
    let nv = nv.as_ref()?;
    let path = format!("{}/tests/kernels/{file}", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).unwrap();
    let mut opts = vec![format!("--gpu-architecture={arch}"), "-std=c++17".to_string()];
    opts.extend(ptxsim::nvrtc::include_dirs().into_iter().map(|d| format!("-I{d}")));
    Some(nv.compile(file, &src, &opts).unwrap_or_else(|e| panic!("{e}")))
}

pub fn module(file: &str, arch: &str) -> Option<ptxsim::Module> {
    let p = ptx(file, arch)?;
    Some(ptxsim::Module::parse(&p).unwrap_or_else(|e| panic!("{file} ({arch}): {e}")))
}

pub const ARCHS: [&str; 2] = ["compute_80", "compute_90"];

/// xorshift64* generator for seeded test inputs.
pub struct Rng(pub u64);
impl Rng {
    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

pub fn opts(seed: u64) -> ptxsim::LaunchOptions {
    ptxsim::LaunchOptions { seed, ..Default::default() }
}
