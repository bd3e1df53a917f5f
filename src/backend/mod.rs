//! The `Backend` trait: the small set of fused ops a transformer needs, forward and backward.
//! `CpuBackend` is the fp32 reference; `CudaBackend<G: Gpu>` implements the same trait.

pub mod cpu;
