// sparsekern::cholesky_delete: remove one variable per batch entry from an upper Cholesky factor by Givens
// rotations. The arithmetic of one batch entry is shared by the CPU and CUDA kernels (host and device code).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include <cmath>

#include "../common.h"

namespace sparsekern {

// The checked operands and the outputs of one call: r [batch, n, n] (upper copy), columns [batch] int64 in
// [0, n), out [batch, n-1, n-1], dropped [batch, n], carry [batch, n-1] (scratch).
struct DeleteBuffers {
  at::Tensor r, columns, out, dropped, carry;
};
DeleteBuffers cholesky_delete_buffers(const at::Tensor& upper, const at::Tensor& index);

// (out, dropped) in upper's batch shape.
std::tuple<at::Tensor, at::Tensor> cholesky_delete_results(const at::Tensor& upper, const DeleteBuffers& buffers);

// One batch entry, with `lane` of `lanes` workers each taking the kept columns jj = lane (mod lanes): no step
// needs another worker's results, because the rotation of step i depends only on column q of R and on the
// running radius, which every worker tracks itself. u [n, n] upper; out [n-1, n-1]; carry [n-1] scratch;
// dropped [n]. Kept column jj is original column jj + (jj >= q).
template <typename scalar_t>
SPARSEKERN_HOST_DEVICE void delete_entry(const scalar_t* u, int64_t q, int64_t n, scalar_t* out, scalar_t* carry,
                                         scalar_t* dropped, int64_t lane, int64_t lanes) {
  const int64_t m = n - 1;
  // Rows below q keep their values, one row and one column up.
  for (int64_t row = q + 1; row < n; ++row)
    for (int64_t jj = lane; jj < m; jj += lanes) {
      const int64_t j = jj + (jj >= q);
      out[(row - 1) * m + jj] = j >= row ? u[row * n + j] : scalar_t(0);
    }
  // Column q moved to the front; rotations of rows (i-1, i), i = q..1, zero it below row 0. `carry` is the row
  // being rotated upward (it starts as row q), carry_q its entry in column q.
  for (int64_t jj = lane; jj < m; jj += lanes) {
    const int64_t j = jj + (jj >= q);
    carry[jj] = j >= q ? u[q * n + j] : scalar_t(0);
  }
  scalar_t carry_q = u[q * n + q];
  for (int64_t i = q; i >= 1; --i) {
    const scalar_t* above = u + (i - 1) * n;  // row i-1, still as in R
    const scalar_t a = above[q];
#ifdef __CUDA_ARCH__
    const scalar_t radius = hypot(a, carry_q);
#else
    const scalar_t radius = std::hypot(a, carry_q);
#endif
    const scalar_t c = radius > 0 ? a / radius : scalar_t(1);
    const scalar_t s = radius > 0 ? carry_q / radius : scalar_t(0);
    // The new row i has its diagonal at kept column i-1, where carry (rows >= i) is zero: it is -s R[i-1, i-1].
    // Flip the row if that is negative, so the factor keeps a positive diagonal.
    const scalar_t flip = -s * above[i - 1] < 0 ? scalar_t(-1) : scalar_t(1);
    for (int64_t jj = lane; jj < m; jj += lanes) {
      scalar_t value = 0;
      if (jj >= i - 1) {
        const int64_t j = jj + (jj >= q);
        const scalar_t r_above = above[j];  // j >= i - 1: inside the upper triangle
        const scalar_t r_carry = carry[jj];
        value = flip * (c * r_carry - s * r_above);
        carry[jj] = c * r_above + s * r_carry;
      }
      out[(i - 1) * m + jj] = value;
    }
    carry_q = radius;
  }
  // What is left of the rotated row is the dropped first row, in the original column order.
  for (int64_t jj = lane; jj < m; jj += lanes) dropped[jj + (jj >= q)] = carry[jj];
  if (lane == 0) dropped[q] = carry_q;
}

}  // namespace sparsekern
