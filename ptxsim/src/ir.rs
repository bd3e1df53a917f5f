//! The pre-decoded instruction form that the parser produces and the executor runs: operands
//! resolved to register indices, immediates and state-space offsets; arithmetic resolved to
//! plain function pointers, so the inner loop never looks at text.

/// Register index, relative to the current function's register base.
pub(crate) type Reg = u32;

/// PTX scalar and packed types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ty {
    B8,
    B16,
    B32,
    B64,
    B128,
    U8,
    U16,
    U32,
    U64,
    S8,
    S16,
    S32,
    S64,
    F16,
    F16x2,
    BF16,
    BF16x2,
    F32,
    F64,
    Pred,
}

impl Ty {
    pub(crate) fn parse(s: &str) -> Option<Ty> {
        use Ty::*;
        Some(match s {
            "b8" => B8,
            "b16" => B16,
            "b32" => B32,
            "b64" => B64,
            "b128" => B128,
            "u8" => U8,
            "u16" => U16,
            "u32" => U32,
            "u64" => U64,
            "s8" => S8,
            "s16" => S16,
            "s32" => S32,
            "s64" => S64,
            "f16" => F16,
            "f16x2" => F16x2,
            "bf16" => BF16,
            "bf16x2" => BF16x2,
            "f32" => F32,
            "f64" => F64,
            "pred" => Pred,
            _ => return None,
        })
    }
    pub(crate) fn bytes(self) -> u32 {
        use Ty::*;
        match self {
            B8 | U8 | S8 | Pred => 1,
            B16 | U16 | S16 | F16 | BF16 => 2,
            B32 | U32 | S32 | F32 | F16x2 | BF16x2 => 4,
            B64 | U64 | S64 | F64 => 8,
            B128 => 16,
        }
    }
    pub(crate) fn signed(self) -> bool {
        matches!(self, Ty::S8 | Ty::S16 | Ty::S32 | Ty::S64)
    }
    pub(crate) fn is_float(self) -> bool {
        matches!(self, Ty::F16 | Ty::F16x2 | Ty::BF16 | Ty::BF16x2 | Ty::F32 | Ty::F64)
    }
}

/// Special registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sreg {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    Laneid,
    Warpid,
    Nwarpid,
    LanemaskEq,
    LanemaskLt,
    LanemaskLe,
    LanemaskGt,
    LanemaskGe,
    Clock,
    Clock64,
    Smid,
    DynSmem,
    TotalSmem,
}

/// A source operand.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Src {
    R(Reg),
    I(u64),
    S(Sreg),
    /// Device address of module-scope global/const variable #n.
    G(u32),
    /// Per-thread local address: current frame's local base + offset.
    L(u32),
}

/// State spaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Space {
    Global,
    Shared,
    Local,
    /// Kernel parameters (one buffer per launch).
    Param,
    /// Per-thread parameters of `.func` calls (offset from the frame's param base).
    FParam,
    Const,
    Generic,
}

impl Space {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Space::Global => "global",
            Space::Shared => "shared",
            Space::Local => "local",
            Space::Param | Space::FParam => "param",
            Space::Const => "const",
            Space::Generic => "generic",
        }
    }
}

/// An address operand `[base+off]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Addr {
    pub(crate) base: Src,
    pub(crate) off: i64,
}

/// Arithmetic on raw register bits: `f(mode, a, b, c)`.
pub(crate) type AluFn = fn(u8, u64, u64, u64) -> u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShflMode {
    Idx,
    Up,
    Down,
    Bfly,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AtomOp {
    Add,
    Min,
    Max,
    Inc,
    Dec,
    And,
    Or,
    Xor,
    Exch,
    Cas,
}

/// Conversion spec for `cvt`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CvtSpec {
    pub(crate) dst: Ty,
    pub(crate) src: Ty,
    pub(crate) rnd: Option<crate::num::Rnd>,
    /// Integer rounding (.rni etc.) for float->float.
    pub(crate) int_rnd: bool,
    pub(crate) ftz: bool,
    pub(crate) sat: bool,
    pub(crate) relu: bool,
}

