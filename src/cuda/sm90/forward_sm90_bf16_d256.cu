// One instantiation per file: sm_90a forward, bf16, head dim 256.
#include "cuda/sm90/forward_sm90.cuh"
#include "cuda/sm90/launch_sm90.hpp"

namespace spattn::cuda::sm90 {
cudaError_t forward_bf16_d256(const AttnParams& p, cudaStream_t s) {
  return launch_forward_sm90<__nv_bfloat16, 256>(p, s);
}
}  // namespace spattn::cuda::sm90
