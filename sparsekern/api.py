"""The Python API: ``sparsekern.prune(model, tokenizer, method=..., sparsity=..., ...)``."""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping

import torch

from .patterns import PatternSpec, SparsityPattern
from .pipeline import LinearReport, prune_layers
from .prune import make_method


def zero_fraction(linears: list[LinearReport]) -> float:
    """The fraction of zeros over several linears, weighted by their sizes."""
    total = sum(r.shape[0] * r.shape[1] for r in linears)
    zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in linears)
    return zeros / total if total else 0.0


@dataclasses.dataclass
class PruneReport:
    """What a pruning run did; ``to_dict()`` is the content of ``sparsity.json``."""

    method: str
    pattern: str
    options: dict
    calibration: dict | None
    linears: list[LinearReport]
    time_s: float

    @property
    def sparsity(self) -> float:
        """Achieved fraction of zeros over all pruned linears."""
        return zero_fraction(self.linears)

    def to_dict(self) -> dict:
        from . import __version__

        return {
            "method": self.method,
            "pattern": self.pattern,
            "sparsity": self.sparsity,
            "options": self.options,
            "calibration": self.calibration,
            "time_s": self.time_s,
            "sparsekern_version": __version__,
            "layers": [dataclasses.asdict(r) for r in self.linears],
        }


