// Histogram with shared-memory atomics then global atomics; plus other atomic ops.
extern "C" __global__ void histogram(const unsigned* x, int n, unsigned* hist, int nbins) {
    extern __shared__ unsigned h[];
    for (int b = threadIdx.x; b < nbins; b += blockDim.x) h[b] = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        atomicAdd(&h[x[i] % nbins], 1u);
    __syncthreads();
    for (int b = threadIdx.x; b < nbins; b += blockDim.x) atomicAdd(&hist[b], h[b]);
}
extern "C" __global__ void atomic_misc(const int* x, int n, int* out, float* fout, double* dout) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    atomicMax(&out[0], x[i]);
    atomicMin(&out[1], x[i]);
    atomicXor(&out[2], x[i]);
    atomicOr(&out[3], x[i] & 0xff);
    atomicAnd(&out[4], x[i] | 0xffff0000);
    atomicCAS(&out[5], 0, x[i]);
    atomicExch(&out[6 + (i & 1)], 5);
    atomicAdd(&fout[0], (float)x[i] * 0.5f);
    atomicAdd(&dout[0], (double)x[i] * 0.25);
}
