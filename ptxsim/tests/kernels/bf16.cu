// bf16/f16 conversions and packed arithmetic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
extern "C" __global__ void bf16_conv(const float* x, __nv_bfloat16* xb, float* back, __half* xh, float* hback, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    __nv_bfloat16 b = __float2bfloat16(x[i]);
    xb[i] = b;
    back[i] = __bfloat162float(b);
    __half h = __float2half(x[i]);
    xh[i] = h;
    hback[i] = __half2float(h);
}
extern "C" __global__ void bf16x2_fma(const __nv_bfloat162* a, const __nv_bfloat162* b, __nv_bfloat162* c, const __half2* ha, __half2* hc, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    c[i] = __hfma2(a[i], b[i], c[i]);
    hc[i] = __hmul2(__hadd2(ha[i], ha[i]), ha[i]);
}
