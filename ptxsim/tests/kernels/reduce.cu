// Block sum reduction: warp shuffles then shared memory across warps; one partial per block,
// plus an atomicAdd of every partial into total[0]. Also a double-precision row max/sum.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
extern "C" __global__ void block_sum(const float* x, int n, float* partial, float* total) {
    __shared__ float s[32];
    int tid = threadIdx.x;
    float v = 0.f;
    for (int i = blockIdx.x * blockDim.x + tid; i < n; i += gridDim.x * blockDim.x) v += x[i];
    v = warp_sum(v);
    if ((tid & 31) == 0) s[tid >> 5] = v;
    __syncthreads();
    if (tid < 32) {
        v = tid < (blockDim.x >> 5) ? s[tid] : 0.f;
        v = warp_sum(v);
        if (tid == 0) { partial[blockIdx.x] = v; atomicAdd(total, v); }
    }
}
// Tree reduction in shared memory only (classic), of int values, with dynamic shared memory.
extern "C" __global__ void tree_sum_int(const int* x, int* out) {
    extern __shared__ int sm[];
    int tid = threadIdx.x;
    sm[tid] = x[blockIdx.x * blockDim.x + tid];
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) sm[tid] += sm[tid + s];
        __syncthreads();
    }
    if (tid == 0) out[blockIdx.x] = sm[0];
}
// The same with the barrier inside the loop removed: a race the simulator must report.
extern "C" __global__ void tree_sum_racy(const int* x, int* out) {
    extern __shared__ int sm[];
    int tid = threadIdx.x;
    sm[tid] = x[blockIdx.x * blockDim.x + tid];
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) sm[tid] += sm[tid + s];
    }
    if (tid == 0) out[blockIdx.x] = sm[0];
}
// Shuffle variants and votes, written per lane to out[lane*8 + k].
extern "C" __global__ void warp_ops(const int* x, int* out) {
    int lane = threadIdx.x & 31;
    int v = x[threadIdx.x];
    int* o = out + threadIdx.x * 8;
    o[0] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) & 31);
    o[1] = __shfl_up_sync(0xffffffffu, v, 3);
    o[2] = __shfl_down_sync(0xffffffffu, v, 5);
    o[3] = __shfl_xor_sync(0xffffffffu, v, 6, 16);
    o[4] = __ballot_sync(0xffffffffu, v > 0);
    o[5] = __any_sync(0xffffffffu, v > 1000) + 2 * __all_sync(0xffffffffu, v > -1000000000);
    o[6] = __reduce_add_sync(0xffffffffu, v) ^ __reduce_max_sync(0xffffffffu, (unsigned)v);
    unsigned m = 0;
    if (v & 1) m = __activemask();
    o[7] = m;
}
