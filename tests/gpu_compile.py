"""Compile every Triton kernel for an H100 (sm_90a) without a GPU: Triton's compiler and bundled ptxas need none.

Run as a script in its own process (the test suite's interpreter setting would turn the kernels into interpreted
functions): ``python tests/gpu_compile.py`` prints one line per kernel configuration and exits 1 if any fails.
Pointer arguments get their dtype; other runtime arguments are int32; constexprs are the launchers' GPU choices.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
F32 = "*fp32"


def cases():
    from sparsekern.triton_kernels import (_gemm_common, bitmap, bitmap_gemm, select, sparse24, sparse24_gemm,
                                           sparsegpt_sweep, stats, wanda)

    sweep = {n: F32 for n in ["w_ptr", "u_ptr", "q_ptr", "err_ptr", "loss_ptr", "scale_ptr", "zero_ptr"]}
    sweep.update(prune_ptr="*u8", mask_ptr="*u8")
    common = dict(PRUNE_N=0, PRUNE_M=1, HAS_MASK=True, BITS=0, MAXQ=0.0, GROUPSIZE=0, ADD_LOSS=True, BLOCK_R=16,
                  BLOCK_B=128)
    yield "sweep 50%", sparsegpt_sweep._sparsegpt_sweep_kernel, sweep, common, 4
    yield "sweep 2:4 4-bit", sparsegpt_sweep._sparsegpt_sweep_kernel, sweep, {
        **common, "PRUNE_N": 2, "PRUNE_M": 4, "HAS_MASK": False, "BITS": 4, "MAXQ": 15.0}, 4
    yield "sweep 50% 4-bit g32", sparsegpt_sweep._sparsegpt_sweep_kernel, sweep, {
        **common, "BITS": 4, "MAXQ": 15.0, "GROUPSIZE": 32}, 4
    for precision in ["ieee", "tf32"]:
        yield f"lazy update {precision}", sparsegpt_sweep._lazy_update_kernel, {"w_ptr": F32, "e_ptr": F32,
                                                                                "u_ptr": F32}, dict(
            INPUT_PRECISION=precision, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 4
    radix = {"values_ptr": F32, "state_ptr": "*i32", "hist_ptr": "*i32", "ties_ptr": "*i32",
             "ties_before_ptr": "*i32", "mask_ptr": "*u8"}
    yield "radix histogram", select._radix_histogram_kernel, radix, dict(SHIFT=10, DIGITS=10, FIRST=False,
                                                                         BLOCK=4096), 4
    yield "radix pick", select._radix_pick_kernel, radix, dict(DIGITS=11, FIRST=True), 4
    yield "count ties", select._count_ties_kernel, radix, dict(BLOCK=4096), 4
    yield "select mask", select._select_mask_kernel, radix, dict(BLOCK=4096), 4
    for dtype, block_m in [("*fp32", 32), ("*bf16", 64)]:
        yield f"hessian {dtype}", stats._hessian_update_kernel, {"h_ptr": F32, "x_ptr": dtype, "keep": "fp32",
                                                                 "scale": "fp32"}, dict(
            BLOCK=128, BLOCK_M=block_m, INPUT_PRECISION="ieee", UPCAST=False), 8
    yield "sumsq", stats._sumsq_partial_kernel, {"out_ptr": F32, "x_ptr": "*bf16"}, dict(BLOCK_M=128,
                                                                                         BLOCK_K=32), 4
    yield "wanda unstructured", wanda._wanda_prune_kernel, {"w_ptr": "*fp16", "a_ptr": F32, "mask_ptr": "*i1"}, dict(
        BLOCK=4096), 4
    yield "wanda 2:4", wanda._nm_mask_kernel, {"x_ptr": "*fp16", "a_ptr": F32, "mask_ptr": "*i1"}, dict(
        M=4, HAS_WEIGHT=True, BLOCK_R=4, BLOCK_G=128, BLOCK_M=4), 4
    packed = {"w_ptr": "*fp16", "values_ptr": "*fp16", "meta_ptr": "*i32", "out_ptr": "*fp16"}
    yield "compress_24", sparse24._compress_24_kernel, packed, dict(BLOCK_N=16, BLOCK_G=64), 8
    yield "decompress_24", sparse24._decompress_24_kernel, packed, dict(BLOCK_N=16, BLOCK_G=64), 8
    gemm = dict(PAIRS=True, W_PER_GROUP=1, HAS_BIAS=True, EVEN_K=True, DOT_FP32=False, INPUT_PRECISION="ieee",
                GROUP_M=8)
    for label, partial, tiles, warps, perm in [("decode split-K", True, (16, 64, 128), 4, False),
                                               ("prefill", False, (128, 128, 64), 8, False),
                                               ("decode split-K, perm", True, (16, 64, 128), 4, True),
                                               ("prefill, perm", False, (128, 128, 64), 8, True)]:
        types = {"x_ptr": "*fp16", "w_ptr": "*i32", "meta_ptr": "*i32", "bias_ptr": "*fp16", "perm_ptr": "*i32",
                 "out_ptr": F32 if partial else "*fp16"}
        yield f"sparse24 gemm {label}", sparse24_gemm._sparse24_gemm_kernel, types, dict(
            gemm, HAS_PERM=perm, PARTIAL=partial, BLOCK_M=tiles[0], BLOCK_N=tiles[1], BLOCK_K=tiles[2]), warps
    yield "split-K reduce", _gemm_common._splitk_reduce_kernel, {
        "ws_ptr": F32, "bias_ptr": "*fp16", "y_ptr": "*fp16"}, dict(SPLITS=4, HAS_BIAS=True, BLOCK=1024), 4
    tiles = dict(zip(("BLOCK_N", "BLOCK_T"), bitmap.GPU_TILES))
    for dtype, bits in [("*fp16", "*i16"), ("*fp32", "*i32")]:  # the kernels see integer views of the weight
        types = {"w_ptr": bits, "bitmap_ptr": "*i32", "counts_ptr": "*i32", "offsets_ptr": "*i32",
                 "values_ptr": bits, "out_ptr": bits}
        yield f"compress_bitmap count {dtype}", bitmap._bitmap_count_kernel, types, tiles, bitmap.GPU_WARPS
        yield f"compress_bitmap scatter {dtype}", bitmap._bitmap_scatter_kernel, types, tiles, bitmap.GPU_WARPS
        yield f"decompress_bitmap {dtype}", bitmap._bitmap_decompress_kernel, types, tiles, bitmap.GPU_WARPS
    g = bitmap_gemm
    for dtype in ["*fp16", "*bf16", "*fp32"]:
        configs = [("decode", False, g.DECODE_TILES, True), ("decode split-K, ragged K", True, g.DECODE_TILES, False),
                   ("prefill M <= 64", False, g.PREFILL_TILES_64, True),
                   ("prefill, ragged K", False, g.PREFILL_TILES_128, False)]
        if dtype == "*fp32":
            configs = [("decode split-K", True, g.FP32_DECODE_TILES, False),
                       ("prefill", False, g.FP32_PREFILL_TILES, False)]
        for label, partial, (block_m, block_n, block_k, warps, _), even_k in configs:
            types = {"x_ptr": dtype, "values_ptr": dtype, "bitmap_ptr": "*i32", "offsets_ptr": "*i32",
                     "bias_ptr": dtype, "out_ptr": F32 if partial else dtype}
            yield f"bitmap gemm {label} {dtype}", g._bitmap_gemm_kernel, types, dict(
                HAS_BIAS=not partial, PARTIAL=partial, EVEN_K=even_k, DOT_FP32=False,
                INPUT_PRECISION="ieee" if dtype == "*fp32" else "tf32",
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=g.GROUP_M), warps


def compile_one(fn, types, constexprs, num_warps):
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=TARGET, options={"num_warps": num_warps, "num_stages": 3})


def main() -> int:
    failures = 0
    for label, fn, types, constexprs, num_warps in cases():
        if any(v is None for v in constexprs.values()):
            missing = [k for k, v in constexprs.items() if v is None]
            print(f"FAIL {label}: no GPU value for constexpr {missing}")
            failures += 1
            continue
        try:
            compile_one(fn, types, constexprs, num_warps)
            print(f"ok   {label}")
        except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:500]}")
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
