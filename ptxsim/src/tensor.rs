//! Warp-wide matrix instructions: fragment layouts of `mma.sync.aligned.m16n8k{8,16}` with
//! bf16/f16 inputs and f32 accumulators, and of `ldmatrix`/`stmatrix` (m8n8, b16), following
//! the PTX ISA layout tables. Layout functions are pure so tests can check them entry by entry.

use crate::num::{bh2f, h2f};

/// A fragment element of m16n8k16 / m16n8k8: (row, col) of A (16 x K) for register `reg`
/// (0..K/4) and half `h` (0 = low 16 bits) held by `lane`.
pub(crate) fn a_pos(lane: usize, reg: usize, h: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane & 3);
    let row = g + 8 * (reg & 1);
    let col = 2 * t + h + 8 * (reg >> 1);
    (row, col)
}

/// (k, n) of the B (K x 8, "col") fragment element in register `reg` (0..K/8), half `h`.
pub(crate) fn b_pos(lane: usize, reg: usize, h: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane & 3);
    (2 * t + h + 8 * reg, g)
}

/// (row, col) of the C/D (16 x 8 f32) fragment element `i` (0..4).
pub(crate) fn c_pos(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane & 3);
    (g + 8 * (i >> 1), 2 * t + (i & 1))
}

/// D = A * B + C for one warp. a[lane][reg], b[lane][reg] hold packed 16-bit pairs; c/d f32.
/// Products of 16-bit floats are exact in f64 and the K-term sum is formed in f64, then
/// rounded once to f32 (hardware accumulates with at least f32 precision in an unspecified
/// order; kernel tests compare against an f64 reference with a tolerance).
pub(crate) fn mma(bf: bool, k: usize, a: &[[u32; 4]; 32], b: &[[u32; 2]; 32], c: &[[f32; 4]; 32]) -> [[f32; 4]; 32] {
    let cvt = |x: u32| if bf { bh2f(x as u64) } else { h2f(x as u64) } as f64;
    let mut am = [[0f64; 16]; 16];
    let mut bm = [[0f64; 8]; 16];
    for lane in 0..32 {
        for reg in 0..k / 4 {
            for h in 0..2 {
                let (r, cc) = a_pos(lane, reg, h);
                am[r][cc] = cvt((a[lane][reg] >> (16 * h)) & 0xffff);
            }
        }
        for reg in 0..k / 8 {
            for h in 0..2 {
                let (kk, n) = b_pos(lane, reg, h);
                bm[kk][n] = cvt((b[lane][reg] >> (16 * h)) & 0xffff);
            }
        }
    }
    let mut d = [[0f32; 4]; 32];
    for lane in 0..32 {
        for i in 0..4 {
            let (r, n) = c_pos(lane, i);
            let mut s = c[lane][i] as f64;
            for kk in 0..k {
                s += am[r][kk] * bm[kk][n];
            }
            d[lane][i] = s as f32;
        }
    }
    d
}

