// The README's C++ quick start, built and run by ctest so the snippet cannot rot.
// The lines between the [readme] markers appear verbatim in README.md (checked by
// examples/check_readme.cmake).
#include <cstdio>

#include "spattn/attention.hpp"
#include "spattn/select.hpp"

int main() {
  // [readme]
  using namespace spattn;
  Tensor q = Tensor::empty({1, 8, 4096, 64}, DType::bfloat16);  // (B, H, N, D); any strides
  Tensor k = Tensor::empty({1, 8, 4096, 64}, DType::bfloat16);
  Tensor v = Tensor::empty({1, 8, 4096, 64}, DType::bfloat16);
  fill_uniform(q, 1); fill_uniform(k, 2); fill_uniform(v, 3);
  HybridOptions opt;                                 // Top-k 3% ∪ Top-p 20%, 128 x 64 tiles
  BlockPlan plan = select_hybrid(q, k, opt);         // or BlockPlan::dense, a pattern, ...
  ForwardResult fwd = forward(q, k, v, &plan);       // out (B, H, N, D), lse (B, H, N)
  Gradients g = backward(q, k, v, fwd.out, fwd.lse, fwd.out, &plan);  // dout = out here
  std::printf("density %.3f\n", plan.density());
  // [/readme]
  return g.dq.defined() && g.dk.defined() && g.dv.defined() ? 0 : 1;
}
