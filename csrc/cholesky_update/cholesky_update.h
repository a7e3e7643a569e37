// sparsekern::cholesky_update: the rank-k update/downdate of an upper Cholesky factor by Givens rotations.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <tuple>

#include "../common.h"

namespace sparsekern {

// Checks the arguments and returns (R, X): contiguous [batch, n, n] / [batch, k, n] working copies.
std::tuple<at::Tensor, at::Tensor> cholesky_update_operands(const at::Tensor& upper, const at::Tensor& x);

// codes[e]: -1, or row * n + column where batch entry e's downdate lost positive definiteness. Raises the
// LinAlgError naming the first failed entry, if any.
void check_downdates(const int64_t* codes, int64_t batch, int64_t n);

// Step j of one rank-1 sweep: the rotation that folds x's entry a into the diagonal d = R[j, j]. Returns false
// when a downdate would leave the new diagonal non-positive. sign is +1 (update) or -1 (downdate).
template <typename scalar_t>
struct Rotation {
  scalar_t diag, c, s, signed_s, inverse_c;

  SPARSEKERN_HOST_DEVICE bool make(scalar_t d, scalar_t a, scalar_t sign) {
    const scalar_t squared = d * d + sign * a * a;
#ifdef __CUDA_ARCH__
    diag = sqrt(squared);
#else
    diag = std::sqrt(squared);
#endif
    c = diag / d;
    s = a / d;
    signed_s = sign * s;
    inverse_c = d / diag;  // a multiply per element instead of a divide
    return squared > 0;
  }

  // The rest of row j of R and of x: R[j, i] <- (R[j, i] +- s x[i]) / c, then x[i] <- c x[i] - s R[j, i].
  SPARSEKERN_HOST_DEVICE void apply(scalar_t& r, scalar_t& v) const {
    const scalar_t updated = (r + signed_s * v) * inverse_c;
    r = updated;
    v = c * v - s * updated;
  }
};

}  // namespace sparsekern
