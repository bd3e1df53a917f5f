//! Prints the PTX NVRTC emits for a .cu file: `cargo run -p ptxsim --example nvrtc_ptx -- file.cu [compute_80]`.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let src = std::fs::read_to_string(&args[1]).expect("read .cu");
    let arch = args.get(2).cloned().unwrap_or_else(|| "compute_80".into());
    let nv = ptxsim::nvrtc::Nvrtc::load().expect("load nvrtc");
    let mut opts = vec![format!("--gpu-architecture={arch}"), "-std=c++17".to_string()];
    opts.extend(ptxsim::nvrtc::include_dirs().into_iter().map(|d| format!("-I{d}")));
    match nv.compile(&args[1], &src, &opts) {
        Ok(p) => print!("{p}"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    }
}
