// Token sampling for the rollout engine: one block of SAMPLE_THREADS threads per row of
// logits picks the row's next token with the same result as the host sampler
// (src/backend/cpu/sample.rs `pick`, the CPU reference): greedy argmax (lowest id among the
// largest non-NaN logits), else weights w = exp((x - max) / temperature) in f64, top-k and
// top-p cuts over the logits ordered descending (ties: lower id first), and the inverse CDF
// of the kept weights in token-id order for the draw u = mix64 hash of (seed, prompt key,
// sample, position), top 53 bits, as `sampler::uniform`. No sort: the cuts are found by a
// bitwise threshold search over order keys of the logits (32 counting passes for top-k, 32
// mass passes for top-p), with block reductions in a fixed order (no atomics, so a row's
// result is deterministic). Sums are f64 on both sides; only their order differs from the
// host's, which can change a token only when u * total lies within a few f64 roundings of a
// cumulative boundary.
#include "common.cuh"

#define SAMPLE_THREADS 256
// u32 words per row of `params`: seed lo/hi, key lo/hi, sample, position, temperature (f32
// bits), top_k (0 = all), top_p (f32 bits), pad.
#define ROW_WORDS 10

__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    unsigned long long z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// ord_key(a) > ord_key(b) iff a > b for non-NaN floats (sampler::ord_key).
__device__ __forceinline__ unsigned ord_key(float x) {
    const unsigned b = __float_as_uint(x);
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float from_ord(unsigned k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Weight of a non-NaN logit x given the row max m (md = m as double).
__device__ __forceinline__ double weight(float x, float m, double md, double inv_t) {
    return x == m ? 1.0 : exp(((double)x - md) * inv_t);
}

// Block maximum over SAMPLE_THREADS threads (sums: block_sum in common.cuh); every thread
// gets the result. `sh` is 32 elements of shared memory, free again when this returns.
__device__ unsigned long long block_max_u64(unsigned long long v, unsigned long long* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long y = __shfl_xor_sync(FULL_MASK, v, o);
        v = y > v ? y : v;
    }
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < SAMPLE_THREADS / 32 ? sh[lane] : 0ull;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long y = __shfl_xor_sync(FULL_MASK, v, o);
            v = y > v ? y : v;
        }
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    v = sh[0];
    __syncthreads();
    return v;
}

