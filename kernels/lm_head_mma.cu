// The fused lm-head log-prob forward on tensor cores for Precision::Bf16 (host side:
// src/backend/cuda/lm_head_mma.rs). lm_logits_lse_mma: the logits of a tile of BM gathered
// hidden rows against a tile of BN vocabulary rows of the bf16 head, mma.sync
// m16n8k16.row.col.f32.bf16.bf16.f32 (h rounded RNE to bf16 as it is staged, as f32_to_bf16
// rounds it for the cuBLAS path; fp32 accumulation), k-loop over dim in steps of BK staged in
// shared memory (any dim: the tail is zero-padded). The logits never leave registers: the
// epilogue writes per (row, vocab tile) the tile's max and sum of exp(logit - max), and the
// target's logit for the one tile holding it. lm_lse_combine merges a row's partials into
// lse and logp = logit[target] - lse. CPU reference: src/backend/cpu/lm_head.rs.
//   h       f32 [tokens, dim]       rows       u32 [n] (rows of h, repeats allowed)
//   w       bf16 [vocab, dim]       targets    u32 [n] (< vocab)
//   part    f32 [n, n_vtiles, 2]    (max, sum) per row and vocab tile
//   tgt     f32 [n]                 logit of the row's target
// Block = 4 warps, a BM x BN tile; warp (wm, wn) = (warp / 2, warp % 2) owns rows 32 wm ..
// +32 (two m16 tiles) and vocab columns 64 wn .. +64 (eight n8 tiles). Fragment layouts as in
// attention_mma.cu (g = lane / 4, t = lane % 4; A: rows g | g+8, k 2t, 2t+1 | +8; B: k 2t,
// 2t+1 | +8, col g; C: rows g | g+8, cols 2t, 2t+1). 1-D grid, swizzled in groups of GROUP_M
// row tiles: consecutive blocks share one weight tile (read from L2 by all but the first)
// and a group's rows of h stay in L2 while it sweeps the vocabulary.
#include <cuda_bf16.h>
#include "common.cuh"
#include "mma.cuh"

#define BM 64
#define BN 128
#define BK 32
#define LDK (BK + 8)  // row stride (bf16) of the staged tiles: 80 bytes, 16-byte aligned rows,
                      // fragment loads of the 8 rows g hit 8 distinct bank groups
#define GROUP_M 16

// grid (n_mtiles * n_vtiles), block 128, no dynamic smem.
extern "C" __global__ void __launch_bounds__(128) lm_logits_lse_mma(const float* h, const __nv_bfloat16* w, const unsigned* rows,
                                                                    const unsigned* targets, float2* part, float* tgt, int n, int vocab,
                                                                    int dim, int n_mtiles, int n_vtiles) {
    __shared__ __align__(16) __nv_bfloat16 as[BM * LDK];  // [BM][LDK] gathered h rows, bf16
    __shared__ __align__(16) __nv_bfloat16 bs[BN * LDK];  // [BN][LDK] head rows
    __shared__ float2 red[2][BM];                         // (max, sum) per warp column half and row
    const int pid = blockIdx.x, width = GROUP_M * n_vtiles;
    const int first_m = pid / width * GROUP_M, gsize = min(n_mtiles - first_m, GROUP_M);
    const int mt = first_m + (pid % width) % gsize, vt = (pid % width) / gsize;
    const int m0 = mt * BM, n0 = vt * BN;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int wm = warp >> 1, wn = warp & 1;
    // Warp-uniform: rows of its first / second m16 tile exist; its 64 columns start in the vocab.
    const bool act0 = m0 + 32 * wm < n, act1 = m0 + 32 * wm + 16 < n;
    const bool wactive = act0 && n0 + 64 * wn < vocab;
    const bool vec = (dim & 7) == 0;  // 16-byte loads of w (8 bf16) and h (2 x 4 f32)

    // Vector path: thread tid stages rows tid / 4 + 32 j (j < 2) of h, 8 columns each, and rows
    // tid / 4 + 32 j (j < 4) of w, 8 columns each; the row bases stay fixed over the k-loop.
    const int vc = (tid & 3) * 8;
    const float* hrow[2];
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int r = m0 + (tid >> 2) + 32 * j;
        hrow[j] = r < n ? h + (long long)rows[r] * dim : nullptr;
    }

    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 8; ni++) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.f;

    for (int k0 = 0; k0 < dim; k0 += BK) {
        __syncthreads();
        if (vec) {
            const bool kin = k0 + vc < dim;  // dim % 8 == 0: all 8 columns in, or none
#pragma unroll
            for (int j = 0; j < 2; j++) {
                uint4 v = make_uint4(0, 0, 0, 0);
                if (hrow[j] && kin) {
                    const float4 x = *reinterpret_cast<const float4*>(hrow[j] + k0 + vc);
                    const float4 y = *reinterpret_cast<const float4*>(hrow[j] + k0 + vc + 4);
                    v = make_uint4(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w), pack_bf16(y.x, y.y), pack_bf16(y.z, y.w));
                }
                *reinterpret_cast<uint4*>(as + ((tid >> 2) + 32 * j) * LDK + vc) = v;
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int r = (tid >> 2) + 32 * j;
                uint4 v = make_uint4(0, 0, 0, 0);
                if (n0 + r < vocab && kin) v = *reinterpret_cast<const uint4*>(w + (long long)(n0 + r) * dim + k0 + vc);
                *reinterpret_cast<uint4*>(bs + r * LDK + vc) = v;
            }
        } else {
            for (int e = tid; e < BM * BK; e += blockDim.x) {
                const int r = e / BK, c = e % BK;
                as[r * LDK + c] = (m0 + r < n && k0 + c < dim) ? __float2bfloat16_rn(h[(long long)rows[m0 + r] * dim + k0 + c]) : BF16_ZERO;
            }
            for (int e = tid; e < BN * BK; e += blockDim.x) {
                const int r = e / BK, c = e % BK;
                bs[r * LDK + c] = (n0 + r < vocab && k0 + c < dim) ? w[(long long)(n0 + r) * dim + k0 + c] : BF16_ZERO;
            }
        }
        __syncthreads();
        if (!wactive) continue;  // warp-uniform
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            unsigned a[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                const __nv_bfloat16* pa = as + (32 * wm + 16 * mi + g) * LDK + kk * 16 + 2 * t4;
                a[mi][0] = ld_pair(pa);
                a[mi][1] = ld_pair(pa + 8 * LDK);
                a[mi][2] = ld_pair(pa + 8);
                a[mi][3] = ld_pair(pa + 8 * LDK + 8);
            }
