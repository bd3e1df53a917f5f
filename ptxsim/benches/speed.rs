//! Simulator speed: lane-instructions per second on one core for SIMT kernels compiled by
//! NVRTC (tiled fp32 GEMM with shared memory, and saxpy). Run:
//! `cargo bench -p ptxsim --bench speed` (race checking on and off).
use ptxsim::{Device, LaunchOptions, Module, ParamValue as P};
use std::time::Instant;

fn compile(file: &str) -> Option<Module> {
    let nv = match ptxsim::nvrtc::Nvrtc::load() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("skipping: {e}");
            return None;
        }
    };
    let src = std::fs::read_to_string(format!("{}/tests/kernels/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut opts = vec!["--gpu-architecture=compute_80".to_string()];
    opts.extend(ptxsim::nvrtc::include_dirs().into_iter().map(|d| format!("-I{d}")));
    Some(Module::parse(&nv.compile(file, &src, &opts).unwrap()).unwrap())
}

/// CPU seconds used by this process (user + system), from /proc; the build machine is shared,
/// so wall time overstates the simulator's cost.
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn report(name: &str, f: impl Fn() -> ptxsim::LaunchStats) {
    f(); // warm up
    let c = cpu_seconds();
    let t = Instant::now();
    let mut lanes = 0u64;
    let mut iters = 0;
    while t.elapsed().as_secs_f64() < 2.0 {
        lanes += f().lane_instructions;
        iters += 1;
    }
    let s = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - c;
    println!(
        "{name:40} {:7.1} M lane-instr/s per CPU second ({:.1} M/s wall; {iters} launches of {:.1} M lane-instr)",
        lanes as f64 / cpu / 1e6,
        lanes as f64 / s / 1e6,
        lanes as f64 / iters as f64 / 1e6
    );
}

fn main() {
    let Some(gemm) = compile("gemm.cu") else { return };
    let Some(saxpy) = compile("saxpy.cu") else { return };
    let (m, n, k) = (128usize, 128usize, 128usize);
    let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.25 - 1.0).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect();
    let mut dev = Device::new();
    let (da, db, dc) = (dev.upload(&a), dev.upload(&b), dev.alloc((m * n * 4) as u64));
    let nx = 1 << 18;
    let dx = dev.upload(&vec![1.5f32; nx]);
    let dy = dev.upload(&vec![-0.5f32; nx]);
    let dev = std::cell::RefCell::new(dev);
    for race in [false, true] {
        let o = LaunchOptions { race_check: race, ..Default::default() };
        report(&format!("gemm_tiled 128^3 (race_check={race})"), || {
            dev.borrow_mut()
                .launch(&gemm, "gemm_tiled", (8, 8, 1), (16, 16, 1), 0, &[P::Ptr(da), P::Ptr(db), P::Ptr(dc), P::I32(m as i32), P::I32(n as i32), P::I32(k as i32)], &o)
                .unwrap()
        });
        report(&format!("saxpy 2^18 (race_check={race})"), || {
            dev.borrow_mut().launch(&saxpy, "saxpy", (64, 1, 1), (256, 1, 1), 0, &[P::I32(nx as i32), P::F32(0.5), P::Ptr(dx), P::Ptr(dy)], &o).unwrap()
        });
    }
}
