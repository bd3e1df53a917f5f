// RMSNorm forward and input gradient, one block per row (blockDim a multiple of 32); the
// weight gradient is col_sum in elementwise.cu (a deterministic second pass, no atomics).
// CPU reference: rmsnorm / rmsnorm_bwd in src/backend/cpu/mod.rs.
#include "common.cuh"

// x, out [rows, dim]; w [dim]; rstd [rows] = 1 / sqrt(mean(x^2) + eps)
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

// dx[rows, dim] = r w dy - (r^3 / dim) x sum_j(w_j dy_j x_j)
extern "C" __global__ void rmsnorm_bwd(const float* dy, const float* x, const float* w, const float* rstd, float* dx, int dim) {
    __shared__ float sh[32];
    const long long row = blockIdx.x;
    const float *xr = x + row * dim, *dyr = dy + row * dim;
    float dot = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dot += dyr[i] * xr[i] * w[i];
    dot = block_sum(dot, sh);
    const float r = rstd[row], c = r * r * r * dot / dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) dx[row * dim + i] = r * w[i] * dyr[i] - c * xr[i];
}
