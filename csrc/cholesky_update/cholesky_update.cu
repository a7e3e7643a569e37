// sparsekern::cholesky_update, CUDA: one thread block per batch entry. Row j of R and the columns of x to its
// right are spread over the threads (a thread owns the columns i = threadIdx.x mod blockDim); the rotation of
// step (column j, row t of x) is made by the owner of column j, which is also the last thread to have written
// R[j, j] and x[t, j], and broadcast through shared memory: one barrier per step. Same order and arithmetic
// (Rotation, cholesky_update.h) as the CPU kernel.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cholesky_update.h"

namespace sparsekern {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void cholesky_update_kernel(scalar_t* __restrict__ r_all, scalar_t* __restrict__ x_all, int64_t n,
                                       int64_t k, bool downdate, int64_t* __restrict__ failure) {
  const int64_t entry = blockIdx.x;
  scalar_t* r = r_all + entry * n * n;
  scalar_t* x = x_all + entry * k * n;
  const scalar_t sign = downdate ? -1 : 1;
  // Two slots, alternating by step, so a step's owner never overwrites what a slower thread still has to read.
  __shared__ Rotation<scalar_t> rotations[2];
  for (int64_t j = 0; j < n; ++j) {  // the CPU kernel's order: column by column, each row of x in turn
    scalar_t* row = r + j * n;
    for (int64_t t = 0; t < k; ++t) {
      const int slot = (j * k + t) & 1;
      scalar_t* v = x + t * n;
      if (threadIdx.x == j % kThreads) {
        // A failed downdate goes on with NaN (sqrt of a negative); the host raises after the kernel.
        if (!rotations[slot].make(row[j], v[j], sign) && downdate && failure[entry] < 0) failure[entry] = t * n + j;
        row[j] = rotations[slot].diag;
      }
      __syncthreads();
      const Rotation<scalar_t> rotation = rotations[slot];
      // The first column > j this thread owns.
      const int64_t first = j + 1 + ((threadIdx.x - (j + 1) % kThreads) + kThreads) % kThreads;
      for (int64_t i = first; i < n; i += kThreads) rotation.apply(row[i], v[i]);
    }
  }
}

at::Tensor cholesky_update_cuda(const at::Tensor& upper, const at::Tensor& x, bool downdate) {
  const c10::cuda::CUDAGuard guard(upper.device());
  at::Tensor r, rows;  // named, not structured bindings: the dispatch lambda captures them
  std::tie(r, rows) = cholesky_update_operands(upper, x);
  const int64_t batch = r.size(0), n = r.size(2), k = rows.size(1);
  auto failure = at::full({batch}, -1, r.options().dtype(at::kLong));
  if (batch > 0 && n > 0 && k > 0) {
    AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "cholesky_update_cuda", [&] {
      cholesky_update_kernel<scalar_t><<<batch, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          r.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(), n, k, downdate, failure.data_ptr<int64_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (downdate) {
      const auto codes = failure.cpu();  // waits for the kernel
      check_downdates(codes.data_ptr<int64_t>(), batch, n);
    }
  }
  return r.reshape(upper.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("cholesky_update", &cholesky_update_cuda); }

}  // namespace sparsekern
