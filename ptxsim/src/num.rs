//! Numeric semantics of PTX arithmetic: IEEE rounding modes (rn/rz/rm/rp) for f16, bf16, f32
//! and f64, flush-to-zero, saturation, and the f16/bf16 conversions. Values travel as raw
//! bits in u64 registers; helpers here convert and round.

use half::{bf16, f16};

/// IEEE rounding mode of a PTX instruction (`.rn` default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rnd {
    N,
    Z,
    M,
    P,
}

#[inline(always)]
pub(crate) fn f32_of(x: u64) -> f32 {
    f32::from_bits(x as u32)
}
#[inline(always)]
pub(crate) fn f64_of(x: u64) -> f64 {
    f64::from_bits(x)
}
#[inline(always)]
pub(crate) fn b32(x: f32) -> u64 {
    x.to_bits() as u64
}
#[inline(always)]
pub(crate) fn b64(x: f64) -> u64 {
    x.to_bits()
}

/// Flush an f32 subnormal to a zero of the same sign.
#[inline(always)]
pub(crate) fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// Saturate to [0, 1]; NaN becomes +0 (PTX `.sat` on floats).
#[inline(always)]
pub(crate) fn sat32(x: f32) -> f32 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}
#[inline(always)]
pub(crate) fn sat64(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

/// Exact sum as (s, e) with s = RN(a+b) and a+b = s+e (Knuth's TwoSum).
#[inline(always)]
pub(crate) fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    (s, e)
}

/// Move a sign-magnitude float bit pattern one step toward (true) or away from zero.
#[inline(always)]
fn step(bits: u64, sign_bit: u64, toward_zero: bool) -> u64 {
    let mag = bits & !sign_bit;
    let sign = bits & sign_bit;
    if toward_zero {
        if mag == 0 {
            bits
        } else {
            sign | (mag - 1)
        }
    } else {
        sign | (mag + 1)
    }
}

/// Turn a round-to-nearest result `rn` (bits of a format whose sign bit is `sign_bit`, value
/// `rn_val`) into the directed-rounding result, given the sign of (exact - rn).
/// `diff` < 0 means the exact value is below `rn`.
pub(crate) fn directed(rn: u64, rn_val: f64, diff: f64, sign_bit: u64, mode: Rnd) -> u64 {
    if mode == Rnd::N || diff == 0.0 || rn_val.is_nan() {
        return rn;
    }
    let neg = rn_val < 0.0 || (rn_val == 0.0 && rn & sign_bit != 0);
    // Want: RZ -> |result| <= |exact|; RM -> result <= exact; RP -> result >= exact.
    let go_down = match mode {
        Rnd::M => diff < 0.0,
        Rnd::P => false,
        Rnd::Z => (diff < 0.0 && !neg) || (diff > 0.0 && neg),
        Rnd::N => false,
    };
    let go_up = match mode {
        Rnd::P => diff > 0.0,
        _ => false,
    };
    if !go_down && !go_up {
        return rn;
    }
    if rn_val == 0.0 {
        // exact is tiny with sign of diff: smallest subnormal of that sign, or zero
        return if go_up { 1 } else { sign_bit | 1 };
    }
    // Down on a positive number or up on a negative one moves toward zero.
    let toward_zero = go_down != neg;
    step(rn, sign_bit, toward_zero)
}

/// Round an exact value hi+lo (hi = RN(exact) in f64, |lo| <= ulp(hi)/2) to f32 with `mode`.
pub(crate) fn round_f32(hi: f64, lo: f64, mode: Rnd) -> f32 {
    let r = hi as f32;
    if mode == Rnd::N {
        if lo != 0.0 && r.is_finite() && hi != r as f64 {
            // hi may sit exactly halfway between two f32 values; then lo breaks the tie
            let other = if hi > r as f64 { r.next_up() } else { r.next_down() };
            if hi - r as f64 == other as f64 - hi {
                return if (lo > 0.0) == (other > r) { other } else { r };
            }
        }
        return r;
    }
    let d = if r.is_infinite() && hi.is_finite() { -(r as f64).signum() } else { (hi - r as f64) + lo };
    f32::from_bits(directed(r.to_bits() as u64, r as f64, d, 0x8000_0000, mode) as u32)
}

/// f32 -> f16 bits with rounding mode.
pub(crate) fn f32_to_f16(x: f32, mode: Rnd) -> u16 {
    let r = f16::from_f32(x);
    let rv = r.to_f32();
    let d = if rv.is_infinite() && x.is_finite() { -(rv as f64).signum() } else { x as f64 - rv as f64 };
    directed(r.to_bits() as u64, rv as f64, d, 0x8000, mode) as u16
}

/// f32 -> bf16 bits with rounding mode (NaN stays NaN).
pub(crate) fn f32_to_bf16(x: f32, mode: Rnd) -> u16 {
    let r = bf16::from_f32(x);
    let rv = r.to_f32();
    let d = if rv.is_infinite() && x.is_finite() { -(rv as f64).signum() } else { x as f64 - rv as f64 };
    directed(r.to_bits() as u64, rv as f64, d, 0x8000, mode) as u16
}

/// f64 -> f16 / bf16 / f32 with one rounding (no double rounding through f32).
pub(crate) fn f64_to_f32(x: f64, mode: Rnd) -> f32 {
    round_f32(x, 0.0, mode)
}
pub(crate) fn f64_to_f16(x: f64, mode: Rnd) -> u16 {
    let r = f16_from_f64(x);
    let rv = r.to_f64();
    let d = if rv.is_infinite() && x.is_finite() { -rv.signum() } else { x - rv };
    directed(r.to_bits() as u64, rv, d, 0x8000, mode) as u16
}
pub(crate) fn f64_to_bf16(x: f64, mode: Rnd) -> u16 {
    let r = bf16_from_f64(x);
    let rv = r.to_f64();
    let d = if rv.is_infinite() && x.is_finite() { -rv.signum() } else { x - rv };
    directed(r.to_bits() as u64, rv, d, 0x8000, mode) as u16
}

