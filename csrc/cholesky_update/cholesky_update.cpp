// sparsekern::cholesky_update, CPU: R' with R'^T R' = R^T R +- X^T X, one rank-1 Givens sweep per row of X
// (O(k n^2) per batch entry instead of an O(n^3) refactorization). The CUDA kernel is cholesky_update.cu; the
// specification, line by line, is sparsekern/reference/cholesky.py.
#include "cholesky_update.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"

namespace sparsekern {

std::tuple<at::Tensor, at::Tensor> cholesky_update_operands(const at::Tensor& upper, const at::Tensor& x) {
  auto r = batched_upper_copy(upper, "cholesky_update");
  const int64_t n = upper.size(-1);
  TORCH_CHECK_VALUE(x.dim() == upper.dim() && x.size(-1) == n &&
                        x.sizes().slice(0, x.dim() - 2) == upper.sizes().slice(0, upper.dim() - 2),
                    "cholesky_update: x must be [..., k, ", n, "] with the batch shape of upper ", upper.sizes(),
                    ", got ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == upper.device(), "cholesky_update: x is on ", x.device(), ", upper on ",
                    upper.device());
  auto rows = x.reshape({r.size(0), -1, n}).to(r.scalar_type()).clone(at::MemoryFormat::Contiguous);
  return {r, rows};
}

void check_downdates(const int64_t* codes, int64_t batch, int64_t n) {
  for (int64_t e = 0; e < batch; ++e) {
    TORCH_CHECK_LINALG(codes[e] < 0, "cholesky_update: the downdate by row ", codes[e] / n,
                       " of x makes the matrix indefinite at batch entry ", e, ", column ", codes[e] % n);
  }
}

namespace {

// One batch entry: r [n, n] upper (row-major), x [k, n] consumed. Returns -1, or row * n + column of a downdate
// step whose new diagonal would not be positive.
//
// Column by column, each row of x in turn: the same rotations as k rank-1 sweeps one after another (step (t, j)
// needs R[j, j] after rows < t, and x[t, j] after columns < j, as both orders provide), but row j of R is read
// from memory once rather than k times.
template <typename scalar_t>
int64_t update_entry(scalar_t* r, scalar_t* x, int64_t n, int64_t k, bool downdate) {
  const scalar_t sign = downdate ? -1 : 1;
  for (int64_t j = 0; j < n; ++j) {
    scalar_t* __restrict__ row = r + j * n;  // never x's memory: lets the compiler vectorize the loop below
    for (int64_t t = 0; t < k; ++t) {
      scalar_t* __restrict__ v = x + t * n;
      Rotation<scalar_t> rotation;
      if (!rotation.make(row[j], v[j], sign) && downdate) return t * n + j;
      row[j] = rotation.diag;
      for (int64_t i = j + 1; i < n; ++i) rotation.apply(row[i], v[i]);
    }
  }
  return -1;
}

at::Tensor cholesky_update_cpu(const at::Tensor& upper, const at::Tensor& x, bool downdate) {
  at::Tensor r, rows;  // named, not structured bindings: the dispatch lambda captures them
  std::tie(r, rows) = cholesky_update_operands(upper, x);
  const int64_t batch = r.size(0), n = r.size(2), k = rows.size(1);
  std::vector<int64_t> failure(batch, -1);
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "cholesky_update", [&] {
    auto* r_data = r.data_ptr<scalar_t>();
    auto* x_data = rows.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e)
        failure[e] = update_entry(r_data + e * n * n, x_data + e * k * n, n, k, downdate);
    });
  });
  check_downdates(failure.data(), batch, n);
  return r.reshape(upper.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("cholesky_update", &cholesky_update_cpu); }

}  // namespace sparsekern
