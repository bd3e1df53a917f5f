//! ptxsim: parses and executes the PTX that NVRTC emits, on the CPU, so every CUDA kernel is
//! run and checked in CI without a GPU (DESIGN.md section 6). Public surface: `Module::parse`,
//! `Device` (memory + `launch`), `ParamValue`, `LaunchOptions`, `LaunchStats`, `Error`, and the
//! NVRTC loader in `nvrtc`.

mod alu;
mod exec;
mod ir;
mod mem;
mod num;
pub mod cudalib;
pub mod nvrtc;
mod parse;
mod tensor;

pub use ir::Class;
pub use mem::DevicePtr;
pub use parse::Module;

use std::collections::HashMap;

/// Everything that can go wrong, with the kernel, PTX line, thread and address where known.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("PTX parse error at line {line}: {msg}")]
    Parse { line: u32, msg: String },
    #[error("launch error: {0}")]
    Launch(String),
    #[error("kernel {kernel}, PTX line {line}, ctaid {ctaid:?}, tid {tid:?}: {msg}")]
    Exec { kernel: String, line: u32, ctaid: [u32; 3], tid: [u32; 3], msg: String },
    #[error("device memory: {0}")]
    Memory(String),
}

/// A kernel argument, packed into the parameter buffer by the kernel's declared layout.
#[derive(Clone, Debug)]
pub enum ParamValue {
    U8(u8),
    U16(u16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Ptr(DevicePtr),
    /// A struct or array passed by value.
    Bytes(Vec<u8>),
}

impl ParamValue {
    fn bytes(&self) -> Vec<u8> {
        match self {
            ParamValue::U8(v) => v.to_le_bytes().to_vec(),
            ParamValue::U16(v) => v.to_le_bytes().to_vec(),
            ParamValue::U32(v) => v.to_le_bytes().to_vec(),
            ParamValue::I32(v) => v.to_le_bytes().to_vec(),
            ParamValue::U64(v) | ParamValue::Ptr(v) => v.to_le_bytes().to_vec(),
            ParamValue::I64(v) => v.to_le_bytes().to_vec(),
            ParamValue::F32(v) => v.to_le_bytes().to_vec(),
            ParamValue::F64(v) => v.to_le_bytes().to_vec(),
            ParamValue::Bytes(b) => b.clone(),
        }
    }
}

/// Launch options.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Seed of the CTA order and the warp interleaving.
    pub seed: u64,
    /// Report conflicting shared-memory accesses by different warps between two barriers.
    pub race_check: bool,
    /// Abort after this many warp-instructions (catches infinite loops).
    pub max_instructions: u64,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions { seed: 1, race_check: true, max_instructions: 20_000_000_000 }
    }
}

/// Counters of one launch. Byte counters are indexed by state space:
/// 0 global (incl. const), 1 shared, 2 local, 3 param, 4 reserved.
#[derive(Clone, Debug, Default)]
pub struct LaunchStats {
    pub ctas: u64,
    pub warp_instructions: u64,
    /// Instructions times active lanes.
    pub lane_instructions: u64,
    /// Lane-instructions per `Class` (index with `Class as usize`).
    pub by_class: [u64; ir::NCLASS],
    pub bytes_loaded: [u64; 5],
    pub bytes_stored: [u64; 5],
    /// Completed barriers (all CTAs).
    pub barriers: u64,
}

impl LaunchStats {
    pub fn global_bytes_loaded(&self) -> u64 {
        self.bytes_loaded[0]
    }
    pub fn global_bytes_stored(&self) -> u64 {
        self.bytes_stored[0]
    }
    pub fn shared_bytes(&self) -> u64 {
        self.bytes_loaded[1] + self.bytes_stored[1]
    }
}

/// Plain-data element types that can be copied to and from device memory.
pub trait Scalar: Copy {
    const SIZE: usize;
    fn to_le(self, out: &mut Vec<u8>);
    fn from_le(b: &[u8]) -> Self;
}
macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn to_le(self, out: &mut Vec<u8>) { out.extend_from_slice(&self.to_le_bytes()); }
            fn from_le(b: &[u8]) -> Self { <$t>::from_le_bytes(b.try_into().unwrap()) }
        }
    )*};
}
scalar!(u8, i8, u16, i16, u32, i32, u64, i64, f32, f64, half::f16, half::bf16);

/// A simulated device: global memory plus per-module variables.
#[derive(Default)]
pub struct Device {
    mem: mem::Memory,
    modvars: HashMap<u64, Vec<u64>>,
}

impl Device {
    pub fn new() -> Device {
        Device::default()
    }

