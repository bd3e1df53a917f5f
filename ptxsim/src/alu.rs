//! Lane arithmetic: every PTX ALU instruction becomes one `AluFn` chosen at decode time from
//! its opcode, modifiers and type. Registers hold raw bits; narrower values are read from the
//! low bits. Float ops honour `.rn/.rz/.rm/.rp`, `.ftz` and `.sat` through the mode byte.

use crate::ir::{AluFn, Class, Ty};
use crate::num::*;
use half::{bf16, f16};

// mode byte: bits 0-1 rounding, bit 2 ftz, bit 3 sat, bits 4-7 op-specific (setp compare,
// min/max .NaN, prmt mode, shf clamp, bfind shiftamt, approx).
pub(crate) const M_FTZ: u8 = 4;
pub(crate) const M_SAT: u8 = 8;
pub(crate) const M_X: u8 = 16;

#[inline(always)]
pub(crate) fn rnd_of(m: u8) -> Rnd {
    match m & 3 {
        0 => Rnd::N,
        1 => Rnd::Z,
        2 => Rnd::M,
        _ => Rnd::P,
    }
}

#[inline(always)]
fn fin(m: u8, x: u64) -> f32 {
    let v = f32_of(x);
    if m & M_FTZ != 0 {
        ftz32(v)
    } else {
        v
    }
}
#[inline(always)]
fn fout(m: u8, r: f32) -> u64 {
    let r = if m & M_SAT != 0 { sat32(r) } else { r };
    let r = if m & M_FTZ != 0 { ftz32(r) } else { r };
    if r.is_nan() {
        0x7fff_ffff
    } else {
        b32(r)
    }
}
#[inline(always)]
fn dout(m: u8, r: f64) -> u64 {
    let r = if m & M_SAT != 0 { sat64(r) } else { r };
    if r.is_nan() {
        0x7fff_ffff_ffff_ffff
    } else {
        b64(r)
    }
}

// ---------------------------------------------------------------- f32
fn add_f32(m: u8, a: u64, b: u64, _: u64) -> u64 {
    let (x, y) = (fin(m, a), fin(m, b));
    let r = x + y;
    let r = if m & 3 == 0 { r } else {
        let (hi, lo) = two_sum(x as f64, y as f64);
        f32_op(r, hi, lo, rnd_of(m))
    };
    fout(m, r)
}
fn sub_f32(m: u8, a: u64, b: u64, _: u64) -> u64 {
    add_f32(m, a, b ^ 0x8000_0000, 0)
}
fn mul_f32(m: u8, a: u64, b: u64, _: u64) -> u64 {
    let (x, y) = (fin(m, a), fin(m, b));
    let r = x * y;
    let r = if m & 3 == 0 { r } else { f32_op(r, x as f64 * y as f64, 0.0, rnd_of(m)) };
    fout(m, r)
}
fn fma_f32(m: u8, a: u64, b: u64, c: u64) -> u64 {
    let (x, y, z) = (fin(m, a), fin(m, b), fin(m, c));
    let r = x.mul_add(y, z);
    let r = if m & 3 == 0 { r } else {
        let (hi, lo) = two_sum(x as f64 * y as f64, z as f64);
        f32_op(r, hi, lo, rnd_of(m))
    };
    fout(m, r)
}
fn div_f32(m: u8, a: u64, b: u64, _: u64) -> u64 {
    let (x, y) = (fin(m, a), fin(m, b));
    let r = x / y;
    let r = if m & 3 == 0 || !r.is_finite() { r } else {
        // sign of exact - r from the f64 remainder x - r*y (exact with fma)
        let rem = (-(r as f64)).mul_add(y as f64, x as f64);
        f32_op(r, r as f64, rem * (y as f64).signum(), rnd_of(m))
    };
    fout(m, r)
}
fn sqrt_f32(m: u8, a: u64, _: u64, _: u64) -> u64 {
    let x = fin(m, a);
    let r = x.sqrt();
    let r = if m & 3 == 0 || !r.is_finite() { r } else {
        let rem = (-(r as f64)).mul_add(r as f64, x as f64);
        f32_op(r, r as f64, rem, rnd_of(m))
    };
    fout(m, r)
}
fn rcp_f32(m: u8, a: u64, _: u64, _: u64) -> u64 {
    div_f32(m, b32(1.0), a, 0)
}
fn min_f32(m: u8, a: u64, b: u64, _: u64) -> u64 {
    let (x, y) = (fin(m, a), fin(m, b));
    if m & M_X != 0 && (x.is_nan() || y.is_nan()) {
        return 0x7fff_ffff;
    }
    // -0 < +0 for min/max (sm_80 behaviour)
    let r = if x.is_nan() { y } else if y.is_nan() { x } else if x == y { if x.is_sign_negative() { x } else { y } } else { x.min(y) };
    fout(m, r)
}
fn max_f32(m: u8, a: u64, b: u64, _: u64) -> u64 {
    let (x, y) = (fin(m, a), fin(m, b));
    if m & M_X != 0 && (x.is_nan() || y.is_nan()) {
        return 0x7fff_ffff;
    }
    let r = if x.is_nan() { y } else if y.is_nan() { x } else if x == y { if x.is_sign_negative() { y } else { x } } else { x.max(y) };
    fout(m, r)
}
fn abs_f32(m: u8, a: u64, _: u64, _: u64) -> u64 {
    let x = fin(m, a);
    if x.is_nan() { return a & 0x7fff_ffff; }
    b32(x.abs())
}
fn neg_f32(m: u8, a: u64, _: u64, _: u64) -> u64 {
    let x = fin(m, a);
    if x.is_nan() { return a as u32 as u64 ^ 0x8000_0000; }
    b32(-x)
}
/// Approximate functions: ptxsim evaluates them in f64 and rounds once to f32, so results are
/// within 1 ulp of the exact value -- tighter than hardware (PTX ISA: ex2/lg2 ~2 ulp,
/// rsqrt/rcp.approx ~1 ulp, sin/cos abs err 2^-20.9 in [-pi, pi], tanh rel err 2^-11).
/// Kernel tests must use tolerances no tighter than the hardware bounds.
fn ex2_f32(m: u8, a: u64, _: u64, _: u64) -> u64 {
    fout(m, fin(m, a).exp2_f64())
}
fn lg2_f32(m: u8, a: u64, _: u64, _: u64) -> u64 {
    fout(m, (fin(m, a) as f64).log2() as f32)
}
fn rsqrt_f32(m: u8, a: u64, _: u64, _: u64) -> u64 {
    fout(m, (1.0 / (fin(m, a) as f64).sqrt()) as f32)
}
fn sin_f32(m: u8, a: u64, _: u64, _: u64) -> u64 {
    fout(m, (fin(m, a) as f64).sin() as f32)
}
fn cos_f32(m: u8, a: u64, _: u64, _: u64) -> u64 {
    fout(m, (fin(m, a) as f64).cos() as f32)
}
fn tanh_f32(m: u8, a: u64, _: u64, _: u64) -> u64 {
    fout(m, (fin(m, a) as f64).tanh() as f32)
}
fn copysign_f32(_: u8, a: u64, b: u64, _: u64) -> u64 {
    // copysign.f32 d, a, b: magnitude of b, sign of a
    ((b as u32 & 0x7fff_ffff) | (a as u32 & 0x8000_0000)) as u64
}
trait Exp2F64 {
    fn exp2_f64(self) -> f32;
}
impl Exp2F64 for f32 {
    fn exp2_f64(self) -> f32 {
        (self as f64).exp2() as f32
    }
}

