// Attention forward on tensor cores for the bf16 mixed-precision mode (Precision::Bf16, host
// side in src/backend/cuda/precision.rs): fp32 q/k/v in global memory, rounded to bf16 (RNE)
// as they are staged in shared memory, or (the `_qkv_bf16` kernels) q/k/v already bf16
// (`Backend::store_bf16`: the same RNE rounding made once by f32_to_bf16, so both variants
// stage the same bits and give the same results); S = Q K^T and O += P V with
// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 (bf16 inputs, fp32 accumulation); the online
// softmax (scale, mask, running max and sum, rescaling) in fp32; P rounded to bf16 for the PV
// product; fp32 out and the same lse as attn_fwd (attention.cu), so the fp32 backward kernels
// run unchanged on its outputs. Compiled once per HEAD_DIM (any value: dims are zero-padded
// to a multiple of 16 in shared memory). CPU reference: src/backend/cpu/attention.rs.
//   spans  int4 [n_spans] = (start, len, prefix_start, prefix_len)   (as attn_fwd)
//   qtiles int2 [n]       = (span, first query j of the tile); BQ queries per tile
// Visible keys of a span: kk = 0 .. prefix_len + len (prefix rows, then its own rows);
// query j sees kk <= prefix_len + j. GQA: head h reads KV head h / (n_heads / n_kv).
// Block = 4 warps; warp w owns queries j0 + 16w .. +16 of the tile (the mma M dimension);
// per key tile of BK keys the block converts K (row-major [BK][LDQ]) and V (transposed,
// [HDP][LDV], so a B fragment's key pair is one 32-bit word) into shared memory.
// Fragments (PTX ISA, m16n8k16, g = lane / 4, t = lane % 4): A regs hold (row g | g+8,
// cols 2t, 2t+1 | +8), B regs (k rows 2t, 2t+1 | +8, col g), C (row g | g+8, cols 2t, 2t+1);
// the low half of a 32-bit register is the lower column / k index. The score accumulators of
// two adjacent n8 tiles are exactly the A fragment of P for the next k16 step (FA2).
// Each thread owns two query rows (g, g + 8) of its warp's 16; row max and sum reduce over
// the 4 threads of a quad with shuffles (no __syncwarp needed).
#include <cuda_bf16.h>
#include "common.cuh"
#include "mma.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#define HDP ((HEAD_DIM + 15) / 16 * 16)  // head dim padded to the mma k-step
#define NWARP 4
#define BQ (16 * NWARP)  // queries per block
#define BK 32            // keys per tile
#define LDQ (HDP + 8)    // row stride (bf16) of the Q and K tiles: even, rows 4-byte aligned
#define LDV (BK + 8)     // row stride (bf16) of the transposed V tile
#define NT (BK / 8)      // n8 score tiles per key tile
#define ND (HDP / 8)     // n8 output tiles
// dynamic smem bytes: (BQ * LDQ + BK * LDQ + HDP * LDV) * 2 (host: precision.rs)

