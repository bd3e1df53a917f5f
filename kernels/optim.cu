// Optimizer kernels of the trainer (src/train/optim.rs): the sum of squares behind the global
// gradient norm, and AdamW / SGD updates of fp32 master weights and moments in place.
// CPU reference: src/backend/cpu/optim.rs (the same operations in the same order). The
// updates use __f*_rn intrinsics so that NVRTC cannot contract them into fused multiply-adds:
// every operation is one IEEE f32 rounding, exactly as the CPU's, so parity is bit-exact.
// Launch: 1-D grid-stride, 256 threads per block (sum_squares_partial needs exactly 256).
#include "common.cuh"

#define SUMSQ_BLOCK 256

// partial[blockIdx.x] = sum of x[i]^2 over this block's grid-stride elements, in f64 (each
// square of an f32 is exact in f64). A fixed-shape tree over shared memory, no atomics: the
// host adds the gridDim.x partials in block order, so the result is deterministic.
// x [n] f32, partial [gridDim.x] f64.
extern "C" __global__ void sum_squares_partial(const float* x, double* partial, long long n) {
    __shared__ double sh[SUMSQ_BLOCK];
    double acc = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const double v = (double)x[i];
        acc += v * v;
    }
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = SUMSQ_BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

// One AdamW step in place on p, m, v [n] f32 with gradient g [n] f32 (backend::AdamwStep):
// g' = g*gs; m = b1*m + omb1*g'; v = b2*v + (omb2*g')*g'; p = p*decay;
// p = p - (step*m) / (sqrt(v)/bc2_sqrt + eps). omb1 = 1 - b1 and omb2 = 1 - b2 in f32.
extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, long long n, float gs, float b1, float omb1,
                                      float b2, float omb2, float decay, float step, float bc2_sqrt, float eps) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gi = __fmul_rn(g[i], gs);
        const float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(omb1, gi));
        const float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(omb2, gi), gi));
        const float w = __fmul_rn(p[i], decay);
        const float den = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        p[i] = __fsub_rn(w, __fdiv_rn(__fmul_rn(step, mi), den));
        m[i] = mi;
        v[i] = vi;
    }
}

// One SGD step in place: p = p - lr * (g*gs + wd*p); p, g [n] f32.
extern "C" __global__ void sgd_step(float* p, const float* g, long long n, float lr, float wd, float gs) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float w = p[i];
        p[i] = __fsub_rn(w, __fmul_rn(lr, __fadd_rn(__fmul_rn(g[i], gs), __fmul_rn(wd, w))));
    }
}
