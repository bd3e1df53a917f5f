//! `--device cpu | sim | cuda[:N]` (config key `device`): the one device parser, shared by
//! every workflow that runs the model and by every subcommand's `--device` flag.
//!
//! - `cpu`: `CpuBackend<f32>`, the reference (rayon threads over the CPU cores).
//! - `cuda` / `cuda:N`: `CudaBackend<Cudarc>` on GPU N (driver API + cuBLAS, kernels built by
//!   NVRTC for the device's architecture). "No GPU" or "no NVRTC" is an error naming the flag.
//! - `sim`: `CudaBackend<Sim>`: the same host code and PTX run in ptxsim on this CPU. Orders of
//!   magnitude slower than either; meant for checking the CUDA path on tiny models.
//!
//! `with_backend!(device, be => { ... })` expands the block once per backend type, so the
//! code that uses the model is written once and monomorphised for each backend.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{CudaBackend, Cudarc, Sim};
use crate::backend::Precision;
use anyhow::{bail, Context, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Sim,
    Cuda(usize),
}

/// The help text of every `--device` flag.
pub(crate) const HELP: &str = "Where to run: cpu (the reference, all cores), cuda or cuda:N (GPU N: CUDA driver + cuBLAS, kernels compiled by NVRTC at run time), or sim (the CUDA kernels in the PTX simulator on this CPU: very slow, for checking the CUDA path on tiny models)";

impl Device {
    /// Parses a `--device` value; errors name the flag and the accepted forms.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "sim" => Ok(Device::Sim),
            "cuda" => Ok(Device::Cuda(0)),
            d => match d.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map(Device::Cuda).map_err(|_| anyhow::anyhow!("--device {d}: expected cuda:N with N a GPU ordinal (0, 1, ...)")),
                None => bail!("--device {d}: unknown device (expected cpu, cuda, cuda:N or sim)"),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Sim => write!(f, "sim"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Device> {
        Device::parse(s)
    }
}

impl<'de> serde::Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Device::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The help text of every `--precision` flag.
pub(crate) const PRECISION_HELP: &str = "Arithmetic of the products: f32 (the reference; the default on cpu), bf16 (operands rounded to bf16, sums in f32: cpu AVX512_BF16 GEMMs on weights packed once, cuda cuBLAS bf16, the tensor-core attention forward and backward and lm-head, with frozen weights, the KV cache and the saved activations but the residual stream stored in bf16; trained weights, master copies, gradients and optimizer state stay f32), q8 (cpu only, for rollouts: 8-bit weights in blocks of 32, like llama.cpp's Q8_0) or q4 (cpu only, for rollouts: 4-bit weights in blocks of 32 with a scale and a minimum, llama.cpp's Q4_1 blocks). Default: bf16 on cuda, f32 on cpu and sim (the simulator is the parity tool: pass --precision bf16 to run cuda's default path on it)";

/// The precision a command runs at on `device`: `flag` when given, else bf16 on a real GPU and
/// f32 on the CPU and the simulator. `IPO_PRECISION`, which chose the CUDA precision before
/// `--precision` existed, is refused with the flag to use instead.
pub(crate) fn resolve_precision(device: Device, flag: Option<Precision>) -> Result<Precision> {
    if let Some(v) = std::env::var("IPO_PRECISION").ok().filter(|v| !v.trim().is_empty()) {
        bail!("IPO_PRECISION={v} is no longer read: pass --precision {} (in ipo run's config: precision = \"{}\"), or unset it", v.trim(), v.trim());
    }
    Ok(flag.unwrap_or(match device {
        Device::Cuda(_) => Precision::Bf16,
        Device::Cpu | Device::Sim => Precision::F32,
    }))
}

/// Parses a `--precision` value; errors name the flag.
pub fn parse_precision(s: &str) -> Result<Precision> {
    Precision::parse(s).map_err(|e| anyhow::anyhow!("--precision {s}: {e}"))
}

/// Where a workflow runs its model; flattened into every subcommand and stage table.
#[derive(clap::Args, serde::Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct DeviceOptions {
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = Device::parse, help = HELP)]
    pub device: Device,
    #[arg(long, value_name = "PRECISION", value_parser = parse_precision, help = PRECISION_HELP)]
    #[serde(deserialize_with = "precision_from_str")]
    pub precision: Option<Precision>,
}

