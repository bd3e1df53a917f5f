// Paged KV cache kernels: kv_write (new K/V rows into their slots), kv_copy_block
// (copy-on-write of one block), paged_attn (new queries against the cached keys of each
// sequence, online softmax) and, for sequences of one new query (a decode step),
// paged_decode + paged_decode_combine (flash-decoding), and under Precision::Bf16
// paged_attn_mma (the prefill chunks on tensor cores); compiled once per HEAD_DIM and cache
// type. Cache layout per layer: [num_blocks, 2 (k, v), n_kv, block_size, HEAD_DIM] of kv_t:
// fp32, or with KV_BF16=1 bf16 (Precision::Bf16: K/V rounded RNE when written, as
// f32_to_bf16 rounds; read back exactly; every sum stays fp32). CPU reference:
// src/backend/cpu/kv.rs (fp32).
#include <cuda_bf16.h>
#include "common.cuh"
#include "mma.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#ifndef KV_BF16
#define KV_BF16 0
#endif
#if KV_BF16
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

// ---- Prefill chunks on tensor cores (Precision::Bf16; host: paged_attention_split) --------
// paged_attn_mma: paged_attn's sequences, causality and output, computed as attn_fwd_mma
// (kernels/attention_mma.cu) computes the training forward: S = Q K^T and O += P V with
// mma.sync.m16n8k16 bf16 -> fp32, the online softmax (scale, mask, running max and sum) in
// fp32, P rounded to bf16 (RNE) for PV. Queries are fp32, rounded RNE as they are staged; the
// K/V rows come through the block table: a bf16 cache is staged as it is (exact), an fp32
// one (a cache made before the precision changed) rounded RNE. HEAD_DIM is zero-padded to a
// multiple of 16 (PA_HDP).
// GQA: a block covers `hb` query heads of one KV group (hb divides the group; the host picks
// the largest divisor <= 8) for PA_BQ / hb queries: tile row r = (query q0 + r / hb, head
// h0 + r % hb), so the mma M dimension holds queries x heads and each K/V tile is read from
// the cache and staged once for the hb heads instead of hb times. The block count stays
// that of one head per block (hb heads x PA_BQ / hb queries), and a warp's 16 rows span
// 16 / hb queries, so its causal cut-off (wlast) is tighter. Rows past rows = nq * hb (the
// PA_BQ % hb leftover, a short tile) are zero and never written.
// Fragments as in attention_mma.cu (g = lane / 4, t4 = lane % 4): A (rows g | g + 8, cols 2t4,
// 2t4 + 1 | + 8), B (k rows 2t4, 2t4 + 1 | + 8, col g), C (row g | g + 8, cols 2t4, 2t4 + 1).
#define PA_HDP ((HEAD_DIM + 15) / 16 * 16)  // head dim padded to the mma k-step
#define PA_NWARP 4
#define PA_BQ (16 * PA_NWARP)  // tile rows (queries x heads) per block
#define PA_BK 32               // keys per tile
#define PA_LDQ (PA_HDP + 8)    // row stride (bf16) of the Q and K tiles: even, rows 4-byte aligned
#define PA_LDV (PA_BK + 8)     // row stride (bf16) of the transposed V tile
#define PA_NT (PA_BK / 8)      // n8 score tiles per key tile
#define PA_ND (PA_HDP / 8)     // n8 output tiles

// A cached K/V value as staged: bf16 bits as they are, fp32 rounded RNE.
#if KV_BF16
__device__ __forceinline__ __nv_bfloat16 kv_bf16(const kv_t* p) { return __ushort_as_bfloat16(*p); }
#else
__device__ __forceinline__ __nv_bfloat16 kv_bf16(const kv_t* p) { return __float2bfloat16_rn(*p); }
#endif

