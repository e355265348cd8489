// Host side of the TMA path: builds CUtensorMap descriptors through the driver entry point that
// the runtime hands out (cudaGetDriverEntryPointByVersion), so nothing links libcuda directly.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>

namespace spattn::cuda::sm90 {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return PFN_cuTensorMapEncodeTiled_v12000(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 4-d map over a (batch, heads, rows, d) tensor with element strides `stride` = (batch, head,
// row) and a unit last dim: dims (d, rows, heads, batch), box (64, box_rows, 1, 1), 128-byte
// swizzle, rows past `rows` read as zeros. False when the driver refuses (the caller then takes
// the mma.sync kernels).
inline bool encode_map(CUtensorMap* map, const void* ptr, const int64_t* stride, bool bf16, int d,
                       int rows, int heads, int batch, int box_rows) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr || rows <= 0 || heads <= 0 || batch <= 0) return false;
  const cuuint64_t dims[4] = {cuuint64_t(d), cuuint64_t(rows), cuuint64_t(heads),
                              cuuint64_t(batch)};
  // Byte strides of dims 1..3. A dim of size 1 is never stepped over; give it a harmless
  // packed stride so that a 0 or odd stride of an unused dim cannot make the driver refuse.
  const int64_t elem_strides[3] = {stride[2], stride[1], stride[0]};
  cuuint64_t strides[3];
  uint64_t packed = uint64_t(d) * 2;
  for (int i = 0; i < 3; ++i) {
    const int64_t s = elem_strides[i] * 2;
    strides[i] = dims[i + 1] == 1 || s <= 0 ? packed : cuuint64_t(s);
    packed = uint64_t(strides[i]) * dims[i + 1];
  }
  const cuuint32_t box[4] = {64, cuuint32_t(box_rows), 1, 1};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUresult r =
      encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
             const_cast<void*>(ptr), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

}  // namespace spattn::cuda::sm90