/// Instruction class for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Class {
    Int = 0,
    F32 = 1,
    F64 = 2,
    Half = 3,
    Sfu = 4,
    Cvt = 5,
    Mov = 6,
    Load = 7,
    Store = 8,
    Atomic = 9,
    Branch = 10,
    Barrier = 11,
    Warp = 12,
    Tensor = 13,
    AsyncCopy = 14,
    Other = 15,
}
pub(crate) const NCLASS: usize = 16;

/// Decoded operations.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Alu { f: AluFn, m: u8, d: Reg, a: Src, b: Src, c: Src },
    /// Two destinations from one lane computation (e.g. `%r|%p` forms are separate ops).
    Setp { f: AluFn, m: u8, d: Reg, dn: Option<Reg>, a: Src, b: Src, comb: Option<(BoolOp, Src, bool)> },
    Selp { d: Reg, a: Src, b: Src, p: Src },
    Mov { d: Reg, a: Src, mask: u64 },
    Pack { d: Reg, parts: Box<[Src]>, bits: u32 },
    Unpack { ds: Box<[Option<Reg>]>, a: Src, bits: u32 },
    Cvt { d: Reg, a: Src, spec: CvtSpec },
    /// `cvt.rn.{bf16x2,f16x2}.f32 d, a, b`: d = {cvt(a) << 16 | cvt(b)}.
    CvtPack { d: Reg, a: Src, b: Src, bf: bool, relu: bool, rnd: crate::num::Rnd },
    Cvta { to: bool, sp: Space, d: Reg, a: Src },
    Ld { sp: Space, size: u8, signed: bool, ds: Box<[Option<Reg>]>, addr: Addr },
    St { sp: Space, size: u8, vals: Box<[Src]>, addr: Addr },
    Atom { sp: Space, op: AtomOp, ty: Ty, d: Option<Reg>, addr: Addr, b: Src, c: Src },
    Bra { t: u32 },
    Bar { id: Src, cnt: Option<Src>, arrive: bool, red: Option<(u8, Reg, Src, bool)> },
    /// `bar.warp.sync membermask` (`__syncwarp`): each executing lane waits until every
    /// non-exited lane of its mask has executed a `bar.warp.sync` with the same mask.
    WarpSync { mask: Src },
    Shfl { mode: ShflMode, d: Reg, dp: Option<Reg>, a: Src, b: Src, c: Src, mask: Src },
    Vote { mode: VoteMode, d: Reg, a: Src, neg: bool, mask: Src },
    Activemask { d: Reg },
    Redux { op: AtomOp, signed: bool, d: Reg, a: Src, mask: Src },
    Match { all: bool, wide: bool, d: Reg, dp: Option<Reg>, a: Src, mask: Src },
    Call { func: u32, rets: Box<[u32]>, args: Box<[(u32, u32)]> },
    Ret,
    Exit,
    Nop,
    Trap,
    /// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (and m16n8k8).
    Mma { bf: bool, k: u8, d: [Reg; 4], a: [Src; 4], b: [Src; 2], c: [Src; 4] },
    Ldmatrix { num: u8, trans: bool, ds: [Reg; 4], addr: Addr, sp: Space },
    Stmatrix { num: u8, trans: bool, vals: [Src; 4], addr: Addr, sp: Space },
    CpAsync { dst: Addr, src: Addr, size: u8, src_size: Option<Src> },
    CpCommit,
    CpWait { n: u32 },
}

/// One instruction with its guard and PTX source line.
#[derive(Clone, Debug)]
pub(crate) struct Inst {
    pub(crate) op: Op,
    pub(crate) guard: Option<(Reg, bool)>,
    pub(crate) line: u32,
    pub(crate) class: Class,
}