// seqs int4 [n_seqs] = (q_start, q_len, ctx_len, table_start) as paged_attn; qtiles int2 =
// (seq, first query j), PA_BQ / hb queries each. q, out [tokens, n_heads, HEAD_DIM] fp32;
// table [..] block ids. grid (n_qtiles, n_heads / hb), block 32 * PA_NWARP; warp w owns tile
// rows 16w .. +16. Dynamic smem (bytes): (PA_BQ * PA_LDQ + PA_BK * PA_LDQ + PA_HDP * PA_LDV) * 2
// (host: precision.rs, paged_mma_smem_bytes): Q [PA_BQ][PA_LDQ], K [PA_BK][PA_LDQ], V
// transposed [PA_HDP][PA_LDV] (a B fragment's key pair is one 32-bit word).
extern "C" __global__ void __launch_bounds__(32 * PA_NWARP) paged_attn_mma(const float* q, const kv_t* cache, float* out, const int4* seqs,
                                                                          const int2* qtiles, const unsigned* table, int n_heads, int n_kv,
                                                                          int bs, int hb, float scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [PA_BQ][PA_LDQ]
    __nv_bfloat16* ks = qs + PA_BQ * PA_LDQ;                          // [PA_BK][PA_LDQ]
    __nv_bfloat16* vt = ks + PA_BK * PA_LDQ;                          // [PA_HDP][PA_LDV]
    const int h0 = blockIdx.y * hb, kvh = h0 / (n_heads / n_kv);
    const int2 tile = qtiles[blockIdx.x];
    const int4 sq = seqs[tile.x];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int qrow = n_heads * HEAD_DIM;
    const int q0 = tile.y;
    const int nq = min(PA_BQ / hb, sq.y - q0);  // queries of this tile
    const int rows = nq * hb;                   // tile rows in use
    const int off = sq.z - sq.y;                // cached keys before the first new query
    const int nk = off + q0 + nq;               // keys the tile's last query sees
    for (int e = threadIdx.x; e < PA_BQ * PA_HDP; e += blockDim.x) {
        const int r = e / PA_HDP, d = e % PA_HDP;
        qs[r * PA_LDQ + d] =
            (r < rows && d < HEAD_DIM) ? __float2bfloat16_rn(q[(long long)(sq.x + q0 + r / hb) * qrow + (h0 + r % hb) * HEAD_DIM + d]) : BF16_ZERO;
    }
    const int wq = warp * 16;                                // first tile row of this warp
    const bool wactive = wq < rows;
    const int wlast = off + q0 + min(wq + 15, rows - 1) / hb;  // last key any row of the warp sees
    const int ra = wq + g, rb = ra + 8;                      // tile rows of this thread
    const int ja = q0 + ra / hb, jb = q0 + rb / hb;          // their sequence query index
    const long long kvo = (long long)n_kv * bs * HEAD_DIM;   // from a K row to its V row
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    float o[PA_ND][4];
#pragma unroll
    for (int nd = 0; nd < PA_ND; nd++) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
    for (int k0 = 0; k0 < nk; k0 += PA_BK) {
        __syncthreads();
        for (int e = threadIdx.x; e < PA_BK * PA_HDP; e += blockDim.x) {
            const int r = e / PA_HDP, d = e % PA_HDP, kk = k0 + r;
            __nv_bfloat16 kx = BF16_ZERO, vx = BF16_ZERO;
            if (kk < nk && d < HEAD_DIM) {
                const long long kp = ((long long)table[sq.w + kk / bs] * 2 * n_kv + kvh) * bs * HEAD_DIM + (long long)(kk % bs) * HEAD_DIM + d;
                kx = kv_bf16(cache + kp);
                vx = kv_bf16(cache + kp + kvo);
            }
            ks[r * PA_LDQ + d] = kx;
            vt[d * PA_LDV + r] = vx;
        }
        __syncthreads();
        if (!wactive || k0 > wlast) continue;  // warp-uniform: the shuffles below see all lanes
        // S [16, PA_BK] = Q K^T
        float s[PA_NT][4];
#pragma unroll
        for (int nt = 0; nt < PA_NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < PA_HDP / 16; kk++) {
            const __nv_bfloat16* qa = qs + ra * PA_LDQ + kk * 16 + 2 * t4;
            const unsigned a0 = ld_pair(qa), a1 = ld_pair(qa + 8 * PA_LDQ), a2 = ld_pair(qa + 8), a3 = ld_pair(qa + 8 * PA_LDQ + 8);
#pragma unroll
            for (int nt = 0; nt < PA_NT; nt++) {
                const __nv_bfloat16* kb = ks + (nt * 8 + g) * PA_LDQ + kk * 16 + 2 * t4;
                mma_bf16(s[nt], a0, a1, a2, a3, ld_pair(kb), ld_pair(kb + 8));
            }
        }
        // Scale and mask in fp32 (query j sees keys 0 .. off + j); running max over the row.
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < PA_NT; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int key = k0 + nt * 8 + 2 * t4 + (i & 1);
                const int j = i < 2 ? ja : jb;
                const bool vis = key < nk && key <= off + j;
                s[nt][i] = vis ? s[nt][i] * scale : -INFINITY;
                mx[i >> 1] = fmaxf(mx[i >> 1], s[nt][i]);
            }
        }
        mma_softmax_tile(s, mx, m, l, o);
        // O [16, PA_HDP] += P [16, PA_BK] (bf16) V [PA_BK, PA_HDP]