/// ldmatrix/stmatrix m8n8.b16: the two (row, col) elements of an 8x8 matrix held by `lane`
/// (low half first). Without .trans lane holds row lane/4, cols 2*(lane%4)+{0,1}; with .trans
/// it holds the transposed positions.
pub(crate) fn ldm_pos(lane: usize, h: usize, trans: bool) -> (usize, usize) {
    let (g, t) = (lane >> 2, lane & 3);
    if trans {
        (2 * t + h, g)
    } else {
        (g, 2 * t + h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fragment_matches_ptx_isa_table() {
        // PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type", A (.bf16):
        // a0,a1: (groupID, 2*tig + {0,1}); a2,a3: (groupID+8, ...); a4,a5: (groupID, 2*tig+8+{0,1});
        // a6,a7: (groupID+8, 2*tig+8+{0,1}); two elements per .b32 register.
        assert_eq!(a_pos(0, 0, 0), (0, 0));
        assert_eq!(a_pos(0, 0, 1), (0, 1));
        assert_eq!(a_pos(0, 1, 0), (8, 0));
        assert_eq!(a_pos(0, 2, 1), (0, 9));
        assert_eq!(a_pos(0, 3, 0), (8, 8));
        assert_eq!(a_pos(5, 0, 0), (1, 2));
        assert_eq!(a_pos(31, 3, 1), (15, 15));
        assert_eq!(a_pos(30, 1, 1), (15, 5));
        // every A element is held exactly once
        let mut seen = [[0; 16]; 16];
        for lane in 0..32 {
            for reg in 0..4 {
                for h in 0..2 {
                    let (r, c) = a_pos(lane, reg, h);
                    seen[r][c] += 1;
                }
            }
        }
        assert!(seen.iter().flatten().all(|&n| n == 1));
    }

    #[test]
    fn b_and_c_fragments_match_ptx_isa_table() {
        // B: b0,b1: row (k) = 2*tig + {0,1}, col = groupID; b2,b3: k + 8.
        assert_eq!(b_pos(0, 0, 0), (0, 0));
        assert_eq!(b_pos(0, 1, 1), (9, 0));
        assert_eq!(b_pos(6, 0, 1), (5, 1));
        assert_eq!(b_pos(31, 1, 1), (15, 7));
        // C/D: c0,c1: (groupID, 2*tig + {0,1}); c2,c3: (groupID + 8, ...).
        assert_eq!(c_pos(0, 0), (0, 0));
        assert_eq!(c_pos(0, 3), (8, 1));
        assert_eq!(c_pos(13, 1), (3, 3));
        assert_eq!(c_pos(31, 2), (15, 6));
    }

    #[test]
    fn ldmatrix_positions() {
        // PTX ISA ldmatrix: "each thread receives a row fragment": thread t holds row t/4,
        // elements 2*(t%4), 2*(t%4)+1; .trans delivers the transposed matrix.
        assert_eq!(ldm_pos(0, 0, false), (0, 0));
        assert_eq!(ldm_pos(7, 1, false), (1, 7));
        assert_eq!(ldm_pos(7, 1, true), (7, 1));
        assert_eq!(ldm_pos(31, 0, true), (6, 7));
    }

    #[test]
    fn mma_computes_a_times_b_plus_c() {
        // fill fragments from whole matrices using the layout, check against a direct product
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ((rng >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        };
        let am: Vec<Vec<half::bf16>> = (0..16).map(|_| (0..16).map(|_| half::bf16::from_f32(next())).collect()).collect();
        let bm: Vec<Vec<half::bf16>> = (0..16).map(|_| (0..8).map(|_| half::bf16::from_f32(next())).collect()).collect();
        let cm: Vec<Vec<f32>> = (0..16).map(|_| (0..8).map(|_| next()).collect()).collect();
        let (mut a, mut b, mut c) = ([[0u32; 4]; 32], [[0u32; 2]; 32], [[0f32; 4]; 32]);
        for lane in 0..32 {
            for reg in 0..4 {
                for h in 0..2 {
                    let (r, cc) = a_pos(lane, reg, h);
                    a[lane][reg] |= (am[r][cc].to_bits() as u32) << (16 * h);
                }
            }
            for reg in 0..2 {
                for h in 0..2 {
                    let (k, n) = b_pos(lane, reg, h);
                    b[lane][reg] |= (bm[k][n].to_bits() as u32) << (16 * h);
                }
            }
            for i in 0..4 {
                let (r, n) = c_pos(lane, i);
                c[lane][i] = cm[r][n];
            }
        }
        let d = mma(true, 16, &a, &b, &c);
        for lane in 0..32 {
            for i in 0..4 {
                let (r, n) = c_pos(lane, i);
                let want: f64 = cm[r][n] as f64 + (0..16).map(|k| am[r][k].to_f64() * bm[k][n].to_f64()).sum::<f64>();
                assert_eq!(d[lane][i], want as f32, "lane {lane} i {i}");
            }
        }
    }
}
