//! CPU time per forward + backward step (2 x 256 tokens, the default model's shape, seeded
//! random weights: the step of benches/forward_backward.rs), from `getrusage`: user + system
//! seconds of the process per step, beside wall seconds. For A/B runs on a machine that other
//! work keeps busy, where wall time says little and CPU time stays close to the idle cost.
//!
//!     cargo bench --bench fb_cpu_time -- [f32|bf16] [STEPS]
//!
//! One untimed warm-up step, then STEPS (default 3) timed ones; prints one line per step and the
//! median.

use ipo::backend::cpu::CpuBackend;
use ipo::backend::Precision;
use ipo::model::transformer::{Batch, Transformer};
use std::time::Instant;

#[path = "common/smollm2.rs"]
mod smollm2;
use smollm2::{random_weights, smol_config, Rng};

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    s(u.ru_utime) + s(u.ru_stime)
}

fn main() {
    // cargo bench passes `--bench`; the rest are ours.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let precision = match args.first().map(String::as_str).unwrap_or("bf16") {
        "f32" => Precision::F32,
        "bf16" => Precision::Bf16,
        other => panic!("precision {other:?}: expected f32 or bf16"),
    };
    let steps: usize = args.get(1).map(|s| s.parse().expect("STEPS: a whole number")).unwrap_or(3);
    let cfg = smol_config(30);
    let model = Transformer::with_backend(CpuBackend::with_precision(precision), cfg.clone(), random_weights(&cfg, &mut Rng(0x2545F4914F6CDD1D))).unwrap();
    let seqs: Vec<Vec<u32>> = (0..2u32).map(|b| (0..256u32).map(|i| (i * 7919 + b * 104729) % 49152).collect()).collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    let batch = Batch::from_sequences(&refs);
    let dlogp = vec![1.0f32; batch.rows.len()];
    let step = || {
        let mut grads = model.zero_grads();
        let (_, tape) = model.forward(&batch).unwrap();
        model.backward(&batch, tape, &dlogp, &mut grads);
        grads
    };
    drop(step());
    let mut cpu = Vec::new();
    for i in 0..steps {
        let (c0, t0) = (cpu_seconds(), Instant::now());
        drop(step());
        let (c, w) = (cpu_seconds() - c0, t0.elapsed().as_secs_f64());
        println!("step {i}: {c:.3} CPU s, {w:.3} wall s");
        cpu.push(c);
    }
    cpu.sort_by(f64::total_cmp);
    println!("{} median: {:.3} CPU s/step over {steps} steps", precision.name(), cpu[steps / 2]);
}
