// TensorRef: a non-owning view of strided memory (pointer, dtype, device, shape, strides in
// elements). Attention takes (B, H, N, D) views in any memory order — both B,H,N,D and
// B,N,H,D storage are just different strides — so callers never copy to call spattn.
//
// Tensor: a small owning host buffer for C++ callers, tests and tools.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "spattn/dtype.hpp"

namespace spattn {

enum class DeviceKind : uint8_t { cpu, cuda };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int index = 0;
  friend bool operator==(const Device&, const Device&) = default;
};

std::string to_string(Device d);

inline constexpr int kMaxRank = 4;

struct TensorRef {
  void* data = nullptr;
  DType dtype = DType::float32;
  Device device{};
  int rank = 0;
  std::array<int64_t, kMaxRank> shape{};
  std::array<int64_t, kMaxRank> stride{};  // in elements, may be any non-negative value

  int64_t size(int dim) const { return shape[dim]; }
  int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_string() const;  // "(2, 8, 128, 64)"
  template <class T> T* ptr() const { return static_cast<T*>(data); }
};

// A view; `strides` empty means row-major contiguous.
TensorRef make_ref(void* data, DType dtype, std::initializer_list<int64_t> shape,
                   std::initializer_list<int64_t> strides = {}, Device device = {});
TensorRef make_ref(void* data, DType dtype, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& strides = {}, Device device = {});

// Owning, 64-byte aligned host memory.
class Tensor {
 public:
  Tensor() = default;
  // `memory_order` lists the logical dims from outermost to innermost in storage;
  // empty means row-major. For a (B, H, N, D) tensor stored as B,N,H,D pass {0, 2, 1, 3}.
  static Tensor empty(const std::vector<int64_t>& shape, DType dtype,
                      const std::vector<int>& memory_order = {});
  static Tensor zeros(const std::vector<int64_t>& shape, DType dtype,
                      const std::vector<int>& memory_order = {});

  const TensorRef& ref() const { return ref_; }
  operator const TensorRef&() const { return ref_; }  // NOLINT: views are what APIs take
  template <class T> T* ptr() const { return ref_.ptr<T>(); }
  int64_t size(int dim) const { return ref_.shape[dim]; }
  int64_t numel() const { return ref_.numel(); }
  DType dtype() const { return ref_.dtype; }
  bool defined() const { return ref_.data != nullptr; }

  // Element access through strides, converted to/from double (tests, tools, reference).
  double get(std::initializer_list<int64_t> index) const;
  void set(std::initializer_list<int64_t> index, double value);

 private:
  std::shared_ptr<void> storage_;
  TensorRef ref_;
};

// Element offset of a multi-index in a view.
inline int64_t offset_of(const TensorRef& t, std::initializer_list<int64_t> index) {
  int64_t off = 0;
  int d = 0;
  for (int64_t i : index) off += i * t.stride[d++];
  return off;
}

// Reads/writes one element of any dtype as double (host memory only).
double load_element(const TensorRef& t, int64_t element_offset);
void store_element(const TensorRef& t, int64_t element_offset, double value);

// Fills with seeded uniform values in [lo, hi) (host memory only). Deterministic per seed.
void fill_uniform(const TensorRef& t, uint64_t seed, double lo = -1.0, double hi = 1.0);
void fill_value(const TensorRef& t, double value);

}  // namespace spattn
