"""Layer streaming: prune a safetensors checkpoint holding one decoder layer in memory at a time.

:func:`prune_checkpoint` builds the model with its parameters on the meta device (``models.parameters_on_meta``:
no memory; non-persistent buffers such as rotary frequencies are computed as usual), reads from the checkpoint
(``safe_open``, memory-mapped; each tensor copied out and the mapping dropped) what lies outside the decoder layers
(embeddings, final norm, head; tied weights stay tied), and runs the same layer loop as the in-memory path
(``pipeline.prune_layers``) with :class:`StreamedLayers`: each layer is read just before it is pruned, and once
its calibration outputs are computed its tensors (pruned linears and every other parameter, in the model's dtype)
are written as that layer's shard and the layer goes back to the meta device. Peak host memory: embeddings + head +
one layer (two while the previous one is being written) + the calibration activations, whatever the depth.

With a resume folder (``OUT.partial``), a layer's shard *is* its record in the resume state (``resume.py``: written
durably, one commit per layer), and the run's fingerprint is computed from the checkpoint's files (a strided
sample of every tensor's bytes) instead of the weights in memory. The output is an ordinary sharded Hugging Face
checkpoint assembled at the end in a temporary sibling folder renamed into place (``models.write_atomically``):
``model.safetensors.index.json``, one shard per decoder layer (hard links to the records, or copies), one shard
for the rest, config.json, generation_config.json when the source has one, the tokenizer's files, and the
``sparsity.json`` / ``permutations.safetensors`` extras.

Not streamed (refused with a message that says ``--no-stream``): allocations that need dense passes over all the
layers first (owl, sensitivity; a JSON file allocation is fine).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .pipeline import InMemoryLayers, find_decoder_layers
from .resume import checkpoint_fingerprint, layer_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

__all__ = ["StreamedLayers", "checkpoint_files", "is_streamable", "prune_checkpoint"]


def checkpoint_files(folder: str | os.PathLike) -> dict[str, Path] | None:
    """{tensor name: file} of a safetensors checkpoint folder (sharded with an index, or one model.safetensors),
    or None when the folder holds no safetensors weights."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{folder / INDEX} cannot be read ({exc}): the checkpoint is damaged") from None
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE).is_file():
        return {name: folder / SINGLE for name in _header(folder / SINGLE)}
    return None


def is_streamable(folder: str | os.PathLike) -> bool:
    """Whether ``sparsekern prune`` streams this model folder (it holds safetensors weights)."""
    folder = Path(folder)
    return (folder / INDEX).is_file() or (folder / SINGLE).is_file()


def _header(path: Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets"}} from a safetensors file's header (the data is not read)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read as safetensors ({exc}): the checkpoint is damaged") from None
    header.pop("__metadata__", None)
    return header


class _Checkpoint:
    """Reads single tensors from a safetensors checkpoint; nothing of it stays mapped between reads."""

    def __init__(self, folder: Path):
        self.folder = folder
        files = checkpoint_files(folder)
        if files is None:
            raise ValueError(f"{folder} holds no safetensors weights to stream: pass --no-stream")
        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ValueError(f"{path} is missing: the checkpoint is incomplete")
            for name, entry in _header(path).items():
                self.shapes[name] = tuple(entry["shape"])
                self.dtypes[name] = entry["dtype"]
        missing = [name for name in files if name not in self.shapes]
        if missing:
            raise ValueError(f"{folder / INDEX} names {missing[:3]} but their files do not hold them: the "
                             "checkpoint is damaged")

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:
            mapped = f.get_tensor(name)
        # a copy: the memory-mapped tensor would keep the file's pages (counted as resident) alive
        return mapped.to(dtype, copy=True) if mapped.is_floating_point() else mapped.clone()


