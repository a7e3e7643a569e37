// sparsekern::cholesky_update: the rank-k update/downdate of an upper Cholesky factor by Givens rotations.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sparsekern {

// Checks the arguments and returns (R, X): contiguous [batch, n, n] / [batch, k, n] working copies.
std::tuple<at::Tensor, at::Tensor> cholesky_update_operands(const at::Tensor& upper, const at::Tensor& x);

// codes[e]: -1, or row * n + column where batch entry e's downdate lost positive definiteness. Raises the
// LinAlgError naming the first failed entry, if any.
void check_downdates(const int64_t* codes, int64_t batch, int64_t n);

}  // namespace sparsekern
