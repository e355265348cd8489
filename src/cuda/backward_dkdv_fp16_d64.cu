// One instantiation per file: backward dk/dv pass, fp16, head dim 64.
#include "cuda/backward_kernel.cuh"
#include "cuda/launch.hpp"

namespace spattn::cuda {
cudaError_t backward_dkdv_fp16_d64(const AttnParams& p, cudaStream_t s) {
  return launch_dkdv<__half, 64>(p, s);
}
}  // namespace spattn::cuda