#pragma unroll
            for (int ni = 0; ni < 8; ni++) {
                if (n0 + 64 * wn + 8 * ni >= vocab) break;  // warp-uniform: n8 tiles past the vocab
                const __nv_bfloat16* pb = bs + (64 * wn + 8 * ni + g) * LDK + kk * 16 + 2 * t4;
                const unsigned b0 = ld_pair(pb), b1 = ld_pair(pb + 8);
                mma_bf16(acc[0][ni], a[0][0], a[0][1], a[0][2], a[0][3], b0, b1);
                if (act1) mma_bf16(acc[1][ni], a[1][0], a[1][1], a[1][2], a[1][3], b0, b1);
            }
        }
    }

    // Epilogue: per row of the warp, max and sum of exp over its 64 columns (16 per thread,
    // then the 4 threads of the quad), the target's logit where it falls here; the two column
    // halves merge through shared memory.
#pragma unroll
    for (int mi = 0; mi < 2; mi++) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int lr = 32 * wm + 16 * mi + 8 * hf + g, row = m0 + lr;
            float m = -INFINITY, s = 0.f;
            if (wactive) {  // warp-uniform: the shuffles see all lanes
                const int target = row < n ? (int)targets[row] : -1;
#pragma unroll
                for (int ni = 0; ni < 8; ni++) {
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const int col = n0 + 64 * wn + 8 * ni + 2 * t4 + j;
                        const float x = acc[mi][ni][2 * hf + j];
                        if (col < vocab) m = fmaxf(m, x);
                        if (col == target) tgt[row] = x;
                    }
                }
                m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, 1));
                m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, 2));
#pragma unroll
                for (int ni = 0; ni < 8; ni++) {
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        const int col = n0 + 64 * wn + 8 * ni + 2 * t4 + j;
                        if (col < vocab) s += expf(acc[mi][ni][2 * hf + j] - m);
                    }
                }
                s += __shfl_xor_sync(FULL_MASK, s, 1);
                s += __shfl_xor_sync(FULL_MASK, s, 2);
            }
            if (t4 == 0) red[wn][lr] = make_float2(m, s);
        }
    }
    __syncthreads();
    if (tid < BM && m0 + tid < n) {
        float2 p = red[0][tid];
        lse_merge(p.x, p.y, red[1][tid].x, red[1][tid].y);
        part[(long long)(m0 + tid) * n_vtiles + vt] = p;
    }
}

// logp, lse [n] from the partials of lm_logits_lse_mma: one warp per row, lane l merging
// tiles l, l + 32, ... in order, then a fixed butterfly over the lanes (deterministic).
// grid ceil(n / 4), block 128.
extern "C" __global__ void lm_lse_combine(const float2* part, const float* tgt, float* logp, float* lse, int n, int n_vtiles) {
    const int row = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n) return;  // warp-uniform
    float m = -INFINITY, s = 0.f;
    for (int t = lane; t < n_vtiles; t += 32) {
        const float2 p = part[(long long)row * n_vtiles + t];
        lse_merge(m, s, p.x, p.y);
    }
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float m2 = __shfl_xor_sync(FULL_MASK, m, o), s2 = __shfl_xor_sync(FULL_MASK, s, o);
        lse_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        const float L = m + logf(s);
        lse[row] = L;
        logp[row] = tgt[row] - L;
    }
}
