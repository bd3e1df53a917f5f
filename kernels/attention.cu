// Attention over packed spans (see Span in src/backend/mod.rs), fp32, compiled once per
// HEAD_DIM (#define). CPU reference: src/backend/cpu/attention.rs.
//   spans  int4 [n_spans] = (start, len, prefix_start, prefix_len)
//   qtiles int2 [n]       = (span, first query j of the tile); QW queries per tile
//   ktiles int2 [n]       = (span, first visible key of the tile); KT keys per tile
// Visible keys of a span are numbered kk = 0 .. prefix_len + len: the prefix rows, then the
// span's own rows; query j sees kk <= prefix_len + j.
// attn_fwd / attn_bwd_dq: one warp per (query, head), QW warps per block share each K/V tile
// of KT keys in shared memory; lane = key for the scores, lane = dims for the accumulators;
// online softmax saving lse. attn_bwd_dkdv: one block per (key tile, KV head), lane =
// (key, dim group); loops over the span's queries and the KV head's query heads (GQA sum)
// and adds into dk/dv. Spans sharing a prefix touch the same key rows, so the host launches
// dkdv in waves of spans with disjoint key rows: no atomics, deterministic.
#include "common.cuh"

#ifndef HEAD_DIM
#error "HEAD_DIM must be defined"
#endif
#define KT 32
#define QW 4
#define DPL ((HEAD_DIM + 31) / 32)  // dims per lane (lane-strided)
#define DG 4                        // dim groups in attn_bwd_dkdv
#define DPG ((HEAD_DIM + DG - 1) / DG)
#define KS (HEAD_DIM + 1)           // padded row stride of the shared K/V tiles

// Loads keys [k0, k0 + KT) (those < nk) of one KV head into ks, vs [KT, KS].
__device__ __forceinline__ void load_kv_tile(const float* k, const float* v, float* ks, float* vs, int4 sp, int k0, int nk, int kvrow, int kvh) {
    for (int e = threadIdx.x; e < KT * HEAD_DIM; e += blockDim.x) {
        const int kk = e / HEAD_DIM, d = e % HEAD_DIM;
        if (k0 + kk < nk) {
            const long long o = (long long)key_row(sp, k0 + kk) * kvrow + kvh * HEAD_DIM + d;
            ks[kk * KS + d] = k[o];
            vs[kk * KS + d] = v[o];
        }
    }
}

// q, out [tokens, n_heads, HEAD_DIM]; k, v [tokens, n_kv, HEAD_DIM]; lse [tokens, n_heads].
// grid (n_qtiles, n_heads), block 32*QW, dynamic smem (2*KT*KS + QW*HEAD_DIM) floats.
extern "C" __global__ void attn_fwd(const float* q, const float* k, const float* v, float* out, float* lse,
                                    const int4* spans, const int2* qtiles, int n_heads, int n_kv, float scale) {
    extern __shared__ float smem[];
    float *ks = smem, *vs = ks + KT * KS, *qs = vs + KT * KS;
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv);
    const int2 tile = qtiles[blockIdx.x];
    const int4 sp = spans[tile.x];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = tile.y + warp;
    const bool active = j < sp.y;
    const int qrow = n_heads * HEAD_DIM, kvrow = n_kv * HEAD_DIM;
    const long long qo = (long long)(sp.x + j) * qrow + h * HEAD_DIM;
    float* qw = qs + warp * HEAD_DIM;
    if (active)
        for (int d = lane; d < HEAD_DIM; d += 32) qw[d] = q[qo + d];
    const int nk = sp.w + min(tile.y + QW, sp.y);  // keys the tile's last query sees
    float m = -INFINITY, l = 0.f, acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] = 0.f;
    for (int k0 = 0; k0 < nk; k0 += KT) {
        __syncthreads();
        load_kv_tile(k, v, ks, vs, sp, k0, nk, kvrow, kvh);
        __syncthreads();
        if (!active) continue;
        const int kk = k0 + lane;
        const bool vis = kk <= sp.w + j;
        float s = -INFINITY;
        if (vis) {
            float dot = 0.f;
#pragma unroll
            for (int d = 0; d < HEAD_DIM; d++) dot += qw[d] * ks[lane * KS + d];
            s = dot * scale;
        }
        const float mn = fmaxf(m, warp_max(s));
        const float p = vis ? expf(s - mn) : 0.f;
        const float corr = expf(m - mn);
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] *= corr;
        const int nt = min(KT, nk - k0);
        for (int t = 0; t < nt; t++) {
            const float pt = __shfl_sync(FULL_MASK, p, t);
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                const int d = lane + 32 * i;
                if (d < HEAD_DIM) acc[i] += pt * vs[t * KS + d];
            }
        }
        m = mn;
    }
    if (active) {
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < HEAD_DIM) out[qo + d] = acc[i] / l;
        }
        if (lane == 0) lse[(long long)(sp.x + j) * n_heads + h] = m + logf(l);
    }
}

