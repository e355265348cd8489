// Plain parameter structs passed by value into the CUDA kernels (FlashAttention's
// Flash_fwd_params idea): raw pointers, element strides and sizes, nothing that needs a
// constructor. Built on the host by cuda_attention.cpp from a validated AttentionProblem.
#pragma once

#include <cstdint>

namespace spattn::cuda {

// How a kernel chooses the tiles it visits.
enum class TileSource : int32_t {
  dense = 0,    // every kernel tile the rule allows; full tiles (by the kernel's own tile
                // geometry) skip masking
  native = 1,   // walk the plan's rows directly (block_q >= 128, block_k >= 64): full plan
                // tiles skip masking, partial ones apply the rule and the tails
  generic = 2,  // other plan block sizes: visit every tile the rule allows, mask each element
                // by the rule, the tails and whether its plan tile is listed (correct, slower)
};

// Plan arrays on the device, in the layout of spattn::PlanView (or its transpose).
struct PlanArgs {
  const int32_t* index = nullptr;        // (batch, heads, rows, capacity)
  const int32_t* num_full = nullptr;     // (batch, heads, rows)
  const int32_t* num_partial = nullptr;  // (batch, heads, rows)
  int64_t capacity = 0;
  int32_t batch = 1, heads = 1;          // 1 broadcasts
  int32_t rows = 0;                      // query blocks (forward plan) or kv blocks (transposed)
  int32_t block_q = 128, block_k = 64;
};

struct AttnParams {
  // Tensors: element strides for (batch, head, row); the last dimension is unit-stride.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_stride[3]{}, k_stride[3]{}, v_stride[3]{};
  void* out = nullptr;  // forward output; backward input
  int64_t o_stride[3]{};
  float* lse = nullptr;  // (B, Hq, Nq), forward output (natural log)
  int64_t lse_stride[3]{};

  // Backward only.
  const void* dout = nullptr;
  int64_t do_stride[3]{};
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_stride[3]{}, dk_stride[3]{}, dv_stride[3]{};
  // Workspace (B, Hq, Nq) contiguous: lse in log2 units (+inf for rows with no key, so their
  // probabilities vanish) and delta = rowsum(dout * out).
  float* lse2 = nullptr;
  float* delta = nullptr;

  int32_t batch = 0, heads_q = 0, heads_kv = 0, group = 1;
  int32_t q_len = 0, k_len = 0;
  float scale = 1.f;       // softmax scale
  float scale_log2 = 1.f;  // scale * log2(e)
  // Rule as offset bounds on d = j - i - (k_len - q_len), clamped to +-2^30.
  int32_t d_lo = 0, d_hi = 0;

  TileSource source = TileSource::dense;
  PlanArgs plan;   // forward plan (dense: unused)
  PlanArgs tplan;  // transposed plan, native backward only
};

inline constexpr int32_t kOffsetUnbounded = 1 << 30;

}  // namespace spattn::cuda
