// Paged KV cache kernels: kv_write (new K/V rows into their slots), kv_copy_block
// (copy-on-write of one block) and paged_attn (new queries against the cached keys of each
// sequence, online softmax), compiled once per HEAD_DIM and cache type. Cache layout per
// layer: [num_blocks, 2 (k, v), n_kv, block_size, HEAD_DIM] of kv_t: fp32, or with KV_BF16=1
// bf16 (Precision::Bf16: K/V rounded RNE when written, as f32_to_bf16 rounds; read back
// exactly; every sum stays fp32). CPU reference: src/backend/cpu/kv.rs (fp32).
#include "common.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef KV_BF16
#define KV_BF16 0
#endif
#if KV_BF16
#include <cuda_bf16.h>
typedef unsigned short kv_t;  // bf16 bits
__device__ __forceinline__ float kv_ld(const kv_t* p) { return __uint_as_float((unsigned)*p << 16); }
__device__ __forceinline__ kv_t kv_st(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
#else
typedef float kv_t;
__device__ __forceinline__ float kv_ld(const kv_t* p) { return *p; }
__device__ __forceinline__ kv_t kv_st(float x) { return x; }
#endif
#define DPL ((HEAD_DIM + 31) / 32)
#define QW 4

// cache[slot / bs, 0|1, h, slot % bs, :] = k|v[t, h, :]; k, v [tokens, n_kv, HEAD_DIM]
extern "C" __global__ void kv_write(kv_t* cache, const float* k, const float* v, const unsigned* slots, int tokens, int n_kv, int bs) {
    const long long n = (long long)tokens * n_kv * HEAD_DIM;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const int d = e % HEAD_DIM;
        const long long th = e / HEAD_DIM;
        const int h = th % n_kv;
        const long long t = th / n_kv;
        const unsigned slot = slots[t], blk = slot / bs, off = slot % bs;
        const long long kb = (((long long)blk * 2) * n_kv + h) * bs * HEAD_DIM + (long long)off * HEAD_DIM + d;
        cache[kb] = kv_st(k[e]);
        cache[kb + (long long)n_kv * bs * HEAD_DIM] = kv_st(v[e]);
    }
}

// cache block dst = block src (block_len values)
extern "C" __global__ void kv_copy_block(kv_t* cache, unsigned src, unsigned dst, long long block_len) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < block_len; e += (long long)gridDim.x * blockDim.x)
        cache[dst * block_len + e] = cache[src * block_len + e];
}

// seqs int4 [n_seqs] = (q_start, q_len, ctx_len, table_start); qtiles int2 = (seq, first j).
// q, out [tokens, n_heads, HEAD_DIM]; table [..] block ids. grid (n_qtiles, n_heads), block
// 32*QW, one warp per (query, head); lane = key for scores, lane = dims for the output.
// No shared memory (a warp that has no query leaves at once).
extern "C" __global__ void paged_attn(const float* q, const kv_t* cache, float* out, const int4* seqs, const int2* qtiles,
                                      const unsigned* table, int n_heads, int n_kv, int bs, float scale) {
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv);
    const int2 tile = qtiles[blockIdx.x];
    const int4 sq = seqs[tile.x];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = tile.y + warp;
    if (j >= sq.y) return;  // whole warp leaves; no block barriers below
    const int qrow = n_heads * HEAD_DIM;
    const long long qo = (long long)(sq.x + j) * qrow + h * HEAD_DIM;
    // The query row, lane-strided in registers; broadcast by shuffles in the dot products.
    float qr[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) qr[i] = lane + 32 * i < HEAD_DIM ? q[qo + lane + 32 * i] : 0.f;
    const int nk = sq.z - sq.y + j + 1;  // keys this query sees
    const long long head_off = (long long)kvh * bs * HEAD_DIM, vo = (long long)n_kv * bs * HEAD_DIM;
    float m = -INFINITY, l = 0.f, acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] = 0.f;
    for (int k0 = 0; k0 < nk; k0 += 32) {
        const int kk = k0 + lane;
        const bool vis = kk < nk;
        long long kp = 0;  // offset of this lane's key row
        if (vis) kp = (long long)table[sq.w + kk / bs] * 2 * n_kv * bs * HEAD_DIM + head_off + (long long)(kk % bs) * HEAD_DIM;
        float dot = 0.f;
#pragma unroll
        for (int d = 0; d < HEAD_DIM; d++) {
            const float qd = __shfl_sync(FULL_MASK, qr[d / 32], d % 32);
            if (vis) dot += qd * kv_ld(cache + kp + d);
        }
        const float s = vis ? dot * scale : -INFINITY;
        const float mn = fmaxf(m, warp_max(s));
        const float p = vis ? expf(s - mn) : 0.f;
        const float corr = expf(m - mn);
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] *= corr;
        const int nt = min(32, nk - k0);
        for (int t = 0; t < nt; t++) {
            const float pt = __shfl_sync(FULL_MASK, p, t);
            const long long vt = __shfl_sync(FULL_MASK, kp, t) + vo;
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                const int d = lane + 32 * i;
                if (d < HEAD_DIM) acc[i] += pt * kv_ld(cache + vt + d);
            }
        }
        m = mn;
    }
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        const int d = lane + 32 * i;
        if (d < HEAD_DIM) out[qo + d] = acc[i] / l;
    }
}