// ---------------------------------------------------------------- f64
fn din(x: u64) -> f64 {
    f64_of(x)
}
fn add_f64(m: u8, a: u64, b: u64, _: u64) -> u64 {
    let (x, y) = (din(a), din(b));
    let (s, e) = two_sum(x, y);
    dout(m, f64_dir(s, e, rnd_of(m)))
}
fn sub_f64(m: u8, a: u64, b: u64, _: u64) -> u64 {
    add_f64(m, a, b ^ (1 << 63), 0)
}
fn mul_f64(m: u8, a: u64, b: u64, _: u64) -> u64 {
    let (x, y) = (din(a), din(b));
    let r = x * y;
    let e = if m & 3 == 0 { 0.0 } else { x.mul_add(y, -r) };
    dout(m, f64_dir(r, e, rnd_of(m)))
}
fn fma_f64(m: u8, a: u64, b: u64, c: u64) -> u64 {
    let (x, y, z) = (din(a), din(b), din(c));
    let r = x.mul_add(y, z);
    // directed fma on f64: sign of the residual from an exact two-product
    let e = if m & 3 == 0 || !r.is_finite() { 0.0 } else {
        let p = x * y;
        let pe = x.mul_add(y, -p);
        let (s, se) = two_sum(p, z);
        ((s - r) + se) + pe
    };
    dout(m, f64_dir(r, e, rnd_of(m)))
}
fn div_f64(m: u8, a: u64, b: u64, _: u64) -> u64 {
    let (x, y) = (din(a), din(b));
    let r = x / y;
    let e = if m & 3 == 0 || !r.is_finite() { 0.0 } else { (-r).mul_add(y, x) * y.signum() };
    dout(m, f64_dir(r, e, rnd_of(m)))
}
fn sqrt_f64(m: u8, a: u64, _: u64, _: u64) -> u64 {
    let x = din(a);
    let r = x.sqrt();
    let e = if m & 3 == 0 || !r.is_finite() { 0.0 } else { (-r).mul_add(r, x) };
    dout(m, f64_dir(r, e, rnd_of(m)))
}
fn rcp_f64(m: u8, a: u64, _: u64, _: u64) -> u64 {
    div_f64(m, b64(1.0), a, 0)
}
fn rsqrt_f64(m: u8, a: u64, _: u64, _: u64) -> u64 {
    dout(m, 1.0 / din(a).sqrt())
}
fn min_f64(m: u8, a: u64, b: u64, _: u64) -> u64 {
    let (x, y) = (din(a), din(b));
    if m & M_X != 0 && (x.is_nan() || y.is_nan()) { return 0x7fff_ffff_ffff_ffff; }
    let r = if x.is_nan() { y } else if y.is_nan() { x } else if x == y { if x.is_sign_negative() { x } else { y } } else { x.min(y) };
    dout(m, r)
}
fn max_f64(m: u8, a: u64, b: u64, _: u64) -> u64 {
    let (x, y) = (din(a), din(b));
    if m & M_X != 0 && (x.is_nan() || y.is_nan()) { return 0x7fff_ffff_ffff_ffff; }
    let r = if x.is_nan() { y } else if y.is_nan() { x } else if x == y { if x.is_sign_negative() { y } else { x } } else { x.max(y) };
    dout(m, r)
}
fn abs_f64(_: u8, a: u64, _: u64, _: u64) -> u64 {
    a & !(1 << 63)
}
fn neg_f64(_: u8, a: u64, _: u64, _: u64) -> u64 {
    a ^ (1 << 63)
}

// ---------------------------------------------------------------- f16 / bf16 (scalar, x2)
/// Round hi+lo (exact) to f16 or bf16 bits, round-to-nearest-even.
fn round_half(hi: f64, lo: f64, bf: bool) -> u16 {
    let (r, rv) = if bf {
        let r = bf16_from_f64(hi);
        (r.to_bits(), r.to_f64())
    } else {
        let r = f16_from_f64(hi);
        (r.to_bits(), r.to_f64())
    };
    if lo == 0.0 || !rv.is_finite() || hi == rv {
        return r;
    }
    let other = if hi > rv { if rv >= 0.0 { r + 1 } else { r - 1 } } else if rv > 0.0 { r - 1 } else { r + 1 };
    let ov = if bf { bf16::from_bits(other).to_f64() } else { f16::from_bits(other).to_f64() };
    if hi - rv == ov - hi {
        if (lo > 0.0) == (ov > rv) { other } else { r }
    } else {
        r
    }
}
#[inline(always)]
fn h_in(x: u64, bf: bool, ftz: bool) -> f64 {
    let v = if bf { bh2f(x) } else { h2f(x) } as f64;
    if ftz && !bf && v != 0.0 && v.abs() < 6.103515625e-05 { 0.0f64.copysign(v) } else { v }
}
#[inline(always)]
fn h_out(m: u8, v: f64, lo: f64, bf: bool) -> u64 {
    let v = if m & M_SAT != 0 { sat64(v) } else { v };
    let mut r = round_half(v, if m & M_SAT != 0 { 0.0 } else { lo }, bf);
    if m & M_FTZ != 0 && !bf && r & 0x7c00 == 0 {
        r &= 0x8000;
    }
    if (r & 0x7fff) > if bf { 0x7f80 } else { 0x7c00 } {
        r = 0x7fff; // canonical NaN
    }
    r as u64
}
macro_rules! half_ops {
    ($name:ident, $bf:expr, $x2:expr, |$m:ident, $x:ident, $y:ident, $z:ident| $body:expr) => {
        fn $name(m: u8, a: u64, b: u64, c: u64) -> u64 {
            let one = |a: u64, b: u64, c: u64| -> u64 {
                let ftz = m & M_FTZ != 0;
                let ($m, $x, $y, $z) = (m, h_in(a, $bf, ftz), h_in(b, $bf, ftz), h_in(c, $bf, ftz));
                let (hi, lo): (f64, f64) = $body;
                h_out($m, hi, lo, $bf)
            };
            if $x2 {
                one(a & 0xffff, b & 0xffff, c & 0xffff) | (one((a >> 16) & 0xffff, (b >> 16) & 0xffff, (c >> 16) & 0xffff) << 16)
            } else {
                one(a, b, c)
            }
        }
    };
}
macro_rules! half_family {
    ($bf:expr, $x2:expr, $add:ident, $sub:ident, $mul:ident, $fma:ident, $min:ident, $max:ident, $ex2:ident, $tanh:ident) => {
        half_ops!($add, $bf, $x2, |_m, x, y, _z| two_sum(x, y));
        half_ops!($sub, $bf, $x2, |_m, x, y, _z| two_sum(x, -y));
        half_ops!($mul, $bf, $x2, |_m, x, y, _z| (x * y, 0.0));
        half_ops!($fma, $bf, $x2, |_m, x, y, z| two_sum(x * y, z));
        half_ops!($min, $bf, $x2, |m, x, y, _z| (if m & M_X != 0 && (x.is_nan() || y.is_nan()) { f64::NAN } else if x.is_nan() { y } else if y.is_nan() { x } else if x == y && x.is_sign_negative() { x } else if x == y { y } else { x.min(y) }, 0.0));
        half_ops!($max, $bf, $x2, |m, x, y, _z| (if m & M_X != 0 && (x.is_nan() || y.is_nan()) { f64::NAN } else if x.is_nan() { y } else if y.is_nan() { x } else if x == y && x.is_sign_negative() { y } else if x == y { x } else { x.max(y) }, 0.0));
        half_ops!($ex2, $bf, $x2, |_m, x, _y, _z| (x.exp2(), 0.0));
        half_ops!($tanh, $bf, $x2, |_m, x, _y, _z| (x.tanh(), 0.0));
    };
}
half_family!(false, false, add_h, sub_h, mul_h, fma_h, min_h, max_h, ex2_h, tanh_h);
half_family!(false, true, add_h2, sub_h2, mul_h2, fma_h2, min_h2, max_h2, ex2_h2, tanh_h2);
half_family!(true, false, add_bh, sub_bh, mul_bh, fma_bh, min_bh, max_bh, ex2_bh, tanh_bh);
half_family!(true, true, add_bh2, sub_bh2, mul_bh2, fma_bh2, min_bh2, max_bh2, ex2_bh2, tanh_bh2);
fn neg_h(_: u8, a: u64, _: u64, _: u64) -> u64 {
    (a ^ 0x8000) & 0xffff
}
fn neg_h2(_: u8, a: u64, _: u64, _: u64) -> u64 {
    (a ^ 0x8000_8000) & 0xffff_ffff
}
fn abs_h(_: u8, a: u64, _: u64, _: u64) -> u64 {
    a & 0x7fff
}
fn abs_h2(_: u8, a: u64, _: u64, _: u64) -> u64 {
    a & 0x7fff_7fff
}

