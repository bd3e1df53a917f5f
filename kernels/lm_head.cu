// The per-row parts of the fused lm-head log-prob; the logits of a chunk of rows come from a
// GEMM (cuBLAS) into a [chunk, vocab] scratch, so [tokens, vocab] is never materialised.
// lse_rows: online log-sum-exp over the vocabulary (threads stride over vocab tiles, then a
// block merge); lm_head_grad: the logits gradient in place. CPU reference:
// src/backend/cpu/lm_head.rs. Launch: one block per row, blockDim a multiple of 32.
#include "common.cuh"

// logits [rows, vocab]; targets, logp, lse [rows]
extern "C" __global__ void lse_rows(const float* logits, const unsigned* targets, float* logp, float* lse, int vocab) {
    __shared__ float sm[32], ss[32];
    const long long row = blockIdx.x;
    const float* l = logits + row * vocab;
    float m = -INFINITY, s = 0.f;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        const float x = l[v];
        if (x > m) {
            s = s * expf(m - x) + 1.f;
            m = x;
        } else {
            s += expf(x - m);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(FULL_MASK, m, o), s2 = __shfl_xor_sync(FULL_MASK, s, o);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) lse_merge(m, s, sm[w], ss[w]);
        const float L = m + logf(s);
        lse[row] = L;
        logp[row] = l[targets[row]] - L;
    }
}

// g[rows, vocab] (in place over the logits) = dlogp[r] * (onehot(target[r]) - exp(logit - lse[r]))
extern "C" __global__ void lm_head_grad(float* g, const unsigned* targets, const float* lse, const float* dlogp, int rows, int vocab) {
    const long long n = (long long)rows * vocab;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / vocab;
        const int v = e % vocab;
        const float p = expf(g[e] - lse[r]);
        g[e] = dlogp[r] * ((v == (int)targets[r] ? 1.f : 0.f) - p);
    }
}
