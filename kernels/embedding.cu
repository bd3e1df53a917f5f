// Row gather and grouped row scatter-add: the embedding forward/backward, the lm-head row
// gather and the scatter of its dh. The scatter is deterministic without atomics: the host
// groups source rows by destination row (CSR, members in increasing order), one block per
// group adds them in order (the CPU's order). CPU reference: embedding / embedding_bwd.
#include "common.cuh"

// dst[n, dim] = src[idx[i], :]
extern "C" __global__ void gather_rows(const float* src, const unsigned* idx, float* dst, int n, int dim) {
    const long long total = (long long)n * dim;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const long long i = e / dim, c = e % dim;
        dst[e] = src[(long long)idx[i] * dim + c];
    }
}

// For group g: dst[dst_row[g], :] += sum over m in [off[g], off[g+1]) of src[members[m], :]
extern "C" __global__ void scatter_add_rows(const float* src, float* dst, const unsigned* dst_row, const unsigned* off,
                                            const unsigned* members, int groups, int dim) {
    for (int g = blockIdx.x; g < groups; g += gridDim.x) {
        const long long d0 = (long long)dst_row[g] * dim;
        for (int c = threadIdx.x; c < dim; c += blockDim.x) {
            float acc = dst[d0 + c];
            for (unsigned m = off[g]; m < off[g + 1]; m++) acc += src[(long long)members[m] * dim + c];
            dst[d0 + c] = acc;
        }
    }
}
