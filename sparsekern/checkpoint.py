"""Compressed checkpoints: a pruned model's linears stored in their sparse formats, loaded without dense weights.

A compressed checkpoint is a folder with
- ``sparsekern.json``: ``format_version`` (this module's ``FORMAT_VERSION``), the dtype, every compressed linear
  {name: {format, in_features, out_features, bias, permuted}}, tied parameters {alias: the name stored}, and the
  linears' dense and compressed bytes;
- ``model.safetensors``: the model's state_dict with each compressed linear's format tensors in place of its
  weight (``<linear>.values`` + ``.meta`` for 2:4, ``.values`` + ``.bitmap`` + ``.offsets`` for the bitmap, and
  ``.perm`` for a channel-permuted 2:4 layer; ``sparsekern.formats``), every tied tensor once;
- ``config.json``, ``generation_config.json``, the tokenizer's files, and ``sparsity.json`` when pruned by
  sparsekern.
Plain transformers cannot load it: :func:`load` (``sparsekern.load``) can, and ``sparsekern decompress`` turns it
back into the plain Hugging Face checkpoint, bit-identical to the dense save of the same pruned model.

:func:`load` builds the model with its parameters on the meta device (no memory; non-persistent buffers such as
rotary frequencies are computed as usual), swaps the compressed linears for empty ``SparseLinear`` layers of the
stored sizes, and assigns the stored tensors: the dense weights of those linears never exist. Every tensor's
name, shape and dtype are checked against the model, and every compressed layer's tensors against each other,
before the model is returned: a damaged or foreign checkpoint is refused with the tensor it tripped on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import formats
from .models import load_model, resolve_model, write_atomically, write_extras
from .models import parameters_on_meta as _parameters_on_meta
from .nn.sparse_linear import SparseLinear, _set_submodule, sparsify, tied_linears

FORMAT_VERSION = 1
MANIFEST = "sparsekern.json"
WEIGHTS = "model.safetensors"
PERMUTATIONS = "permutations.safetensors"
SPARSITY = "sparsity.json"


def is_compressed(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def linear_bytes(model: nn.Module) -> dict:
    """Bytes of the model's linears as stored (dense or compressed) and as they would be dense, and the number of
    compressed linears per format. A linear whose weight is tied to another module (an lm_head sharing the
    embedding matrix) is stored as that module, not as a linear, and is not counted."""
    dense = stored = 0
    per_format: dict[str, int] = {}
    tied = tied_linears(model)
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            dense += module.in_features * module.out_features * module.values.element_size()
            stored += module.weight_nbytes()
            per_format[module.format] = per_format.get(module.format, 0) + 1
        elif type(module) is nn.Linear and name not in tied:
            size = module.weight.numel() * module.weight.element_size()
            dense, stored = dense + size, stored + size
    return {"dense_linear_bytes": dense, "stored_linear_bytes": stored,
            "ratio": stored / dense if dense else 1.0, "compressed_linears": per_format}


def _tied_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{alias: first name} for state_dict entries that are the same tensor (tied embeddings)."""
    seen: dict[tuple, str] = {}
    tied = {}
    for name, tensor in state.items():
        if tensor.device.type == "meta" or not tensor.numel():
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


