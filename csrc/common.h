// Shared argument checks of the Cholesky-family ops.
#pragma once

#include <ATen/core/Tensor.h>

// Arithmetic shared by a CPU loop and a CUDA kernel is written once, callable from both.
#ifdef __CUDACC__
#define SPARSEKERN_HOST_DEVICE __host__ __device__
#else
#define SPARSEKERN_HOST_DEVICE
#endif

namespace sparsekern {

// A contiguous [batch, n, n] copy of the upper triangle of `upper` ([..., n, n], float32/float64): the kernels
// work in place on it, and reading only the upper triangle makes whatever lies below the diagonal irrelevant.
inline at::Tensor batched_upper_copy(const at::Tensor& upper, const char* op) {
  TORCH_CHECK_VALUE(upper.dim() >= 2 && upper.size(-1) == upper.size(-2), op, ": upper must be [..., n, n], got ",
                    upper.sizes());
  TORCH_CHECK_VALUE(upper.scalar_type() == at::kFloat || upper.scalar_type() == at::kDouble, op,
                    ": upper must be float32 or float64, got ", upper.scalar_type());
  const int64_t n = upper.size(-1);
  return upper.reshape({-1, n, n}).triu().contiguous();
}

}  // namespace sparsekern
