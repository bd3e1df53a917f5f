//! `ipo selftest --device sim|cuda[:N]`: runs every kernel op of the CUDA backend against the
//! CPU reference on seeded random inputs (src/backend/cuda/parity.rs) and prints a table
//! (op, shape, max error, tolerance, pass). Fails if any row fails.
//!
//! `ipo selftest --resources [--arch sm_80,sm_90]`: instead, compiles every kernel file with
//! NVRTC for the real archs and prints ptxas's per-kernel registers, shared memory, stack frame
//! and spills (src/backend/cuda/resources.rs); fails if any kernel spills. Needs NVRTC, no GPU.

use crate::backend::cuda::{parity, resources, CudaBackend, Gpu};
use anyhow::{bail, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// `sim` (the PTX simulator on this CPU) or `cuda` / `cuda:N` (a real GPU).
    #[arg(long, default_value = "sim")]
    pub device: String,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Only these ops (comma separated; default: all).
    #[arg(long, value_delimiter = ',')]
    pub ops: Vec<String>,
    /// Print the ptxas resource table of every kernel (registers, smem, spills) instead.
    #[arg(long)]
    pub resources: bool,
    /// Real architectures for --resources (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = ["sm_80".to_string(), "sm_90".to_string()])]
    pub arch: Vec<String>,
}

fn resource_table(archs: &[String]) -> anyhow::Result<()> {
    let nv = ptxsim::nvrtc::Nvrtc::load().context("NVRTC (set IPO_NVRTC, or run scripts/setup-cuda.sh)")?;
    let (maj, min) = nv.version()?;
    println!("NVRTC {maj}.{min}, ptxas -v");
    let mut rows = Vec::new();
    for a in archs {
        if !a.starts_with("sm_") {
            bail!("--arch {a}: expected a real architecture sm_XY");
        }
        rows.extend(resources::resource_report(&nv, a)?);
    }
    print!("{}", resources::format_table(&rows));
    let spills: Vec<_> = rows.iter().filter(|r| r.spills()).map(|r| format!("{} [{}] {} {}", r.file, r.defines, r.arch, r.kernel)).collect();
    if !spills.is_empty() {
        bail!("kernels spill: {}", spills.join(", "));
    }
    println!("{} kernel builds, no spills", rows.len());
    Ok(())
}

fn table<G: Gpu>(be: &CudaBackend<G>, a: &Args) -> anyhow::Result<()> {
    let ops: Vec<&str> = if a.ops.is_empty() { parity::OPS.to_vec() } else { a.ops.iter().map(String::as_str).collect() };
    if let Some(bad) = ops.iter().find(|o| !parity::OPS.contains(o)) {
        bail!("--ops: unknown op {bad} (known: {})", parity::OPS.join(", "));
    }
    println!("device: {}", be.gpu().name());
    let rows: Vec<_> = ops.iter().flat_map(|op| parity::check_op(be, op, a.seed)).collect();
    print!("{}", parity::format_table(&rows));
    let failed = rows.iter().filter(|r| !r.pass()).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", rows.len());
    }
    println!("all {} checks pass", rows.len());
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.resources {
        return resource_table(&a.arch);
    }
    match a.device.as_str() {
        "sim" => table(&CudaBackend::sim().context("CUDA simulator backend")?, &a),
        d if d == "cuda" || d.starts_with("cuda:") => {
            let n = d.strip_prefix("cuda:").map_or(Ok(0), |s| s.parse::<usize>()).with_context(|| format!("--device {d}: expected cuda:N"))?;
            table(&CudaBackend::cuda(n).context("CUDA device")?, &a)
        }
        d => bail!("--device {d}: expected sim, cuda or cuda:N"),
    }
}