// A q/k/v element as staged in shared memory: fp32 rounded RNE, or bf16 as it is.
__device__ __forceinline__ __nv_bfloat16 as_bf16(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ __nv_bfloat16 as_bf16(__nv_bfloat16 x) { return x; }

// q, out [tokens, n_heads, HEAD_DIM] (q: T = f32 or bf16, out f32); k, v [tokens, n_kv,
// HEAD_DIM] T; lse [tokens, n_heads] f32. grid (n_qtiles, n_heads), block 32 * NWARP.
template <typename T>
__device__ __forceinline__ void attn_fwd_mma_body(const T* q, const T* k, const T* v, float* out, float* lse, const int4* spans,
                                                  const int2* qtiles, int n_heads, int n_kv, float scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [BQ][LDQ]
    __nv_bfloat16* ks = qs + BQ * LDQ;                                // [BK][LDQ]
    __nv_bfloat16* vt = ks + BK * LDQ;                                // [HDP][LDV]
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv);
    const int2 tile = qtiles[blockIdx.x];
    const int4 sp = spans[tile.x];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int qrow = n_heads * HEAD_DIM, kvrow = n_kv * HEAD_DIM;
    const int q0 = tile.y;
    const int nq = min(BQ, sp.y - q0);  // queries of this tile
    const int nk = sp.w + q0 + nq;      // keys the tile's last query sees
    for (int e = threadIdx.x; e < BQ * HDP; e += blockDim.x) {
        const int r = e / HDP, d = e % HDP;
        qs[r * LDQ + d] = (r < nq && d < HEAD_DIM) ? as_bf16(q[(long long)(sp.x + q0 + r) * qrow + h * HEAD_DIM + d]) : BF16_ZERO;
    }
    const int wq = warp * 16;                               // first tile row of this warp
    const bool wactive = wq < nq;
    const int wlast = sp.w + q0 + min(wq + 15, nq - 1);    // last key any row of the warp sees
    const int ja = q0 + wq + g, jb = ja + 8;               // span query index of rows g, g + 8
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    float o[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; nd++) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
    for (int k0 = 0; k0 < nk; k0 += BK) {
        __syncthreads();
        for (int e = threadIdx.x; e < BK * HDP; e += blockDim.x) {
            const int r = e / HDP, d = e % HDP;
            __nv_bfloat16 kx = BF16_ZERO, vx = BF16_ZERO;
            if (k0 + r < nk && d < HEAD_DIM) {
                const long long off = (long long)key_row(sp, k0 + r) * kvrow + kvh * HEAD_DIM + d;
                kx = as_bf16(k[off]);
                vx = as_bf16(v[off]);
            }
            ks[r * LDQ + d] = kx;
            vt[d * LDV + r] = vx;
        }
        __syncthreads();
        if (!wactive || k0 > wlast) continue;  // warp-uniform: the shuffles below see all lanes
        // S [16, BK] = Q K^T
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HDP / 16; kk++) {
            const __nv_bfloat16* qa = qs + (wq + g) * LDQ + kk * 16 + 2 * t4;
            const unsigned a0 = ld_pair(qa), a1 = ld_pair(qa + 8 * LDQ), a2 = ld_pair(qa + 8), a3 = ld_pair(qa + 8 * LDQ + 8);
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const __nv_bfloat16* kb = ks + (nt * 8 + g) * LDQ + kk * 16 + 2 * t4;
                mma_bf16(s[nt], a0, a1, a2, a3, ld_pair(kb), ld_pair(kb + 8));
            }
        }
        // Scale and mask in fp32; running max over the row (4 threads of the quad).
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int key = k0 + nt * 8 + 2 * t4 + (i & 1);
                const int j = i < 2 ? ja : jb;
                const bool vis = key < nk && key <= sp.w + j;
                s[nt][i] = vis ? s[nt][i] * scale : -INFINITY;
                mx[i >> 1] = fmaxf(mx[i >> 1], s[nt][i]);
            }
        }
        mma_softmax_tile(s, mx, m, l, o);
        // O [16, HDP] += P [16, BK] (bf16) V [BK, HDP]
#pragma unroll
        for (int kt = 0; kt < BK / 16; kt++) {
            const unsigned a0 = pack_bf16(s[2 * kt][0], s[2 * kt][1]), a1 = pack_bf16(s[2 * kt][2], s[2 * kt][3]);
            const unsigned a2 = pack_bf16(s[2 * kt + 1][0], s[2 * kt + 1][1]), a3 = pack_bf16(s[2 * kt + 1][2], s[2 * kt + 1][3]);
#pragma unroll
            for (int nd = 0; nd < ND; nd++) {
                const __nv_bfloat16* vb = vt + (nd * 8 + g) * LDV + kt * 16 + 2 * t4;
                mma_bf16(o[nd], a0, a1, a2, a3, ld_pair(vb), ld_pair(vb + 8));
            }
        }
    }
    if (!wactive) return;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int j = r ? jb : ja;
        if (j >= sp.y) continue;
        const float inv = 1.f / l[r];
        const long long qo = (long long)(sp.x + j) * qrow + h * HEAD_DIM;