// logits [rows, vocab] f32; params [rows, ROW_WORDS] u32; wbuf [rows, vocab] f64 scratch
// (the weights; unused by greedy rows); out [rows] u32 token ids.
// Launch: grid (rows), block SAMPLE_THREADS.
extern "C" __global__ void sample_rows(const float* logits, const unsigned* params, double* wbuf, unsigned* out, int vocab) {
    __shared__ unsigned long long sh_u64[32];
    __shared__ double sh_f64[32];
    __shared__ unsigned sh_u32[32];
    __shared__ double chunk_mass[SAMPLE_THREADS];
    __shared__ unsigned chunk_ties[SAMPLE_THREADS];
    __shared__ double bcast_f64[2];
    __shared__ int bcast_int[2];

    const long long row = blockIdx.x;
    const int tid = threadIdx.x;
    const float* l = logits + row * vocab;
    double* w = wbuf + row * vocab;
    const unsigned* p = params + row * ROW_WORDS;
    const float temp = __uint_as_float(p[6]);
    const unsigned top_k = p[7];
    const float top_p = __uint_as_float(p[8]);

    // 1. Argmax: the largest (order key, ~id) over non-NaN logits; 0 = every logit is NaN.
    unsigned long long best = 0ull;
    for (int i = tid; i < vocab; i += SAMPLE_THREADS) {
        const float x = l[i];
        if (x == x) {
            const unsigned long long c = ((unsigned long long)ord_key(x) << 32) | (unsigned)~i;
            best = c > best ? c : best;
        }
    }
    best = block_max_u64(best, sh_u64);
    const unsigned am = best ? ~(unsigned)best : 0u;
    const float m = best ? l[am] : -INFINITY;
    if (temp == 0.f || top_k == 1u || m == -INFINITY) {
        if (tid == 0) out[row] = am;
        return;
    }

    // 2. Weights (f64, kept in the scratch row) and the number of non-NaN logits.
    const double inv_t = 1.0 / (double)temp, md = (double)m;
    unsigned nv = 0;
    for (int i = tid; i < vocab; i += SAMPLE_THREADS) {
        const float x = l[i];
        double wi = 0.0;
        if (x == x) {
            nv++;
            wi = weight(x, m, md, inv_t);
        }
        w[i] = wi;
    }
    nv = block_sum(nv, sh_u32); // its barriers also publish the w writes to the block

    // The kept set so far: every non-NaN token if !cut, else the tokens with key > T and the
    // first c tokens (in id order) with key == T.
    bool cut = false;
    unsigned T = 0, c = 0;

    // 3. Top-k: T = the largest t with #(key >= t) >= k (the k-th key), bit by bit.
    const unsigned k = top_k == 0u ? nv : min(top_k, nv);
    if (k < nv) {
        unsigned t = 0;
        for (int b = 31; b >= 0; b--) {
            const unsigned cand = t | (1u << b);
            unsigned cnt = 0;
            for (int i = tid; i < vocab; i += SAMPLE_THREADS) {
                const float x = l[i];
                cnt += (x == x && ord_key(x) >= cand) ? 1u : 0u;
            }
            if (block_sum(cnt, sh_u32) >= k) t = cand;
        }
        unsigned gt = 0;
        for (int i = tid; i < vocab; i += SAMPLE_THREADS) {
            const float x = l[i];
            gt += (x == x && ord_key(x) > t) ? 1u : 0u;
        }
        gt = block_sum(gt, sh_u32);
        cut = true;
        T = t;
        c = k - gt;
    }

    // 4. Top-p over the top-k set: keep tokens (in order) while the mass before them is below
    //    limit = top_p * (top-k mass). Tp = the smallest key t >= T with mass(key > t) < limit,
    //    found as 1 + the largest t where that fails; then the ties at Tp one by one.
    if (top_p < 1.f) {
        double mgt = 0.0;
        for (int i = tid; i < vocab; i += SAMPLE_THREADS) {
            const float x = l[i];
            if (x == x && (!cut || ord_key(x) > T)) mgt += w[i];
        }
        mgt = block_sum(mgt, sh_f64);
        if (tid == 0) {
            double total = mgt;
            if (cut) {
                const double wt = weight(from_ord(T), m, md, inv_t);
                for (unsigned r = 0; r < c; r++) total += wt;
            }
            bcast_f64[0] = total;
        }
        __syncthreads();
        const double limit = (double)top_p * bcast_f64[0];
        __syncthreads();
        const unsigned lo = cut ? T : 0u;
        unsigned f = 0;
        for (int b = 31; b >= 0; b--) {
            const unsigned cand = f | (1u << b);
            bool fails = true;
            if (cand >= lo) {
                double s = 0.0;
                for (int i = tid; i < vocab; i += SAMPLE_THREADS) {
                    const float x = l[i];
                    if (x == x && ord_key(x) > cand) s += w[i];
                }
                fails = !(block_sum(s, sh_f64) < limit);
            }
            if (fails) f = cand;
        }
        const unsigned tp = f + 1u;
        double mp = 0.0;
        unsigned gtp = 0, eq = 0;
        for (int i = tid; i < vocab; i += SAMPLE_THREADS) {
            const float x = l[i];
            if (x == x) {
                const unsigned o = ord_key(x);
                if (o > tp) {
                    mp += w[i];
                    gtp++;
                }
                eq += o == tp ? 1u : 0u;
            }
        }
        mp = block_sum(mp, sh_f64);
        gtp = block_sum(gtp, sh_u32);
        eq = block_sum(eq, sh_u32);
        const unsigned avail = (cut && tp == T) ? c : eq;
        if (tid == 0) {
            const double wt = weight(from_ord(tp), m, md, inv_t);
            double acc = mp;
            unsigned cp = 0;
            while (cp < avail) {
                if (gtp + cp > 0u && acc >= limit) break;
                acc += wt;
                cp++;
            }
            bcast_int[0] = (int)cp;
        }
        __syncthreads();
        cut = true;
        T = tp;
        c = (unsigned)bcast_int[0];
        __syncthreads();
    }

    // 5. The draw: inverse CDF of the kept weights in id order. Thread j owns the contiguous
    //    ids [j * per, (j + 1) * per); thread 0 scans the per-thread tie counts and masses.
    const int per = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int i0 = min(tid * per, vocab), i1 = min(i0 + per, vocab);
    unsigned ties = 0;
    if (cut) {
        for (int i = i0; i < i1; i++) {
            const float x = l[i];
            ties += (x == x && ord_key(x) == T) ? 1u : 0u;
        }
    }
    chunk_ties[tid] = ties;
    __syncthreads();
    if (tid == 0) {
        unsigned acc = 0;
        for (int j = 0; j < SAMPLE_THREADS; j++) {
            const unsigned n = chunk_ties[j];
            chunk_ties[j] = acc;
            acc += n;
        }
    }
    __syncthreads();
    const unsigned rank0 = chunk_ties[tid];
    double s = 0.0;
    {
        unsigned rank = rank0;
        for (int i = i0; i < i1; i++) {
            const float x = l[i];
            if (x != x) continue;
            bool keep = true;
            if (cut) {
                const unsigned o = ord_key(x);
                keep = o > T || (o == T && rank++ < c);
            }
            if (keep) s += w[i];
        }
    }
    chunk_mass[tid] = s;
    __syncthreads();
    if (tid == 0) {
        const unsigned* q = p;
        const unsigned long long seed = q[0] | ((unsigned long long)q[1] << 32);
        const unsigned long long key = q[2] | ((unsigned long long)q[3] << 32);
        const unsigned long long z = mix64(mix64(mix64(mix64(seed) ^ key) ^ (unsigned long long)q[4]) ^ (unsigned long long)q[5]);
        const double u = (double)(z >> 11) * (1.0 / 9007199254740992.0);
        double total = 0.0;
        for (int j = 0; j < SAMPLE_THREADS; j++) total += chunk_mass[j];
        const double target = u * total;
        double acc = 0.0, at = 0.0;
        int sel = -1;
        for (int j = 0; j < SAMPLE_THREADS; j++) {
            const double next = acc + chunk_mass[j];
            if (sel < 0 && next > target) {
                sel = j;
                at = acc;
            }
            acc = next;
        }
        bcast_int[1] = sel;
        bcast_f64[1] = at;
        bcast_f64[0] = target;
        if (sel < 0) out[row] = am; // unreachable: the argmax token is kept with weight 1
    }
    __syncthreads();
    if (tid == bcast_int[1]) {
        const double at = bcast_f64[1], target = bcast_f64[0];
        unsigned rank = rank0;
        double a = 0.0;
        for (int i = i0; i < i1; i++) {
            const float x = l[i];
            if (x != x) continue;
            bool keep = true;
            if (cut) {
                const unsigned o = ord_key(x);
                keep = o > T || (o == T && rank++ < c);
            }
            if (!keep) continue;
            a += w[i];
            if (at + a > target) {
                out[row] = (unsigned)i;
                break;
            }
        }
    }
}