#pragma unroll
        for (int kt = 0; kt < PA_BK / 16; kt++) {
            const unsigned a0 = pack_bf16(s[2 * kt][0], s[2 * kt][1]), a1 = pack_bf16(s[2 * kt][2], s[2 * kt][3]);
            const unsigned a2 = pack_bf16(s[2 * kt + 1][0], s[2 * kt + 1][1]), a3 = pack_bf16(s[2 * kt + 1][2], s[2 * kt + 1][3]);
#pragma unroll
            for (int nd = 0; nd < PA_ND; nd++) {
                const __nv_bfloat16* vb = vt + (nd * 8 + g) * PA_LDV + kt * 16 + 2 * t4;
                mma_bf16(o[nd], a0, a1, a2, a3, ld_pair(vb), ld_pair(vb + 8));
            }
        }
    }
    if (!wactive) return;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = r ? rb : ra;
        if (row >= rows) continue;
        const float inv = 1.f / l[r];
        const long long qo = (long long)(sq.x + q0 + row / hb) * qrow + (h0 + row % hb) * HEAD_DIM;
#pragma unroll
        for (int nd = 0; nd < PA_ND; nd++) {
            const int d = nd * 8 + 2 * t4;
            if (d < HEAD_DIM) out[qo + d] = o[nd][2 * r] * inv;
            if (d + 1 < HEAD_DIM) out[qo + d + 1] = o[nd][2 * r + 1] * inv;
        }
    }
}

// Decode (one new query per sequence). paged_attn would give each (sequence, query head) one
// warp that walks the whole context alone, and every head of a GQA group would re-read its KV
// head's rows: `group` times the bytes, and a near-empty GPU at small batch. paged_decode runs
// one block per (split of `split` keys of a context, KV head, chunk of up to DEC_GMAX query
// heads of its group): each K/V value is read once for all the group's heads, and a long
// context spreads over many blocks. A context of one split writes its output; a longer one
// writes per-split partials that paged_decode_combine merges in split order (no atomics).
#define DEC_WARPS 4  // warps per paged_decode block
#define DEC_GMAX 8   // query heads per paged_decode block at most (a larger group: gridDim.z chunks)

#define QPAD ((HEAD_DIM + 3) / 4 * 4)  // a query row in shared memory, zero-padded to float4s

struct __align__(16) DecodeSmem {
    float q[DEC_GMAX][QPAD];                   // the block's query rows, times scale
    float acc[DEC_WARPS][DEC_GMAX][HEAD_DIM];  // each warp's unnormalised output
    float m[DEC_WARPS][DEC_GMAX], l[DEC_WARPS][DEC_GMAX];  // each warp's max and sum of exp
    float w[DEC_WARPS][DEC_GMAX];              // exp(m_warp - m_block): a warp's weight in the merge
    float mx[DEC_GMAX], lt[DEC_GMAX];          // the block's max and sum
};

// paged_decode's block for G query heads h0 .. h0 + G of KV head kvh, split sp of sequence ds.
template <int G>
__device__ __forceinline__ void decode_block(DecodeSmem& sm, const float* q, const kv_t* cache, float* out, float* part, int4 ds, int sp,
                                             const unsigned* table, int n_heads, int n_kv, int kvh, int h0, int bs, int split, float scale) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long qo = ((long long)ds.x * n_heads + h0) * HEAD_DIM;  // the G query rows, contiguous
    for (int e = threadIdx.x; e < G * QPAD; e += blockDim.x) {
        const int g = e / QPAD, d = e % QPAD;
        sm.q[g][d] = d < HEAD_DIM ? q[qo + g * HEAD_DIM + d] * scale : 0.f;
    }
    __syncthreads();
    const int k_begin = sp * split, k_end = min(ds.y, k_begin + split);
    const long long vo = (long long)n_kv * bs * HEAD_DIM;  // from a K row to its V row
    float m[G], l[G], acc[G][DPL];  // l: this lane's part of the sum (summed over the warp at the end)
#pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[g][i] = 0.f;
    }
    for (int k0 = k_begin + 32 * warp; k0 < k_end; k0 += 32 * DEC_WARPS) {
        const int kk = k0 + lane;
        const bool vis = kk < k_end;
        unsigned row = 0;  // this lane's K row: cache + row * HEAD_DIM (the host checks it fits)
        float s[G];
#pragma unroll
        for (int g = 0; g < G; g++) s[g] = -INFINITY;
        if (vis) {
            row = (table[ds.z + kk / bs] * 2 * n_kv + kvh) * bs + kk % bs;
            const long long kp = (long long)row * HEAD_DIM;
#pragma unroll
            for (int g = 0; g < G; g++) s[g] = 0.f;
#pragma unroll
            for (int d = 0; d < QPAD; d += 4) {
                float kd[4];
#pragma unroll
                for (int j = 0; j < 4; j++) kd[j] = d + j < HEAD_DIM ? kv_ld(cache + kp + d + j) : 0.f;
#pragma unroll
                for (int g = 0; g < G; g++) {
                    const float4 qv = *reinterpret_cast<const float4*>(&sm.q[g][d]);  // broadcast
                    s[g] += qv.x * kd[0];
                    s[g] += qv.y * kd[1];
                    s[g] += qv.z * kd[2];
                    s[g] += qv.w * kd[3];
                }
            }
        }
        float p[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float mn = fmaxf(m[g], warp_max(s[g]));
            p[g] = vis ? expf(s[g] - mn) : 0.f;
            const float corr = expf(m[g] - mn);
            l[g] = l[g] * corr + p[g];
#pragma unroll
            for (int i = 0; i < DPL; i++) acc[g][i] *= corr;
            m[g] = mn;
        }
        const int nt = min(32, k_end - k0);
        for (int t = 0; t < nt; t++) {
            const long long vt = (long long)__shfl_sync(FULL_MASK, row, t) * HEAD_DIM + vo;
            float vd[DPL];
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                const int d = lane + 32 * i;
                vd[i] = d < HEAD_DIM ? kv_ld(cache + vt + d) : 0.f;
            }
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float pt = __shfl_sync(FULL_MASK, p[g], t);
#pragma unroll
                for (int i = 0; i < DPL; i++) acc[g][i] += pt * vd[i];
            }
        }
    }
    // Merge the warps that saw keys (in warp order), as paged_decode_combine merges splits.
#pragma unroll
    for (int g = 0; g < G; g++) {
        const float lw = warp_sum(l[g]);
        if (lane == 0) {
            sm.m[warp][g] = m[g];
            sm.l[warp][g] = lw;
        }
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < HEAD_DIM) sm.acc[warp][g][d] = acc[g][i];
        }
    }
    __syncthreads();
    const int nw = min(DEC_WARPS, (k_end - k_begin + 31) / 32);
    if (threadIdx.x < G) {
        const int g = threadIdx.x;
        float mx = sm.m[0][g], lt = 0.f;
        for (int w = 1; w < nw; w++) mx = fmaxf(mx, sm.m[w][g]);
        for (int w = 0; w < nw; w++) {
            sm.w[w][g] = expf(sm.m[w][g] - mx);
            lt += sm.l[w][g] * sm.w[w][g];
        }
        sm.mx[g] = mx;
        sm.lt[g] = lt;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < G * HEAD_DIM; e += blockDim.x) {
        const int g = e / HEAD_DIM, d = e % HEAD_DIM;
        float a = 0.f;
        for (int w = 0; w < nw; w++) a += sm.acc[w][g][d] * sm.w[w][g];
        if (ds.w < 0) {
            out[qo + e] = a / sm.lt[g];
        } else {
            float* pp = part + ((long long)(ds.w + sp) * n_heads + h0 + g) * (HEAD_DIM + 2);
            pp[d] = a;
            if (d == 0) {
                pp[HEAD_DIM] = sm.mx[g];
                pp[HEAD_DIM + 1] = sm.lt[g];
            }
        }
    }
}

