// Conversions between float and the 16-bit formats, checked exhaustively against the
// compiler's own _Float16 and against the bfloat16 definition (the top half of a float).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "spattn/dtype.hpp"
#include "spattn/error.hpp"
#include "spattn/tensor.hpp"

namespace spattn {
namespace {

TEST(DType, SizesAndNames) {
  EXPECT_EQ(dtype_size(DType::float32), 4);
  EXPECT_EQ(dtype_size(DType::bfloat16), 2);
  EXPECT_EQ(dtype_size(DType::float16), 2);
  EXPECT_EQ(dtype_size(DType::float64), 8);
  EXPECT_STREQ(dtype_name(DType::bfloat16), "bfloat16");
}

TEST(DType, Float16ToFloatMatchesCompilerForEveryPattern) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    _Float16 h;
    const uint16_t b16 = uint16_t(bits);
    std::memcpy(&h, &b16, 2);
    const float expected = float(h);
    const float got = to_float(float16{b16});
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << "bits " << bits;
    } else {
      EXPECT_EQ(float_to_bits(got), float_to_bits(expected)) << "bits " << bits;
    }
  }
}

TEST(DType, FloatToFloat16RoundsLikeCompiler) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any;
  for (int n = 0; n < 2000000; ++n) {
    // Random bit patterns cover every exponent, subnormals, overflow and NaN.
    const float f = bits_to_float(any(rng));
    const _Float16 h = _Float16(f);
    uint16_t expected;
    std::memcpy(&expected, &h, 2);
    const uint16_t got = to_float16(f).bits;
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(to_float(float16{got})));
    } else {
      ASSERT_EQ(got, expected) << "float " << f;
    }
  }
}

TEST(DType, BFloat16RoundsToNearestEven) {
  // 1 + 2^-8 lies exactly between two bfloat16 values (1 and 1 + 2^-7): ties go to even (1).
  EXPECT_EQ(to_float(to_bfloat16(1.0f + 1.0f / 256)), 1.0f);
  // 1 + 3*2^-8 lies between 1 + 2^-7 and 1 + 2^-6: ties to even gives 1 + 2^-6.
  EXPECT_EQ(to_float(to_bfloat16(1.0f + 3.0f / 256)), 1.0f + 1.0f / 64);
  EXPECT_EQ(to_float(to_bfloat16(-2.5f)), -2.5f);
  EXPECT_TRUE(std::isinf(to_float(to_bfloat16(std::numeric_limits<float>::infinity()))));
  EXPECT_TRUE(std::isnan(to_float(to_bfloat16(std::numeric_limits<float>::quiet_NaN()))));
  // Every bfloat16 value round-trips.
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const float f = to_float(bfloat16{uint16_t(bits)});
    if (!std::isnan(f)) EXPECT_EQ(to_bfloat16(f).bits, bits);
  }
}

TEST(Tensor, MemoryOrderGivesStrides) {
  Tensor bnhd = Tensor::empty({2, 3, 5, 8}, DType::float32, {0, 2, 1, 3});
  EXPECT_EQ(bnhd.ref().stride[0], 3 * 5 * 8);
  EXPECT_EQ(bnhd.ref().stride[1], 8);
  EXPECT_EQ(bnhd.ref().stride[2], 3 * 8);
  EXPECT_EQ(bnhd.ref().stride[3], 1);
  EXPECT_FALSE(bnhd.ref().is_contiguous());
  Tensor bhnd = Tensor::empty({2, 3, 5, 8}, DType::float32);
  EXPECT_TRUE(bhnd.ref().is_contiguous());
  bnhd.set({1, 2, 4, 7}, 3.5);
  EXPECT_EQ(bnhd.get({1, 2, 4, 7}), 3.5);
}

TEST(Tensor, FillUniformIsSeededAndInRange) {
  Tensor a = Tensor::empty({4, 100}, DType::bfloat16), b = Tensor::empty({4, 100}, DType::bfloat16);
  fill_uniform(a, 42, -2.0, 2.0);
  fill_uniform(b, 42, -2.0, 2.0);
  for (int64_t i = 0; i < a.numel(); ++i) {
    EXPECT_EQ(load_element(a, i), load_element(b, i));
    EXPECT_GE(load_element(a, i), -2.0);
    EXPECT_LE(load_element(a, i), 2.0);
  }
}

TEST(Tensor, BadArgumentsThrowWithDetails) {
  try {
    (void)Tensor::empty({2, 3}, DType::float32, {0, 0});
    FAIL() << "expected spattn::Error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("memory_order"), std::string::npos) << e.what();
  }
  EXPECT_THROW((void)make_ref(nullptr, DType::float32, {2, 3}, {1}), Error);
}

}  // namespace
}  // namespace spattn