def save_compressed(model: Any, tokenizer: Any, out_dir: str | os.PathLike, extra_json: dict | None = None,
                    overwrite: bool = False, perms: dict[str, torch.Tensor] | None = None,
                    format: str = "auto") -> dict:
    """Write ``model`` as a compressed checkpoint (atomically, as ``models.save_checkpoint``); return its sizes.

    Linears not yet ``SparseLinear`` are sparsified first, in place (``sparsify(model, perms=perms,
    format=format)``: each in the smallest format that saves at least ``formats.MIN_SAVING`` of its bytes; the
    others stay dense). perms: channel permutations of 2:4 layers ({linear name: perm}, ``PruneReport.permutations``).
    """
    sparsify(model, perms=perms, format=format)
    state = model.state_dict()
    tied = _tied_names(state)
    layers = {name: {"format": module.format, "in_features": module.in_features,
                     "out_features": module.out_features, "bias": module.bias is not None,
                     "permuted": module.perm is not None}
              for name, module in model.named_modules() if isinstance(module, SparseLinear)}
    sizes = linear_bytes(model)
    dtype = next((tensor.dtype for tensor in state.values() if tensor.is_floating_point()), torch.float32)
    manifest = {"format_version": FORMAT_VERSION, "dtype": str(dtype).removeprefix("torch."),
                "layers": layers, "tied": tied, **sizes}

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file({name: tensor.contiguous() for name, tensor in state.items() if name not in tied},
                  str(tmp / WEIGHTS), metadata={"format": "pt", "sparsekern_format_version": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_extras(tmp, {MANIFEST: manifest, **(extra_json or {})})

    out = write_atomically(out_dir, overwrite, write)
    return {"out": str(out), **sizes, "file_bytes": folder_bytes(out)}


def folder_bytes(folder: str | os.PathLike) -> dict[str, int]:
    """Sizes of a checkpoint's weight files: {"weights": *.safetensors except extras, "total": every file}."""
    files = [p for p in Path(folder).iterdir() if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors" and p.name != PERMUTATIONS)
    return {"weights": weights, "total": sum(p.stat().st_size for p in files)}


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}): the checkpoint is damaged") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} is compressed checkpoint format version {version!r}; this sparsekern reads version "
            f"{FORMAT_VERSION} only. Load it with the sparsekern that wrote it and run `sparsekern decompress` "
            "there (or prune again)")
    for key in ("layers", "tied", "dtype"):
        if key not in manifest:
            raise ValueError(f"{path} has no {key!r}: the checkpoint is damaged")
    layer_keys = {"format", "in_features", "out_features", "bias", "permuted"}
    for name, spec in manifest["layers"].items():
        if not isinstance(spec, dict) or not layer_keys <= set(spec) or spec["format"] not in formats.formats():
            raise ValueError(f"{path}: the entry of {name!r} is not a compressed layer ({sorted(layer_keys)}, a "
                             f"format among {list(formats.formats())}): the checkpoint is damaged")
    if not isinstance(getattr(torch, str(manifest["dtype"]), None), torch.dtype):
        raise ValueError(f"{path}: dtype {manifest['dtype']!r} is not a torch dtype: the checkpoint is damaged")
    return manifest


def _saved_permutations(folder: Path) -> dict[str, torch.Tensor] | None:
    """The channel permutations a pruned checkpoint carries beside it (``--permute``), or None."""
    path = folder / PERMUTATIONS
    return _read_tensors(path) if path.is_file() else None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValueError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{path} cannot be read ({type(exc).__name__}: {exc}): the checkpoint is damaged") from None


