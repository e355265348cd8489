// One instantiation per file: backward dk/dv pass, fp16, head dim 128.
#include "cuda/backward_kernel.cuh"
#include "cuda/launch.hpp"

namespace spattn::cuda {
cudaError_t backward_dkdv_fp16_d128(const AttnParams& p, cudaStream_t s) {
  return launch_dkdv<__half, 128>(p, s);
}
}  // namespace spattn::cuda