// dseqs int4 [n_dseqs] = (q row, ctx_len, table_start, first partial; -1 when the context is
// one split), items int2 = (dseq, split), or (-1, 0): padding, skipped. q, out [tokens, n_heads, HEAD_DIM]; part [n_parts,
// n_heads, HEAD_DIM + 2] (per split and head: unnormalised accumulator, max m, sum l).
// grid (n_items, n_kv, ceil(group / DEC_GMAX)), block 32*DEC_WARPS: warp w takes the split's
// key tiles w, w + DEC_WARPS, ... with its own online softmax per head; lane = key for the
// scores of all G heads (the K row read once), lane = dims for the output (the V row read
// once). smem: DecodeSmem, static (20.6 KB at HEAD_DIM 128), where the warps' states merge.
extern "C" __global__ void paged_decode(const float* q, const kv_t* cache, float* out, float* part, const int4* dseqs, const int2* items,
                                        const unsigned* table, int n_heads, int n_kv, int bs, int split, float scale) {
    __shared__ DecodeSmem sm;
    const int2 it = items[blockIdx.x];
    if (it.x < 0) return;  // padding (the host pads items to a power of two)
    const int4 ds = dseqs[it.x];
    const int group = n_heads / n_kv, kvh = blockIdx.y, c0 = blockIdx.z * DEC_GMAX;
    const int h0 = kvh * group + c0;
#define DECODE_CASE(G) \
    case G: decode_block<G>(sm, q, cache, out, part, ds, it.y, table, n_heads, n_kv, kvh, h0, bs, split, scale); break;
    switch (min(DEC_GMAX, group - c0)) {
        DECODE_CASE(1) DECODE_CASE(2) DECODE_CASE(3) DECODE_CASE(4) DECODE_CASE(5) DECODE_CASE(6) DECODE_CASE(7) DECODE_CASE(8)
    }
#undef DECODE_CASE
}

// out[seq, h, :] from the partials of a context of several splits, in split order:
// m = max_s m_s, l = sum_s l_s exp(m_s - m), out = sum_s acc_s exp(m_s - m) / l.
// cseqs [n] indices into dseqs (see paged_decode), or -1: padding, skipped. grid (n, n_heads), block 32: one warp per
// (sequence, head); lane = split for the weights (broadcast by shuffles), lane = dims for the
// output. No shared memory.
extern "C" __global__ void paged_decode_combine(const float* part, float* out, const int4* dseqs, const int* cseqs, int n_heads, int split) {
    if (cseqs[blockIdx.x] < 0) return;  // padding (to a power of two)
    const int4 ds = dseqs[cseqs[blockIdx.x]];
    const int h = blockIdx.y, lane = threadIdx.x;
    const int ns = (ds.y + split - 1) / split;
    const long long stride = (long long)n_heads * (HEAD_DIM + 2);  // from one split's partial to the next
    const float* pp = part + ((long long)ds.w * n_heads + h) * (HEAD_DIM + 2);
    float m = -INFINITY;
    for (int s = lane; s < ns; s += 32) m = fmaxf(m, pp[s * stride + HEAD_DIM]);
    m = warp_max(m);
    float l = 0.f, o[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) o[i] = 0.f;
    for (int s0 = 0; s0 < ns; s0 += 32) {
        float w = 0.f;  // weight of split s0 + lane
        if (s0 + lane < ns) {
            w = expf(pp[(s0 + lane) * stride + HEAD_DIM] - m);
            l += pp[(s0 + lane) * stride + HEAD_DIM + 1] * w;
        }
        const int nt = min(32, ns - s0);
        for (int t = 0; t < nt; t++) {
            const float wt = __shfl_sync(FULL_MASK, w, t);
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                const int d = lane + 32 * i;
                if (d < HEAD_DIM) o[i] += wt * pp[(s0 + t) * stride + d];
            }
        }
    }
    l = warp_sum(l);
    const long long qo = ((long long)ds.x * n_heads + h) * HEAD_DIM;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
        const int d = lane + 32 * i;
        if (d < HEAD_DIM) out[qo + d] = o[i] / l;
    }
}
