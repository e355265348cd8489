// Hopper (sm_90a) building blocks for the wgmma/TMA kernels: mbarriers, bulk tensor copies
// (TMA), wgmma shared-memory descriptors and instructions, register reallocation. Inline PTX
// only; every wrapper is a single instruction (or a wait loop) so the kernels read like the
// hardware model. Compiled for sm_90a only (src/cuda/CMakeLists.txt).
#pragma once

#include <cuda.h>  // CUtensorMap (a 128-byte opaque struct; no libcuda link needed)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace spattn::cuda::sm90 {

// ---- mbarriers -----------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
// Makes the initialised barriers visible to the async proxy (TMA) before first use.
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives and announces `bytes` of transactions that TMA copies will complete on this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Blocks until the barrier's phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// ---- TMA ------------------------------------------------------------------------------------------
// 4-d tile (d, row, head, batch) of `map` into shared memory at `dst`; completes `bytes` on `bar`
// (the whole box, including the zero fill of rows past the tensor's end).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ---- register reallocation between warpgroups --------------------------------------------------------
template <int N>
__device__ __forceinline__ void regs_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void regs_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

// Barrier among the 128 threads of one warpgroup (ids 1.. ; 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_sync(int id) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory");
}

// ---- shared memory ------------------------------------------------------------------------------
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
// Address of 16-byte chunk `chunk` (8 elements) of row `row` in a tile that TMA wrote with the
// 128-byte swizzle (see smem_desc): 64-column slabs `slab_bytes` apart, 128-byte rows, chunk c
// of row r stored at chunk c ^ (r % 8).
__device__ __forceinline__ uint32_t swizzled_chunk(uint32_t tile, int slab_bytes, int row,
                                                   int chunk) {
  return tile + (chunk / 8) * slab_bytes + row * 128 + (((chunk % 8) ^ (row & 7)) << 4);
}

// ---- wgmma ------------------------------------------------------------------------------------------
// Shared-memory matrix descriptor for a 128-byte-swizzled operand (the layout TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B): rows of 64 16-bit elements (128 B), 16-byte chunk c of row r stored
// at chunk c ^ (r % 8), 8-row atoms of 1024 B that must start 1024-byte aligned.
//   K-major (A = Q, B = K):  lbo unused (1), sbo = 1024 (next 8 rows of M/N).
//   MN-major (B = V):        lbo = bytes to the next 64 columns of N, sbo = 1024 (next 8 rows of K).
// A k-step inside the 128-byte row advances the start address by 32 bytes (16 elements).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= uint64_t((addr & 0x3FFFF) >> 4);
  d |= uint64_t((lbo & 0x3FFFF) >> 4) << 16;
  d |= uint64_t((sbo & 0x3FFFF) >> 4) << 32;
  d |= uint64_t(1) << 62;  // 128-byte swizzle
  return d;
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Ties registers to this point of the program: the compiler may neither read an accumulator of
// an in-flight wgmma before the wait, nor reuse the registers of an A fragment it still reads.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// wgmma.mma_async m64nNk16 with float32 accumulators. Accumulator layout (per thread of the
// warpgroup; warp w, g = lane / 4, t = lane % 4): d[4j + e] is row 16w + g + 8 * (e / 2),
// column 8j + 2t + (e % 2). PTX names every accumulator register, hence the long lists.
template <class T, int N> struct Wgmma;

// Operand text per accumulator count (32 registers for N = 64, 64 for N = 128): the register
// list, its "+f" constraints, and the operands numbered after it (ss: desc_a, desc_b,
// accumulate, kTransB; rs: the four A registers, desc_b, kTransB).
#define SPATTN_WGMMA_ACC32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define SPATTN_WGMMA_ACC32_OUT(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define SPATTN_WGMMA_SS_PRED32 "%34"
#define SPATTN_WGMMA_SS_TAIL32 "%32, %33, p, 1, 1, 0, %35"
#define SPATTN_WGMMA_RS_TAIL32 "{%32, %33, %34, %35}, %36, 1, 1, 1, %37"
#define SPATTN_WGMMA_ACC64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define SPATTN_WGMMA_ACC64_OUT(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define SPATTN_WGMMA_SS_PRED64 "%66"
#define SPATTN_WGMMA_SS_TAIL64 "%64, %65, p, 1, 1, 0, %67"
#define SPATTN_WGMMA_RS_TAIL64 "{%64, %65, %66, %67}, %68, 1, 1, 1, %69"

// Wgmma<ELEM, N>::ss: D(64xN, f32) (+)= A(64x16, smem, K-major) * B(16xN, smem; K-major, or
// N-major when kTransB). Wgmma<ELEM, N>::rs: D(64xN, f32) += A(64x16, registers: the m16n8k16 A
// fragment of each warp's 16 rows) * B(16xN, smem; K-major, or N-major when kTransB).
// PTX_TYPE is the instruction's element suffix, ACC the accumulator count N / 2.
#define SPATTN_WGMMA_SPECIALISATION(ELEM, PTX_TYPE, N, ACC)                                    \
  template <>                                                                                   \
  struct Wgmma<ELEM, N> {                                                                       \
    template <int kTransB>                                                                      \
    __device__ static void ss(float* d, uint64_t desc_a, uint64_t desc_b, int accumulate) {     \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SPATTN_WGMMA_SS_PRED##ACC ", 0;\n"        \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " "   \
                   SPATTN_WGMMA_ACC##ACC ", " SPATTN_WGMMA_SS_TAIL##ACC ";\n}\n"                 \
                   : SPATTN_WGMMA_ACC##ACC##_OUT(d)                                              \
                   : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransB));                   \
    }                                                                                           \
    template <int kTransB>                                                                      \
    __device__ static void rs(float* d, const uint32_t* a, uint64_t desc_b) {                   \
      asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " "  \
                   SPATTN_WGMMA_ACC##ACC ", " SPATTN_WGMMA_RS_TAIL##ACC ";\n"                    \
                   : SPATTN_WGMMA_ACC##ACC##_OUT(d)                                              \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(kTransB));     \
    }                                                                                           \
  };

SPATTN_WGMMA_SPECIALISATION(__nv_bfloat16, "bf16", 64, 32)
SPATTN_WGMMA_SPECIALISATION(__nv_bfloat16, "bf16", 128, 64)
SPATTN_WGMMA_SPECIALISATION(__half, "f16", 64, 32)
SPATTN_WGMMA_SPECIALISATION(__half, "f16", 128, 64)

}  // namespace spattn::cuda::sm90
