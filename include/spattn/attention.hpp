// Attention entry points. One function per operation; the backend is chosen by the tensors'
// device (cpu, cuda). Shapes, in logical (B, H, N, D) order with any strides:
//   q    (B, Hq,  Nq, Dqk)      k  (B, Hkv, Nk, Dqk)      v  (B, Hkv, Nk, Dv)
//   out  (B, Hq,  Nq, Dv)       lse (B, Hq, Nq)           dout like out
//   dq like q, dk like k, dv like v (dk, dv summed over the query heads of each GQA group)
// Hq must be a multiple of Hkv (GQA; Hkv = 1 is MQA). q, k, v, out, dout, dq, dk, dv share one
// dtype (float32, bfloat16, float16; float64 on the CPU for gradient checks). Accumulation is
// float32 (float64 for float64 inputs). lse is natural-log, float32 (float64 for float64 inputs).
// A query row with no allowed key gets out = 0 and lse = -inf; its gradients are 0.
#pragma once

#include <string>

#include "spattn/plan.hpp"
#include "spattn/tensor.hpp"

namespace spattn {

struct AttentionParams {
  double scale = 0.0;  // softmax scale; 0 means 1/sqrt(Dqk)
  MaskRule mask{};     // causal / sliding window; with a plan it must equal the plan's rule
  int num_threads = 0; // CPU threads; 0 = the OpenMP default
  void* stream = nullptr;  // cudaStream_t for the CUDA backend; nullptr = default stream
};

// Writes out and lse. plan == nullptr computes dense attention under params.mask.
void forward(const TensorRef& q, const TensorRef& k, const TensorRef& v, const PlanView* plan,
             const AttentionParams& params, const TensorRef& out, const TensorRef& lse);

// Writes dq, dk, dv from the forward's out and lse. `plan` must be the forward's plan.
void backward(const TensorRef& q, const TensorRef& k, const TensorRef& v, const TensorRef& out,
              const TensorRef& lse, const TensorRef& dout, const PlanView* plan,
              const AttentionParams& params, const TensorRef& dq, const TensorRef& dk,
              const TensorRef& dv);

// Owning conveniences for host tensors: allocate contiguous outputs and call the above.
struct ForwardResult {
  Tensor out;  // (B, Hq, Nq, Dv), q's dtype
  Tensor lse;  // (B, Hq, Nq)
};
struct Gradients {
  Tensor dq, dk, dv;
};
ForwardResult forward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                      const BlockPlan* plan, const AttentionParams& params = {});
Gradients backward(const TensorRef& q, const TensorRef& k, const TensorRef& v,
                   const TensorRef& out, const TensorRef& lse, const TensorRef& dout,
                   const BlockPlan* plan, const AttentionParams& params = {});

// What a backend can run, asked by the dispatcher and by callers before they call.
struct Support {
  bool ok = true;
  std::string reason;  // why not, when !ok
};
Support backend_supports(Device device, DType dtype, int64_t head_dim_qk, int64_t head_dim_v);
bool cuda_backend_available();  // compiled in and a device is present

}  // namespace spattn
