// One instantiation per file: sm_90a backward dkdv pass, fp16, head dim 64.
#include "cuda/sm90/backward_sm90.cuh"
#include "cuda/sm90/backward_sm90.hpp"

namespace spattn::cuda::sm90 {
cudaError_t backward_dkdv_fp16_d64(const AttnParams& p, cudaStream_t s) {
  return launch_dkdv_sm90<__half, 64>(p, s);
}
}  // namespace spattn::cuda::sm90
