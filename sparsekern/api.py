"""The Python API: ``sparsekern.prune(model, tokenizer, method=..., sparsity=..., ...)``."""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping

import torch

from .allocate import allocate
from .distributed import Ranks
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
    allocation: dict | None = None  # the per-layer sparsities an allocation chose (None: uniform)

    @property
    def permutations(self) -> dict[str, torch.Tensor]:
        """{linear name: int32 input order} of the linears pruned in a permuted order (``permute=True``)."""
        return {r.name: torch.tensor(r.permutation, dtype=torch.int32) for r in self.linears
                if r.permutation is not None}

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
            "allocation": self.allocation,
            "sparsekern_version": __version__,
            # the permutations (K integers per linear) go to permutations.safetensors, not here
            "layers": [{k: v for k, v in dataclasses.asdict(r).items() if k != "permutation"} for r in self.linears],
            "permuted_linears": len(self.permutations),
        }


def prune(
    model: torch.nn.Module,
    tokenizer=None,
    *,
    method: str = "admm",
    sparsity: PatternSpec = 0.5,
    calib: str | torch.Tensor = "lee",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    bos: str = "auto",
    update: str = "none",
    refine: str = "none",
    allocation: str = "uniform",
    permute: bool = False,
    device: str | torch.device | None = None,
    true_sequential: bool = False,
    overrides: Mapping[str, PatternSpec | None] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    resume_dir: str | None = None,
    layer_io=None,
    distributed: bool | None = None,
    offload_activations: str | None = None,
    **options,
) -> PruneReport:
    """Prune ``model`` in place, one decoder layer at a time, and return a :class:`PruneReport`.

    method: a registered method (``sparsekern.prune.REGISTRY["method"]``): "admm" (default: ADMM on each layer's
        sparse regression, then an exact least-squares refit, see ``sparsekern.prune.admm``; the lowest perplexity
        measured at every pattern), "sparsegpt" (the published algorithm, with joint quantization), "wanda", "ria",
        "magnitude", or "obc" (exact greedy OBS per row, Frantar et al. 2022: a quality ceiling for SparseGPT that
        costs O(rows * k * n^2) per linear, for small models and layers only).
    update: "obs" reconstructs the kept weights on the method's mask with SparseGPT's OBS sweep (for mask-only
        methods: wanda, ria, magnitude); "lsq" refits them exactly by least squares on the final mask (conjugate
        gradients on the Hessian, after any method, SparseGPT included); "none" (default) leaves them.
    refine: a registered refinement run last on each linear's mask: "dsnot", or "none" (default).
    allocation: how the target sparsity is spread over the decoder layers (unstructured patterns): "uniform"
        (default), "owl", "sensitivity", or the path of a JSON file {layer index or name: sparsity}; the average
        over the pruned parameters stays exactly the target. See ``sparsekern.prune.allocation``.
    permute: for N:M patterns, prune each input group in the channel order that keeps the most Wanda score under the
        pattern (``sparsekern.permute``); the checkpoint stays in its own order, and ``report.permutations`` (saved
        by the CLI as permutations.safetensors) lets ``SparseLinear`` run it on the 2:4 kernel.
    sparsity: a ratio such as 0.5, or "2:4", "4:8", ...
    calib: a text source ("lee", "wikitext2", "c4", "ptb", or a .txt/.jsonl path) tokenized with ``tokenizer``
        into ``nsamples`` random windows of ``seqlen`` tokens, or a LongTensor [nsamples, seqlen] of token ids.
    bos: "auto" starts every calibration window with the BOS token when the tokenizer adds one (Gemma, Llama...),
        "always" does so for any tokenizer with a BOS token, "never" cuts windows from the middle of the stream
        (the published protocol); see ``sparsekern.data``.
    **options: the chosen steps' own options, by name (``sparsekern.prune.option_specs()`` lists them all), e.g.
        wbits/groupsize/blocksize/percdamp for SparseGPT (joint quantization, sweep block, Hessian damping),
        lazy_precision ("ieee" or "tf32" for the lazy-update GEMM), hessian_dtype (cast calibration inputs before the
        Hessian accumulates them in fp32), ria_alpha. An option none of the chosen steps takes is refused.
    device: where layers are pruned (default: CUDA when available, else the model's device); the model itself
        stays where it is, so a model larger than the GPU prunes.
    overrides: {module-name glob: pattern or "dense"}, e.g. {"*.down_proj": "0.6", "*.layers.0.*": "dense"}.
    resume_dir: a folder recording each finished layer; rerunning with the same model, settings and calibration
        resumes there (``time_s`` then includes the earlier runs).
    distributed: spread the work over the ranks of the initialized ``torch.distributed`` process group (call
        ``prune`` in every rank with the same arguments): each calibrates on its share of the samples, the linears
        are pruned by owners chosen by cost, and every rank ends with the whole pruned model (see
        ``sparsekern.distributed``). None (default): when a group of more than one rank is initialized.
    offload_activations: a folder for the calibration activations between layers (a fresh subfolder, removed at the
        end): one batch in memory at a time, for the widest models (``sparsekern.offload``).
    layer_io: internal: where the decoder layers come from and go (``sparsekern.pipeline.InMemoryLayers`` by
        default; ``sparsekern.streaming.prune_checkpoint`` passes its streamed layers).
    """
    start = time.perf_counter()
    pattern, algorithm = check_arguments(
        method=method, sparsity=sparsity, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, bos=bos,
        batch_size=batch_size, true_sequential=true_sequential, progress=progress, update=update, refine=refine,
        allocation=allocation, permute=permute, offload_activations=offload_activations, **options)
    check_streamable(algorithm, layer_io)
    ranks = Ranks.current(distributed)
    check_distributable(algorithm, ranks)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else next(model.parameters()).device
    calibration_ids, calibration_info = None, None
    if algorithm.needs_calibration:
        calibration_ids, calibration_info = _calibration(model, tokenizer, calib, nsamples, seqlen, seed, bos)
    # Per-layer sparsities first (a dense pass, and for "sensitivity" a fit), as overrides under the user's own.
    allocated, allocation_record = allocate(model, algorithm, pattern, calibration_ids, overrides, torch.device(device),
                                            batch_size, progress)
    linears, earlier_s = prune_layers(
        model, algorithm, pattern, calibration_ids, device=device, batch_size=batch_size,
        true_sequential=true_sequential, overrides={**allocated, **(overrides or {})}, progress=progress,
        resume_dir=resume_dir, layer_io=layer_io, ranks=ranks, offload_activations=offload_activations,
    )
    options = {**algorithm.options(), "true_sequential": true_sequential, "overrides": dict(overrides or {})}
    # time_s counts the interrupted runs this one resumed, too
    return PruneReport(algorithm.name, str(pattern), options, calibration_info, linears,
                       earlier_s + time.perf_counter() - start, allocation_record)


