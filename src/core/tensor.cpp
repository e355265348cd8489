#include "spattn/tensor.hpp"

#include <cstdlib>
#include <numeric>
#include <random>
#include <sstream>

#include "spattn/error.hpp"

namespace spattn {

std::string to_string(Device d) {
  return d.kind == DeviceKind::cpu ? std::string("cpu") : "cuda:" + std::to_string(d.index);
}

int64_t TensorRef::numel() const {
  int64_t n = 1;
  for (int d = 0; d < rank; ++d) n *= shape[d];
  return n;
}

bool TensorRef::is_contiguous() const {
  int64_t expected = 1;
  for (int d = rank - 1; d >= 0; --d) {
    if (shape[d] != 1 && stride[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorRef::shape_string() const {
  std::ostringstream s;
  s << "(";
  for (int d = 0; d < rank; ++d) s << (d ? ", " : "") << shape[d];
  s << ")";
  return s.str();
}

TensorRef make_ref(void* data, DType dtype, const std::vector<int64_t>& shape,
                   const std::vector<int64_t>& strides, Device device) {
  SPATTN_CHECK(shape.size() <= size_t(kMaxRank), "make_ref: rank must be at most ", kMaxRank,
               "; got ", shape.size());
  SPATTN_CHECK(strides.empty() || strides.size() == shape.size(),
               "make_ref: strides must be empty or have one entry per dim (", shape.size(),
               "); got ", strides.size());
  TensorRef t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.rank = int(shape.size());
  int64_t running = 1;
  for (int d = t.rank - 1; d >= 0; --d) {
    SPATTN_CHECK(shape[d] >= 0, "make_ref: shape[", d, "] must be >= 0; got ", shape[d]);
    t.shape[d] = shape[d];
    t.stride[d] = strides.empty() ? running : strides[d];
    SPATTN_CHECK(t.stride[d] >= 0, "make_ref: stride[", d, "] must be >= 0; got ", t.stride[d]);
    running *= shape[d];
  }
  return t;
}

TensorRef make_ref(void* data, DType dtype, std::initializer_list<int64_t> shape,
                   std::initializer_list<int64_t> strides, Device device) {
  return make_ref(data, dtype, std::vector<int64_t>(shape), std::vector<int64_t>(strides),
                  device);
}

Tensor Tensor::empty(const std::vector<int64_t>& shape, DType dtype,
                     const std::vector<int>& memory_order) {
  const int rank = int(shape.size());
  std::vector<int> order = memory_order;
  if (order.empty()) {
    order.resize(rank);
    std::iota(order.begin(), order.end(), 0);
  }
  SPATTN_CHECK(int(order.size()) == rank, "Tensor::empty: memory_order must have ", rank,
               " entries; got ", order.size());
  std::vector<int64_t> strides(rank, 0);
  std::vector<bool> seen(rank, false);
  int64_t running = 1;
  for (int pos = rank - 1; pos >= 0; --pos) {
    const int d = order[pos];
    SPATTN_CHECK(d >= 0 && d < rank && !seen[d],
                 "Tensor::empty: memory_order must be a permutation of 0..", rank - 1);
    seen[d] = true;
    strides[d] = running;
    running *= shape[d];
  }
  const size_t bytes = size_t(std::max<int64_t>(running, 1)) * dtype_size(dtype);
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* raw = std::aligned_alloc(64, rounded);
  SPATTN_CHECK(raw != nullptr, "Tensor::empty: could not allocate ", rounded, " bytes");
  Tensor t;
  t.storage_ = std::shared_ptr<void>(raw, [](void* p) { std::free(p); });
  t.ref_ = make_ref(raw, dtype, shape, strides);
  return t;
}

Tensor Tensor::zeros(const std::vector<int64_t>& shape, DType dtype,
                     const std::vector<int>& memory_order) {
  Tensor t = empty(shape, dtype, memory_order);
  fill_value(t, 0.0);
  return t;
}

double load_element(const TensorRef& t, int64_t off) {
  switch (t.dtype) {
    case DType::float32: return t.ptr<float>()[off];
    case DType::float64: return t.ptr<double>()[off];
    case DType::bfloat16: return to_float(t.ptr<bfloat16>()[off]);
    case DType::float16: return to_float(t.ptr<float16>()[off]);
  }
  return 0.0;
}

void store_element(const TensorRef& t, int64_t off, double value) {
  switch (t.dtype) {
    case DType::float32: t.ptr<float>()[off] = float(value); break;
    case DType::float64: t.ptr<double>()[off] = value; break;
    case DType::bfloat16: t.ptr<bfloat16>()[off] = to_bfloat16(float(value)); break;
    case DType::float16: t.ptr<float16>()[off] = to_float16(float(value)); break;
  }
}

double Tensor::get(std::initializer_list<int64_t> index) const {
  return load_element(ref_, offset_of(ref_, index));
}
void Tensor::set(std::initializer_list<int64_t> index, double value) {
  store_element(ref_, offset_of(ref_, index), value);
}

namespace {
// Visits every element offset of a strided view in logical row-major order.
template <class F>
void for_each_offset(const TensorRef& t, F&& f) {
  if (t.numel() == 0) return;
  std::array<int64_t, kMaxRank> idx{};
  while (true) {
    int64_t off = 0;
    for (int d = 0; d < t.rank; ++d) off += idx[d] * t.stride[d];
    f(off);
    int d = t.rank - 1;
    while (d >= 0 && ++idx[d] == t.shape[d]) idx[d--] = 0;
    if (d < 0) return;
  }
}
}  // namespace

void fill_uniform(const TensorRef& t, uint64_t seed, double lo, double hi) {
  SPATTN_CHECK(t.device.kind == DeviceKind::cpu, "fill_uniform: tensor must be on cpu; got ",
               to_string(t.device));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  for_each_offset(t, [&](int64_t off) { store_element(t, off, dist(rng)); });
}

void fill_value(const TensorRef& t, double value) {
  SPATTN_CHECK(t.device.kind == DeviceKind::cpu, "fill_value: tensor must be on cpu; got ",
               to_string(t.device));
  for_each_offset(t, [&](int64_t off) { store_element(t, off, value); });
}

}  // namespace spattn
