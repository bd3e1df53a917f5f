// Shared helpers of kernels/*.cu (pasted in front of each source by the kernel builder,
// src/backend/cuda/build.rs): warp and block reductions (templates over the element type).
#pragma once

#define FULL_MASK 0xffffffffu
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Element i of an fp32 array, or of bf16 bits (unsigned short: what `Backend::store_bf16` keeps
// under bf16), as fp32 (exact).
__device__ __forceinline__ float ld_f32(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld_f32(const unsigned short* p, long long i) { return __uint_as_float((unsigned)p[i] << 16); }

// Sum over the warp (float, double, unsigned, ...); every lane gets the result.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. `sh` is 32 elements of shared memory, free again when this returns.
template <typename T>
__device__ T block_sum(T v, T* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < nw ? sh[lane] : T(0);
        v = warp_sum(v);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    v = sh[0];
    __syncthreads();
    return v;
}

// Token row of key `kk` of a span `sp` = (start, len, prefix_start, prefix_len): the span's
// prefix keys come first, then its own rows (the packed layout of backend::Span).
__device__ __forceinline__ int key_row(int4 sp, int kk) { return kk < sp.w ? sp.z + kk : sp.x + kk - sp.w; }

// Merges two online log-sum-exp states (max m, sum s of exp(x - m)); m = -inf means empty.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) return;
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}
