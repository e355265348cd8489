// One instantiation per file: forward, bf16, head dim 64.
#include "cuda/forward_kernel.cuh"
#include "cuda/launch.hpp"

namespace spattn::cuda {
cudaError_t forward_bf16_d64(const AttnParams& p, cudaStream_t s) {
  return launch_forward<__nv_bfloat16, 64>(p, s);
}
}  // namespace spattn::cuda
