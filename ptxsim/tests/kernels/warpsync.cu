// __syncwarp() (bar.warp.sync): lanes of a warp exchange data through shared memory with the
// warp barrier inside divergent branches, so the lanes that arrive first must wait for the
// others named in the mask; a half-warp mask; a member lane that exits early.

// Each warp: lanes < 16 write 2*x, lanes >= 16 write x+1 in the other branch, both sync
// inside their branch and read the partner lane (lane ^ 16) written by the other branch.
extern "C" __global__ void swap_halves(const float* x, float* y, int n) {
    __shared__ float s[256];
    int t = threadIdx.x, lane = t & 31, i = blockIdx.x * blockDim.x + t;
    float v = i < n ? x[i] : 0.f;
    float r;
    if (lane < 16) {
        s[t] = 2.f * v;
        __syncwarp();
        r = s[t + 16] - v;
    } else {
        s[t] = v + 1.f;
        __syncwarp();
        r = s[t - 16] * v;
    }
    if (i < n) y[i] = r;
}

// Partial masks: the lower half-warp runs a 16-lane shared-memory tree sum with
// __syncwarp(0x0000ffff) between steps; the upper half-warp does the same with 0xffff0000
// on its own data, in the other branch.
extern "C" __global__ void half_warp_sums(const int* x, int* y) {
    __shared__ int s[256];
    int t = threadIdx.x, lane = t & 31, i = blockIdx.x * blockDim.x + t;
    s[t] = x[i];
    if (lane < 16) {
        __syncwarp(0x0000ffffu);
        for (int o = 8; o > 0; o >>= 1) {
            int a = lane < o ? s[t + o] : 0;
            __syncwarp(0x0000ffffu);
            if (lane < o) s[t] += a;
            __syncwarp(0x0000ffffu);
        }
    } else {
        __syncwarp(0xffff0000u);
        for (int o = 8; o > 0; o >>= 1) {
            int a = (lane - 16) < o ? s[t + o] : 0;
            __syncwarp(0xffff0000u);
            if ((lane - 16) < o) s[t] += a * 3;
            __syncwarp(0xffff0000u);
        }
    }
    __syncwarp();
    y[i] = s[t - lane + (lane < 16 ? 0 : 16)];
}

// Lanes with x < 0 exit before the warp barrier; the others sync (full mask, so exited lanes
// must not be waited for) and read their neighbour's value (0 where the neighbour exited).
extern "C" __global__ void sync_after_exit(const float* x, float* y) {
    __shared__ float s[256];
    int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    s[t] = 0.f;
    __syncthreads();
    float v = x[i];
    if (v < 0.f) return;
    s[t] = v;
    __syncwarp();
    int nb = (t & ~31) | ((t + 1) & 31);
    y[i] = s[nb];
}

// A lane executing bar.warp.sync with a mask that does not name it: an error.
extern "C" __global__ void bad_mask(float* y) {
    int lane = threadIdx.x & 31;
    __syncwarp(1u << ((lane + 1) & 31));
    y[threadIdx.x] = 1.f;
}

// Lanes 0-15 wait at __syncwarp() for lanes 16-31, which wait at __syncthreads(): a deadlock
// on hardware, reported as an error.
extern "C" __global__ void wsync_deadlock(float* y) {
    int lane = threadIdx.x & 31;
    if (lane < 16) __syncwarp();
    else __syncthreads();
    y[threadIdx.x] = 1.f;
}