#pragma unroll
        for (int nd = 0; nd < ND; nd++) {
            const int d = nd * 8 + 2 * t4;
            if (d < HEAD_DIM) out[qo + d] = o[nd][2 * r] * inv;
            if (d + 1 < HEAD_DIM) out[qo + d + 1] = o[nd][2 * r + 1] * inv;
        }
        if (t4 == 0) lse[(long long)(sp.x + j) * n_heads + h] = m[r] + logf(l[r]);
    }
}

extern "C" __global__ void __launch_bounds__(32 * NWARP) attn_fwd_mma(const float* q, const float* k, const float* v, float* out,
                                                                      float* lse, const int4* spans, const int2* qtiles,
                                                                      int n_heads, int n_kv, float scale) {
    attn_fwd_mma_body(q, k, v, out, lse, spans, qtiles, n_heads, n_kv, scale);
}

extern "C" __global__ void __launch_bounds__(32 * NWARP) attn_fwd_mma_qkv_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                                               const __nv_bfloat16* v, float* out, float* lse,
                                                                               const int4* spans, const int2* qtiles, int n_heads,
                                                                               int n_kv, float scale) {
    attn_fwd_mma_body(q, k, v, out, lse, spans, qtiles, n_heads, n_kv, scale);
}

// ---- Backward on tensor cores (FA2's split: one kernel for dQ, one for dK and dV) ----------
// Both recompute P = exp(scale S - lse) from the forward's lse and take D = rowsum(dO * O)
// from attn_bwd_d (attention.cu); dS = P * (dP - D), dP = dO V^T. Every product is an
// m16n8k16 bf16 mma with fp32 accumulation; Q, K, V (unless already bf16: the `_qkv_bf16`
// kernels) and dO are rounded to bf16 as they are staged, P and dS as they become A fragments
// (as P in the forward). q, k, v are T = f32 or bf16 as in the forward.

