// Row softmax, one block of 128 threads per row, fp32 with __expf (ex2.approx), block max/sum
// via shuffles and shared memory; also writes the log-sum-exp.
__device__ float block_reduce(float v, bool is_max, float* s) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) s[w] = v;
    __syncthreads();
    v = s[0];
    for (int i = 1; i < (blockDim.x >> 5); i++) v = is_max ? fmaxf(v, s[i]) : v + s[i];
    __syncthreads();
    return v;
}
extern "C" __global__ void softmax(const float* x, float* y, float* lse, int cols) {
    __shared__ float s[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* yr = y + (size_t)blockIdx.x * cols;
    float m = -__int_as_float(0x7f800000);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, xr[c]);
    m = block_reduce(m, true, s);
    float sum = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += __expf(xr[c] - m);
    sum = block_reduce(sum, false, s);
    float inv = 1.f / sum;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = __expf(xr[c] - m) * inv;
    if (threadIdx.x == 0) lse[blockIdx.x] = m + logf(sum);
}
