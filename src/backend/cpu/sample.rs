//! The CPU reference of `Backend::sample` (kernels/sampling.cu is the CUDA one): picks a token
//! from one row of logits with greedy, temperature, top-k and top-p, from the row's
//! counter-based draw (`backend::uniform`). `pick` is the definition both backends follow: its
//! kept set is defined over the logits' order and its draw is an inverse CDF in token-id
//! order, so the GPU needs no sort and picks the same token from the same counters.

use crate::backend::SampleRow;

/// Picks a token for every row of `logits` `[rows.len(), vocab]` (rows in parallel; each
/// draw depends only on its row's counters). The host reference of `Backend::sample`.
pub(crate) fn sample_rows(logits: &[f32], vocab: usize, rows: &[SampleRow]) -> Vec<u32> {
    use rayon::prelude::*;
    assert!(logits.len() >= rows.len() * vocab, "sample_rows: {} logits for {} rows of {vocab}", logits.len(), rows.len());
    rows.par_iter()
        .enumerate()
        .map(|(i, r)| pick(&logits[i * vocab..(i + 1) * vocab], r.temperature, r.top_k, r.top_p, r.uniform()))
        .collect()
}

/// Greedy argmax: the lowest id among the largest non-NaN logits (0 when every logit is NaN).
fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<usize> = None;
    for (i, &x) in logits.iter().enumerate() {
        if !x.is_nan() && best.is_none_or(|b| x > logits[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

/// Order key of a non-NaN logit: `ord(a) > ord(b)` iff `a > b` (-0 below +0). The CUDA
/// sampler (kernels/sampling.cu) searches thresholds over these keys.
#[inline]
fn ord_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// `cand` (pairs of key and id, in ascending id order) sorted by descending key, equal keys in
/// id order: what `sort_unstable_by` with `pick`'s order gives, but a stable LSD radix sort on
/// the key (three passes of 11 bits), linear in the 49152 candidates of a top-p draw over the
/// whole vocabulary, where the comparison sort took about a millisecond per token.
fn sort_by_key_desc(cand: &mut Vec<(u32, u32)>) {
    const BITS: u32 = 11;
    let mut tmp = vec![(0u32, 0u32); cand.len()];
    for pass in 0..32u32.div_ceil(BITS) {
        let digit = |c: &(u32, u32)| ((!c.0 >> (pass * BITS)) & ((1 << BITS) - 1)) as usize;
        let mut start = vec![0usize; 1 << BITS];
        for c in cand.iter() {
            start[digit(c)] += 1;
        }
        let mut sum = 0;
        for s in start.iter_mut() {
            (*s, sum) = (sum, sum + *s);
        }
        for c in cand.iter() {
            let d = digit(c);
            tmp[start[d]] = *c;
            start[d] += 1;
        }
        std::mem::swap(cand, &mut tmp);
    }
}

/// The sampler, defined so that a GPU can reproduce it without sorting:
/// - greedy (`temperature == 0` or `top_k == 1`, or no logit above -inf): `argmax`;
/// - weights `w_i = exp((x_i - m) / temperature)` in f64 (m = the largest non-NaN logit;
///   `w_i = 1` where `x_i == m`, so +inf logits share the mass; NaN weighs 0);
/// - candidates: the non-NaN tokens ordered by logit, descending, ties by lower id;
///   top-k keeps the first k; top-p then keeps the first tokens while the weight before
///   them (in that order) is below `top_p` times the top-k mass (so at least one stays);
/// - the draw is the inverse CDF of the kept weights **in token-id order**: the first kept
///   id whose running sum exceeds `u * total`. The kept set and the weights are those of
///   the sorted formulation, so the distribution is the same; only the map from u to a
///   token differs, and it needs no sort (the GPU finds the kept set by threshold search).
pub(crate) fn pick(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, u: f64) -> u32 {
    if temperature == 0.0 || top_k == 1 {
        return argmax(logits);
    }
    let m = logits.iter().copied().filter(|x| !x.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        return argmax(logits);
    }
    let inv_t = 1.0 / temperature as f64;
    let md = m as f64;
    // Unnormalised probabilities in f64 (exp of scaled logits relative to the max).
    let w: Vec<f64> = logits
        .iter()
        .map(|&x| {
            if x.is_nan() {
                0.0
            } else if x == m {
                1.0
            } else {
                ((x as f64 - md) * inv_t).exp()
            }
        })
        .collect();
    let n_valid = logits.iter().filter(|x| !x.is_nan()).count();
    let k = if top_k == 0 { n_valid } else { top_k.min(n_valid) };
    let mut kept: Vec<u32> = if k == n_valid && top_p >= 1.0 {
        (0..logits.len() as u32).filter(|&i| !logits[i as usize].is_nan()).collect()
    } else {
        // Candidates by descending logit (ties: lower id first), cut by top-k then top-p.
        let mut cand: Vec<(u32, u32)> = (0..logits.len() as u32).filter(|&i| !logits[i as usize].is_nan()).map(|i| (ord_key(logits[i as usize]), i)).collect();
        let order = |a: &(u32, u32), b: &(u32, u32)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, order);
            cand.truncate(k);
            if top_p < 1.0 {
                cand.sort_unstable_by(order);
            }
        } else if top_p < 1.0 {
            // Still in id order: the stable radix sort gives `order`'s result.
            sort_by_key_desc(&mut cand);
        }
        if top_p < 1.0 {
            let total: f64 = cand.iter().map(|c| w[c.1 as usize]).sum();
            // Keep tokens while the mass before them is below top_p (so at least one stays).
            let limit = top_p as f64 * total;
            let mut acc = 0.0;
            let mut keep = 0;
            for c in &cand {
                if keep > 0 && acc >= limit {
                    break;
                }
                acc += w[c.1 as usize];
                keep += 1;
            }
            cand.truncate(keep);
        }
        let mut ids: Vec<u32> = cand.into_iter().map(|c| c.1).collect();
        ids.sort_unstable();
        ids
    };
    kept.retain(|&i| w[i as usize] > 0.0);
    // Inverse CDF in id order.
    let total: f64 = kept.iter().map(|&i| w[i as usize]).sum();
    let target = u * total;
    let mut acc = 0.0;
    for &i in &kept {
        acc += w[i as usize];
        if acc > target {
            return i;
        }
    }
    kept.last().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::uniform;

    /// The radix sort gives the comparison sort's order: many ties, both zeros, infinities,
    /// subnormals and a vocabulary-sized row.
    #[test]
    fn radix_sort_matches_the_comparison_sort() {
        let special = [0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -1e-40, 3.5, -3.5];
        let vals = crate::backend::cpu::test_vals(49152, 3);
        let logits: Vec<f32> = vals.iter().enumerate().map(|(i, &v)| if i % 7 == 0 { special[i / 7 % 8] } else { ((v * 40.0).round() / 8.0) as f32 }).collect();
        let mut cand: Vec<(u32, u32)> = logits.iter().enumerate().map(|(i, &x)| (ord_key(x), i as u32)).collect();
        let mut want = cand.clone();
        want.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        sort_by_key_desc(&mut cand);
        assert!(cand == want);
    }

    #[test]
    fn greedy_takes_first_max_and_topk1_is_greedy() {
        let l = [0.5f32, 2.0, -1.0, 2.0];
        assert_eq!(pick(&l, 0.0, 0, 1.0, 0.99), 1);
        assert_eq!(pick(&l, 1.0, 1, 1.0, 0.99), 1);
    }

    #[test]
    fn empirical_distribution_matches_softmax_and_filters() {
        let l = [1.0f32, 0.0, 2.0, -0.5, 0.3];
        let n = 40_000;
        let count = |t: f32, k: usize, p: f32| {
            let mut c = [0usize; 5];
            for i in 0..n {
                c[pick(&l, t, k, p, uniform(7, 11, 0, i)) as usize] += 1;
            }
            c
        };
        let e: Vec<f64> = l.iter().map(|&x| (x as f64 / 0.7).exp()).collect();
        let z: f64 = e.iter().sum();
        let c = count(0.7, 0, 1.0);
        for i in 0..5 {
            let f = c[i] as f64 / n as f64;
            assert!((f - e[i] / z).abs() < 0.01, "token {i}: {f} vs {}", e[i] / z);
        }
        // top-k 2: only ids 2 and 0.
        let c = count(1.0, 2, 1.0);
        assert_eq!(c[1] + c[3] + c[4], 0);
        assert!(c[0] > 0 && c[2] > c[0]);
        // top-p 0.5: p(2) = 0.53 alone reaches it.
        let c = count(1.0, 0, 0.5);
        assert_eq!(c[2], n as usize);
    }

    #[test]
    fn special_logits_and_ties() {
        let draws = |l: &[f32], t: f32, k: usize, p: f32| {
            let mut c = vec![0usize; l.len()];
            for i in 0..4000 {
                c[pick(l, t, k, p, uniform(3, 5, 1, i)) as usize] += 1;
            }
            c
        };
        // NaN is never chosen; all-NaN rows fall back to id 0, all -inf rows to the first -inf.
        let nan = f32::NAN;
        assert_eq!(pick(&[nan, -1.0, nan], 0.0, 0, 1.0, 0.5), 1);
        assert_eq!(pick(&[nan, nan], 1.0, 0, 1.0, 0.5), 0);
        assert_eq!(pick(&[nan, f32::NEG_INFINITY, f32::NEG_INFINITY], 1.0, 0, 0.5, 0.5), 1);
        // Two +inf logits share the mass; NaN, -inf and finite logits get none.
        let c = draws(&[nan, 1.0, f32::INFINITY, f32::NEG_INFINITY, f32::INFINITY], 1.0, 0, 1.0);
        assert_eq!(c[0] + c[1] + c[3], 0);
        assert!(c[2] > 1800 && c[4] > 1800, "{c:?}");
        // Top-k cuts ties by id; top-p with equal weights keeps exactly ceil(p * n) tokens.
        let c = draws(&[1.0, 2.0, 2.0, 2.0, 2.0], 1.0, 2, 1.0);
        assert_eq!(c[0] + c[3] + c[4], 0);
        assert!(c[1] > 1800 && c[2] > 1800, "{c:?}");
        let c = draws(&[0.5; 8], 0.7, 0, 0.5);
        assert_eq!(c[4..].iter().sum::<usize>(), 0);
        assert!(c[..4].iter().all(|&n| n > 850), "{c:?}");
        // The id-order inverse CDF: u below the first kept weight's share picks the lowest kept id.
        assert_eq!(pick(&[0.0, 3.0, 0.0, 3.0], 1.0, 2, 1.0, 0.0), 1);
        assert_eq!(pick(&[0.0, 3.0, 0.0, 3.0], 1.0, 2, 1.0, 0.999), 3);
    }

    #[test]
    fn draws_depend_on_every_counter() {
        let base = uniform(1, 2, 3, 4);
        assert_eq!(base, uniform(1, 2, 3, 4));
        for other in [uniform(0, 2, 3, 4), uniform(1, 9, 3, 4), uniform(1, 2, 0, 4), uniform(1, 2, 3, 5)] {
            assert_ne!(base, other);
        }
    }
}
