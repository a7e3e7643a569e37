#!/usr/bin/env bash
# A GPU session in stages, each fitting one device call (10 minutes; the machine has no network). Installs the
# copied tree, then: `tests` runs the GPU tests with compiled kernels, `prune` the per-layer benchmark, `model`
# the whole-model pruning benchmark, `gemm` the 2:4 layer benchmark (and the dispatch table), `e2e` the 2:4 model
# decode/prefill benchmark. Logs, result CSVs and the table land in $OUT (default /tmp/sparsekern-gpu).
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
[ ${#stages[@]} -eq 0 ] && stages=(tests prune model gemm e2e)
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
    *) echo "unknown stage $stage (tests, prune, model, gemm, e2e)"; exit 2 ;;
  esac
done
cp benchmarks/results/*.csv "$OUT/"
