// y = x · wᵀ (+ bias) for a few rows of x: the target's linear layers when it verifies γ+1 tokens.
// BLAS picks kernels for large M; at M = 2..8 on CPUs without bf16 units (MKL on AMD, say) it
// costs as much as M separate passes, while the work is bound by reading w once. This kernel reads
// each row of w once per 8 rows of x. Framework-agnostic (no torch): raw pointers, fp32.
//
// Every output element is summed in one fixed order that does not depend on m (so row i of a
// 5-row call equals a 1-row call, bit for bit) nor on the instruction set:
//   acc[l] (l < 8) = Σ over c of x[8c + l] * w[8c + l], left to right, products and sums each
//                    rounded to fp32 (no FMA), for 8c + 8 <= k;
//   s = ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7));
//   then s = s + x[j] * w[j] for the tail j in [k - k % 8, k), in order; then s + bias.
// fastspec.ops.reference.skinny_linear computes the same sums in PyTorch.
#pragma once
#include <cstdint>

namespace fastspec {

constexpr int64_t kSkinnyRowsPerPass = 8;  // rows of x sharing one read of w

// y[i, j] for i < m and j in [n_begin, n_end): x [m, k] and w [n, k] row-major, bias [n] or
// nullptr, y [m, ldy] row-major. Threads may split [0, n) and call this on disjoint ranges.
void skinny_linear(const float* x, int64_t m, int64_t k, const float* w, const float* bias, float* y, int64_t ldy,
                   int64_t n_begin, int64_t n_end);

// The portable path (the same sums without AVX2); for tests that the two agree bit for bit.
void skinny_linear_portable(const float* x, int64_t m, int64_t k, const float* w, const float* bias, float* y,
                            int64_t ldy, int64_t n_begin, int64_t n_end);

// True when skinny_linear runs its AVX2 path on this CPU.
bool skinny_linear_uses_avx2();

}  // namespace fastspec
