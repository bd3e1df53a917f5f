// Language features beyond plain loops: a non-inlined device function (.func + call with
// param passing), __constant__ and __device__ module variables with initialisers, a local
// array with dynamic indexing (.local), a struct passed by value, nested divergent branches
// followed by warp shuffles (reconvergence), and named barriers with bar.arrive/bar.sync
// (producer/consumer warps).
struct Affine { float scale; float shift; int idx[4]; };

__constant__ float kTable[8] = {1.f, 2.f, 3.f, 5.f, 7.f, 11.f, 13.f, 17.f};
__device__ int gCounter = 42;

__device__ __noinline__ float poly(float x, int k) {
    float r = 0.f;
    for (int i = 0; i <= k; i++) r = r * x + kTable[i & 7];
    return r;
}

extern "C" __global__ void misc(const float* x, float* y, int* flags, Affine aff, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float loc[16];
    for (int j = 0; j < 16; j++) loc[j] = x[(i + j) % n] * (float)(j + 1);
    float v = 0.f;
    if (i < n) {
        float xi = x[i];
        if (xi > 0.f) {
            if (xi > 0.5f) v = poly(xi, (i & 3) + 2);
            else v = loc[i & 15] + loc[(i * 7) & 15];
        } else {
            v = -poly(-xi, 1) + loc[aff.idx[i & 3] & 15];
        }
    }
    // reconverged: every lane must take part
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (i < n) y[i] = v * aff.scale + aff.shift;
    if (i == 0) flags[0] = atomicAdd(&gCounter, 1);
}

// Warp 0 produces into shared memory, warps 1..3 consume: bar.arrive / bar.sync on barrier 1
// with 128 threads, as in producer/consumer pipelines.
extern "C" __global__ void named_barrier(const int* x, int* out) {
    __shared__ int buf[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (warp == 0) {
        buf[lane] = x[blockIdx.x * 32 + lane] * 3;
        asm volatile("bar.arrive 1, 128;" ::: "memory");
    } else {
        asm volatile("bar.sync 1, 128;" ::: "memory");
        out[(blockIdx.x * 3 + warp - 1) * 32 + lane] = buf[(lane + warp) & 31] + warp;
    }
}
