// Linked instead of the CUDA backend when spattn is configured with SPATTN_CUDA=OFF, so that
// calls with cuda tensors fail with a clear error rather than at link time.
#include "cuda/cuda_attention.hpp"
#include "spattn/error.hpp"

namespace spattn::cuda {

namespace {
constexpr const char* kReason =
    "the CUDA backend is not compiled into this build of spattn (configure with "
    "-DSPATTN_CUDA=ON on a machine with nvcc)";
}

bool available() { return false; }

Support supports(DType, int64_t, int64_t) { return {false, kReason}; }

void forward(const detail::AttentionProblem&, const TensorRef&, const TensorRef&,
             const TensorRef&, const TensorRef&, const TensorRef&) {
  throw Error(std::string("forward: ") + kReason);
}

void backward(const detail::AttentionProblem&, const TensorRef&, const TensorRef&,
              const TensorRef&, const TensorRef&, const TensorRef&, const TensorRef&,
              const TensorRef&, const TensorRef&, const TensorRef&) {
  throw Error(std::string("backward: ") + kReason);
}

}  // namespace spattn::cuda
