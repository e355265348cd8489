// One instantiation per file: backward dk/dv pass, fp16, head dim 256.
#include "cuda/backward_kernel.cuh"
#include "cuda/launch.hpp"

namespace spattn::cuda {
cudaError_t backward_dkdv_fp16_d256(const AttnParams& p, cudaStream_t s) {
  return launch_dkdv<__half, 256>(p, s);
}
}  // namespace spattn::cuda
