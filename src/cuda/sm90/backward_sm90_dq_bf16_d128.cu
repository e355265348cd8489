// One instantiation per file: sm_90a backward dq pass, bf16, head dim 128.
#include "cuda/sm90/backward_sm90.cuh"
#include "cuda/sm90/backward_sm90.hpp"

namespace spattn::cuda::sm90 {
cudaError_t backward_dq_bf16_d128(const AttnParams& p, cudaStream_t s) {
  return launch_dq_sm90<__nv_bfloat16, 128>(p, s);
}
}  // namespace spattn::cuda::sm90
