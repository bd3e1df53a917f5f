//! `ipo selftest --device sim|cuda[:N]`: prints how the CUDA libraries were found (NVRTC,
//! cuBLAS, the driver), then runs every kernel op of the CUDA backend against the
//! CPU reference on seeded random inputs (src/backend/cuda/parity.rs) and prints a table
//! (op, shape, max error, tolerance, pass). Fails if any row fails.
//!
//! On a GPU (or with `--time`) it then times every op of the fixed workload
//! (src/backend/workload.rs; SmolLM2-135M layer dims on a GPU, a small shape on the simulator)
//! with CUDA events: the mean milliseconds per call over `--reps` calls after one warm-up.
//!
//! `ipo selftest --resources [--arch sm_80,sm_90]`: instead, compiles every kernel file with
//! NVRTC for the real archs and prints ptxas's per-kernel registers, shared memory, stack frame
//! and spills (src/backend/cuda/resources.rs); fails if any kernel spills. Needs NVRTC, no GPU.

use crate::backend::cuda::{library_report, parity, resources, time_ms, CudaBackend, Gpu, Precision};
use crate::backend::workload::{self, Shape};
use crate::workflow::device::{resolve_precision, Device};
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
    /// Also time every op of the workload (always on with a GPU).
    #[arg(long)]
    pub time: bool,
    /// Precision of the timed ops: bf16 or f32 (default: bf16 on cuda, f32 on sim, as every
    /// command). The table checks each kernel at its own precision whatever this is: the f32
    /// rows at fp32 tolerances, the bf16 paths in their `*_bf16` rows.
    #[arg(long, value_name = "PRECISION", value_parser = crate::workflow::device::parse_precision)]
    pub precision: Option<Precision>,
    /// Timed calls per op (after one warm-up call); default 20 on a GPU, 1 on the simulator.
    #[arg(long, value_name = "N")]
    pub reps: Option<usize>,
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
    // Every kernel file built up front: a build failure is this command's error, not a panic
    // inside a check.
    be.prepare(resources::HEAD_DIMS)?;
    // The table checks each kernel at its own precision: the f32 rows at fp32 tolerances, the
    // `*_bf16` rows on the bf16 paths. bf16 would route the f32 rows through bf16 math and fail
    // them on bf16 rounding (seen on an H200: errors ~1e-3 against 1e-6), so the table runs at
    // fp32 and the precision comes back for the timings.
    let precision = be.precision();
    if precision != Precision::F32 {
        println!("note: --precision {} applies to the timings; the table checks the f32 kernels at fp32 and the bf16 paths in their *_bf16 rows", precision.name());
        be.set_precision(Precision::F32);
    }
    let rows: Vec<_> = ops.iter().flat_map(|op| parity::check_op(be, op, a.seed)).collect();
    be.set_precision(precision);
    print!("{}", parity::format_table(&rows));
    let failed = rows.iter().filter(|r| !r.pass()).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed", rows.len());
    }
    println!("all {} checks pass", rows.len());
    Ok(())
}

