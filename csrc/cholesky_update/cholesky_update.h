// sparsekern::cholesky_update: the rank-k update/downdate of an upper Cholesky factor by Givens rotations.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace sparsekern {

// Checks the arguments and returns (R, X): contiguous [batch, n, n] / [batch, k, n] working copies.
std::tuple<at::Tensor, at::Tensor> cholesky_update_operands(const at::Tensor& upper, const at::Tensor& x);

// Raises the LinAlgError of a downdate that failed at `code` = row * n + column of batch entry `entry`.
[[noreturn]] void cholesky_downdate_failed(int64_t entry, int64_t code, int64_t n);

}  // namespace sparsekern