    /// Allocate `bytes` of zeroed device memory.
    pub fn alloc(&mut self, bytes: u64) -> DevicePtr {
        self.mem.alloc(bytes)
    }

    pub fn free(&mut self, p: DevicePtr) -> Result<(), Error> {
        if self.mem.free(p) {
            Ok(())
        } else {
            Err(Error::Memory(format!("free of {p:#x}, which is not a live allocation")))
        }
    }

    pub fn write(&mut self, p: DevicePtr, data: &[u8]) -> Result<(), Error> {
        let desc = self.mem.describe(p);
        let s = self.mem.slice(p, data.len()).ok_or_else(|| Error::Memory(format!("host write of {} bytes at {p:#x}: {desc}", data.len())))?;
        s.copy_from_slice(data);
        Ok(())
    }

    pub fn read(&mut self, p: DevicePtr, len: usize) -> Result<Vec<u8>, Error> {
        let desc = self.mem.describe(p);
        let s = self.mem.slice(p, len).ok_or_else(|| Error::Memory(format!("host read of {len} bytes at {p:#x}: {desc}")))?;
        Ok(s.to_vec())
    }

    /// Allocate and fill with `data`.
    pub fn upload<T: Scalar>(&mut self, data: &[T]) -> DevicePtr {
        let mut b = Vec::with_capacity(data.len() * T::SIZE);
        for x in data {
            x.to_le(&mut b);
        }
        let p = self.alloc(b.len() as u64);
        self.write(p, &b).unwrap();
        p
    }

    pub fn write_slice<T: Scalar>(&mut self, p: DevicePtr, data: &[T]) -> Result<(), Error> {
        let mut b = Vec::with_capacity(data.len() * T::SIZE);
        for x in data {
            x.to_le(&mut b);
        }
        self.write(p, &b)
    }

    pub fn read_vec<T: Scalar>(&mut self, p: DevicePtr, n: usize) -> Result<Vec<T>, Error> {
        let b = self.read(p, n * T::SIZE)?;
        Ok(b.chunks_exact(T::SIZE).map(T::from_le).collect())
    }

    fn module_vars(&mut self, m: &Module) -> &Vec<u64> {
        if !self.modvars.contains_key(&m.id) {
            let mut v = Vec::new();
            for g in &m.globals {
                let p = self.mem.alloc(g.size.max(1).div_ceil(g.align.max(1)) * g.align.max(1));
                self.mem.slice(p, g.init.len()).unwrap().copy_from_slice(&g.init);
                v.push(p);
            }
            self.modvars.insert(m.id, v);
        }
        &self.modvars[&m.id]
    }

    /// Device address of a module-scope `.global` / `.const` variable.
    pub fn symbol(&mut self, m: &Module, name: &str) -> Result<DevicePtr, Error> {
        let i = m.globals.iter().position(|g| g.name == name).ok_or_else(|| Error::Launch(format!("no module variable {name}")))?;
        Ok(self.module_vars(m)[i])
    }

    /// Run `kernel` over `grid` x `block` threads with `dyn_smem` bytes of dynamic shared memory.
    pub fn launch(
        &mut self,
        m: &Module,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        dyn_smem: u32,
        params: &[ParamValue],
        opts: &LaunchOptions,
    ) -> Result<LaunchStats, Error> {
        let f = m.func_idx.get(kernel).map(|&i| &m.funcs[i as usize]).filter(|f| f.entry && f.defined).ok_or_else(|| {
            Error::Launch(format!("no kernel {kernel} in module (kernels: {:?})", m.kernels()))
        })?;
        if params.len() != f.params.len() {
            return Err(Error::Launch(format!("kernel {kernel} takes {} parameters, {} given", f.params.len(), params.len())));
        }
        let mut buf = vec![0u8; f.param_size as usize];
        for (i, (p, d)) in params.iter().zip(&f.params).enumerate() {
            let b = p.bytes();
            if b.len() != d.size as usize {
                return Err(Error::Launch(format!("kernel {kernel} parameter {i} ({}) is {} bytes, {} given ({p:?})", d.name, d.size, b.len())));
            }
            buf[d.offset as usize..d.offset as usize + b.len()].copy_from_slice(&b);
        }
        let gaddr = self.module_vars(m).clone();
        let l = exec::Launch {
            m,
            kernel: f,
            kname: kernel,
            gaddr: &gaddr,
            params: buf,
            grid: [grid.0, grid.1, grid.2],
            block: [block.0, block.1, block.2],
            dyn_smem,
            opts,
        };
        exec::launch(&l, &mut self.mem)
    }
}
