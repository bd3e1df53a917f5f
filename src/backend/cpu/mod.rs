//! The CPU reference backend (fp32, rayon, GEMM via the `gemm` crate).