# The API's typed arguments: (accepted types, may be None). bool is refused where an int is meant (it is one).
_ARGUMENT_TYPES = {"nsamples": (int, False), "seqlen": (int, False), "seed": (int, False),
                   "batch_size": (int, False), "true_sequential": (bool, False), "progress": (bool, False),
                   "method": (str, False), "update": (str, False), "refine": (str, False),
                   "allocation": (str, False), "permute": (bool, False)}


def check_arguments(*, method: str, sparsity: PatternSpec, calib, nsamples: int, seqlen: int, seed: int, bos: str,
                    batch_size: int, true_sequential: bool, progress: bool, update: str = "none",
                    refine: str = "none", allocation: str = "uniform", permute: bool = False,
                    offload_activations: str | None = None, **options):
    """(pattern, method) after every check :func:`prune`'s arguments allow without the model: types, the pattern,
    the steps and their options (from the registry), the calibration source (a local file is read once: missing, empty or not UTF-8
    fails here). The CLI calls it before loading the model. Raises ValueError, TypeError or FileNotFoundError."""
    _check_types(nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size,
                 true_sequential=true_sequential, progress=progress, method=method, update=update, refine=refine)
    pattern = SparsityPattern.parse(sparsity)
    _check_types(allocation=allocation, permute=permute)
    algorithm = make_method(method, update=update, refine=refine, allocation=allocation, permute=permute,
                            progress=progress, **options)
    if algorithm.allocation is not None and pattern.is_nm:
        raise ValueError(f"--allocation spreads an unstructured sparsity over the layers; {pattern} is N:M: use "
                         "--allocation uniform, or an unstructured --sparsity such as 0.5")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if offload_activations is not None:  # a folder that cannot take the activations fails now, not after loading
        from .offload import DiskActivations

        DiskActivations(offload_activations).close()
    from .data import BOS_CHOICES, check_source

    if bos not in BOS_CHOICES:
        raise ValueError(f"bos {bos!r} is not one of {', '.join(BOS_CHOICES)}")
    if algorithm.needs_calibration and not isinstance(calib, torch.Tensor):
        if nsamples < 1 or seqlen < 1:
            raise ValueError(f"nsamples and seqlen must be positive, got nsamples={nsamples}, seqlen={seqlen}")
        check_source(calib)
    return pattern, algorithm


def check_streamable(algorithm, layer_io) -> None:
    """Streaming reads each decoder layer once, in order: an allocation that needs dense passes over every layer
    first (owl, sensitivity) is refused (a JSON file allocation needs none)."""
    step = getattr(algorithm, "allocation", None)
    if getattr(layer_io, "streamed", False) and step is not None and not isinstance(step, str):
        raise ValueError(f"--allocation {step.name} needs dense statistics passes over every layer before pruning, "
                         "which the streamed path (one layer in memory at a time) does not run: add --no-stream "
                         "(the whole model is loaded in memory), or use --allocation uniform or a JSON file")


def check_distributable(algorithm, ranks) -> None:
    """A distributed run calibrates each rank on its share of the samples: an allocation fitted by dense passes
    over the whole calibration set first (owl, sensitivity) is refused (a JSON file allocation is fine)."""
    step = getattr(algorithm, "allocation", None)
    if ranks is not None and step is not None and not isinstance(step, str):
        raise ValueError(f"--allocation {step.name} is not distributed: run it in one process, or pass the per-layer "
                         "sparsities it chose (the \"allocation\" of a one-process run's sparsity.json) as "
                         "--allocation FILE.json")


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
