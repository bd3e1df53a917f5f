// Elementwise and column-reduction kernels: add_assign, fill, bias_add, col_sum (bias and
// RMSNorm weight gradients), SwiGLU fwd/bwd, rotate-half RoPE. CPU references: the ops of
// the same names in src/backend/cpu/mod.rs. Launch: 1-D grid-stride, any block size.
#include "common.cuh"

// x[n] += y[n]
extern "C" __global__ void add_assign(float* x, const float* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// x[n] = v
extern "C" __global__ void fill(float* x, float v, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] = v;
}

// y[rows, dim] += b[dim] (broadcast over rows)
extern "C" __global__ void bias_add(float* y, const float* b, long long n, int dim) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] += b[i % dim];
}

// out[dim] += sum_r dy[r, c] * (x ? x[r, c] * rstd[r] : 1), rows summed in order from out[c]
// (the CPU's order, so bias_bwd is bit-exact). One thread per column c; rstd staged in shared
// memory 256 rows at a time (blockDim <= 256), so each block reads it once. x: T = float, or
// bf16 bits (col_sum_xbf16: a residual-stream input saved by `Backend::store_bf16`).
template <typename T>
__device__ __forceinline__ void col_sum_body(const float* dy, const T* x, const float* rstd, float* out, int rows, int dim) {
    __shared__ float rs[256];
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    float acc = c < dim ? out[c] : 0.f;
    for (int r0 = 0; r0 < rows; r0 += blockDim.x) {
        const int n = min((int)blockDim.x, rows - r0);
        if (x) {
            __syncthreads();
            if ((int)threadIdx.x < n) rs[threadIdx.x] = rstd[r0 + threadIdx.x];
            __syncthreads();
        }
        if (c < dim) {
            for (int j = 0; j < n; j++) {
                const long long i = (long long)(r0 + j) * dim + c;
                acc += x ? dy[i] * ld_f32(x, i) * rs[j] : dy[i];
            }
        }
    }
    if (c < dim) out[c] = acc;
}

extern "C" __global__ void col_sum(const float* dy, const float* x, const float* rstd, float* out, int rows, int dim) {
    col_sum_body(dy, x, rstd, out, rows, dim);
}

extern "C" __global__ void col_sum_xbf16(const float* dy, const unsigned short* x, const float* rstd, float* out, int rows, int dim) {
    col_sum_body(dy, x, rstd, out, rows, dim);
}

// out[n] = silu(gate) * up
extern "C" __global__ void swiglu_fwd(const float* gate, const float* up, float* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = gate[i], s = 1.f / (1.f + expf(-g));
        out[i] = g * s * up[i];
    }
}

// dgate[n], dup[n] from dout[n], gate[n], up[n]
// gate, up: T = float, or bf16 bits (unsigned short: `Backend::store_bf16` under bf16, exact
// in fp32; swiglu_bwd_bf16); the math is fp32 either way.

template <typename T>
__device__ __forceinline__ void swiglu_bwd_body(const float* dout, const T* gate, const T* up, float* dgate, float* dup, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = ld_f32(gate, i), u = ld_f32(up, i), d = dout[i], s = 1.f / (1.f + expf(-g));
        dup[i] = d * g * s;
        dgate[i] = d * u * (s + g * s * (1.f - s));
    }
}

extern "C" __global__ void swiglu_bwd(const float* dout, const float* gate, const float* up, float* dgate, float* dup, long long n) {
    swiglu_bwd_body(dout, gate, up, dgate, dup, n);
}

extern "C" __global__ void swiglu_bwd_bf16(const float* dout, const unsigned short* gate, const unsigned short* up, float* dgate, float* dup, long long n) {
    swiglu_bwd_body(dout, gate, up, dgate, dup, n);
}

// In-place rotate-half RoPE on x[tokens, n_heads, head_dim]; cs[tokens, head_dim/2, 2] holds
// (cos, sin) of the (signed) angle per token and pair, computed on the host in f64. One thread
// per (token, pair) rotates that pair in every head, so the table is read once.
extern "C" __global__ void rope(float* x, const float* cs, int tokens, int n_heads, int head_dim) {
    const int half = head_dim / 2;
    const long long n = (long long)tokens * half;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const int i = e % half;
        const long long t = e / half;
        const float2 a = reinterpret_cast<const float2*>(cs)[e];
        const float c = a.x, s = a.y;
        float* p = x + t * n_heads * head_dim;
        for (int h = 0; h < n_heads; h++, p += head_dim) {
            const float x1 = p[i], x2 = p[i + half];
            p[i] = x1 * c - x2 * s;
            p[i + half] = x2 * c + x1 * s;
        }
    }
}