// dq [tokens, n_heads, HEAD_DIM] (overwritten) = scale * dS K. grid (n_qtiles of BQ, n_heads),
// block 32 * NWARP; warp w owns queries q0 + 16w .. +16. Dynamic smem (bytes):
// (2 * BQ * LDQ + 2 * BK * LDQ + HDP * LDV) * 2: Q and dO of the tile, K and V of a key tile
// (row-major, for S = Q K^T and dP = dO V^T) and K transposed (for dS K).
template <typename T>
__device__ __forceinline__ void attn_bwd_dq_mma_body(const T* q, const T* k, const T* v, const float* dout, const float* lse,
                                                     const float* D, float* dq, const int4* spans, const int2* qtiles, int n_heads,
                                                     int n_kv, float scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* qs = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [BQ][LDQ]
    __nv_bfloat16* dos = qs + BQ * LDQ;                               // [BQ][LDQ]
    __nv_bfloat16* ks = dos + BQ * LDQ;                               // [BK][LDQ]
    __nv_bfloat16* vs = ks + BK * LDQ;                                // [BK][LDQ]
    __nv_bfloat16* kt = vs + BK * LDQ;                                // [HDP][LDV]
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv);
    const int2 tile = qtiles[blockIdx.x];
    const int4 sp = spans[tile.x];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int qrow = n_heads * HEAD_DIM, kvrow = n_kv * HEAD_DIM;
    const int q0 = tile.y;
    const int nq = min(BQ, sp.y - q0);
    const int nk = sp.w + q0 + nq;
    for (int e = threadIdx.x; e < BQ * HDP; e += blockDim.x) {
        const int r = e / HDP, d = e % HDP;
        __nv_bfloat16 x = BF16_ZERO;
        float y = 0.f;
        if (r < nq && d < HEAD_DIM) {
            const long long o = (long long)(sp.x + q0 + r) * qrow + h * HEAD_DIM + d;
            x = as_bf16(q[o]);
            y = dout[o];
        }
        qs[r * LDQ + d] = x;
        dos[r * LDQ + d] = __float2bfloat16_rn(y);
    }
    const int wq = warp * 16;
    const bool wactive = wq < nq;
    const int wlast = sp.w + q0 + min(wq + 15, nq - 1);
    const int ja = q0 + wq + g, jb = ja + 8;
    float L[2], Dr[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int j = r ? jb : ja;
        const bool in = j < sp.y;
        L[r] = in ? lse[(long long)(sp.x + j) * n_heads + h] : 0.f;
        Dr[r] = in ? D[(long long)(sp.x + j) * n_heads + h] : 0.f;
    }
    float acc[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; nd++) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;
    for (int k0 = 0; k0 < nk; k0 += BK) {
        __syncthreads();
        for (int e = threadIdx.x; e < BK * HDP; e += blockDim.x) {
            const int r = e / HDP, d = e % HDP;
            __nv_bfloat16 kx = BF16_ZERO, vx = BF16_ZERO;
            if (k0 + r < nk && d < HEAD_DIM) {
                const long long off = (long long)key_row(sp, k0 + r) * kvrow + kvh * HEAD_DIM + d;
                kx = as_bf16(k[off]);
                vx = as_bf16(v[off]);
            }
            ks[r * LDQ + d] = kx;
            kt[d * LDV + r] = kx;
            vs[r * LDQ + d] = vx;
        }
        __syncthreads();
        if (!wactive || k0 > wlast) continue;  // warp-uniform
        // S = Q K^T and dP = dO V^T, [16, BK] each
        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HDP / 16; kk++) {
            const __nv_bfloat16* qa = qs + (wq + g) * LDQ + kk * 16 + 2 * t4;
            const __nv_bfloat16* da = dos + (wq + g) * LDQ + kk * 16 + 2 * t4;
            const unsigned a0 = ld_pair(qa), a1 = ld_pair(qa + 8 * LDQ), a2 = ld_pair(qa + 8), a3 = ld_pair(qa + 8 * LDQ + 8);
            const unsigned c0 = ld_pair(da), c1 = ld_pair(da + 8 * LDQ), c2 = ld_pair(da + 8), c3 = ld_pair(da + 8 * LDQ + 8);
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const __nv_bfloat16* kb = ks + (nt * 8 + g) * LDQ + kk * 16 + 2 * t4;
                const __nv_bfloat16* vb = vs + (nt * 8 + g) * LDQ + kk * 16 + 2 * t4;
                mma_bf16(s[nt], a0, a1, a2, a3, ld_pair(kb), ld_pair(kb + 8));
                mma_bf16(dp[nt], c0, c1, c2, c3, ld_pair(vb), ld_pair(vb + 8));
            }
        }
        // dS = P * (dP - D), P = exp(scale S - lse) (0 where masked), in place of s
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int key = k0 + nt * 8 + 2 * t4 + (i & 1);
                const int r = i >> 1;
                const bool vis = key < nk && key <= sp.w + (r ? jb : ja);
                const float p = vis ? expf(s[nt][i] * scale - L[r]) : 0.f;
                s[nt][i] = p * (dp[nt][i] - Dr[r]);
            }
        }
        // dQ [16, HDP] += dS [16, BK] (bf16) K [BK, HDP]
#pragma unroll
        for (int kq = 0; kq < BK / 16; kq++) {
            const unsigned a0 = pack_bf16(s[2 * kq][0], s[2 * kq][1]), a1 = pack_bf16(s[2 * kq][2], s[2 * kq][3]);
            const unsigned a2 = pack_bf16(s[2 * kq + 1][0], s[2 * kq + 1][1]), a3 = pack_bf16(s[2 * kq + 1][2], s[2 * kq + 1][3]);
#pragma unroll
            for (int nd = 0; nd < ND; nd++) {
                const __nv_bfloat16* kb = kt + (nd * 8 + g) * LDV + kq * 16 + 2 * t4;
                mma_bf16(acc[nd], a0, a1, a2, a3, ld_pair(kb), ld_pair(kb + 8));
            }
        }
    }
    if (!wactive) return;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int j = r ? jb : ja;
        if (j >= sp.y) continue;
        const long long qo = (long long)(sp.x + j) * qrow + h * HEAD_DIM;
