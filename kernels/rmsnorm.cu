// RMSNorm forward and input gradient; the weight gradient is col_sum in elementwise.cu (a
// deterministic second pass, no atomics). CPU reference: rmsnorm / rmsnorm_bwd in
// src/backend/cpu/mod.rs.
//
// rmsnorm_{fwd,bwd}_v<V> (dim <= V * blockDim, V in 1, 2, 4, 8, 16): a block owns rows
// blockIdx.x, blockIdx.x + gridDim.x, ...; thread t owns columns t + k * blockDim (k < V) and
// keeps them in registers. w is read once per block, x (and dy) once, so each kernel moves
// about its minimum bytes (tests/kernel_counters.rs). The per-thread sums run over k in order,
// then block_sum, as in the one-row-per-block kernels below (used for wider rows).
#include "common.cuh"

// The row's rstd (or any per-row scalar) read once per warp and broadcast.
__device__ __forceinline__ float warp_load(const float* p) {
    float v = 0.f;
    if ((threadIdx.x & 31) == 0) v = *p;
    return __shfl_sync(0xffffffffu, v, 0);
}

// x, out [rows, dim]; w [dim]; rstd [rows] = 1 / sqrt(mean(x^2) + eps)
template <int V>
__device__ __forceinline__ void rmsnorm_fwd_rows(const float* x, const float* w, float* out, float* rstd, int rows, int dim, float eps) {
    __shared__ float sh[32];
    float wr[V], xv[V];
#pragma unroll
    for (int k = 0; k < V; k++) {
        const int c = threadIdx.x + k * blockDim.x;
        wr[k] = c < dim ? w[c] : 0.f;
    }
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * dim;
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < V; k++) {
            const int c = threadIdx.x + k * blockDim.x;
            xv[k] = c < dim ? xr[c] : 0.f;
            ss += xv[k] * xv[k];
        }
        ss = block_sum(ss, sh);
        const float r = 1.f / sqrtf(ss / dim + eps);
        if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
        for (int k = 0; k < V; k++) {
            const int c = threadIdx.x + k * blockDim.x;
            if (c < dim) out[row * dim + c] = xv[k] * r * wr[k];
        }
    }
}

// dx[rows, dim] = r w dy - (r^3 / dim) x sum_j(w_j dy_j x_j); x: TX = float, or bf16 bits
// (the _xbf16 kernels: a residual-stream input saved by `Backend::store_bf16`, fp32 math).
template <int V, typename TX>
__device__ __forceinline__ void rmsnorm_bwd_rows(const float* dy, const TX* x, const float* w, const float* rstd, float* dx, int rows, int dim) {
    __shared__ float sh[32];
    float wr[V], xv[V], dv[V];
#pragma unroll
    for (int k = 0; k < V; k++) {
        const int c = threadIdx.x + k * blockDim.x;
        wr[k] = c < dim ? w[c] : 0.f;
    }
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        const TX* xr = x + row * dim;
        const float* dyr = dy + row * dim;
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < V; k++) {
            const int c = threadIdx.x + k * blockDim.x;
            xv[k] = c < dim ? ld_f32(xr, c) : 0.f;
            dv[k] = c < dim ? dyr[c] : 0.f;
            dot += dv[k] * xv[k] * wr[k];
        }
        dot = block_sum(dot, sh);
        const float r = warp_load(rstd + row), c = r * r * r * dot / dim;
#pragma unroll
        for (int k = 0; k < V; k++) {
            const int col = threadIdx.x + k * blockDim.x;
            if (col < dim) dx[row * dim + col] = r * wr[k] * dv[k] - c * xv[k];
        }
    }
}

#define RMSNORM_VARIANT(V)                                                                                                         \
    extern "C" __global__ void rmsnorm_fwd_v##V(const float* x, const float* w, float* out, float* rstd, int rows, int dim, float eps) { \
        rmsnorm_fwd_rows<V>(x, w, out, rstd, rows, dim, eps);                                                                         \
    }                                                                                                                                 \
    extern "C" __global__ void rmsnorm_bwd_v##V(const float* dy, const float* x, const float* w, const float* rstd, float* dx, int rows, int dim) { \
        rmsnorm_bwd_rows<V>(dy, x, w, rstd, dx, rows, dim);                                                                           \
    }                                                                                                                                 \
    extern "C" __global__ void rmsnorm_bwd_v##V##_xbf16(const float* dy, const unsigned short* x, const float* w, const float* rstd, float* dx, int rows, int dim) { \
        rmsnorm_bwd_rows<V>(dy, x, w, rstd, dx, rows, dim);                                                                           \
    }
RMSNORM_VARIANT(1)
RMSNORM_VARIANT(2)
RMSNORM_VARIANT(4)
RMSNORM_VARIANT(8)
RMSNORM_VARIANT(16)

// Rows wider than 16 * 256: one block per row, x (and dy, w) read twice.
extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, float* out, float* rstd, int dim, float eps) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const float* xr = x + row * dim;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, sh);
    const float r = 1.f / sqrtf(ss / dim + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[row * dim + i] = xr[i] * r * w[i];
}

template <typename TX>
__device__ __forceinline__ void rmsnorm_bwd_row(const float* dy, const TX* x, const float* w, const float* rstd, float* dx, int dim) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const TX* xr = x + row * dim;
    const float* dyr = dy + row * dim;
    float dot = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dot += dyr[i] * ld_f32(xr, i) * w[i];
    dot = block_sum(dot, sh);
    const float r = rstd[row], c = r * r * r * dot / dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dx[row * dim + i] = r * w[i] * dyr[i] - c * ld_f32(xr, i);
}

extern "C" __global__ void rmsnorm_bwd(const float* dy, const float* x, const float* w, const float* rstd, float* dx, int dim) {
    rmsnorm_bwd_row(dy, x, w, rstd, dx, dim);
}

extern "C" __global__ void rmsnorm_bwd_xbf16(const float* dy, const unsigned short* x, const float* w, const float* rstd, float* dx, int dim) {
    rmsnorm_bwd_row(dy, x, w, rstd, dx, dim);
}
