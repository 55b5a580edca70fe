#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "fastspec/skinny_linear.h"

namespace {

std::vector<float> randoms(size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& f : v) f = dist(gen);
  return v;
}

// y [m,n] from the public entry point, split into two column ranges as two threads would.
std::vector<float> run(bool portable, const std::vector<float>& x, int64_t m, int64_t k, const std::vector<float>& w,
                       int64_t n, const float* bias) {
  std::vector<float> y(static_cast<size_t>(m * n), -1.f);
  const int64_t half = n / 2;
  auto call = portable ? fastspec::skinny_linear_portable : fastspec::skinny_linear;
  call(x.data(), m, k, w.data(), bias, y.data(), n, 0, half);
  call(x.data(), m, k, w.data(), bias, y.data(), n, half, n);
  return y;
}

}  // namespace

TEST(SkinnyLinear, MatchesDoublePrecisionOnAwkwardSizes) {
  for (int64_t k : {1, 7, 8, 9, 577}) {
    for (int64_t m : {1, 3, 8, 11}) {
      const int64_t n = 37;
      auto x = randoms(m * k, 1), w = randoms(n * k, 2), b = randoms(n, 3);
      auto y = run(false, x, m, k, w, n, b.data());
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double want = b[j];
          for (int64_t t = 0; t < k; ++t) want += double(x[i * k + t]) * w[j * k + t];
          EXPECT_NEAR(y[i * n + j], want, 1e-4 * (1 + std::sqrt(double(k)))) << "k " << k << " m " << m;
        }
    }
  }
}

TEST(SkinnyLinear, RowsDoNotDependOnHowManyRowsShareAPass) {
  const int64_t k = 300, n = 50, m = 11;
  auto x = randoms(m * k, 4), w = randoms(n * k, 5);
  auto all = run(false, x, m, k, w, n, nullptr);
  for (int64_t i = 0; i < m; ++i) {
    std::vector<float> row(x.begin() + i * k, x.begin() + (i + 1) * k);
    auto one = run(false, row, 1, k, w, n, nullptr);
    EXPECT_EQ(0, std::memcmp(one.data(), all.data() + i * n, sizeof(float) * n)) << "row " << i;
  }
}

TEST(SkinnyLinear, Avx2AndPortablePathsAgreeBitForBit) {
  const int64_t k = 203, n = 29;
  for (int64_t m : {1, 5, 8, 9}) {
    auto x = randoms(m * k, 6), w = randoms(n * k, 7), b = randoms(n, 8);
    auto fast = run(false, x, m, k, w, n, b.data());
    auto portable = run(true, x, m, k, w, n, b.data());
    EXPECT_EQ(0, std::memcmp(fast.data(), portable.data(), sizeof(float) * fast.size())) << "m " << m;
  }
}

TEST(SkinnyLinear, EmptyReductionGivesTheBias) {
  std::vector<float> x, w, b{1.5f, -2.f};
  std::vector<float> y(2, 9.f);
  fastspec::skinny_linear(x.data(), 1, 0, w.data(), b.data(), y.data(), 2, 0, 2);
  EXPECT_EQ(y[0], 1.5f);
  EXPECT_EQ(y[1], -2.f);
}
