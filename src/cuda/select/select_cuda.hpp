// CUDA side of the plan writers declared in spattn/select.hpp. The public functions in
// src/select/select_into.cpp validate what does not depend on the device and call these for
// CUDA buffers; select_unavailable.cpp replaces them when spattn is built without CUDA.
#pragma once

#include "spattn/select.hpp"

namespace spattn::cuda {

// Which kernels select_hybrid runs (benchmarks time the stages apart; callers use all).
enum SelectStages : int { kStagePool = 1, kStageSelect = 2, kStageAll = 3 };

// q, k on one CUDA device; out on the same device, geometry checked by the caller.
void select_hybrid(const TensorRef& q, const TensorRef& k, const HybridOptions& opt,
                   const PlanBuffers& out, void* stream, int stages = kStageAll);
// Host plan -> device buffers (capacity checked by the caller).
void copy_plan(const BlockPlan& plan, const PlanBuffers& out, void* stream);
// Dense-under-rule plan of out.geo in device buffers.
void dense_plan(const PlanBuffers& out, void* stream);

}  // namespace spattn::cuda
