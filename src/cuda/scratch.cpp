#include "cuda/scratch.hpp"

#include <cstdint>
#include <mutex>

#include "cuda/runtime_check.hpp"

namespace spattn::cuda {
namespace {

// The pool of one device, created on first use. It keeps what it has held (at most the
// largest scratch seen at once); the caller's default pool is left as it is.
cudaMemPool_t scratch_pool(int device, const char* where) {
  constexpr int kMaxPools = 64;
  static std::mutex mutex;
  static cudaMemPool_t pools[kMaxPools] = {};
  if (device < 0 || device >= kMaxPools) return nullptr;
  const std::lock_guard<std::mutex> lock(mutex);
  if (!pools[device]) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    check(cudaMemPoolCreate(&pool, &props), where, "cudaMemPoolCreate (scratch)");
    uint64_t keep = UINT64_MAX;
    check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), where,
          "cudaMemPoolSetAttribute (scratch)");
    pools[device] = pool;
  }
  return pools[device];
}

}  // namespace

void* scratch_alloc(size_t bytes, int device, cudaStream_t stream, const char* where) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream, &capture), where, "cudaStreamIsCapturing");
  cudaMemPool_t pool =
      capture == cudaStreamCaptureStatusNone ? scratch_pool(device, where) : nullptr;
  void* p = nullptr;
  if (pool)
    check(cudaMallocFromPoolAsync(&p, bytes, pool, stream), where,
          "cudaMallocFromPoolAsync (scratch)");
  else
    check(cudaMallocAsync(&p, bytes, stream), where, "cudaMallocAsync (scratch)");
  return p;
}

void scratch_free(void* ptr, cudaStream_t stream) {
  if (ptr) cudaFreeAsync(ptr, stream);
}

}  // namespace spattn::cuda