def load(model: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
         format: str = "auto") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode with ``SparseLinear`` layers, from a compressed checkpoint or a plain one.

    A compressed checkpoint (``sparsekern.json`` in the folder) is loaded without ever building the dense weights
    of its compressed linears. Any other Hugging Face folder or alias is loaded dense and sparsified
    (``sparsify(model, perms=its permutations.safetensors, format=format)``). dtype: "auto" keeps the stored one,
    or "float32"/"float16"/"bfloat16"."""
    folder = resolve_model(model)
    if not is_compressed(folder):
        dense, tokenizer = load_model(folder, dtype=dtype, device=device)
        sparsify(dense, perms=_saved_permutations(folder), format=format)
        return dense, tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .models import _parse_dtype

    manifest = read_manifest(folder)
    stored_dtype = getattr(torch, manifest["dtype"])
    config = AutoConfig.from_pretrained(folder)
    with _parameters_on_meta():
        built = AutoModelForCausalLM.from_config(config, dtype=stored_dtype)
    tensors = _read_tensors(folder / WEIGHTS)
    for name, spec in manifest["layers"].items():  # the layers' data-dependent sizes come from the file
        _swap_in_empty_layer(built, name, spec, stored_dtype, folder, tensors)
    _check_tensors(built, tensors, manifest["tied"], folder / WEIGHTS)
    built.load_state_dict(tensors, strict=False, assign=True)
    for alias, source in manifest["tied"].items():
        _tie(built, alias, source)
    left = [name for name, tensor in [*built.named_parameters(), *built.named_buffers()] if tensor.is_meta]
    if left:
        raise ValueError(f"{folder / WEIGHTS} holds no tensor for {left[:5]}{' ...' if len(left) > 5 else ''}: "
                         "the checkpoint is incomplete")
    if (folder / "generation_config.json").is_file():
        built.generation_config = GenerationConfig.from_pretrained(folder)
    torch_dtype = _parse_dtype(dtype)
    if torch_dtype != "auto":
        built.to(torch_dtype)
    built.to(device).eval()
    for name, spec in manifest["layers"].items():  # on the target device: milliseconds on a GPU
        layer = built.get_submodule(name)
        formats.get(spec["format"]).validate(layer.compressed, layer.in_features, f"{folder / WEIGHTS}: {name}")
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return built, AutoTokenizer.from_pretrained(folder) if has_tokenizer else None


def _swap_in_empty_layer(model: nn.Module, name: str, spec: dict, dtype: torch.dtype, folder: Path,
                         tensors: dict[str, torch.Tensor]) -> None:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    if type(linear) is not nn.Linear or (linear.in_features, linear.out_features) != (
            spec.get("in_features"), spec.get("out_features")):
        raise ValueError(f"{folder / MANIFEST} names {name!r} as a compressed {spec.get('in_features')} -> "
                         f"{spec.get('out_features')} linear, but the model of config.json has "
                         f"{'no such linear' if linear is None else repr(linear)}: the checkpoint is damaged")
    fmt = formats.get(spec["format"])
    shapes = {key: tuple(tensors[f"{name}.{key}"].shape) for key in fmt.buffers if f"{name}.{key}" in tensors}
    layer = SparseLinear(spec["in_features"], spec["out_features"], spec["bias"], dtype, "meta",
                         permuted=spec["permuted"], format=fmt.name, shapes=shapes if "values" in shapes else None)
    _set_submodule(model, name, layer)


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], tied: dict, path: Path) -> None:
    """Every stored tensor is one the model expects, with its shape and dtype (bitmap values: any length)."""
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{path} holds tensors the model does not have: {unexpected[:5]}: the checkpoint is damaged "
                         "or belongs to another config.json")
    missing = sorted(set(expected) - set(tensors) - set(tied))
    if missing:
        raise ValueError(f"{path} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}: the checkpoint is "
                         "incomplete")
    for name, tensor in tensors.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise ValueError(f"{path}: {name} is {str(tensor.dtype).removeprefix('torch.')} "
                             f"{tuple(tensor.shape)}, the model expects {str(want.dtype).removeprefix('torch.')} "
                             f"{tuple(want.shape)}: the checkpoint is damaged")


def _tie(model: nn.Module, alias: str, source: str) -> None:
    module_name, _, attr = alias.rpartition(".")
    owner = model.get_submodule(module_name) if module_name else model
    shared = model.get_parameter(source)
    if isinstance(getattr(owner, attr, None), nn.Parameter) or attr in owner._parameters:
        setattr(owner, attr, shared)
    else:
        owner.register_buffer(attr, model.get_buffer(source))


def densify(model: nn.Module) -> list[str]:
    """Replace every ``SparseLinear`` by its ``nn.Linear`` (masked-dense weight in the original input order), in
    place; return the names."""
    names = [name for name, module in model.named_modules() if isinstance(module, SparseLinear)]
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).to_dense())
    return names


def permutations_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """{linear name: perm} of the model's channel-permuted 2:4 layers."""
    return {name: module.perm.long() for name, module in model.named_modules()
            if isinstance(module, SparseLinear) and module.perm is not None}


def _extra_json(folder: Path) -> dict:
    path = folder / SPARSITY
    return {SPARSITY: json.loads(path.read_text(encoding="utf-8"))} if path.is_file() else {}


def compress_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False,
                        format: str = "auto") -> dict:
    """A plain (dense) pruned checkpoint -> a compressed one (its permutations.safetensors and sparsity.json
    carried over); return the sizes."""
    folder = resolve_model(source)
    if is_compressed(folder):
        raise ValueError(f"{folder} is already a compressed checkpoint")
    model, tokenizer = load_model(folder)
    return save_compressed(model, tokenizer, out_dir, _extra_json(folder), overwrite,
                           perms=_saved_permutations(folder), format=format)


def decompress_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """A compressed checkpoint -> the plain Hugging Face one (``save_checkpoint``), with its permutations."""
    from .models import save_checkpoint

    folder = resolve_model(source)
    if not is_compressed(folder):
        raise ValueError(f"{folder} is not a compressed checkpoint (no {MANIFEST})")
    model, tokenizer = load(folder)
    perms = permutations_of(model)
    densify(model)
    return save_checkpoint(model, tokenizer, out_dir, _extra_json(folder), overwrite,
                           extra_tensors={PERMUTATIONS: perms} if perms else None)
