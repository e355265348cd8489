// Linked instead of select_cuda.cpp when spattn is built without CUDA: plan writers given CUDA
// tensors or buffers fail with a clear message instead of at link time.
#include "cuda/select/select_cuda.hpp"
#include "spattn/error.hpp"

namespace spattn::cuda {

namespace {
constexpr const char* kReason =
    "the CUDA backend is not compiled into this build of spattn (configure with "
    "-DSPATTN_CUDA=ON on a machine with nvcc)";
}

void select_hybrid(const TensorRef&, const TensorRef&, const HybridOptions&, const PlanBuffers&,
                   void*, int) {
  throw Error(std::string("select_hybrid_into: ") + kReason);
}
void copy_plan(const BlockPlan&, const PlanBuffers&, void*) {
  throw Error(std::string("copy_plan_to: ") + kReason);
}
void dense_plan(const PlanBuffers&, void*) {
  throw Error(std::string("dense_plan_into: ") + kReason);
}

}  // namespace spattn::cuda