fn precision_from_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Precision>, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    Precision::parse(&s).map(Some).map_err(serde::de::Error::custom)
}

pub(crate) fn cpu(precision: Option<Precision>) -> Result<CpuBackend<f32>> {
    Ok(CpuBackend::with_precision(resolve_precision(Device::Cpu, precision)?))
}

pub(crate) fn sim(precision: Option<Precision>) -> Result<CudaBackend<Sim>> {
    eprintln!("note: --device sim runs every kernel in the PTX simulator: every instruction is interpreted on this CPU, so expect it to be far slower than --device cpu");
    let be = CudaBackend::sim().context("--device sim: the CUDA backend on the PTX simulator")?;
    set_cuda_precision(&be, resolve_precision(Device::Sim, precision)?)?;
    Ok(be)
}

fn set_cuda_precision<G: crate::backend::cuda::Gpu>(be: &CudaBackend<G>, precision: Precision) -> Result<()> {
    if let Precision::Q8 | Precision::Q4 = precision {
        let bits = if precision == Precision::Q8 { 8 } else { 4 };
        bail!("--precision {precision}: {bits}-bit weights exist on --device cpu only; use bf16 or f32 on {}", if be.gpu().name().contains("sim") { "sim" } else { "cuda" });
    }
    be.set_precision(precision);
    Ok(())
}

static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `ipo --verbose`: opening a CUDA device prints where each CUDA library was found.
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn cuda(ordinal: usize, precision: Option<Precision>) -> Result<CudaBackend<Cudarc>> {
    if VERBOSE.load(std::sync::atomic::Ordering::Relaxed) {
        for line in crate::backend::cuda::library_report() {
            eprintln!("{line}");
        }
    }
    let precision = resolve_precision(Device::Cuda(ordinal), precision)?;
    let be = CudaBackend::cuda(ordinal).with_context(|| format!("--device cuda:{ordinal}"))?;
    set_cuda_precision(&be, precision)?;
    Ok(be)
}

/// Runs `$body` with `$be` bound to the backend of `$opts` (a `DeviceOptions`: device and
/// precision); the body's value (a `Result`) is the value of the whole expression. Errors
/// creating the backend are returned with `?` from the enclosing function.
macro_rules! with_backend {
    ($opts:expr, $be:ident => $body:block) => {{
        let opts: &$crate::workflow::device::DeviceOptions = &$opts;
        match opts.device {
            $crate::workflow::device::Device::Cpu => {
                let $be = $crate::workflow::device::cpu(opts.precision)?;
                $body
            }
            $crate::workflow::device::Device::Sim => {
                let $be = $crate::workflow::device::sim(opts.precision)?;
                $body
            }
            $crate::workflow::device::Device::Cuda(n) => {
                let $be = $crate::workflow::device::cuda(n, opts.precision)?;
                $body
            }
        }
    }};
}
pub(crate) use with_backend;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_names_the_flag_on_errors() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("sim").unwrap(), Device::Sim);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = Device::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--device {bad}:")), "{e}");
        }
        assert_eq!(Device::parse("cuda:2").unwrap().to_string(), "cuda:2");
    }

    #[test]
    fn bf16_is_the_default_on_a_real_gpu_only() {
        // Holds when the test runs without the retired IPO_PRECISION (which is refused).
        assert_eq!(resolve_precision(Device::Cuda(1), None).unwrap(), Precision::Bf16);
        assert_eq!(resolve_precision(Device::Sim, None).unwrap(), Precision::F32);
        assert_eq!(resolve_precision(Device::Cpu, None).unwrap(), Precision::F32);
        assert_eq!(resolve_precision(Device::Cuda(0), Some(Precision::F32)).unwrap(), Precision::F32);
        assert_eq!(resolve_precision(Device::Cpu, Some(Precision::Q8)).unwrap(), Precision::Q8);
        assert_eq!(resolve_precision(Device::Cpu, Some(Precision::Q4)).unwrap(), Precision::Q4);
    }
}