#pragma unroll
        for (int nd = 0; nd < ND; nd++) {
            const int d = nd * 8 + 2 * t4;
            if (d < HEAD_DIM) dq[qo + d] = acc[nd][2 * r] * scale;
            if (d + 1 < HEAD_DIM) dq[qo + d + 1] = acc[nd][2 * r + 1] * scale;
        }
    }
}

extern "C" __global__ void __launch_bounds__(32 * NWARP) attn_bwd_dq_mma(const float* q, const float* k, const float* v,
                                                                         const float* dout, const float* lse, const float* D,
                                                                         float* dq, const int4* spans, const int2* qtiles,
                                                                         int n_heads, int n_kv, float scale) {
    attn_bwd_dq_mma_body(q, k, v, dout, lse, D, dq, spans, qtiles, n_heads, n_kv, scale);
}

extern "C" __global__ void __launch_bounds__(32 * NWARP) attn_bwd_dq_mma_qkv_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                                                  const __nv_bfloat16* v, const float* dout,
                                                                                  const float* lse, const float* D, float* dq,
                                                                                  const int4* spans, const int2* qtiles,
                                                                                  int n_heads, int n_kv, float scale) {
    attn_bwd_dq_mma_body(q, k, v, dout, lse, D, dq, spans, qtiles, n_heads, n_kv, scale);
}

#define BKV (16 * NWARP)   // keys per dkdv block
#define BQ2 32             // queries per step of the dkdv loop
#define NT2 (BQ2 / 8)      // n8 tiles of S^T per step
#define LDQ2 (BQ2 + 8)     // row stride (bf16) of the transposed Q and dO tiles