/// On a GPU: a world-1 NCCL group (`Backend::join_group`) and an all-reduce of seeded buffers
/// (one of them over the 25 MiB bucket size) on the device, then ZeRO-1's reduce-scatter
/// (ncclReduce per piece) of the same buffers and all-gather (ncclBroadcast per piece) of an
/// fp32 weight and a sharded one (bf16 only under bf16). Over one rank each is the identity,
/// so every bit must come back unchanged, and the host path must not be taken.
/// Without libnccl.so.2 it says so and passes: NCCL is needed only with more than one rank.
fn nccl_check(be: &CudaBackend<crate::backend::cuda::Cudarc>, seed: u64) -> anyhow::Result<()> {
    use crate::backend::Backend;
    if let Err(e) = be.join_group(0, 1, std::time::Duration::from_secs(120), &mut |mine| Ok(vec![mine])) {
        if format!("{e:#}").contains("libnccl.so.2") {
            println!("nccl: not checked: {e:#}");
            return Ok(());
        }
        return Err(e.context("nccl: a world-1 NCCL group"));
    }
    let mut rng = workload::Rng(seed);
    let host: Vec<Vec<f32>> = [1000, 7 << 20, 3].iter().map(|&n| rng.vec(n, 1.0)).collect();
    let mut bufs: Vec<_> = host.iter().map(|h| be.upload(h)).collect();
    let mut refs: Vec<_> = bufs.iter_mut().collect();
    be.all_reduce_sum(&mut refs, &mut |_| bail!("the host path was taken after join_group")).context("nccl: all-reduce")?;
    let changed = bufs.iter().zip(&host).map(|(b, h)| be.download(b).iter().zip(h).filter(|(x, y)| x.to_bits() != y.to_bits()).count()).sum::<usize>();
    if changed > 0 {
        bail!("nccl: a world-1 all-reduce changed {changed} of {} values", host.iter().map(Vec::len).sum::<usize>());
    }
    println!("nccl: a world-1 all-reduce of {} values on the device left every bit unchanged", host.iter().map(Vec::len).sum::<usize>());
    let halves = |n: usize| vec![(0..n / 2 + 1, 0), (n / 2 + 1..n, 0)]; // odd starts
    let owners: Vec<_> = host.iter().map(|h| halves(h.len())).collect();
    be.reduce_scatter_start(&mut bufs.iter_mut().collect::<Vec<_>>(), &owners, &mut |_| bail!("the host path was taken after join_group"))
        .and_then(|()| be.all_reduce_wait())
        .context("nccl: reduce-scatter")?;
    if bufs.iter().zip(&host).any(|(b, h)| !be.download(b).iter().zip(h).all(|(x, y)| x.to_bits() == y.to_bits())) {
        bail!("nccl: a world-1 reduce-scatter changed values");
    }
    let mut ws = [be.upload_weight(&host[0]), be.upload_weight(&host[2])];
    be.shard_weight(&mut ws[0]);
    let before: Vec<Vec<f32>> = ws.iter().map(|w| be.download(w)).collect();
    let pieces: Vec<_> = before.iter().enumerate().flat_map(|(i, w)| halves(w.len()).into_iter().map(move |(r, o)| (i, r, o))).collect();
    be.all_gather_slices(0, &mut ws.iter_mut().collect::<Vec<_>>(), &pieces, &mut |_| bail!("the host path was taken after join_group")).context("nccl: all-gather")?;
    if ws.iter().zip(&before).any(|(w, b)| !be.download(w).iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())) {
        bail!("nccl: a world-1 all-gather changed values");
    }
    println!("nccl: a world-1 reduce-scatter and all-gather ({} weight kept in bf16) left every bit unchanged", if be.precision() == crate::backend::Precision::Bf16 { "a" } else { "no" });
    Ok(())
}

/// Mean milliseconds per call of each workload op, from events on the default stream (so a
/// call's host-side index uploads are inside its time, as they are in training).
fn timings<G: Gpu>(be: &CudaBackend<G>, a: &Args, shape: Shape, reps: usize) -> anyhow::Result<()> {
    let ops: Vec<&str> = workload::OPS.iter().copied().filter(|o| a.ops.is_empty() || a.ops.iter().any(|x| x == o)).collect();
    be.prepare(&[shape.head_dim])?;
    let mut inputs = workload::prepare(be, shape, a.seed);
    println!("timing: {} ({reps} calls per op after a warm-up)", shape.describe());
    println!("{:<20} {:>12}", "op", "ms / call");
    for op in ops {
        workload::run_op(be, &mut inputs, op);
        let ms = time_ms(be.gpu(), 0, || {
            for _ in 0..reps {
                workload::run_op(be, &mut inputs, op);
            }
        })?;
        println!("{op:<20} {:>12.4}", ms / reps as f32);
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    for line in library_report() {
        println!("{line}");
    }
    if a.resources {
        return resource_table(&a.arch);
    }
    let precision = |d: Device| -> anyhow::Result<Precision> {
        match resolve_precision(d, a.precision)? {
            Precision::Q8 => bail!("--precision q8: 8-bit weights exist on the CPU backend only; use bf16 or f32"),
            Precision::Q4 => bail!("--precision q4: 4-bit weights exist on the CPU backend only; use bf16 or f32"),
            p => Ok(p),
        }
    };
    match a.device.as_str() {
        "sim" => {
            let be = CudaBackend::sim().context("CUDA simulator backend")?;
            be.set_precision(precision(Device::Sim)?);
            table(&be, &a)?;
            if a.time {
                timings(&be, &a, workload::SMALL, a.reps.unwrap_or(1))?;
            }
            Ok(())
        }
        d if d == "cuda" || d.starts_with("cuda:") => {
            let n = d.strip_prefix("cuda:").map_or(Ok(0), |s| s.parse::<usize>()).with_context(|| format!("--device {d}: expected cuda:N"))?;
            let p = precision(Device::Cuda(n))?;
            let be = CudaBackend::cuda(n).context("CUDA device")?;
            be.set_precision(p);
            table(&be, &a)?;
            nccl_check(&be, a.seed)?;
            // SmolLM2-135M layer dims, 1024 packed tokens, the full vocabulary, 32 sequences decoding.
            timings(&be, &a, crate::workflow::bench::ModelShape::Smollm2.workload(), a.reps.unwrap_or(20))
        }
        d => bail!("--device {d}: expected sim, cuda or cuda:N"),
    }
}