// D[tokens * n_heads] = rowsum(dout * out) over HEAD_DIM (fp32 sums); one warp per row. out:
// fp32, or bf16 bits (`Backend::store_bf16` under bf16, read by common.cuh's ld_f32;
// attn_bwd_d_out_bf16).
template <typename T>
__device__ __forceinline__ void attn_bwd_d_body(const float* dout, const T* out, float* D, int rows) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= rows) return;
    float s = 0.f;
    for (int d = lane; d < HEAD_DIM; d += 32) s += dout[(long long)r * HEAD_DIM + d] * ld_f32(out, (long long)r * HEAD_DIM + d);
    s = warp_sum(s);
    if (lane == 0) D[r] = s;
}

extern "C" __global__ void attn_bwd_d(const float* dout, const float* out, float* D, int rows) { attn_bwd_d_body(dout, out, D, rows); }

extern "C" __global__ void attn_bwd_d_out_bf16(const float* dout, const unsigned short* out, float* D, int rows) {
    attn_bwd_d_body(dout, out, D, rows);
}

// dq [tokens, n_heads, HEAD_DIM] (overwritten) = scale * sum_kk dS[j, kk] K[kk],
// dS = P * (dP - D), P = exp(scale q.k - lse), dP = dout.v. Same grid as attn_fwd,
// dynamic smem (2*KT*KS + 2*QW*HEAD_DIM) floats.
extern "C" __global__ void attn_bwd_dq(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                                       const float* D, float* dq, const int4* spans, const int2* qtiles, int n_heads, int n_kv,
                                       float scale) {
    extern __shared__ float smem[];
    float *ks = smem, *vs = ks + KT * KS, *qs = vs + KT * KS, *dos = qs + QW * HEAD_DIM;
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv);
    const int2 tile = qtiles[blockIdx.x];
    const int4 sp = spans[tile.x];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = tile.y + warp;
    const bool active = j < sp.y;
    const int qrow = n_heads * HEAD_DIM, kvrow = n_kv * HEAD_DIM;
    const long long qo = (long long)(sp.x + j) * qrow + h * HEAD_DIM;
    float *qw = qs + warp * HEAD_DIM, *dw = dos + warp * HEAD_DIM;
    float L = 0.f, Dj = 0.f;
    if (active) {
        for (int d = lane; d < HEAD_DIM; d += 32) {
            qw[d] = q[qo + d];
            dw[d] = dout[qo + d];
        }
        L = lse[(long long)(sp.x + j) * n_heads + h];
        Dj = D[(long long)(sp.x + j) * n_heads + h];
    }
    const int nk = sp.w + min(tile.y + QW, sp.y);
    float acc[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] = 0.f;
    for (int k0 = 0; k0 < nk; k0 += KT) {
        __syncthreads();
        load_kv_tile(k, v, ks, vs, sp, k0, nk, kvrow, kvh);
        __syncthreads();
        if (!active) continue;
        const int kk = k0 + lane;
        float ds = 0.f;
        if (kk <= sp.w + j && kk < nk) {
            float dot = 0.f, dp = 0.f;
#pragma unroll
            for (int d = 0; d < HEAD_DIM; d++) {
                dot += qw[d] * ks[lane * KS + d];
                dp += dw[d] * vs[lane * KS + d];
            }
            const float p = expf(dot * scale - L);
            ds = p * (dp - Dj);
        }
        const int nt = min(KT, nk - k0);
        for (int t = 0; t < nt; t++) {
            const float st = __shfl_sync(FULL_MASK, ds, t);
#pragma unroll
            for (int i = 0; i < DPL; i++) {
                const int d = lane + 32 * i;
                if (d < HEAD_DIM) acc[i] += st * ks[t * KS + d];
            }
        }
    }
    if (active) {
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < HEAD_DIM) dq[qo + d] = acc[i] * scale;
        }
    }
}