// ---------------------------------------------------------------- integers
macro_rules! ibin {
    ($T:ty, |$a:ident, $b:ident| $body:expr) => {{
        let f: AluFn = |_m, x, y, _z| {
            let $a = x as $T;
            let $b = y as $T;
            ($body) as u64
        };
        f
    }};
}
macro_rules! iun {
    ($T:ty, |$a:ident| $body:expr) => {{
        let f: AluFn = |_m, x, _y, _z| {
            let $a = x as $T;
            ($body) as u64
        };
        f
    }};
}
/// Expand an integer body for the Rust type matching a PTX integer type.
macro_rules! by_int {
    ($ty:expr, $mac:ident, $($rest:tt)*) => {
        match $ty {
            Ty::U8 | Ty::B8 => $mac!(u8, $($rest)*),
            Ty::S8 => $mac!(i8, $($rest)*),
            Ty::U16 | Ty::B16 => $mac!(u16, $($rest)*),
            Ty::S16 => $mac!(i16, $($rest)*),
            Ty::U32 | Ty::B32 => $mac!(u32, $($rest)*),
            Ty::S32 => $mac!(i32, $($rest)*),
            Ty::U64 | Ty::B64 => $mac!(u64, $($rest)*),
            Ty::S64 => $mac!(i64, $($rest)*),
            _ => return Err(format!("integer op on type {:?}", $ty)),
        }
    };
}

fn bits(ty: Ty) -> u32 {
    ty.bytes() * 8
}

pub(crate) fn sext_i(x: u64, bits: u32) -> i64 {
    sext(x, bits)
}
fn sext(x: u64, bits: u32) -> i64 {
    if bits >= 64 { x as i64 } else { ((x << (64 - bits)) as i64) >> (64 - bits) }
}
fn mask(bits: u32) -> u64 {
    if bits >= 64 { !0 } else { (1u64 << bits) - 1 }
}

fn prmt(m: u8, a: u64, b: u64, c: u64) -> u64 {
    let bytes = (a as u32 as u64) | ((b as u32 as u64) << 32);
    let byte = |i: u64| (bytes >> (8 * (i & 7))) & 0xff;
    let mode = m >> 4;
    let c = c as u32 as u64;
    let mut d = 0u64;
    if mode == 0 {
        for i in 0..4 {
            let s = (c >> (4 * i)) & 0xf;
            let mut v = byte(s & 7);
            if s & 8 != 0 {
                v = if v & 0x80 != 0 { 0xff } else { 0 };
            }
            d |= v << (8 * i);
        }
        return d;
    }
    let n = c & 3;
    let sel: [u64; 4] = match mode {
        1 => [n, (n + 1) & 7, (n + 2) & 7, (n + 3) & 7], // f4e
        2 => [n, (n + 7) & 7, (n + 6) & 7, (n + 5) & 7], // b4e (wrapping down)
        3 => [[0, 1, 2, 3], [1, 1, 2, 3], [2, 2, 2, 3], [3, 3, 3, 3]][n as usize], // rc8
        4 => [[0, 1, 2, 3], [1, 2, 3, 3], [2, 3, 3, 3], [3, 3, 3, 3]][n as usize], // ecl
        5 => [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 2, 2], [0, 1, 2, 3]][n as usize], // ecr
        6 => [[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]][n as usize], // rc8
        _ => [[0, 1, 0, 1], [2, 3, 2, 3], [0, 1, 0, 1], [2, 3, 2, 3]][n as usize], // rc16
    };
    for (i, s) in sel.iter().enumerate() {
        d |= byte(*s) << (8 * i);
    }
    d
}
pub(crate) fn prmt_mode(s: &str) -> Option<u8> {
    Some(match s {
        "f4e" => 1,
        "b4e" => 2,
        "rc8" => 6,
        "ecl" => 4,
        "ecr" => 5,
        "rc16" => 7,
        _ => return None,
    })
}

fn lop3(m: u8, a: u64, b: u64, c: u64) -> u64 {
    // the immediate lut travels in the high bits of c? no: lut is packed by the decoder into
    // the mode byte is too small, so decode passes it as c's upper 32 bits.
    let lut = (c >> 32) as u8 as u32;
    let (a, b, c) = (a as u32, b as u32, c as u32);
    let _ = m;
    let mut d = 0u32;
    for i in 0..8u32 {
        let ta = if i & 4 != 0 { a } else { !a };
        let tb = if i & 2 != 0 { b } else { !b };
        let tc = if i & 1 != 0 { c } else { !c };
        if lut & (1 << i) != 0 {
            d |= ta & tb & tc;
        }
    }
    d as u64
}

fn bfe32<const S: bool>(_: u8, a: u64, b: u64, c: u64) -> u64 {
    bfe(a, b, c, 32, S)
}
fn bfe64<const S: bool>(_: u8, a: u64, b: u64, c: u64) -> u64 {
    bfe(a, b, c, 64, S)
}
fn bfe(a: u64, b: u64, c: u64, w: u32, signed: bool) -> u64 {
    let a = a & mask(w);
    let pos = (b & 0xff) as u32;
    let len = (c & 0xff) as u32;
    let sbit = if !signed || len == 0 { false } else { (a >> (pos + len - 1).min(w - 1)) & 1 != 0 };
    let mut d = 0u64;
    for i in 0..w {
        let bit = if i < len && pos + i <= w - 1 { (a >> (pos + i)) & 1 != 0 } else { sbit };
        if bit {
            d |= 1 << i;
        }
    }
    d
}
fn bfi32(_: u8, a: u64, b: u64, cd: u64) -> u64 {
    // c packs pos (low 32) and len (high 32), see decode
    bfi(a, b, cd & 0xffff_ffff, cd >> 32, 32)
}
fn bfi(a: u64, b: u64, pos: u64, len: u64, w: u32) -> u64 {
    let pos = (pos & 0xff) as u32;
    let len = (len & 0xff) as u32;
    let mut d = b & mask(w);
    for i in 0..len {
        if pos + i >= w {
            break;
        }
        d = (d & !(1 << (pos + i))) | (((a >> i) & 1) << (pos + i));
    }
    d
}

