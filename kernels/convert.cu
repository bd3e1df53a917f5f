// fp32 -> bf16 conversion for the bf16 mixed-precision mode (Precision::Bf16, see
// src/backend/cuda/precision.rs): matmul operands are rounded into bf16 scratch buffers
// before the bf16 GEMM (bf16 A and B, fp32 C and accumulation). Round to nearest, ties to
// even (__float2bfloat16_rn, one cvt.rn.bf16.f32); NaN stays NaN, overflow rounds to inf, as
// torch's .to(torch.bfloat16). CPU reference: `half::bf16::from_f32` (tests/cuda_sim_bf16.rs).
// Launch: 1-D grid-stride, any block size.
#include <cuda_bf16.h>
#include "common.cuh"

// y[n] bf16 = round_rne(x[n] f32)
extern "C" __global__ void f32_to_bf16(const float* x, __nv_bfloat16* y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(x[i]);
}