// dk, dv [tokens, n_kv, HEAD_DIM] += the gradients from one wave of spans whose key rows are
// disjoint. grid (n_ktiles, n_kv), block 128 = 4 warps x 8 keys x DG dim groups (lane =
// key_in_warp * DG + group; group g owns dims g, g + DG, ...).
extern "C" __global__ void attn_bwd_dkdv(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                                         const float* D, float* dk, float* dv, const int4* spans, const int2* ktiles,
                                         int n_heads, int n_kv, float scale) {
    const int kvh = blockIdx.y, group = n_heads / n_kv;
    const int2 tile = ktiles[blockIdx.x];
    const int4 sp = spans[tile.x];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane % DG;
    const int kw0 = tile.y + warp * (32 / DG);  // first key of this warp
    const int kk = kw0 + lane / DG;
    const int nk = sp.w + sp.y;
    const bool kin = kk < nk;
    const int qrow = n_heads * HEAD_DIM, kvrow = n_kv * HEAD_DIM;
    const long long ko = kin ? (long long)key_row(sp, kk) * kvrow + kvh * HEAD_DIM : 0;
    float kr[DPG], vr[DPG], dka[DPG], dva[DPG];
#pragma unroll
    for (int i = 0; i < DPG; i++) {
        const int d = g + DG * i;
        kr[i] = (kin && d < HEAD_DIM) ? k[ko + d] : 0.f;
        vr[i] = (kin && d < HEAD_DIM) ? v[ko + d] : 0.f;
        dka[i] = dva[i] = 0.f;
    }
    // Queries that see any key of this warp: j >= kw0 - prefix_len.
    for (int j = max(0, kw0 - sp.w); j < sp.y; j++) {
        const long long t = sp.x + j;
        for (int h = kvh * group; h < (kvh + 1) * group; h++) {
            const long long qo = t * qrow + h * HEAD_DIM;
            float qv[DPG], dov[DPG], dot = 0.f, dp = 0.f;
#pragma unroll
            for (int i = 0; i < DPG; i++) {
                const int d = g + DG * i;
                qv[i] = d < HEAD_DIM ? q[qo + d] : 0.f;
                dov[i] = d < HEAD_DIM ? dout[qo + d] : 0.f;
                dot += qv[i] * kr[i];
                dp += dov[i] * vr[i];
            }
#pragma unroll
            for (int o = 1; o < DG; o <<= 1) {
                dot += __shfl_xor_sync(FULL_MASK, dot, o);
                dp += __shfl_xor_sync(FULL_MASK, dp, o);
            }
            const bool vis = kin && kk <= sp.w + j;
            const float p = vis ? expf(dot * scale - lse[t * n_heads + h]) : 0.f;
            const float ds = p * (dp - D[t * n_heads + h]);
#pragma unroll
            for (int i = 0; i < DPG; i++) {
                dva[i] += p * dov[i];
                dka[i] += ds * qv[i];
            }
        }
    }
    if (!kin) return;
#pragma unroll
    for (int i = 0; i < DPG; i++) {
        const int d = g + DG * i;
        if (d < HEAD_DIM) {
            dk[ko + d] += dka[i] * scale;
            dv[ko + d] += dva[i];
        }
    }
}