// dk, dv [tokens, n_kv, HEAD_DIM] += the gradients from one wave of spans whose key rows are
// disjoint (host: as attn_bwd_dkdv). grid (n_ktiles of BKV keys, n_kv), block 32 * NWARP; warp
// w owns keys k0 + 16w .. +16 (the mma M dimension) and loops over the query tiles that see
// them and over the KV head's query heads (GQA sum): S^T = K Q^T, dP^T = V dO^T,
// dV += P^T dO, dK += dS^T Q. Dynamic smem (bytes): (2 * BKV * LDQ + 2 * BQ2 * LDQ +
// 2 * HDP * LDQ2) * 2 + 2 * BQ2 * 4.
template <typename T>
__device__ __forceinline__ void attn_bwd_dkdv_mma_body(const T* q, const T* k, const T* v, const float* dout, const float* lse,
                                                       const float* D, float* dk, float* dv, const int4* spans, const int2* ktiles,
                                                       int n_heads, int n_kv, float scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [BKV][LDQ]
    __nv_bfloat16* vs = ks + BKV * LDQ;                               // [BKV][LDQ]
    __nv_bfloat16* qs = vs + BKV * LDQ;                               // [BQ2][LDQ]
    __nv_bfloat16* dos = qs + BQ2 * LDQ;                              // [BQ2][LDQ]
    __nv_bfloat16* qt = dos + BQ2 * LDQ;                              // [HDP][LDQ2]
    __nv_bfloat16* dot = qt + HDP * LDQ2;                             // [HDP][LDQ2]
    float* ls = reinterpret_cast<float*>(dot + HDP * LDQ2);           // [BQ2] lse
    float* ds_ = ls + BQ2;                                            // [BQ2] D
    const int kvh = blockIdx.y, group = n_heads / n_kv;
    const int2 tile = ktiles[blockIdx.x];
    const int4 sp = spans[tile.x];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int qrow = n_heads * HEAD_DIM, kvrow = n_kv * HEAD_DIM;
    const int k0 = tile.y;
    const int nk = sp.w + sp.y;          // visible keys of the span
    const int nkt = min(BKV, nk - k0);   // keys of this tile
    for (int e = threadIdx.x; e < BKV * HDP; e += blockDim.x) {
        const int r = e / HDP, d = e % HDP;
        __nv_bfloat16 kx = BF16_ZERO, vx = BF16_ZERO;
        if (r < nkt && d < HEAD_DIM) {
            const long long off = (long long)key_row(sp, k0 + r) * kvrow + kvh * HEAD_DIM + d;
            kx = as_bf16(k[off]);
            vx = as_bf16(v[off]);
        }
        ks[r * LDQ + d] = kx;
        vs[r * LDQ + d] = vx;
    }
    const int wk = warp * 16;                  // first tile row (key) of this warp
    const bool wactive = wk < nkt;
    const int ka = k0 + wk + g, kb = ka + 8;   // visible-key index of rows g, g + 8
    float dka[ND][4], dva[ND][4];
#pragma unroll
    for (int nd = 0; nd < ND; nd++) dka[nd][0] = dka[nd][1] = dka[nd][2] = dka[nd][3] = dva[nd][0] = dva[nd][1] = dva[nd][2] = dva[nd][3] = 0.f;
    // Queries that see any key of the tile: j >= k0 - prefix_len.
    const int jfirst = max(0, k0 - sp.w);
    for (int h = kvh * group; h < (kvh + 1) * group; h++) {
        for (int j0 = jfirst; j0 < sp.y; j0 += BQ2) {
            const int nqt = min(BQ2, sp.y - j0);
            __syncthreads();
            for (int e = threadIdx.x; e < BQ2 * HDP; e += blockDim.x) {
                const int r = e / HDP, d = e % HDP;
                __nv_bfloat16 xb = BF16_ZERO;
                float y = 0.f;
                if (r < nqt && d < HEAD_DIM) {
                    const long long o = (long long)(sp.x + j0 + r) * qrow + h * HEAD_DIM + d;
                    xb = as_bf16(q[o]);
                    y = dout[o];
                }
                const __nv_bfloat16 yb = __float2bfloat16_rn(y);
                qs[r * LDQ + d] = xb;
                dos[r * LDQ + d] = yb;
                qt[d * LDQ2 + r] = xb;
                dot[d * LDQ2 + r] = yb;
            }
            for (int r = threadIdx.x; r < BQ2; r += blockDim.x) {
                const bool in = r < nqt;
                ls[r] = in ? lse[(long long)(sp.x + j0 + r) * n_heads + h] : 0.f;
                ds_[r] = in ? D[(long long)(sp.x + j0 + r) * n_heads + h] : 0.f;
            }
            __syncthreads();
            // A warp whose first key comes after every query of the step sees none of them.
            if (!wactive || k0 + wk > sp.w + j0 + nqt - 1) continue;  // warp-uniform
            float s[NT2][4], dp[NT2][4];
#pragma unroll
            for (int nt = 0; nt < NT2; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < HDP / 16; kk++) {
                const __nv_bfloat16* ka_ = ks + (wk + g) * LDQ + kk * 16 + 2 * t4;
                const __nv_bfloat16* va_ = vs + (wk + g) * LDQ + kk * 16 + 2 * t4;
                const unsigned a0 = ld_pair(ka_), a1 = ld_pair(ka_ + 8 * LDQ), a2 = ld_pair(ka_ + 8), a3 = ld_pair(ka_ + 8 * LDQ + 8);
                const unsigned c0 = ld_pair(va_), c1 = ld_pair(va_ + 8 * LDQ), c2 = ld_pair(va_ + 8), c3 = ld_pair(va_ + 8 * LDQ + 8);
#pragma unroll
                for (int nt = 0; nt < NT2; nt++) {
                    const __nv_bfloat16* qb = qs + (nt * 8 + g) * LDQ + kk * 16 + 2 * t4;
                    const __nv_bfloat16* db = dos + (nt * 8 + g) * LDQ + kk * 16 + 2 * t4;
                    mma_bf16(s[nt], a0, a1, a2, a3, ld_pair(qb), ld_pair(qb + 8));
                    mma_bf16(dp[nt], c0, c1, c2, c3, ld_pair(db), ld_pair(db + 8));
                }
            }
            // P^T and dS^T (rows = keys, cols = queries), in place of s and dp
#pragma unroll
            for (int nt = 0; nt < NT2; nt++) {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int c = nt * 8 + 2 * t4 + (i & 1);  // query of the step
                    const int key = i < 2 ? ka : kb;
                    const bool vis = c < nqt && key < nk && key <= sp.w + j0 + c;
                    const float p = vis ? expf(s[nt][i] * scale - ls[c]) : 0.f;
                    s[nt][i] = p;
                    dp[nt][i] = p * (dp[nt][i] - ds_[c]);
                }
            }
            // dV [16, HDP] += P^T [16, BQ2] dO [BQ2, HDP]; dK += dS^T Q
#pragma unroll
            for (int kq = 0; kq < BQ2 / 16; kq++) {
                const unsigned p0 = pack_bf16(s[2 * kq][0], s[2 * kq][1]), p1 = pack_bf16(s[2 * kq][2], s[2 * kq][3]);
                const unsigned p2 = pack_bf16(s[2 * kq + 1][0], s[2 * kq + 1][1]), p3 = pack_bf16(s[2 * kq + 1][2], s[2 * kq + 1][3]);
                const unsigned d0 = pack_bf16(dp[2 * kq][0], dp[2 * kq][1]), d1 = pack_bf16(dp[2 * kq][2], dp[2 * kq][3]);
                const unsigned d2 = pack_bf16(dp[2 * kq + 1][0], dp[2 * kq + 1][1]), d3 = pack_bf16(dp[2 * kq + 1][2], dp[2 * kq + 1][3]);
#pragma unroll
                for (int nd = 0; nd < ND; nd++) {
                    const __nv_bfloat16* ob = dot + (nd * 8 + g) * LDQ2 + kq * 16 + 2 * t4;
                    const __nv_bfloat16* qb = qt + (nd * 8 + g) * LDQ2 + kq * 16 + 2 * t4;
                    mma_bf16(dva[nd], p0, p1, p2, p3, ld_pair(ob), ld_pair(ob + 8));
                    mma_bf16(dka[nd], d0, d1, d2, d3, ld_pair(qb), ld_pair(qb + 8));
                }
            }
        }
    }
    if (!wactive) return;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int key = r ? kb : ka;
        if (key >= nk) continue;
        const long long ko = (long long)key_row(sp, key) * kvrow + kvh * HEAD_DIM;
