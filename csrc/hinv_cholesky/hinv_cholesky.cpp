// sparsekern::hinv_cholesky / hinv_cholesky_: the upper Cholesky factor U of the damped inverse Hessian
// (U^T U = (H + damp I)^-1) with one factorization and one triangular inverse, in the Hessian's own memory.
//
// The index-reversal identity: with P the reversal permutation and P H P = L L^T (lower Cholesky),
// U = P L^-1 P is upper triangular and U^T U = P L^-T L^-1 P = (P L L^T P)^-1 = H^-1. The published code
// instead factorizes H, forms H^-1 from that factor and factorizes H^-1 again (three O(n^3) calls, several
// n x n buffers). Here, all in the n x n buffer itself:
//   1. reverse H in place (P H P is the flat storage reversed);
//   2. blocked lower Cholesky over the lower triangle only, so the untouched strict upper triangle still holds
//      P H P: a failed attempt is undone by mirroring it back, and the damping escalates x10 per failure;
//   3. blocked in-place inverse of the lower factor;
//   4. reverse again: U.
// Everything is ATen on views (GEMMs for the bulk, LAPACK/cuSOLVER on b x b diagonal blocks), so the same code
// runs on CPU and CUDA; extra memory is O(n b), not O(n^2).
#include <ATen/core/Tensor.h>
#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace sparsekern {
namespace {

// Diagonal blocks: big enough that the GEMMs dominate, small enough that the b x b LAPACK calls stay cheap.
// Those calls and the panel solves (O(n^2 b) of the O(n^3) flops) run in fp64: in fp32 they made U^T U up to
// 3x less accurate than the three-call reference on ill-conditioned Hessians; in fp64 it is more accurate
// than the reference on every case of tests/test_hinv_cholesky.py.
int64_t block_size_for(const at::Tensor& t) { return t.is_cuda() ? 512 : 256; }

// a <- P a P for a contiguous square a (its flat storage reversed), as swaps of row chunks so that the
// temporaries stay small: 2 x 256 KiB on CPU; 2 x 16 MiB on CUDA, where each chunk costs three launches.
void reverse_in_place(at::Tensor& a) {
  const int64_t n = a.size(0);
  const int64_t chunk_elements = a.is_cuda() ? int64_t{1} << 22 : int64_t{1} << 16;
  const int64_t chunk = std::max<int64_t>(1, chunk_elements / std::max<int64_t>(n, 1));
  for (int64_t start = 0; start < n / 2; start += chunk) {
    const int64_t rows = std::min(chunk, n / 2 - start);
    auto top = a.narrow(0, start, rows);
    auto bottom = a.narrow(0, n - start - rows, rows);
    auto saved = top.flip({0, 1});
    top.copy_(bottom.flip({0, 1}));
    bottom.copy_(saved);
  }
  if (n % 2) {
    auto middle = a.select(0, n / 2);
    middle.copy_(middle.flip({0}));
  }
}

// Lower Cholesky factor of the symmetric matrix held in the lower triangle of `a`, written over that triangle;
// the strict upper triangle is neither read nor written. Right-looking and blocked. Returns the number of
// diagonal blocks that failed as a 0-dim tensor, so the caller syncs once rather than once per block.
at::Tensor cholesky_lower_in_place(at::Tensor& a, int64_t b) {
  const int64_t n = a.size(0);
  auto failures = at::zeros({}, a.options().dtype(at::kInt));
  for (int64_t k = 0; k < n; k += b) {
    const int64_t kb = std::min(b, n - k), end = k + kb;
    auto diag = a.narrow(0, k, kb).narrow(1, k, kb);
    auto lower = diag.tril();
    auto [factor, info] = at::linalg_cholesky_ex((lower + lower.tril(-1).mT()).to(at::kDouble));
    failures.add_(info);
    auto lower_part = at::ones({kb, kb}, a.options().dtype(at::kBool)).tril();
    diag.copy_(at::where(lower_part, factor.to(a.scalar_type()), diag));  // keeps the upper half of the block
    if (end == n) break;
    // Panel: L[end:, k-block] = A[end:, k-block] L_kk^-T, a triangular solve in fp64.
    auto panel = a.narrow(0, end, n - end).narrow(1, k, kb);
    auto solved = at::linalg_solve_triangular(factor.mT(), panel.to(at::kDouble), /*upper=*/true, /*left=*/false)
                      .to(a.scalar_type());
    panel.copy_(solved);
    // Trailing update A[end:, end:] -= panel panel^T, lower triangle only, one block column at a time.
    for (int64_t j = end; j < n; j += b) {
      const int64_t jb = std::min(b, n - j);
      auto rows = solved.narrow(0, j - end, jb);
      // The diagonal block: subtracting the lower half of the product leaves the upper half's values as they were.
      a.narrow(0, j, jb).narrow(1, j, jb).sub_(at::mm(rows, rows.mT()).tril());
      if (j + jb < n) {
        auto below = a.narrow(0, j + jb, n - j - jb).narrow(1, j, jb);
        below.addmm_(solved.narrow(0, j + jb - end, n - j - jb), rows.mT(), /*beta=*/1, /*alpha=*/-1);
      }
    }
  }
  return failures;
}

// Undo a failed factorization: the strict lower triangle again mirrors the (untouched) strict upper one.
// The diagonal is the caller's to restore.
void mirror_upper_to_lower(at::Tensor& a, int64_t b) {
  const int64_t n = a.size(0);
  for (int64_t i = 0; i < n; i += b) {
    const int64_t ib = std::min(b, n - i);
    for (int64_t j = 0; j < i; j += b) {
      const int64_t jb = std::min(b, n - j);
      a.narrow(0, i, ib).narrow(1, j, jb).copy_(a.narrow(0, j, jb).narrow(1, i, ib).mT());
    }
    auto diag = a.narrow(0, i, ib).narrow(1, i, ib);
    auto strict_upper = diag.triu(1);
    diag.copy_(strict_upper + strict_upper.mT());
  }
}

// L^-1 in place for a lower-triangular `a` with zeros above the diagonal. Block columns from the right: with
// X = L^-1 already in the trailing block, X[end:, j-block] = -X[end:, end:] L[end:, j-block] L_jj^-1.
void invert_lower_in_place(at::Tensor& a, int64_t b) {
  const int64_t n = a.size(0);
  for (int64_t j = ((n - 1) / b) * b; j >= 0; j -= b) {
    const int64_t jb = std::min(b, n - j), end = j + jb;
    auto diag = a.narrow(0, j, jb).narrow(1, j, jb);
    auto diag_inverse = at::linalg_solve_triangular(diag.to(at::kDouble), at::eye(jb, a.options().dtype(at::kDouble)),
                                                    /*upper=*/false)
                            .to(a.scalar_type());
    if (end < n) {
      auto panel = a.narrow(0, end, n - end).narrow(1, j, jb);
      auto product = at::empty({n - end, jb}, a.options());
      // X[end:, end:] is lower triangular: each block row only multiplies the panel rows it can reach.
      for (int64_t r = 0; r < n - end; r += b) {
        const int64_t rb = std::min(b, n - end - r);
        auto out = product.narrow(0, r, rb);
        at::mm_out(out, a.narrow(0, end + r, rb).narrow(1, end, r + rb), panel.narrow(0, 0, r + rb));
      }
      panel.copy_(at::mm(product, diag_inverse).neg_());
    }
    diag.copy_(diag_inverse);
  }
}

void check_hessian(const at::Tensor& hessian, const char* op) {
  TORCH_CHECK_VALUE(hessian.dim() == 2 && hessian.size(0) == hessian.size(1), op,
                    ": hessian must be square, got shape ", hessian.sizes());
  TORCH_CHECK_VALUE(hessian.scalar_type() == at::kFloat || hessian.scalar_type() == at::kDouble, op,
                    ": hessian must be float32 or float64, got ", hessian.scalar_type());
}

at::Tensor hinv_cholesky_inplace(at::Tensor hessian, double percdamp, int64_t max_tries) {
  check_hessian(hessian, "hinv_cholesky_");
  TORCH_CHECK_VALUE(hessian.is_contiguous(),
                    "hinv_cholesky_: hessian must be contiguous (it is overwritten with U)");
  auto& h = hessian;
  // The bulk of the work is fp32 GEMMs: where a process lets fp32 matmuls use TF32 (allow_tf32,
  // set_float32_matmul_precision("high"), common in LLM scripts), U would be ~1e-3 accurate instead of ~1e-7.
  // ATen's own linear algebra opts out the same way (thread-local; the caller's settings are untouched).
  const at::NoTF32Guard full_precision;
  const int64_t b = block_size_for(h);
  auto diag = h.diagonal();
  diag.masked_fill_(diag == 0, 1);  // inputs never active: a unit diagonal keeps H invertible
  auto damp = diag.mean() * percdamp;
  TORCH_CHECK_LINALG(std::isfinite(damp.item<double>()), "the Hessian has non-finite entries");
  reverse_in_place(h);
  const auto base = h.diagonal().clone();
  const int64_t tries = std::max<int64_t>(1, max_tries);
  for (int64_t attempt = 0; attempt < tries; ++attempt) {
    if (attempt > 0) {
      mirror_upper_to_lower(h, b);
      damp = damp * 10;
    }
    h.diagonal().copy_(base + damp);
    if (cholesky_lower_in_place(h, b).item<int>() == 0) {
      h.tril_();
      invert_lower_in_place(h, b);
      reverse_in_place(h);
      return damp;
    }
  }
  // Give the caller its Hessian back (dead inputs' unit diagonal included) before reporting.
  mirror_upper_to_lower(h, b);
  h.diagonal().copy_(base);
  reverse_in_place(h);
  TORCH_CHECK_LINALG(false, "not positive definite after ", tries, " tries (last damping ", damp.item<double>(),
                     "): raise percdamp or max_tries");
}

std::tuple<at::Tensor, at::Tensor> hinv_cholesky(const at::Tensor& hessian, double percdamp, int64_t max_tries) {
  check_hessian(hessian, "hinv_cholesky");
  auto upper = hessian.clone(at::MemoryFormat::Contiguous);
  auto damp = hinv_cholesky_inplace(upper, percdamp, max_tries);
  return {upper, damp};
}

}  // namespace

// ATen on views only, so one function serves both devices (CUDA registered even by a CPU-only build: it is
// only reached with CUDA tensors, i.e. under a CUDA torch).
TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("hinv_cholesky", &hinv_cholesky);
  m.impl("hinv_cholesky_", &hinv_cholesky_inplace);
}

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("hinv_cholesky", &hinv_cholesky);
  m.impl("hinv_cholesky_", &hinv_cholesky_inplace);
}

}  // namespace sparsekern
