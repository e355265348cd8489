// One instantiation per file: sm_90a backward dq pass, fp16, head dim 128.
#include "cuda/sm90/backward_sm90.cuh"
#include "cuda/sm90/backward_sm90.hpp"

namespace spattn::cuda::sm90 {
cudaError_t backward_dq_fp16_d128(const AttnParams& p, cudaStream_t s) {
  return launch_dq_sm90<__half, 128>(p, s);
}
}  // namespace spattn::cuda::sm90
