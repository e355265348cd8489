// One instantiation per file: backward dq pass, bf16, head dim 256.
#include "cuda/backward_kernel.cuh"
#include "cuda/launch.hpp"

namespace spattn::cuda {
cudaError_t backward_dq_bf16_d256(const AttnParams& p, cudaStream_t s) {
  return launch_dq<__nv_bfloat16, 256>(p, s);
}
}  // namespace spattn::cuda
