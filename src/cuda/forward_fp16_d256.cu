// One instantiation per file: forward, fp16, head dim 256.
#include "cuda/forward_kernel.cuh"
#include "cuda/launch.hpp"

namespace spattn::cuda {
cudaError_t forward_fp16_d256(const AttnParams& p, cudaStream_t s) {
  return launch_forward<__half, 256>(p, s);
}
}  // namespace spattn::cuda
