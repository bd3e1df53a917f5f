// Helpers of the tensor-core kernels (attention_mma.cu, kv_cache.cu's paged_attn_mma,
// lm_head_mma.cu), pasted in place of `#include "mma.cuh"` by the kernel builder
// (src/backend/cuda/build.rs). Fragments of mma.sync m16n8k16 (PTX ISA; g = lane / 4,
// t = lane % 4): A regs hold (row g | g+8, cols 2t, 2t+1 | +8), B regs (k rows 2t, 2t+1 | +8,
// col g), C (row g | g+8, cols 2t, 2t+1); the low half of a 32-bit register is the lower index.
#pragma once
#include <cuda_bf16.h>

// Two consecutive bf16 of shared memory as one 32-bit fragment register.
__device__ __forceinline__ unsigned ld_pair(const __nv_bfloat16* p) { return *reinterpret_cast<const unsigned*>(p); }

// (lo, hi) rounded to bf16 (RNE) in one 32-bit register, lo in the low half.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

#define BF16_ZERO __ushort_as_bfloat16((unsigned short)0)

// c[4] += A (a0..a3) B (b0, b1): bf16 inputs, fp32 accumulation.
__device__ __forceinline__ void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The online-softmax step of one key tile in an mma.sync m16n8k16 warp (FlashAttention-2), for
// the thread's two rows (g and g + 8 of the warp's 16): s [NTILES][4] holds the tile's scores,
// already scaled and masked (-inf where not visible), mx the thread's max of each row over s;
// m and l are the rows' running max and sum of exp, o [NDIMS][4] the unnormalised output. On
// return mx is the row max over the quad, s holds P = exp(s - max) in fp32, m and l include
// the tile, and o is rescaled to the new max. A row with nothing visible yet keeps max 0.
template <int NTILES, int NDIMS>
__device__ __forceinline__ void mma_softmax_tile(float (&s)[NTILES][4], float (&mx)[2], float (&m)[2], float (&l)[2], float (&o)[NDIMS][4]) {
    float base[2], corr[2], rs[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL_MASK, mx[r], 2));
        const float mn = fmaxf(m[r], mx[r]);
        base[r] = mn == -INFINITY ? 0.f : mn;
        corr[r] = expf(m[r] - base[r]);
        m[r] = mn;
    }
#pragma unroll
    for (int nt = 0; nt < NTILES; nt++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const float p = expf(s[nt][i] - base[i >> 1]);
            s[nt][i] = p;
            rs[i >> 1] += p;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        rs[r] += __shfl_xor_sync(FULL_MASK, rs[r], 1);
        rs[r] += __shfl_xor_sync(FULL_MASK, rs[r], 2);
        l[r] = l[r] * corr[r] + rs[r];
    }
#pragma unroll
    for (int nd = 0; nd < NDIMS; nd++) {
        o[nd][0] *= corr[0];
        o[nd][1] *= corr[0];
        o[nd][2] *= corr[1];
        o[nd][3] *= corr[1];
    }
}