fn shf<const L: bool, const CLAMP: bool>(_: u8, a: u64, b: u64, c: u64) -> u64 {
    let n = if CLAMP { (c as u32).min(32) } else { c as u32 & 31 };
    let v = ((b as u32 as u64) << 32) | (a as u32 as u64);
    if L {
        ((v << n) >> 32) as u32 as u64
    } else {
        (v >> n) as u32 as u64
    }
}

/// The AluFn, mode and number of sources for an ALU opcode, or Err if not an ALU op / unsupported.
/// `mods` are the dot-separated modifiers after the opcode name, type last.
pub(crate) fn decode(name: &str, mods: &[&str]) -> Result<Option<(AluFn, u8, usize, Class)>, String> {
    let ty = match mods.iter().rev().find_map(|s| Ty::parse(s)) {
        Some(t) => t,
        None => return Ok(None),
    };
    let has = |s: &str| mods.contains(&s);
    let mut m = 0u8;
    for r in mods {
        m |= match *r {
            "rn" | "rni" => 0,
            "rz" | "rzi" => 1,
            "rm" | "rmi" => 2,
            "rp" | "rpi" => 3,
            "ftz" => M_FTZ,
            "sat" => M_SAT,
            "NaN" => M_X,
            _ => 0,
        };
    }
    let w = bits(ty);
    let cls = match ty {
        Ty::F32 => Class::F32,
        Ty::F64 => Class::F64,
        Ty::F16 | Ty::F16x2 | Ty::BF16 | Ty::BF16x2 => Class::Half,
        _ => Class::Int,
    };
    let sfu = |f: AluFn| Ok(Some((f, m, 1, Class::Sfu)));
    let un = |f: AluFn| Ok(Some((f, m, 1, cls)));
    let bin = |f: AluFn| Ok(Some((f, m, 2, cls)));
    let tri = |f: AluFn| Ok(Some((f, m, 3, cls)));
    if ty.is_float() {
        let r = match (name, ty) {
            ("add", Ty::F32) => bin(add_f32),
            ("sub", Ty::F32) => bin(sub_f32),
            ("mul", Ty::F32) => bin(mul_f32),
            ("fma" | "mad", Ty::F32) => tri(fma_f32),
            ("div", Ty::F32) => bin(div_f32),
            ("sqrt", Ty::F32) => sfu(sqrt_f32),
            ("rcp", Ty::F32) => sfu(rcp_f32),
            ("rsqrt", Ty::F32) => sfu(rsqrt_f32),
            ("ex2", Ty::F32) => sfu(ex2_f32),
            ("lg2", Ty::F32) => sfu(lg2_f32),
            ("sin", Ty::F32) => sfu(sin_f32),
            ("cos", Ty::F32) => sfu(cos_f32),
            ("tanh", Ty::F32) => sfu(tanh_f32),
            ("min", Ty::F32) => bin(min_f32),
            ("max", Ty::F32) => bin(max_f32),
            ("abs", Ty::F32) => un(abs_f32),
            ("neg", Ty::F32) => un(neg_f32),
            ("copysign", Ty::F32) => bin(copysign_f32),
            ("add", Ty::F64) => bin(add_f64),
            ("sub", Ty::F64) => bin(sub_f64),
            ("mul", Ty::F64) => bin(mul_f64),
            ("fma" | "mad", Ty::F64) => tri(fma_f64),
            ("div", Ty::F64) => bin(div_f64),
            ("sqrt", Ty::F64) => sfu(sqrt_f64),
            ("rcp", Ty::F64) => sfu(rcp_f64),
            ("rsqrt", Ty::F64) => sfu(rsqrt_f64),
            ("min", Ty::F64) => bin(min_f64),
            ("max", Ty::F64) => bin(max_f64),
            ("abs", Ty::F64) => un(abs_f64),
            ("neg", Ty::F64) => un(neg_f64),
            ("copysign", Ty::F64) => bin(|_, a, b, _| (b & !(1 << 63)) | (a & (1 << 63))),
            ("add", Ty::F16) => bin(add_h),
            ("sub", Ty::F16) => bin(sub_h),
            ("mul", Ty::F16) => bin(mul_h),
            ("fma", Ty::F16) => tri(fma_h),
            ("min", Ty::F16) => bin(min_h),
            ("max", Ty::F16) => bin(max_h),
            ("ex2", Ty::F16) => sfu(ex2_h),
            ("tanh", Ty::F16) => sfu(tanh_h),
            ("neg", Ty::F16 | Ty::BF16) => un(neg_h),
            ("abs", Ty::F16 | Ty::BF16) => un(abs_h),
            ("add", Ty::F16x2) => bin(add_h2),
            ("sub", Ty::F16x2) => bin(sub_h2),
            ("mul", Ty::F16x2) => bin(mul_h2),
            ("fma", Ty::F16x2) => tri(fma_h2),
            ("min", Ty::F16x2) => bin(min_h2),
            ("max", Ty::F16x2) => bin(max_h2),
            ("ex2", Ty::F16x2) => sfu(ex2_h2),
            ("tanh", Ty::F16x2) => sfu(tanh_h2),
            ("neg", Ty::F16x2 | Ty::BF16x2) => un(neg_h2),
            ("abs", Ty::F16x2 | Ty::BF16x2) => un(abs_h2),
            ("add", Ty::BF16) => bin(add_bh),
            ("sub", Ty::BF16) => bin(sub_bh),
            ("mul", Ty::BF16) => bin(mul_bh),
            ("fma", Ty::BF16) => tri(fma_bh),
            ("min", Ty::BF16) => bin(min_bh),
            ("max", Ty::BF16) => bin(max_bh),
            ("ex2", Ty::BF16) => sfu(ex2_bh),
            ("tanh", Ty::BF16) => sfu(tanh_bh),
            ("add", Ty::BF16x2) => bin(add_bh2),
            ("sub", Ty::BF16x2) => bin(sub_bh2),
            ("mul", Ty::BF16x2) => bin(mul_bh2),
            ("fma", Ty::BF16x2) => tri(fma_bh2),
            ("min", Ty::BF16x2) => bin(min_bh2),
            ("max", Ty::BF16x2) => bin(max_bh2),
            ("ex2", Ty::BF16x2) => sfu(ex2_bh2),
            ("tanh", Ty::BF16x2) => sfu(tanh_bh2),
            _ => return Ok(None),
        };
        if matches!(ty, Ty::F16 | Ty::F16x2 | Ty::BF16 | Ty::BF16x2) && m & 3 != 0 {
            return Err(format!("{name}: only .rn is defined for {ty:?}"));
        }
        if has("approx") && name == "div" && ty == Ty::F32 {
            // div.approx: a * (1/b) per PTX ISA (max 2 ulp); ptxsim computes it exactly
            return bin(div_f32);
        }
        return r;
    }
    // integers and bits
    let hi = has("hi");
    let wide = has("wide");
    Ok(Some(match name {
        "add" if has("sat") => (ibin!(i32, |a, b| a.saturating_add(b)), 0, 2, cls),
        "sub" if has("sat") => (ibin!(i32, |a, b| a.saturating_sub(b)), 0, 2, cls),
        "add" => (by_int!(ty, ibin, |a, b| a.wrapping_add(b)), 0, 2, cls),
        "sub" => (by_int!(ty, ibin, |a, b| a.wrapping_sub(b)), 0, 2, cls),
        "mul" | "mad" | "mul24" | "mad24" => {
            let n = if name.starts_with("mad") { 3 } else { 2 };
            let f: AluFn = match (ty.signed(), w, hi, wide) {
                (_, 16, false, false) => |_, a, b, c| (a as u16).wrapping_mul(b as u16).wrapping_add(c as u16) as u64,
                (_, 32, false, false) => |_, a, b, c| (a as u32).wrapping_mul(b as u32).wrapping_add(c as u32) as u64,
                (_, 64, false, false) => |_, a, b, c| a.wrapping_mul(b).wrapping_add(c),
                (true, 16, false, true) => |_, a, b, c| ((a as i16 as i32) * (b as i16 as i32)).wrapping_add(c as i32) as u32 as u64,
                (false, 16, false, true) => |_, a, b, c| ((a as u16 as u32) * (b as u16 as u32)).wrapping_add(c as u32) as u64,
                (true, 32, false, true) => |_, a, b, c| ((a as i32 as i64) * (b as i32 as i64)).wrapping_add(c as i64) as u64,
                (false, 32, false, true) => |_, a, b, c| ((a as u32 as u64) * (b as u32 as u64)).wrapping_add(c),
                (true, 32, true, _) => |_, a, b, c| ((((a as i32 as i64) * (b as i32 as i64)) >> 32) as i32).wrapping_add(c as i32) as u32 as u64,
                (false, 32, true, _) => |_, a, b, c| ((((a as u32 as u64) * (b as u32 as u64)) >> 32) as u32).wrapping_add(c as u32) as u64,
                (true, 64, true, _) => |_, a, b, c| ((((a as i64 as i128) * (b as i64 as i128)) >> 64) as i64).wrapping_add(c as i64) as u64,
                (false, 64, true, _) => |_, a, b, c| ((((a as u128) * (b as u128)) >> 64) as u64).wrapping_add(c),
                (true, 16, true, _) => |_, a, b, c| ((((a as i16 as i32) * (b as i16 as i32)) >> 16) as i16).wrapping_add(c as i16) as u16 as u64,
                (false, 16, true, _) => |_, a, b, c| ((((a as u16 as u32) * (b as u16 as u32)) >> 16) as u16).wrapping_add(c as u16) as u64,
                _ => return Err(format!("{name} on {ty:?}")),
            };
            if name.ends_with("24") && w == 32 && !hi {
                let f24: AluFn = if ty.signed() {
                    |_, a, b, c| ((sext(a, 24) * sext(b, 24)) as u32).wrapping_add(c as u32) as u64
                } else {
                    |_, a, b, c| (((a & 0xff_ffff) * (b & 0xff_ffff)) as u32 as u64 + (c as u32 as u64)) & 0xffff_ffff
                };
                return Ok(Some((f24, 0, n, cls)));
            }
            (f, 0, n, cls)
        }
        "div" => (by_int!(ty, ibin, |a, b| if b == 0 { !b } else { a.wrapping_div(b) }), 0, 2, cls),
        "rem" => (by_int!(ty, ibin, |a, b| if b == 0 { a } else { a.wrapping_rem(b) }), 0, 2, cls),
        "min" => (by_int!(ty, ibin, |a, b| a.min(b)), 0, 2, cls),
        "max" => (by_int!(ty, ibin, |a, b| a.max(b)), 0, 2, cls),
        "abs" => {
            let f: AluFn = match w {
                16 => |_, a, _, _| (a as i16).wrapping_abs() as u16 as u64,
                32 => |_, a, _, _| (a as i32).wrapping_abs() as u32 as u64,
                _ => |_, a, _, _| (a as i64).wrapping_abs() as u64,
            };
            (f, 0, 1, cls)
        }
        "neg" => (by_int!(ty, iun, |a| a.wrapping_neg()), 0, 1, cls),
        "and" if ty == Ty::Pred => (|_, a, b, _| a & b & 1, 0, 2, cls),
        "or" if ty == Ty::Pred => (|_, a, b, _| (a | b) & 1, 0, 2, cls),
        "xor" if ty == Ty::Pred => (|_, a, b, _| (a ^ b) & 1, 0, 2, cls),
        "not" if ty == Ty::Pred => (|_, a, _, _| !a & 1, 0, 1, cls),
        "and" => (by_int!(ty, ibin, |a, b| a & b), 0, 2, cls),
        "or" => (by_int!(ty, ibin, |a, b| a | b), 0, 2, cls),
        "xor" => (by_int!(ty, ibin, |a, b| a ^ b), 0, 2, cls),
        "not" => (by_int!(ty, iun, |a| !a), 0, 1, cls),
        "cnot" => (by_int!(ty, iun, |a| (a == 0) as u8), 0, 1, cls),
        "popc" => (by_int!(ty, iun, |a| a.count_ones()), 0, 1, cls),
        "clz" => (by_int!(ty, iun, |a| a.leading_zeros()), 0, 1, cls),
        "brev" => (by_int!(ty, iun, |a| a.reverse_bits()), 0, 1, cls),
        "bfind" => {
            let f: AluFn = match (w, ty.signed()) {
                (32, false) => |m, a, _, _| { let a = a as u32; if a == 0 { 0xffff_ffff } else { let p = 31 - a.leading_zeros(); (if m & M_X != 0 { 31 - p } else { p }) as u64 } },
                (32, true) => |m, a, _, _| { let a = a as i32; let v = if a < 0 { !a as u32 } else { a as u32 }; if v == 0 { 0xffff_ffff } else { let p = 31 - v.leading_zeros(); (if m & M_X != 0 { 31 - p } else { p }) as u64 } },
                (64, false) => |m, a, _, _| { if a == 0 { 0xffff_ffff } else { let p = 63 - a.leading_zeros(); (if m & M_X != 0 { 63 - p } else { p }) as u64 } },
                _ => |m, a, _, _| { let a = a as i64; let v = if a < 0 { !a as u64 } else { a as u64 }; if v == 0 { 0xffff_ffff } else { let p = 63 - v.leading_zeros(); (if m & M_X != 0 { 63 - p } else { p }) as u64 } },
            };
            (f, if has("shiftamt") { M_X } else { 0 }, 1, cls)
        }
        "shl" => {
            let f: AluFn = match w {
                16 => |_, a, b, _| if b as u32 >= 16 { 0 } else { ((a as u16) << b as u32) as u64 },
                32 => |_, a, b, _| if b as u32 >= 32 { 0 } else { ((a as u32) << b as u32) as u64 },
                _ => |_, a, b, _| if b as u32 >= 64 { 0 } else { a << b as u32 },
            };
            (f, 0, 2, cls)
        }
        "shr" => {
            let f: AluFn = match (w, ty.signed()) {
                (16, false) => |_, a, b, _| if b as u32 >= 16 { 0 } else { ((a as u16) >> b as u32) as u64 },
                (16, true) => |_, a, b, _| ((a as i16) >> (b as u32).min(15)) as u16 as u64,
                (32, false) => |_, a, b, _| if b as u32 >= 32 { 0 } else { ((a as u32) >> b as u32) as u64 },
                (32, true) => |_, a, b, _| ((a as i32) >> (b as u32).min(31)) as u32 as u64,
                (64, false) => |_, a, b, _| if b as u32 >= 64 { 0 } else { a >> b as u32 },
                _ => |_, a, b, _| ((a as i64) >> (b as u32).min(63)) as u64,
            };
            (f, 0, 2, cls)
        }
        "shf" => {
            let f: AluFn = match (has("l"), has("clamp")) {
                (true, true) => shf::<true, true>,
                (true, false) => shf::<true, false>,
                (false, true) => shf::<false, true>,
                (false, false) => shf::<false, false>,
            };
            (f, 0, 3, cls)
        }
        "bfe" => {
            let f: AluFn = match (w, ty.signed()) {
                (32, s) => if s { bfe32::<true> } else { bfe32::<false> },
                (_, s) => if s { bfe64::<true> } else { bfe64::<false> },
            };
            (f, 0, 3, cls)
        }
        "bfi" if w == 32 => (bfi32, 0, 3, cls),
        "bfi" => (|_, a, b, cd| bfi(a, b, cd & 0xffff_ffff, cd >> 32, 64), 0, 3, cls),
        "prmt" => {
            let mode = mods.iter().find_map(|s| prmt_mode(s)).unwrap_or(0);
            (prmt, mode << 4, 3, cls)
        }
        "lop3" => (lop3, 0, 3, cls),
        "sad" => (by_int!(ty, ibin, |a, b| if a > b { a.wrapping_sub(b) } else { b.wrapping_sub(a) }), 0, 2, cls),
        "dp4a" => {
            let f: AluFn = match (mods.first().copied(), mods.get(1).copied()) {
                (Some("s32"), Some("s32")) => |_, a, b, c| { let mut s = c as i32; for i in 0..4 { s = s.wrapping_add(((a >> (8 * i)) as i8 as i32) * ((b >> (8 * i)) as i8 as i32)); } s as u32 as u64 },
                (Some("u32"), Some("u32")) => |_, a, b, c| { let mut s = c as u32; for i in 0..4 { s = s.wrapping_add(((a >> (8 * i)) as u8 as u32) * ((b >> (8 * i)) as u8 as u32)); } s as u64 },
                _ => return Err("dp4a with mixed signedness".into()),
            };
            (f, 0, 3, cls)
        }
        _ => return Ok(None),
    }))
}

