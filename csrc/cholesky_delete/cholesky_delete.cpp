// sparsekern::cholesky_delete, CPU: for U the upper factor of H^-1, removing input q is exact OBS elimination:
// the result is the upper factor of (H without q)^-1 and the dropped row d satisfies d * d[q] = H^-1[q, :].
// O(q n) rotations plus the O(n^2) copy, instead of an O(n^3) refactorization. The arithmetic is
// delete_entry (cholesky_delete.h), shared with the CUDA kernel; its specification is
// sparsekern/reference/cholesky.py.
#include "cholesky_delete.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common.h"

namespace sparsekern {

DeleteBuffers cholesky_delete_buffers(const at::Tensor& upper, const at::Tensor& index) {
  auto r = batched_upper_copy(upper, "cholesky_delete");
  const int64_t batch = r.size(0), n = r.size(2);
  TORCH_CHECK_VALUE(n >= 1, "cholesky_delete: cannot delete from an empty factor");
  TORCH_CHECK_VALUE(!at::isFloatingType(index.scalar_type()) && index.scalar_type() != at::kBool,
                    "cholesky_delete: index must be an integer tensor, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.sizes() == upper.sizes().slice(0, upper.dim() - 2),
                    "cholesky_delete: index must hold one column per batch entry, shape ",
                    upper.sizes().slice(0, upper.dim() - 2), ", got ", index.sizes());
  auto columns = index.to(r.device(), at::kLong).reshape({batch}).contiguous();
  if (batch > 0) {
    TORCH_CHECK_VALUE(columns.min().item<int64_t>() >= 0 && columns.max().item<int64_t>() < n,
                      "cholesky_delete: index must lie in [0, ", n, ")");
  }
  return {r, columns, at::empty({batch, n - 1, n - 1}, r.options()), at::empty({batch, n}, r.options()),
          at::empty({batch, n - 1}, r.options())};
}

std::tuple<at::Tensor, at::Tensor> cholesky_delete_results(const at::Tensor& upper, const DeleteBuffers& buffers) {
  const int64_t n = buffers.r.size(2);
  auto out_shape = upper.sizes().slice(0, upper.dim() - 2).vec();
  auto dropped_shape = out_shape;
  out_shape.insert(out_shape.end(), {n - 1, n - 1});
  dropped_shape.push_back(n);
  return {buffers.out.reshape(out_shape), buffers.dropped.reshape(dropped_shape)};
}

namespace {

std::tuple<at::Tensor, at::Tensor> cholesky_delete_cpu(const at::Tensor& upper, const at::Tensor& index) {
  const auto buffers = cholesky_delete_buffers(upper, index);
  const int64_t batch = buffers.r.size(0), n = buffers.r.size(2), m = n - 1;
  AT_DISPATCH_FLOATING_TYPES(buffers.r.scalar_type(), "cholesky_delete", [&] {
    const auto* u = buffers.r.data_ptr<scalar_t>();
    const auto* q = buffers.columns.data_ptr<int64_t>();
    auto* out = buffers.out.data_ptr<scalar_t>();
    auto* carry = buffers.carry.data_ptr<scalar_t>();
    auto* dropped = buffers.dropped.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e)
        delete_entry(u + e * n * n, q[e], n, out + e * m * m, carry + e * m, dropped + e * n, 0, 1);
    });
  });
  return cholesky_delete_results(upper, buffers);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("cholesky_delete", &cholesky_delete_cpu); }

}  // namespace sparsekern
