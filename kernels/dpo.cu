// The masked-segment DPO loss of IPO, fused: per preference pair, the policy log-probs of its
// chosen and rejected segments are summed (f64), the pair's gradient of
//   L = mean_i softplus(-beta * z_i) + sft_coef * (sum_i -chosen_i) / batch_chosen_tokens,
//   z_i = (chosen_i - ref_chosen_i) - (rejected_i - ref_rejected_i)
// is computed in f64 and broadcast to every row of its segments as dL/dlogp (f32), so the
// backward starts on the device. The per-pair sums go back to the host for the reported loss
// values (backend::SegmentDpo::grads, used by the CPU reference backend/cpu/dpo.rs and by train::loss::dpo_loss_part, is the same formula in the same order).
// Launch: one block per pair, blockDim a multiple of 32 (<= 1024); dlogp rows outside every
// segment are zeroed by the host (fill) first.
#include "common.cuh"

// 1 / (1 + exp(-x)) without overflow (as backend::SegmentDpo::grads).
__device__ __forceinline__ double sigmoid_d(double x) {
    if (x >= 0.0) return 1.0 / (1.0 + exp(-x));
    const double e = exp(x);
    return e / (1.0 + e);
}

// logp [rows] f32; segs int4 [pairs] (chosen_start, chosen_len, rejected_start, rejected_len);
// refs double2 [pairs] (ref_chosen, ref_rejected); sums double2 [pairs] out (chosen, rejected);
// dlogp [rows] f32 out. beta, sft_coef, n (batch pairs), tokens (batch chosen tokens) are f64
// passed as their bit patterns.
extern "C" __global__ void segment_dpo(const float* logp, const int4* segs, const double2* refs, double2* sums, float* dlogp,
                                       long long beta_bits, long long sft_bits, long long n_bits, long long tokens_bits) {
    __shared__ double sh[32];
    __shared__ float grads[2];
    const double beta = __longlong_as_double(beta_bits), sft = __longlong_as_double(sft_bits);
    const double n = __longlong_as_double(n_bits), tokens = __longlong_as_double(tokens_bits);
    const int4 s = segs[blockIdx.x];
    double c = 0.0, r = 0.0;
    for (int i = threadIdx.x; i < s.y; i += blockDim.x) c += (double)logp[s.x + i];
    for (int i = threadIdx.x; i < s.w; i += blockDim.x) r += (double)logp[s.z + i];
    c = block_sum(c, sh);
    r = block_sum(r, sh);
    if (threadIdx.x == 0) {
        const double2 ref = refs[blockIdx.x];
        const double z = (c - ref.x) - (r - ref.y);
        const double g = -beta * sigmoid_d(-beta * z) / n;
        grads[0] = (float)(g - sft / tokens);
        grads[1] = (float)(-g);
        sums[blockIdx.x] = make_double2(c, r);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < s.y; i += blockDim.x) dlogp[s.x + i] = grads[0];
    for (int i = threadIdx.x; i < s.w; i += blockDim.x) dlogp[s.z + i] = grads[1];
}