// ---------------------------------------------------------------- setp
/// Compare codes (mode bits 4-7).
pub(crate) fn cmp_code(s: &str) -> Option<u8> {
    Some(match s {
        "eq" => 0,
        "ne" => 1,
        "lt" | "lo" => 2,
        "le" | "ls" => 3,
        "gt" | "hi" => 4,
        "ge" | "hs" => 5,
        "equ" => 6,
        "neu" => 7,
        "ltu" => 8,
        "leu" => 9,
        "gtu" => 10,
        "geu" => 11,
        "num" => 12,
        "nan" => 13,
        _ => return None,
    })
}
#[inline(always)]
fn cmp_ord<T: PartialOrd>(c: u8, a: T, b: T) -> bool {
    match c {
        0 => a == b,
        1 => a != b,
        2 => a < b,
        3 => a <= b,
        4 => a > b,
        5 => a >= b,
        _ => false,
    }
}
#[inline(always)]
fn cmp_float(c: u8, a: f64, b: f64) -> bool {
    let unordered = a.is_nan() || b.is_nan();
    match c {
        0..=5 => !unordered && cmp_ord(c, a, b),
        6..=11 => unordered || cmp_ord(c - 6, a, b),
        12 => !unordered,
        _ => unordered,
    }
}
pub(crate) fn setp_fn(ty: Ty) -> Result<AluFn, String> {
    Ok(match ty {
        Ty::F32 => |m, a, b, _| cmp_float(m >> 4, fin(m, a) as f64, fin(m, b) as f64) as u64,
        Ty::F64 => |m, a, b, _| cmp_float(m >> 4, din(a), din(b)) as u64,
        Ty::F16 => |m, a, b, _| cmp_float(m >> 4, h2f(a) as f64, h2f(b) as f64) as u64,
        Ty::BF16 => |m, a, b, _| cmp_float(m >> 4, bh2f(a) as f64, bh2f(b) as f64) as u64,
        Ty::U16 | Ty::B16 => |m, a, b, _| cmp_ord(m >> 4, a as u16, b as u16) as u64,
        Ty::S16 => |m, a, b, _| cmp_ord(m >> 4, a as i16, b as i16) as u64,
        Ty::U32 | Ty::B32 => |m, a, b, _| cmp_ord(m >> 4, a as u32, b as u32) as u64,
        Ty::S32 => |m, a, b, _| cmp_ord(m >> 4, a as i32, b as i32) as u64,
        Ty::U64 | Ty::B64 => |m, a, b, _| cmp_ord(m >> 4, a, b) as u64,
        Ty::S64 => |m, a, b, _| cmp_ord(m >> 4, a as i64, b as i64) as u64,
        Ty::U8 | Ty::B8 => |m, a, b, _| cmp_ord(m >> 4, a as u8, b as u8) as u64,
        Ty::S8 => |m, a, b, _| cmp_ord(m >> 4, a as i8, b as i8) as u64,
        _ => return Err(format!("setp on {ty:?}")),
    })
}