/// f64 -> f32 rounded to odd: a following RN to a format with at most 22 significand bits
/// then equals one direct RN from f64 (avoids double rounding).
fn f32_round_odd(x: f64) -> f32 {
    let r = x as f32;
    if !r.is_finite() || r as f64 == x {
        return r;
    }
    let t = if (r as f64).abs() > x.abs() { f32::from_bits(r.to_bits() - 1) } else { r };
    f32::from_bits(t.to_bits() | 1)
}
/// f64 -> bf16 with one round-to-nearest-even (`half::bf16::from_f64` rounds through f32 twice).
pub(crate) fn bf16_from_f64(x: f64) -> bf16 {
    bf16::from_f32(f32_round_odd(x))
}
/// f64 -> f16 with one round-to-nearest-even.
pub(crate) fn f16_from_f64(x: f64) -> f16 {
    f16::from_f32(f32_round_odd(x))
}

#[inline(always)]
pub(crate) fn h2f(x: u64) -> f32 {
    f16::from_bits(x as u16).to_f32()
}
#[inline(always)]
pub(crate) fn bh2f(x: u64) -> f32 {
    f32::from_bits((x as u32 & 0xffff) << 16)
}

/// f32 result of an operation on f32 inputs, given exactly as hi+lo, rounded with `mode`.
#[inline(always)]
pub(crate) fn f32_op(rn: f32, hi: f64, lo: f64, mode: Rnd) -> f32 {
    if mode == Rnd::N {
        rn
    } else {
        let d = if rn.is_infinite() && hi.is_finite() { -(rn as f64).signum() } else { (hi - rn as f64) + lo };
        f32::from_bits(directed(rn.to_bits() as u64, rn as f64, d, 0x8000_0000, mode) as u32)
    }
}

/// f64 result with directed rounding: `rn` is the RN result, `err` has the sign of exact - rn.
#[inline(always)]
pub(crate) fn f64_dir(rn: f64, err: f64, mode: Rnd) -> f64 {
    if mode == Rnd::N {
        rn
    } else {
        let err = if rn.is_infinite() { -rn.signum() } else { err };
        f64::from_bits(directed(rn.to_bits(), rn, err, 1 << 63, mode))
    }
}

/// Round a float to an integral value with an integer rounding mode (.rni/.rzi/.rmi/.rpi).
pub(crate) fn round_int(x: f64, mode: Rnd) -> f64 {
    match mode {
        Rnd::N => x.round_ties_even(),
        Rnd::Z => x.trunc(),
        Rnd::M => x.floor(),
        Rnd::P => x.ceil(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directed_rounding_of_f32_add() {
        // 1 + 2^-30 is not representable in f32.
        let hi = 1.0f64 + 2f64.powi(-30);
        assert_eq!(round_f32(hi, 0.0, Rnd::N), 1.0);
        assert_eq!(round_f32(hi, 0.0, Rnd::Z), 1.0);
        assert_eq!(round_f32(hi, 0.0, Rnd::M), 1.0);
        assert_eq!(round_f32(hi, 0.0, Rnd::P), f32::from_bits(1.0f32.to_bits() + 1));
        assert_eq!(round_f32(-hi, 0.0, Rnd::Z), -1.0);
        assert_eq!(round_f32(-hi, 0.0, Rnd::M), -f32::from_bits(1.0f32.to_bits() + 1));
        assert_eq!(round_f32(-hi, 0.0, Rnd::P), -1.0);
        // overflow: RZ gives MAX, RN gives inf
        assert_eq!(round_f32(1e39, 0.0, Rnd::Z), f32::MAX);
        assert_eq!(round_f32(1e39, 0.0, Rnd::N), f32::INFINITY);
        assert_eq!(round_f32(-1e39, 0.0, Rnd::P), -f32::MAX);
        // tiny lo decides directed rounding of an exactly representable hi
        assert_eq!(round_f32(1.0, -1e-30, Rnd::Z), f32::from_bits(1.0f32.to_bits() - 1));
        assert_eq!(round_f32(1.0, -1e-30, Rnd::P), 1.0);
    }

    #[test]
    fn bf16_and_f16_rounding() {
        // 1 + 2^-8 + 2^-10 : bf16 has 7 fraction bits.
        let x = 1.0f32 + 2f32.powi(-8) + 2f32.powi(-10);
        assert_eq!(f32_to_bf16(x, Rnd::N), 0x3f81);
        assert_eq!(f32_to_bf16(x, Rnd::Z), 0x3f80);
        assert_eq!(f32_to_bf16(-x, Rnd::M), 0xbf81);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8), Rnd::N), 0x3f80); // tie to even
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8), Rnd::N), 0x3f82); // tie to even
        assert_eq!(f32_to_f16(65520.0, Rnd::N), 0x7c00);
        assert_eq!(f32_to_f16(65520.0, Rnd::Z), 0x7bff);
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-12), Rnd::P), 0x3c01);
    }

    #[test]
    fn int_rounding() {
        assert_eq!(round_int(2.5, Rnd::N), 2.0);
        assert_eq!(round_int(3.5, Rnd::N), 4.0);
        assert_eq!(round_int(-2.5, Rnd::N), -2.0);
        assert_eq!(round_int(-2.7, Rnd::Z), -2.0);
        assert_eq!(round_int(-2.2, Rnd::M), -3.0);
        assert_eq!(round_int(2.2, Rnd::P), 3.0);
    }
}
