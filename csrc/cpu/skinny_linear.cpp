#include "fastspec/skinny_linear.h"

#include <algorithm>

// The sums are specified with separate roundings (skinny_linear.h): never fuse them into FMAs.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTSPEC_X86 1
#endif

namespace fastspec {
namespace {

constexpr int64_t kPrefetchFloats = 3072;

// The fixed lane tree of skinny_linear.h: ((0+4)+(2+6)) + ((1+5)+(3+7)).
inline float lane_sum(const float* a) {
  const float s0 = a[0] + a[4], s1 = a[1] + a[5], s2 = a[2] + a[6], s3 = a[3] + a[7];
  return (s0 + s2) + (s1 + s3);
}

// The tail and the bias, in order, shared by both paths.
inline float finish(float s, const float* x, const float* w, int64_t k8, int64_t k, const float* bias, int64_t j) {
  for (int64_t t = k8; t < k; ++t) s = s + x[t] * w[t];
  return bias != nullptr ? s + bias[j] : s;
}

template <int M>
void pass_portable(const float* x, int64_t k, const float* w, const float* bias, float* y, int64_t ldy, int64_t n0,
                   int64_t n1) {
  const int64_t k8 = k - k % 8;
  for (int64_t j = n0; j < n1; ++j) {
    const float* wj = w + j * k;
    float acc[M][8] = {};
    for (int64_t c = 0; c < k8; c += 8)
      for (int i = 0; i < M; ++i)
        for (int l = 0; l < 8; ++l) acc[i][l] = acc[i][l] + x[i * k + c + l] * wj[c + l];
    for (int i = 0; i < M; ++i) y[i * ldy + j] = finish(lane_sum(acc[i]), x + i * k, wj, k8, k, bias, j);
  }
}

#ifdef FASTSPEC_X86
// target("avx2") without "fma": the compiler cannot contract mul + add, so the sums stay as specified.
template <int M>
__attribute__((target("avx2"))) void pass_avx2(const float* x, int64_t k, const float* w, const float* bias, float* y,
                                               int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t k8 = k - k % 8;
  for (int64_t j = n0; j < n1; ++j) {
    const float* wj = w + j * k;
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < k8; c += 8) {
      // 12 KB ahead (rows further on; prefetch never faults past the end): with both threads
      // streaming, 1 KB left 5-row passes waiting on memory (2-core EPYC, SmolLM2's linears: 5 rows
      // cost 1.19-1.25x one row at 1 KB, 1.00-1.08x at 12 KB; one row unchanged)
      _mm_prefetch(reinterpret_cast<const char*>(wj + c + kPrefetchFloats), _MM_HINT_T0);
      const __m256 wv = _mm256_loadu_ps(wj + c);
      for (int i = 0; i < M; ++i) acc[i] = _mm256_add_ps(acc[i], _mm256_mul_ps(_mm256_loadu_ps(x + i * k + c), wv));
    }
    for (int i = 0; i < M; ++i) {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[i]);
      y[i * ldy + j] = finish(lane_sum(lanes), x + i * k, wj, k8, k, bias, j);
    }
  }
}
#endif

using PassFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t);

template <template <int> class Pick>
PassFn pick(int64_t rows) {
  switch (rows) {
    case 1: return Pick<1>::fn;
    case 2: return Pick<2>::fn;
    case 3: return Pick<3>::fn;
    case 4: return Pick<4>::fn;
    case 5: return Pick<5>::fn;
    case 6: return Pick<6>::fn;
    case 7: return Pick<7>::fn;
    default: return Pick<8>::fn;
  }
}

template <int M>
struct Portable {
  static constexpr PassFn fn = &pass_portable<M>;
};
#ifdef FASTSPEC_X86
template <int M>
struct Avx2 {
  static constexpr PassFn fn = &pass_avx2<M>;
};
#endif

void run(bool avx2, const float* x, int64_t m, int64_t k, const float* w, const float* bias, float* y, int64_t ldy,
         int64_t n_begin, int64_t n_end) {
  for (int64_t i0 = 0; i0 < m; i0 += kSkinnyRowsPerPass) {
    const int64_t rows = std::min(kSkinnyRowsPerPass, m - i0);
#ifdef FASTSPEC_X86
    const PassFn fn = avx2 ? pick<Avx2>(rows) : pick<Portable>(rows);
#else
    (void)avx2;
    const PassFn fn = pick<Portable>(rows);
#endif
    fn(x + i0 * k, k, w, bias, y + i0 * ldy, ldy, n_begin, n_end);
  }
}

}  // namespace

bool skinny_linear_uses_avx2() {
#ifdef FASTSPEC_X86
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

void skinny_linear(const float* x, int64_t m, int64_t k, const float* w, const float* bias, float* y, int64_t ldy,
                   int64_t n_begin, int64_t n_end) {
  run(skinny_linear_uses_avx2(), x, m, k, w, bias, y, ldy, n_begin, n_end);
}

void skinny_linear_portable(const float* x, int64_t m, int64_t k, const float* w, const float* bias, float* y,
                            int64_t ldy, int64_t n_begin, int64_t n_end) {
  run(false, x, m, k, w, bias, y, ldy, n_begin, n_end);
}

}  // namespace fastspec