#pragma unroll
        for (int nd = 0; nd < ND; nd++) {
            const int d = nd * 8 + 2 * t4;
            if (d < HEAD_DIM) {
                dk[ko + d] += dka[nd][2 * r] * scale;
                dv[ko + d] += dva[nd][2 * r];
            }
            if (d + 1 < HEAD_DIM) {
                dk[ko + d + 1] += dka[nd][2 * r + 1] * scale;
                dv[ko + d + 1] += dva[nd][2 * r + 1];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(32 * NWARP) attn_bwd_dkdv_mma(const float* q, const float* k, const float* v,
                                                                           const float* dout, const float* lse, const float* D,
                                                                           float* dk, float* dv, const int4* spans, const int2* ktiles,
                                                                           int n_heads, int n_kv, float scale) {
    attn_bwd_dkdv_mma_body(q, k, v, dout, lse, D, dk, dv, spans, ktiles, n_heads, n_kv, scale);
}

extern "C" __global__ void __launch_bounds__(32 * NWARP) attn_bwd_dkdv_mma_qkv_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k,
                                                                                    const __nv_bfloat16* v, const float* dout,
                                                                                    const float* lse, const float* D, float* dk,
                                                                                    float* dv, const int4* spans, const int2* ktiles,
                                                                                    int n_heads, int n_kv, float scale) {
    attn_bwd_dkdv_mma_body(q, k, v, dout, lse, D, dk, dv, spans, ktiles, n_heads, n_kv, scale);
}