def _entries(root: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(full name, owning module, key, tensor) for every parameter and persistent buffer under ``root``, tied
    duplicates included (each under every name that holds it)."""
    for module_name, module in root.named_modules(prefix=prefix, remove_duplicate=False):
        dot = f"{module_name}." if module_name else ""
        for key, tensor in module._parameters.items():
            if tensor is not None:
                yield dot + key, module, key, tensor
        for key, tensor in module._buffers.items():
            if tensor is not None and key not in module._non_persistent_buffers_set:
                yield dot + key, module, key, tensor


def _groups(entries) -> list[list[tuple[str, nn.Module, str, torch.Tensor]]]:
    """Entries grouped by the tensor they hold (a tied weight is one group of several names), in first-seen order."""
    groups: dict[int, list] = {}
    for entry in entries:
        groups.setdefault(id(entry[3]), []).append(entry)
    return list(groups.values())


def _assign(group, tensor: torch.Tensor) -> None:
    first = group[0][3]
    value = nn.Parameter(tensor, requires_grad=first.requires_grad) if isinstance(first, nn.Parameter) else tensor
    for _, module, key, _ in group:
        if key in module._parameters:
            module._parameters[key] = value
        else:
            module._buffers[key] = value


class StreamedLayers(InMemoryLayers):
    """The decoder layers of a meta-device model, read from a checkpoint one at a time (see the module doc)."""

    streamed = True

    def __init__(self, model: nn.Module, checkpoint: _Checkpoint, dtype: torch.dtype, shard_dir: Path):
        self.model = model
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.shard_dir = shard_dir  # where layers are written when there is no resume state
        self.writes = True  # False on the ranks of a distributed run that do not write the checkpoint (rank > 0)
        self.layers_name, self.layers = find_decoder_layers(model)
        self._loaded: set[int] = set()
        self.check()

    def _outside_groups(self) -> list:
        prefix = f"{self.layers_name}."
        return _groups(e for e in _entries(self.model, "") if not e[0].startswith(prefix))

    def _layer_groups(self, index: int) -> list:
        return _groups(_entries(self.layers[index], f"{self.layers_name}.{index}"))

    def _source_name(self, group) -> str | None:
        return next((name for name, *_ in group if name in self.checkpoint.shapes), None)

    def check(self) -> None:
        """Every parameter (and persistent buffer) of the model is in the checkpoint with its shape: refused before
        any work otherwise."""
        groups = self._outside_groups() + [g for index in range(len(self.layers)) for g in self._layer_groups(index)]
        for group in groups:
            name, tensor = self._source_name(group), group[0][3]
            if name is None:
                if isinstance(tensor, nn.Parameter):
                    raise ValueError(
                        f"{self.checkpoint.folder} holds no tensor {group[0][0]!r} (the model built from its "
                        "config.json has it; its checkpoint may name tensors differently): pass --no-stream to "
                        "load it with transformers instead")
                continue  # a persistent buffer the checkpoint omits keeps its computed value
            if self.checkpoint.shapes[name] != tuple(tensor.shape):
                raise ValueError(f"{self.checkpoint.folder}: tensor {name!r} has shape {self.checkpoint.shapes[name]}"
                                 f", the model of config.json expects {tuple(tensor.shape)}: the checkpoint is damaged"
                                 " or does not belong to this config")

    def _read(self, groups) -> None:
        for group in groups:
            name = self._source_name(group)
            if name is not None:
                tensor = group[0][3]
                _assign(group, self.checkpoint.read(name, self.dtype if tensor.is_floating_point() else tensor.dtype))

    def load_outside(self) -> None:
        """Read everything outside the decoder layers (embeddings, final norm, head...)."""
        self._read(self._outside_groups())

    def fingerprint(self, model: nn.Module, calibration: torch.Tensor, settings: dict) -> str:
        config = model.config.to_json_string() if hasattr(model.config, "to_json_string") else repr(model.config)
        files = sorted({str(p) for p in self.checkpoint.files.values()})
        return checkpoint_fingerprint(config, files, calibration, {**settings, "dtype": str(self.dtype)})

    def load(self, index: int, layer: nn.Module) -> None:
        if index not in self._loaded:
            self._read(self._layer_groups(index))
            self._loaded.add(index)

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The layer's tensors by their checkpoint names (each tied tensor once), as the output stores them."""
        return {group[0][0]: group[0][3].detach().contiguous() for group in self._layer_groups(index)}

    def record(self, index: int, layer: nn.Module, targets: Mapping) -> dict[str, torch.Tensor]:
        return self.tensors(index)

    def restore(self, weights, plan) -> None:
        """Resuming: the completed layers stay on disk (their records are the output's shards)."""

    def load_recorded(self, index: int, layer: nn.Module, targets: Mapping, folder: str) -> None:
        """Resuming from a state without activations: a finished layer's pruned weights, from its record (the
        output's shard)."""
        from safetensors import safe_open

        with safe_open(str(Path(folder) / layer_file(index)), framework="pt") as f:
            for name, (linear, _) in targets.items():
                linear.weight.data.copy_(f.get_tensor(f"{self.layers_name}.{index}.{name}.weight"))

    def release(self, index: int, layer: nn.Module, recorded: bool) -> None:
        if not recorded and self.writes:
            from safetensors.torch import save_file

            save_file(self.tensors(index), str(self.shard_dir / layer_file(index)), {"format": "pt"})
        for group in self._layer_groups(index):
            tensor = group[0][3]
            if isinstance(tensor, nn.Parameter) and not tensor.is_meta:
                _assign(group, torch.empty_like(tensor, device="meta"))
        self._loaded.discard(index)

    def outside_tensors(self) -> dict[str, torch.Tensor]:
        """What lies outside the decoder layers, each tied tensor once under its first name (save_pretrained's)."""
        return {group[0][0]: group[0][3].detach().contiguous() for group in self._outside_groups()
                if not group[0][3].is_meta}


def _model_dtype(checkpoint: _Checkpoint, config, dtype) -> torch.dtype:
    from .models import _parse_dtype

    chosen = _parse_dtype(dtype)
    if chosen != "auto":
        return chosen
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if isinstance(stored, torch.dtype):
        return stored
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    return next((names[d] for d in checkpoint.dtypes.values() if d in names), torch.float32)


def _fixed_mmap_threshold() -> None:
    """Let glibc's malloc serve large blocks (a layer's tensors) with mmap for good, so that they go back to the
    system when freed. By default the threshold rises to the size of the largest block freed (up to 32 MiB), after
    which the next layers' tensors come from the heap, which fragments: measured at 1.6-2.3 MiB of peak RSS more per
    layer on 64 layers of 4-8 MiB, none with the threshold fixed. Best effort: other C libraries are left alone."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: glibc's default value, set explicitly = fixed
    except (OSError, AttributeError):
        pass


def build_streamed(source: str | os.PathLike, dtype: str | torch.dtype = "auto", shard_dir: Path | None = None
                   ) -> tuple[nn.Module, StreamedLayers]:
    """(the model with its decoder layers on the meta device and the rest read, its streamed layers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import parameters_on_meta

    _fixed_mmap_threshold()
    folder = Path(source)
    checkpoint = _Checkpoint(folder)
    config = AutoConfig.from_pretrained(folder)
    torch_dtype = _model_dtype(checkpoint, config, dtype)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    io = StreamedLayers(model, checkpoint, torch_dtype, shard_dir or folder)
    io.load_outside()
    return model, io


def prune_checkpoint(source: str | os.PathLike, out: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                     overwrite: bool = False, resume_dir: str | os.PathLike | None = None,
                     record: dict | None = None, **prune_options: Any):
    """Prune the safetensors checkpoint in ``source`` layer by layer, streamed, into the checkpoint folder ``out``
    (written atomically); returns the :class:`~sparsekern.api.PruneReport`.

    ``prune_options``: :func:`sparsekern.prune`'s keyword arguments (method, sparsity, calib, ...). ``record``: keys
    put before the report's in sparsity.json (e.g. {"model": the name given}). ``resume_dir``: as in
    :func:`sparsekern.prune`; its layer records become the output's shards."""
    from transformers import AutoTokenizer

    from .api import check_arguments, check_streamable, prune
    from .distributed import Ranks
    from .models import write_atomically

    out = Path(out).expanduser().absolute()
    options = {k: v for k, v in prune_options.items() if k not in ("device", "overrides", "progress", "distributed")}
    _, algorithm = check_arguments(**{"method": "sparsegpt", "sparsity": 0.5, "calib": "lee", "nsamples": 128,
                                      "seqlen": 2048, "seed": 0, "bos": "auto", "batch_size": 8,
                                      "true_sequential": False, "progress": False, **options})
    check_streamable(algorithm, StreamedLayers)
    ranks = Ranks.current(prune_options.get("distributed"))
    writer = ranks is None or ranks.is_writer  # distributed: rank 0 writes the layers and the checkpoint
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.layers-", dir=out.parent))
    try:
        model, io = build_streamed(source, dtype, scratch)
        io.writes = writer
        tokenizer = AutoTokenizer.from_pretrained(source)
        report = prune(model, tokenizer, resume_dir=None if resume_dir is None else str(resume_dir), layer_io=io,
                       **prune_options)
        if not writer:
            return report
        shards = Path(resume_dir) if resume_dir is not None else scratch
        content = {**(record or {}), **report.to_dict()}
        extra_tensors = {"permutations.safetensors": report.permutations} if report.permutations else None
        write_atomically(out, overwrite, lambda tmp: _assemble(tmp, io, shards, Path(source), tokenizer,
                                                                 content, extra_tensors, move=resume_dir is None))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _assemble(tmp: Path, io: StreamedLayers, shards: Path, source: Path, tokenizer, sparsity: dict,
              extra_tensors: dict | None, move: bool) -> None:
    """The output folder: one shard per decoder layer (from ``shards``), one for the rest, the index, config,
    generation config, tokenizer and extras."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from .models import write_extras

    count = len(io.layers) + 1
    weight_map: dict[str, str] = {}
    total = 0
    for index in range(len(io.layers)):
        name = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        _place(shards / layer_file(index), tmp / name, move)
        for key, entry in _header(tmp / name).items():
            weight_map[key] = name
            total += entry["data_offsets"][1] - entry["data_offsets"][0]
    rest = f"model-{count:05d}-of-{count:05d}.safetensors"
    tensors = io.outside_tensors()
    save_file(tensors, str(tmp / rest), {"format": "pt"})
    for key, tensor in tensors.items():
        weight_map[key] = rest
        total += tensor.numel() * tensor.element_size()
    index_content = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index_content, indent=2) + "\n")
    config = io.model.config
    config.architectures = [type(io.model).__name__]
    config.save_pretrained(tmp)
    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    write_extras(tmp, {"sparsity.json": sparsity}, extra_tensors)


def _place(src: Path, dst: Path, move: bool) -> None:
    """A layer's shard into the output: moved from a scratch folder, else hard-linked (or copied) from the resume
    state, which must stay whole until the checkpoint is in place."""
    if move:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