// ---------------------------------------------------------------- cvt
/// Apply a `cvt`.
pub(crate) fn cvt(s: &crate::ir::CvtSpec, x: u64) -> u64 {
    use Ty::*;
    let rnd = s.rnd.unwrap_or(Rnd::N);
    // read the source as an exact value: integer or f64
    enum V {
        I(i128),
        F(f64),
    }
    let v = match s.src {
        U8 | B8 => V::I(x as u8 as i128),
        U16 | B16 => V::I(x as u16 as i128),
        U32 | B32 => V::I(x as u32 as i128),
        U64 | B64 => V::I(x as i128),
        S8 => V::I(x as i8 as i128),
        S16 => V::I(x as i16 as i128),
        S32 => V::I(x as i32 as i128),
        S64 => V::I(x as i64 as i128),
        F16 => V::F(h2f(x) as f64),
        BF16 => V::F(bh2f(x) as f64),
        F32 => {
            let f = f32_of(x);
            V::F(if s.ftz { ftz32(f) } else { f } as f64)
        }
        F64 => V::F(f64_of(x)),
        _ => V::I(x as i128),
    };
    match s.dst {
        F32 | F64 | F16 | BF16 => {
            let f = match v {
                V::F(f) => {
                    let f = if s.int_rnd { round_int(f, rnd) } else { f };
                    if s.relu && f < 0.0 { 0.0 } else { f }
                }
                V::I(i) => {
                    // exact as hi + lo in f64
                    let hi = i as f64;
                    let lo = (i - hi as i128) as f64;
                    return match s.dst {
                        F32 => {
                            let r = round_f32(hi, lo, rnd);
                            let r = if s.sat { sat32(r) } else { r };
                            b32(r)
                        }
                        F64 => b64(f64_dir(hi, lo, rnd)),
                        F16 => f64_to_f16(hi, rnd) as u64,
                        _ => f64_to_bf16(hi, rnd) as u64,
                    };
                }
            };
            let f = if s.sat { sat64(f) } else { f };
            match s.dst {
                F32 => {
                    let r = if s.src == F64 { f64_to_f32(f, rnd) } else { f as f32 };
                    let r = if s.ftz { ftz32(r) } else { r };
                    if r.is_nan() { 0x7fff_ffff } else { b32(r) }
                }
                F64 => b64(f),
                F16 => {
                    let r = if s.src == F64 { f64_to_f16(f, rnd) } else { f32_to_f16(f as f32, rnd) };
                    if f.is_nan() { 0x7fff } else { r as u64 }
                }
                _ => {
                    let r = if s.src == F64 { f64_to_bf16(f, rnd) } else { f32_to_bf16(f as f32, rnd) };
                    if f.is_nan() { 0x7fff } else { r as u64 }
                }
            }
        }
        _ => {
            let (lo, hi): (i128, i128) = match s.dst {
                U8 | B8 => (0, u8::MAX as i128),
                U16 | B16 => (0, u16::MAX as i128),
                U32 | B32 => (0, u32::MAX as i128),
                U64 | B64 => (0, u64::MAX as i128),
                S8 => (i8::MIN as i128, i8::MAX as i128),
                S16 => (i16::MIN as i128, i16::MAX as i128),
                S32 => (i32::MIN as i128, i32::MAX as i128),
                _ => (i64::MIN as i128, i64::MAX as i128),
            };
            let i = match v {
                V::I(i) => {
                    if s.sat {
                        i.clamp(lo, hi)
                    } else {
                        i
                    }
                }
                V::F(f) => {
                    // float -> int always saturates; NaN -> 0
                    if f.is_nan() {
                        0
                    } else {
                        let r = round_int(f, rnd);
                        if r <= lo as f64 { lo } else if r >= hi as f64 { hi } else { r as i128 }
                    }
                }
            };
            let b = s.dst.bytes() * 8;
            // sign-extend signed destinations so wider readers see the value
            if s.dst.signed() { sext(i as u64, b) as u64 } else { (i as u64) & mask(b) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, mods: &[&str], a: u64, b: u64, c: u64) -> u64 {
        let (f, m, _, _) = decode(name, mods).unwrap().unwrap();
        f(m, a, b, c)
    }

    #[test]
    fn integer_ops_follow_ptx() {
        assert_eq!(run("mul", &["wide", "s32"], (-3i32) as u32 as u64, 7, 0) as i64, -21);
        assert_eq!(run("mul", &["wide", "u32"], 0xffff_ffff, 2, 0), 0x1_ffff_fffe);
        assert_eq!(run("mad", &["wide", "s32"], (-2i32) as u64, 5, 100), 90);
        assert_eq!(run("mul", &["hi", "u32"], 0x8000_0000, 4, 0), 2);
        assert_eq!(run("mul", &["hi", "s32"], (-1i32) as u32 as u64, 1, 0) as u32, 0xffff_ffff);
        assert_eq!(run("mad", &["lo", "s32"], 3, 4, 5) as u32, 17);
        assert_eq!(run("shr", &["s32"], 0x8000_0000, 40, 0) as u32, 0xffff_ffff);
        assert_eq!(run("shr", &["u32"], 0x8000_0000, 40, 0) as u32, 0);
        assert_eq!(run("shl", &["b32"], 1, 31, 0) as u32, 0x8000_0000);
        assert_eq!(run("div", &["s32"], (-7i32) as u64, 2, 0) as i32, -3);
        assert_eq!(run("rem", &["s32"], (-7i32) as u64, 2, 0) as i32, -1);
        assert_eq!(run("min", &["s32"], (-7i32) as u64, 2, 0) as i32, -7);
        assert_eq!(run("min", &["u32"], (-7i32) as u64, 2, 0) as i32, 2);
        assert_eq!(run("popc", &["b32"], 0xf0f0, 0, 0), 8);
        assert_eq!(run("clz", &["b32"], 0x0001_0000, 0, 0), 15);
        assert_eq!(run("brev", &["b32"], 1, 0, 0), 0x8000_0000);
        assert_eq!(run("bfind", &["u32"], 0x0001_0000, 0, 0), 16);
        assert_eq!(run("bfind", &["shiftamt", "u32"], 0x0001_0000, 0, 0), 15);
        assert_eq!(run("bfind", &["u32"], 0, 0, 0), 0xffff_ffff);
        assert_eq!(run("add", &["sat", "s32"], i32::MAX as u64, 1, 0) as i32, i32::MAX);
    }

    #[test]
    fn bfe_bfi_follow_ptx() {
        // bfe.u32: bits [4, 4+8) of 0xabcd1234 = 0x23
        assert_eq!(run("bfe", &["u32"], 0xabcd_1234, 4, 8), 0x23);
        // bfe.s32 sign-extends from bit pos+len-1: bits [12,16) of 0x0000_f000 = 0xf -> -1
        assert_eq!(run("bfe", &["s32"], 0x0000_f000, 12, 4) as u32, 0xffff_ffff);
        // len 0 gives 0
        assert_eq!(run("bfe", &["s32"], 0xffff_ffff, 3, 0), 0);
        // pos beyond 31 replicates the sign bit for s32
        assert_eq!(run("bfe", &["s32"], 0x8000_0000, 40, 4) as u32, 0xffff_ffff);
        // bfi.b32 d, a=0x5, b=0xffff0000, pos 4, len 3 -> bits 4..7 become 101
        assert_eq!(run("bfi", &["b32"], 0x5, 0xffff_0000, 4 | (3 << 32)), 0xffff_0050);
    }

    #[test]
    fn prmt_follows_ptx_tables() {
        let a = 0x4433_2211u64;
        let b = 0x8877_6655u64;
        // default mode: selector nibbles pick bytes of {b,a}
        assert_eq!(run("prmt", &["b32"], a, b, 0x3210), 0x4433_2211);
        assert_eq!(run("prmt", &["b32"], a, b, 0x7654), 0x8877_6655);
        assert_eq!(run("prmt", &["b32"], a, b, 0x5140), 0x6622_5511);
        // msb replicate: selector 8|7 -> sign of byte 7 (0x88 -> 0xff)
        assert_eq!(run("prmt", &["b32"], a, b, 0x000f), 0x1111_11ff);
        // f4e with n = 1: bytes 1,2,3,4
        assert_eq!(run("prmt", &["b32", "f4e"], a, b, 1), 0x5544_3322);
        // b4e with n = 1: bytes 1,0,7,6
        assert_eq!(run("prmt", &["b32", "b4e"], a, b, 1), 0x7788_1122);
        // ecl n=1: 1,2,3,3
        assert_eq!(run("prmt", &["b32", "ecl"], a, b, 1), 0x4444_3322);
        // rc16 n=1: 2,3,2,3
        assert_eq!(run("prmt", &["b32", "rc16"], a, b, 1), 0x4433_4433);
    }

    #[test]
    fn lop3_truth_table() {
        // lut 0x96 = a ^ b ^ c ; 0xe8 = majority ; 0x80 = a & b & c
        let (a, b, c) = (0xdead_beefu64, 0x1234_5678u64, 0x0f0f_f0f0u64);
        assert_eq!(run("lop3", &["b32"], a, b, c | (0x96 << 32)), a ^ b ^ c);
        assert_eq!(run("lop3", &["b32"], a, b, c | (0xe8 << 32)), (a & b) | (a & c) | (b & c));
        assert_eq!(run("lop3", &["b32"], a, b, c | (0x80 << 32)), a & b & c);
        assert_eq!(run("lop3", &["b32"], a, b, c | (0xf0 << 32)), a);
    }

    #[test]
    fn float_modes() {
        let one = b32(1.0);
        let tiny = b32(2f32.powi(-30));
        assert_eq!(f32_of(run("add", &["rn", "f32"], one, tiny, 0)), 1.0);
        assert_eq!(f32_of(run("add", &["rp", "f32"], one, tiny, 0)), 1.0f32.next_up());
        assert_eq!(f32_of(run("sub", &["rz", "f32"], one, tiny, 0)), 1.0f32.next_down());
        assert_eq!(f32_of(run("add", &["sat", "f32"], b32(0.75), b32(0.5), 0)), 1.0);
        assert_eq!(f32_of(run("add", &["sat", "f32"], b32(f32::NAN), b32(0.5), 0)), 0.0);
        let sub = b32(1e-40);
        assert_eq!(run("mul", &["ftz", "f32"], sub, one, 0), 0);
        assert_eq!(f32_of(run("mul", &["f32"], sub, one, 0)), 1e-40);
        // 1/3 rounded down and up differ by one ulp
        let t = b32(3.0);
        let dn = f32_of(run("div", &["rm", "f32"], one, t, 0));
        let up = f32_of(run("div", &["rp", "f32"], one, t, 0));
        assert_eq!(dn.next_up(), up);
        assert!((dn as f64) < 1.0 / 3.0 && (up as f64) > 1.0 / 3.0);
        // fma single rounding: (1+2^-23)*(1-2^-23) - 1 = -2^-46 exactly
        let a = b32(1.0 + 2f32.powi(-23));
        let b = b32(1.0 - 2f32.powi(-23));
        assert_eq!(f32_of(run("fma", &["rn", "f32"], a, b, b32(-1.0))), -(2f32.powi(-46)));
        // f64 directed
        // RN(1/3) = 0x3fd5555555555555 lies below 1/3, so rz keeps it and rp steps up
        assert_eq!(run("div", &["rz", "f64"], b64(1.0), b64(3.0), 0), 0x3fd5_5555_5555_5555);
        assert_eq!(run("div", &["rp", "f64"], b64(1.0), b64(3.0), 0), 0x3fd5_5555_5555_5556);
        assert_eq!(run("div", &["rn", "f64"], b64(2.0), b64(3.0), 0), 0x3fe5_5555_5555_5555);
        assert_eq!(run("div", &["rz", "f64"], b64(2.0), b64(3.0), 0), 0x3fe5_5555_5555_5555);
        // max with NaN
        assert_eq!(f32_of(run("max", &["f32"], b32(f32::NAN), b32(2.0), 0)), 2.0);
        assert_eq!(run("max", &["NaN", "f32"], b32(f32::NAN), b32(2.0), 0), 0x7fff_ffff);
    }

    #[test]
    fn half_arith_rounds_once() {
        // f16x2 add of 1.0 + 2^-11 in both halves: exact tie -> even (1.0)
        let one = 0x3c00u64;
        let eps = f16::from_f32(2f32.powi(-11)).to_bits() as u64;
        let a = one | (one << 16);
        let b = eps | (eps << 16);
        assert_eq!(run("add", &["f16x2"], a, b, 0), a);
        // bf16 fma: 1 * 1 + 2^-8 -> tie (7 fraction bits) rounds to even 1.0; + 3*2^-8 -> 1+2^-6
        let bone = 0x3f80u64;
        let e8 = bf16::from_f32(2f32.powi(-8)).to_bits() as u64;
        assert_eq!(run("fma", &["rn", "bf16"], bone, bone, e8), 0x3f80);
        let e8x3 = bf16::from_f32(3.0 * 2f32.powi(-8)).to_bits() as u64;
        assert_eq!(run("fma", &["rn", "bf16"], bone, bone, e8x3), 0x3f82);
        // a bf16x2 fma where lanes differ
        let a2 = bone | (0x4000 << 16); // (1, 2)
        let c2 = e8 | (0x3f80 << 16); // (2^-8, 1)
        assert_eq!(run("fma", &["rn", "bf16x2"], a2, a2, c2), 0x3f80 | (0x40a0 << 16)); // (1, 5)
    }

    #[test]
    fn cvt_conversions() {
        use crate::ir::CvtSpec;
        let sp = |dst, src, rnd, int_rnd| CvtSpec { dst, src, rnd, int_rnd, ftz: false, sat: false, relu: false };
        assert_eq!(cvt(&sp(Ty::S32, Ty::F32, Some(Rnd::Z), false), b32(-2.7)) as i32, -2);
        assert_eq!(cvt(&sp(Ty::S32, Ty::F32, Some(Rnd::N), false), b32(2.5)) as i32, 2);
        assert_eq!(cvt(&sp(Ty::S32, Ty::F32, Some(Rnd::M), false), b32(-2.5)) as i32, -3);
        assert_eq!(cvt(&sp(Ty::S32, Ty::F32, Some(Rnd::Z), false), b32(3e9)) as i32, i32::MAX);
        assert_eq!(cvt(&sp(Ty::U32, Ty::F32, Some(Rnd::Z), false), b32(-5.0)) as u32, 0);
        assert_eq!(cvt(&sp(Ty::S32, Ty::F32, Some(Rnd::Z), false), b32(f32::NAN)), 0);
        assert_eq!(cvt(&sp(Ty::S64, Ty::S32, None, false), (-5i32) as u32 as u64) as i64, -5);
        assert_eq!(cvt(&sp(Ty::U64, Ty::U32, None, false), 0xffff_ffff), 0xffff_ffff);
        assert_eq!(cvt(&sp(Ty::U8, Ty::U32, None, false), 0x1ff), 0xff);
        // 2^24+1 does not fit f32: rn -> 2^24, rp -> 2^24+2
        let big = (1u64 << 24) + 1;
        assert_eq!(f32_of(cvt(&sp(Ty::F32, Ty::S32, Some(Rnd::N), false), big)), 16777216.0);
        assert_eq!(f32_of(cvt(&sp(Ty::F32, Ty::S32, Some(Rnd::P), false), big)), 16777218.0);
        assert_eq!(f32_of(cvt(&sp(Ty::F32, Ty::F32, Some(Rnd::N), true), b32(2.5))), 2.0);
        assert_eq!(cvt(&sp(Ty::BF16, Ty::F32, Some(Rnd::N), false), b32(1.0 + 3.0 * 2f32.powi(-8))), 0x3f82);
        assert_eq!(f32_of(cvt(&sp(Ty::F32, Ty::BF16, None, false), 0x3f82)), 1.0 + 2f32.powi(-6));
        assert_eq!(f32_of(cvt(&sp(Ty::F32, Ty::F16, None, false), 0x3c01)), 1.0 + 2f32.powi(-10));
        assert_eq!(cvt(&sp(Ty::F16, Ty::F32, Some(Rnd::N), false), b32(1.0)), 0x3c00);
        // f64 -> f32 single rounding
        assert_eq!(f32_of(cvt(&sp(Ty::F32, Ty::F64, Some(Rnd::Z), false), b64(1.0 / 3.0))), (1.0f32 / 3.0).next_down());
        // f64 -> bf16 without double rounding: 1 + 2^-8 + 2^-30 -> 1 + 2^-7
        assert_eq!(cvt(&sp(Ty::BF16, Ty::F64, Some(Rnd::N), false), b64(1.0 + 2f64.powi(-8) + 2f64.powi(-30))), 0x3f81);
    }

    #[test]
    fn setp_compares() {
        let f = setp_fn(Ty::F32).unwrap();
        let nan = b32(f32::NAN);
        assert_eq!(f(cmp_code("lt").unwrap() << 4, b32(1.0), b32(2.0), 0), 1);
        assert_eq!(f(cmp_code("lt").unwrap() << 4, nan, b32(2.0), 0), 0);
        assert_eq!(f(cmp_code("ltu").unwrap() << 4, nan, b32(2.0), 0), 1);
        assert_eq!(f(cmp_code("neu").unwrap() << 4, nan, nan, 0), 1);
        assert_eq!(f(cmp_code("nan").unwrap() << 4, nan, b32(1.0), 0), 1);
        let g = setp_fn(Ty::U32).unwrap();
        assert_eq!(g(cmp_code("lo").unwrap() << 4, 1, 0xffff_ffff, 0), 1);
        let h = setp_fn(Ty::S32).unwrap();
        assert_eq!(h(cmp_code("lt").unwrap() << 4, 1, 0xffff_ffff, 0), 0);
    }
}
