// sparsekern::cholesky_delete, CUDA: one thread block per batch entry, each thread a lane of delete_entry
// (cholesky_delete.h). The lanes never exchange data (each tracks the rotation scalars itself), so the kernel
// has no barrier at all; reads of R's rows are coalesced across the lanes.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cholesky_delete.h"

namespace sparsekern {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void cholesky_delete_kernel(const scalar_t* __restrict__ u, const int64_t* __restrict__ index, int64_t n,
                                       scalar_t* out, scalar_t* carry, scalar_t* dropped) {
  const int64_t e = blockIdx.x, m = n - 1;
  delete_entry(u + e * n * n, index[e], n, out + e * m * m, carry + e * m, dropped + e * n,
               static_cast<int64_t>(threadIdx.x), static_cast<int64_t>(kThreads));
}

std::tuple<at::Tensor, at::Tensor> cholesky_delete_cuda(const at::Tensor& upper, const at::Tensor& index) {
  const c10::cuda::CUDAGuard guard(upper.device());
  const auto buffers = cholesky_delete_buffers(upper, index);
  const int64_t batch = buffers.r.size(0);
  if (batch > 0) {
    AT_DISPATCH_FLOATING_TYPES(buffers.r.scalar_type(), "cholesky_delete_cuda", [&] {
      cholesky_delete_kernel<scalar_t><<<batch, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          buffers.r.data_ptr<scalar_t>(), buffers.columns.data_ptr<int64_t>(), buffers.r.size(2),
          buffers.out.data_ptr<scalar_t>(), buffers.carry.data_ptr<scalar_t>(), buffers.dropped.data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return cholesky_delete_results(upper, buffers);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) { m.impl("cholesky_delete", &cholesky_delete_cuda); }

}  // namespace sparsekern