def prune(
    model: torch.nn.Module,
    tokenizer=None,
    *,
    method: str = "sparsegpt",
    sparsity: PatternSpec = 0.5,
    calib: str | torch.Tensor = "lee",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    bos: str = "auto",
    wbits: int | None = None,
    groupsize: int | None = None,
    blocksize: int | None = None,
    percdamp: float | None = None,
    lazy_precision: str | None = None,
    hessian_dtype: str | None = None,
    device: str | torch.device | None = None,
    true_sequential: bool = False,
    overrides: Mapping[str, PatternSpec | None] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    resume_dir: str | None = None,
) -> PruneReport:
    """Prune ``model`` in place, one decoder layer at a time, and return a :class:`PruneReport`.

    method: "sparsegpt", "wanda", "magnitude", or "obc" (exact greedy OBS per row, Frantar et al. 2022: a quality
        ceiling for SparseGPT that costs O(rows * k * n^2) per linear, for small models and layers only).
    sparsity: a ratio such as 0.5, or "2:4", "4:8", ...
    calib: a text source ("lee", "wikitext2", "c4", "ptb", or a .txt/.jsonl path) tokenized with ``tokenizer``
        into ``nsamples`` random windows of ``seqlen`` tokens, or a LongTensor [nsamples, seqlen] of token ids.
    bos: "auto" starts every calibration window with the BOS token when the tokenizer adds one (Gemma, Llama...),
        "always" does so for any tokenizer with a BOS token, "never" cuts windows from the middle of the stream
        (the published protocol); see ``sparsekern.data``.
    wbits/groupsize/blocksize/percdamp: SparseGPT options (joint quantization, sweep block, Hessian damping);
        OBC takes percdamp and hessian_dtype.
    lazy_precision: SparseGPT's lazy-update GEMM, "ieee" (fp32, default) or "tf32" (tensor cores).
    hessian_dtype: cast calibration inputs to "bfloat16"/"float16"/"float32" before the Hessian accumulates them
        (fp32 accumulation either way); default: as the model produces them.
    device: where layers are pruned (default: CUDA when available, else the model's device); the model itself
        stays where it is, so a model larger than the GPU prunes.
    overrides: {module-name glob: pattern or "dense"}, e.g. {"*.down_proj": "0.6", "*.layers.0.*": "dense"}.
    resume_dir: a folder recording each finished layer; rerunning with the same model, settings and calibration
        resumes there (``time_s`` then includes the earlier runs).
    """
    start = time.perf_counter()
    pattern, algorithm = check_arguments(
        method=method, sparsity=sparsity, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, bos=bos,
        batch_size=batch_size, true_sequential=true_sequential, progress=progress, wbits=wbits,
        groupsize=groupsize, blocksize=blocksize, percdamp=percdamp, lazy_precision=lazy_precision,
        hessian_dtype=hessian_dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else next(model.parameters()).device
    calibration_ids, calibration_info = None, None
    if algorithm.stats is not None:
        calibration_ids, calibration_info = _calibration(model, tokenizer, calib, nsamples, seqlen, seed, bos)
    linears, earlier_s = prune_layers(
        model, algorithm, pattern, calibration_ids, device=device, batch_size=batch_size,
        true_sequential=true_sequential, overrides=overrides, progress=progress, resume_dir=resume_dir,
    )
    options = {**algorithm.options(), "true_sequential": true_sequential, "overrides": dict(overrides or {})}
    # time_s counts the interrupted runs this one resumed, too
    return PruneReport(algorithm.name, str(pattern), options, calibration_info, linears,
                       earlier_s + time.perf_counter() - start)


# The API's typed arguments: (accepted types, may be None). bool is refused where an int is meant (it is one).
_ARGUMENT_TYPES = {"nsamples": (int, False), "seqlen": (int, False), "seed": (int, False),
                   "batch_size": (int, False), "wbits": (int, True), "groupsize": (int, True),
                   "blocksize": (int, True), "percdamp": ((int, float), True), "true_sequential": (bool, False),
                   "progress": (bool, False)}


def check_arguments(*, method: str, sparsity: PatternSpec, calib, nsamples: int, seqlen: int, seed: int, bos: str,
                    batch_size: int, true_sequential: bool, progress: bool, **method_options):
    """(pattern, method) after every check :func:`prune`'s arguments allow without the model: types, the pattern,
    the method and its options, the calibration source (a local file is read once: missing, empty or not UTF-8
    fails here). The CLI calls it before loading the model. Raises ValueError, TypeError or FileNotFoundError."""
    _check_types(nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size, wbits=method_options["wbits"],
                 groupsize=method_options["groupsize"], blocksize=method_options["blocksize"],
                 percdamp=method_options["percdamp"], true_sequential=true_sequential, progress=progress)
    pattern = SparsityPattern.parse(sparsity)
    algorithm = make_method(method, progress=progress, **method_options)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    from .data import BOS_CHOICES, check_source

    if bos not in BOS_CHOICES:
        raise ValueError(f"bos {bos!r} is not one of {', '.join(BOS_CHOICES)}")
    if algorithm.stats is not None and not isinstance(calib, torch.Tensor):
        if nsamples < 1 or seqlen < 1:
            raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
        check_source(calib)
    return pattern, algorithm


def _check_types(**arguments) -> None:
    for name, value in arguments.items():
        types, optional = _ARGUMENT_TYPES[name]
        if value is None and optional:
            continue
        if not isinstance(value, types) or (types is not bool and isinstance(value, bool)):
            expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise TypeError(f"sparsekern.prune: {name} must be {expected}{' or None' if optional else ''}, got "
                            f"{type(value).__name__} {value!r}")


def _calibration(model, tokenizer, calib, nsamples, seqlen, seed, bos) -> tuple[torch.Tensor, dict]:
    if isinstance(calib, torch.Tensor):
        if calib.dim() != 2 or calib.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"calibration ids must be an integer tensor [nsamples, seqlen], got "
                             f"{calib.dtype} {tuple(calib.shape)}")
        vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
        if calib.numel() and (calib.min() < 0 or (vocab is not None and calib.max() >= vocab)):
            raise ValueError(f"calibration ids must lie in [0, {vocab}) (the model's vocabulary), got "
                             f"{int(calib.min())} .. {int(calib.max())}")
        return calib.long(), {"source": "tensor", "nsamples": calib.shape[0], "seqlen": calib.shape[1]}
    if tokenizer is None:
        raise ValueError(f"calibration source {calib!r} needs the model's tokenizer: prune(model, tokenizer, ...)")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise ValueError(f"seqlen {seqlen} exceeds the model's max_position_embeddings {limit}; pass --seqlen")
    from .data import calibration_windows, window_bos

    ids = calibration_windows(tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed, bos=bos)
    return ids, {"source": str(calib), "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "bos": bos,
                 "bos_token_id": window_bos(tokenizer, bos)}
