// Device-side plan transpose and the small per-row preparation launchers.
#include "cuda/backward_kernel.cuh"
#include "cuda/launch.hpp"

namespace spattn::cuda {
namespace {

// One warp per transposed row (plan batch, plan head, kv block kb). Lanes test 32 query blocks
// at a time; a ballot and a prefix count place the hits in ascending order, so the output is
// deterministic without atomics. Two sweeps: full tiles, then partial ones.
__global__ void transpose_plan_kernel(PlanArgs plan, int32_t num_k_blocks, int32_t* q_index,
                                      int32_t* num_full, int32_t* num_partial) {
  const int64_t rows = int64_t(plan.batch) * plan.heads * num_k_blocks;
  const int64_t trow = int64_t(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (trow >= rows) return;
  const int kb = int(trow % num_k_blocks);
  const int64_t head_row = trow / num_k_blocks;  // (pb * heads + ph)
  const int nqb = plan.rows;
  int32_t* out = q_index + trow * int64_t(nqb);
  int written = 0;
  int fulls = 0;
  for (int sweep = 0; sweep < 2; ++sweep) {
    for (int c = 0; c < nqb; c += 32) {
      const int qb = c + lane;
      bool hit = false;
      if (qb < nqb) {
        const int64_t row = head_row * nqb + qb;
        const int32_t* idx = plan.index + row * plan.capacity;
        const int nf = plan.num_full[row], np = plan.num_partial[row];
        // Sweep 0 looks in the full run only, sweep 1 in the partial run only.
        hit = sweep == 0 ? plan_row_lists(idx, nf, 0, kb) : plan_row_lists(idx + nf, np, 0, kb);
      }
      const unsigned mask = __ballot_sync(0xffffffffu, hit);
      if (hit) out[written + __popc(mask & ((1u << lane) - 1u))] = qb;
      written += __popc(mask);
    }
    if (sweep == 0) fulls = written;
  }
  if (lane == 0) {
    num_full[trow] = fulls;
    num_partial[trow] = written - fulls;
  }
}

}  // namespace

cudaError_t transpose_plan(const PlanArgs& plan, int32_t num_k_blocks, int32_t* q_index,
                           int32_t* num_full, int32_t* num_partial, cudaStream_t stream) {
  const int64_t rows = int64_t(plan.batch) * plan.heads * num_k_blocks;
  if (rows == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  transpose_plan_kernel<<<unsigned((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(
      plan, num_k_blocks, q_index, num_full, num_partial);
  return cudaGetLastError();
}

cudaError_t backward_prepare_bf16_d64(const AttnParams& p, cudaStream_t s) {
  return launch_backward_prepare<__nv_bfloat16, 64>(p, s);
}
cudaError_t backward_prepare_bf16_d128(const AttnParams& p, cudaStream_t s) {
  return launch_backward_prepare<__nv_bfloat16, 128>(p, s);
}
cudaError_t backward_prepare_fp16_d64(const AttnParams& p, cudaStream_t s) {
  return launch_backward_prepare<__half, 64>(p, s);
}
cudaError_t backward_prepare_fp16_d128(const AttnParams& p, cudaStream_t s) {
  return launch_backward_prepare<__half, 128>(p, s);
}
cudaError_t backward_prepare_bf16_d256(const AttnParams& p, cudaStream_t s) {
  return launch_backward_prepare<__nv_bfloat16, 256>(p, s);
}
cudaError_t backward_prepare_fp16_d256(const AttnParams& p, cudaStream_t s) {
  return launch_backward_prepare<__half, 256>(p, s);
}

}  // namespace spattn::cuda
