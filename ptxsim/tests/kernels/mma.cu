// bf16 tensor-core GEMM C[M,N] (f32) = A[M,K] (row-major bf16) * B[K,N] (row-major bf16) with
// the instructions our attention kernels use: cp.async (16-byte chunks) into shared memory,
// ldmatrix.x4 for A, ldmatrix.x2.trans for B, mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32.
// Block = 4 warps computing a 32x16 tile; warp w owns rows (w/2)*16.., cols (w%2)*8.
// M % 32 == 0, N % 16 == 0, K % 16 == 0.
#include <cuda_bf16.h>
#define LD 24  // padded row length in bf16 (48 bytes: rows stay 16-byte aligned)

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

extern "C" __global__ void mma_gemm(const __nv_bfloat16* A, const __nv_bfloat16* B, float* C, int M, int N, int K) {
    __shared__ __align__(16) __nv_bfloat16 As[32 * LD];
    __shared__ __align__(16) __nv_bfloat16 Bs[16 * LD];
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int m0 = blockIdx.y * 32, n0 = blockIdx.x * 16;
    int wm = (warp >> 1) * 16, wn = (warp & 1) * 8;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < K; k0 += 16) {
        if (tid < 64) {  // A: 32 rows x 2 chunks of 8 bf16
            int r = tid >> 1, c = (tid & 1) * 8;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(&As[r * LD + c])), "l"(A + (size_t)(m0 + r) * K + k0 + c));
        } else if (tid < 96) {  // B: 16 rows x 2 chunks
            int r = (tid - 64) >> 1, c = (tid & 1) * 8;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(&Bs[r * LD + c])), "l"(B + (size_t)(k0 + r) * N + n0 + c));
        }
        asm volatile("cp.async.commit_group;\n" ::);
        asm volatile("cp.async.wait_group 0;\n" ::);
        __syncthreads();
        unsigned a0, a1, a2, a3, b0, b1;
        int ar = wm + (lane & 7) + ((lane >> 3) & 1) * 8, ac = (lane >> 4) * 8;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3) : "r"(smem_u32(&As[ar * LD + ac])));
        int br = lane & 15;
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(b0), "=r"(b1) : "r"(smem_u32(&Bs[br * LD + wn])));
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        __syncthreads();
    }
    int g = lane >> 2, t = lane & 3;
    float* c = C + (size_t)(m0 + wm + g) * N + n0 + wn + 2 * t;
    c[0] = acc[0];
    c[1] = acc[1];
    c[8 * N] = acc[2];
    c[8 * N + 1] = acc[3];
}

// The same without cp.async.wait_group: shared tiles may be read before they land.
extern "C" __global__ void mma_gemm_nowait(const __nv_bfloat16* A, const __nv_bfloat16* B, float* C, int M, int N, int K) {
    __shared__ __align__(16) __nv_bfloat16 As[32 * LD];
    __shared__ __align__(16) __nv_bfloat16 Bs[16 * LD];
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int m0 = blockIdx.y * 32, n0 = blockIdx.x * 16;
    int wm = (warp >> 1) * 16, wn = (warp & 1) * 8;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < K; k0 += 16) {
        if (tid < 64) {
            int r = tid >> 1, c = (tid & 1) * 8;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(&As[r * LD + c])), "l"(A + (size_t)(m0 + r) * K + k0 + c));
        } else if (tid < 96) {
            int r = (tid - 64) >> 1, c = (tid & 1) * 8;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(&Bs[r * LD + c])), "l"(B + (size_t)(k0 + r) * N + n0 + c));
        }
        asm volatile("cp.async.commit_group;\n" ::);
        __syncthreads();
        unsigned a0, a1, a2, a3, b0, b1;
        int ar = wm + (lane & 7) + ((lane >> 3) & 1) * 8, ac = (lane >> 4) * 8;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(a0), "=r"(a1), "=r"(a2), "=r"(a3) : "r"(smem_u32(&As[ar * LD + ac])));
        int br = lane & 15;
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(b0), "=r"(b1) : "r"(smem_u32(&Bs[br * LD + wn])));
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
        __syncthreads();
        asm volatile("cp.async.wait_all;\n" ::);
    }
    int g = lane >> 2, t = lane & 3;
    float* c = C + (size_t)(m0 + wm + g) * N + n0 + wn + 2 * t;
    c[0] = acc[0];
    c[1] = acc[1];
    c[8 * N] = acc[2];
    c[8 * N + 1] = acc[3];
}
