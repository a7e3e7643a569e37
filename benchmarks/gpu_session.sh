#!/usr/bin/env bash
# A GPU session in stages, each fitting one device call (10 minutes; the machine has no network). Installs the
# copied tree, then: `tests` runs the GPU tests with compiled kernels, `prune` the per-layer benchmark, `model`
# the whole-model pruning benchmark, `gemm` the 2:4 layer benchmark (and the dispatch table), `e2e` the 2:4 model
# decode/prefill benchmark, `cholesky` the Cholesky-family ops against the calls they replace. Logs, result CSVs and
# the table land in $OUT (default /tmp/sparsekern-gpu).
#   bash benchmarks/gpu_session.sh tests prune          # SHAPES=7b,13b,70b by default
#   MODEL_ARGS="--layers 8" bash benchmarks/gpu_session.sh model
set -uo pipefail
OUT=${OUT:-/tmp/sparsekern-gpu}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests prune model gemm e2e cholesky)
for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      TRITON_INTERPRET=0 SPARSEKERN_BACKEND=cuda timeout 540 python -m pytest -q -m gpu tests -p no:cacheprovider \
        > "$OUT/gpu-tests.log" 2>&1
      echo "gpu tests exit $?" | tee -a "$OUT/gpu-tests.log"; tail -5 "$OUT/gpu-tests.log" ;;
    prune)
      timeout 540 python benchmarks/bench_prune.py --shapes "${SHAPES:-7b,13b,70b}" --repeat 5 2>&1 \
        | tee "$OUT/bench_prune.log" ;;
    model)
      timeout 540 python benchmarks/bench_prune_model.py ${MODEL_ARGS:-} 2>&1 | tee "$OUT/bench_prune_model.log" ;;
    gemm)
      timeout 540 python benchmarks/bench_gemm.py --shapes "${GEMM_SHAPES:-7b}" --write-table 2>&1 \
        | tee "$OUT/bench_gemm.log"
      cp sparsekern/nn/dispatch_table.json "$OUT/" ;;
    e2e)
      timeout 540 python benchmarks/bench_e2e.py ${E2E_ARGS:-} 2>&1 | tee "$OUT/bench_e2e.log" ;;
    cholesky)
      # ~2-3 minutes with sparsekern._C's CUDA ops: n = 28672 dominates (H built from 94 TFLOP of fp32 GEMMs, the
      # three-call baseline a few seconds a call and ~30 GB at its peak). On the reference fallback the k = 128
      # Givens loops alone take minutes: CHOLESKY_ARGS="--ks 1,16".
      timeout 540 python benchmarks/bench_cholesky.py --device cuda ${CHOLESKY_ARGS:-} 2>&1 \
        | tee "$OUT/bench_cholesky.log" ;;
    *) echo "unknown stage $stage (tests, prune, model, gemm, e2e, cholesky)"; exit 2 ;;
  esac
done
cp benchmarks/results/*.csv "$OUT/"
