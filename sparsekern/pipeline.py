"""Sequential, layer-by-layer pruning of any Hugging Face causal LM.

1. Find the stack of decoder layers generically: the ModuleList of ``num_hidden_layers`` identical blocks.
2. Capture, for every calibration batch, the first layer's input and every layer's other arguments (attention
   mask, position ids or rotary embeddings, cache position...; they differ between layers in models that
   alternate sliding-window and full attention). Each layer's ``forward`` is swapped for a recorder that
   returns its input unchanged, so one cheap pass through the embeddings captures everything.
3. For each layer, on the accelerator while the rest of the model stays where it was (offload): collect the
   method's statistics for its linears with forward hooks, prune them, re-run the layer to produce the next
   layer's inputs. Linears reading the same input (q/k/v, gate/up) share one statistic and one prepared
   factor. With ``true_sequential``, those input groups are pruned in call order, each from statistics
   re-collected after the groups before it were pruned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import inspect
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, MutableSequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import Ranks, assign_owners, linear_cost
from .offload import DiskActivations
from .patterns import PatternSpec, SparsityPattern, resolve_pattern
from .prune import Method
from .resume import ResumeState, fingerprint


class _StopForward(Exception):
    """Raised to end a forward pass once everything needed from it was seen."""


# -- model structure ---------------------------------------------------------------------------------------


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The (name, ModuleList) of the model's decoder layers, found without per-model module paths.

    Preferred: the shallowest ModuleList of ``num_hidden_layers`` modules of one class that contain linears.
    Fallback: the longest such list.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    expected = getattr(text_config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not find_linears(module[0]):
            continue
        candidates.append((len(module) != expected, name.count("."), -len(module), name, module))
    if not candidates:
        raise ValueError(
            f"{type(model).__name__}: found no list of decoder layers containing linear layers; "
            "sparsekern prunes Hugging Face causal LMs whose decoder layers are an nn.ModuleList"
        )
    candidates.sort(key=lambda c: c[:4])
    return candidates[0][3], candidates[0][4]


def _is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family) is a linear layer with a transposed [in, out] weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_linears(module: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer under ``module`` by relative name: nn.Linear and transformers' Conv1D."""
    return {name: child for name, child in module.named_modules() if name and _is_linear(child)}


def weight_matrix(linear: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a view; Conv1D stores it transposed)."""
    return linear.weight.t() if type(linear).__name__ == "Conv1D" else linear.weight


# -- capture of layer inputs -------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerCall:
    """How the model called one layer for one batch: positional args (hidden states removed) and kwargs."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool

    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> Any:
        hidden = hidden.to(next(layer.parameters()).device)  # a no-op, unless the activations were offloaded
        if self.hidden_as_kwarg:
            return layer(*self.args, hidden_states=hidden, **self.kwargs)
        return layer(hidden, *self.args, **self.kwargs)


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, LayerCall]:
    if args:
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs), False)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), LayerCall((), kwargs, True)


def _first_output(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


_NO_FORWARD = object()  # "the layer had no instance-level forward" (None could be a real value)


@contextlib.contextmanager
def _swapped_forwards(layers: nn.ModuleList, make_forward: Callable[[int], Callable]) -> Iterator[None]:
    """Temporarily replace each layer's forward (attributes such as ``attention_type`` stay readable)."""
    # A forward already set on the instance (accelerate's hooks wrap ``module.forward`` this way, e.g. for
    # device_map models) is put back afterwards rather than deleted, which would silently remove the hook.
    saved = [layer.__dict__.get("forward", _NO_FORWARD) for layer in layers]
    try:
        for index, layer in enumerate(layers):
            layer.forward = make_forward(index)
        yield
    finally:
        for layer, forward in zip(layers, saved):
            if forward is _NO_FORWARD:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    training = model.training
    model.eval()
    if config is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(training)
        if config is not None:
            config.use_cache = use_cache


def _outside_layers(model: nn.Module, layers: nn.ModuleList) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """(module, key, tensor) for every parameter and buffer not inside a decoder layer (embeddings, rotary...)."""
    inside = {id(t) for t in layers.parameters()} | {id(t) for t in layers.buffers()}
    for module in model.modules():
        for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and id(tensor) not in inside:
                yield module, key, tensor


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> Callable[[], None]:
    """Move what is outside the decoder layers to ``device``; return the function that moves it back."""
    moved = []
    for module, key, tensor in _outside_layers(model, layers):
        if tensor.device != device:
            moved.append((module, key, tensor.device))
            _set_tensor_device(module, key, device)

    def restore() -> None:
        for module, key, home in moved:
            _set_tensor_device(module, key, home)

    return restore


def _set_tensor_device(module: nn.Module, key: str, device: torch.device) -> None:
    if key in module._parameters:
        param = module._parameters[key]
        param.data = param.data.to(device)  # keeps the Parameter object, so tied weights stay tied
    else:
        module._buffers[key] = module._buffers[key].to(device)


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], device: torch.device,
    store: MutableSequence[torch.Tensor] | None = None,
) -> tuple[MutableSequence[torch.Tensor], list[list[LayerCall]]]:
    """The first layer's input for each batch, and how each layer is called for each batch ([layer][batch]).

    Everything outside the decoder layers must already be on ``device``. ``store``: where the inputs go (default a
    new list; ``offload.DiskActivations`` keeps them on disk).
    """
    calls: list[list[LayerCall]] = [[] for _ in layers]
    first_inputs = store if store is not None else []
    first_output_is_tensor: list[bool] = []

    def make_forward(index: int) -> Callable:
        def record(*args, **kwargs):
            hidden, call = _split_hidden(args, kwargs)
            calls[index].append(call)
            if index == 0:
                first_inputs.append(hidden)
            if index == len(layers) - 1:
                raise _StopForward
            # Return the input unchanged, shaped like the real layer's output.
            return hidden if first_output_is_tensor[0] else (hidden,)

        return record

    model_kwargs = _no_cache_kwargs(model)
    # Learn the layers' output structure (a tensor, or a tuple led by the hidden states) from one real call.
    with _swapped_forwards(layers[:1], lambda _: _recording_stop(first_inputs, calls[0])):
        with contextlib.suppress(_StopForward):
            model(batches[0].to(device), **model_kwargs)
    with _on_device(layers[0], device):
        probe = calls[0][0](layers[0], first_inputs[0])
    first_output_is_tensor.append(isinstance(probe, torch.Tensor))
    first_inputs.clear()
    calls[0].clear()
    with _swapped_forwards(layers, make_forward):
        for batch in batches:
            with contextlib.suppress(_StopForward):
                model(batch.to(device), **model_kwargs)
    return first_inputs, calls


def _no_cache_kwargs(model: nn.Module) -> dict:
    """``use_cache=False`` for forwards that take it (HF models: no KV cache is wanted while capturing); a
    plain nn.Module LM whose forward takes only the ids gets nothing extra rather than a TypeError."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {"use_cache": False}
    if any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {"use_cache": False}
    return {}


def _recording_stop(first_inputs: list, calls: list) -> Callable:
    def record(*args, **kwargs):
        hidden, call = _split_hidden(args, kwargs)
        first_inputs.append(hidden)
        calls.append(call)
        raise _StopForward

    return record


# -- input groups ------------------------------------------------------------------------------------------


def input_groups(layer: nn.Module, linears: Mapping[str, nn.Module], run: Callable[[], Any]) -> list[list[str]]:
    """Linears grouped by the very tensor they read, in the order the layer first calls them.

    ``run`` performs one forward of the layer. Linears never called are left out.
    """
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook(name):
        def fn(module, args):
            for tensor, names in seen:
                if tensor is args[0]:
                    names.append(name)
                    return
            seen.append((args[0], [name]))

        return fn

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return [names for _, names in seen]


# -- the driver --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    pattern: str
    sparsity: float
    loss: float | None = None
    damp: float | None = None
    time_s: float = 0.0
    permutation: list[int] | None = None  # --permute: the input order in which the N:M pattern holds


def _plan(
    layers_name: str, layers: nn.ModuleList, method: Method, pattern: SparsityPattern,
    overrides: Mapping[str, PatternSpec | None] | None,
) -> list[dict[str, tuple[nn.Module, SparsityPattern]]]:
    """Per layer: the linears to prune and their patterns. Checks every override, shape and weight before any
    work starts."""
    linears = [(index, name, linear) for index, layer in enumerate(layers)
               for name, linear in find_linears(layer).items()]
    names = [f"{layers_name}.{index}.{name}" for index, name, _ in linears]
    for glob in overrides or {}:
        if not any(fnmatch.fnmatchcase(name, glob) for name in names):
            raise ValueError(f"override {glob!r} matches no linear layer (they are named like {names[0]!r}); "
                             "fix the glob or drop it")
    plan: list[dict[str, tuple[nn.Module, SparsityPattern]]] = [{} for _ in layers]
    for (index, name, linear), full_name in zip(linears, names):
        chosen = resolve_pattern(full_name, pattern, overrides)
        if chosen is None:
            continue
        chosen.check_columns(weight_matrix(linear).shape[1], full_name)
        method.validate(chosen, full_name)
        # Checked here, before any layer is calibrated or modified, not only when the linear is pruned:
        # a NaN weight poisons the layer's activations, so the first error would otherwise come from the
        # statistics of a linear downstream of it (blaming its inputs and the dtype, not the damaged
        # weight), and layers before it would already have been pruned in place.
        if not weight_matrix(linear).is_meta:  # streamed layers are checked when they are read
            _check_weight(weight_matrix(linear), full_name)
        plan[index][name] = (linear, chosen)
    if not any(plan):
        raise ValueError("nothing to prune: every linear layer was excluded by the overrides")
    return plan


def _check_weight(view: torch.Tensor, where: str) -> None:
    if not torch.isfinite(view).all():
        raise FloatingPointError(f"{where}: the weight contains NaN or Inf; the checkpoint is damaged")


def _prune_linear(method: Method, linear: nn.Module, prepared: Any, pattern: SparsityPattern,
                  where: str, perm: torch.Tensor | None = None) -> LinearReport:
    start = time.perf_counter()
    view = weight_matrix(linear)  # finite: checked by _plan before any work
    weight = view.detach().to(torch.float32, copy=True)
    if perm is not None:  # pruned in the permuted input order, in which the pattern holds
        weight = weight.index_select(1, perm.to(weight.device))
    result = method.prune_linear(weight, prepared, pattern, where)
    pruned = result.weight
    if perm is not None:  # back to the checkpoint's own order
        pruned = torch.empty_like(pruned).index_copy_(1, perm.to(pruned.device), pruned)
    view.data.copy_(pruned.to(view.dtype))
    sparsity = (view == 0).float().mean().item()
    return LinearReport(where, tuple(view.shape), str(pattern), sparsity, result.loss, result.damp,
                        time.perf_counter() - start, None if perm is None else perm.tolist())


class InMemoryLayers:
    """Where the layer loop of :func:`prune_layers` gets each decoder layer and what it records after it: the layers
    of a model held in memory (the default). ``sparsekern.streaming.StreamedLayers`` is the other kind: layers
    read from a checkpoint one at a time and written out after pruning."""

    streamed = False  # True: layers are loaded and released one at a time, and recorded whole

    def fingerprint(self, model: nn.Module, calibration: torch.Tensor, settings: dict) -> str:
        return fingerprint(model, calibration, settings)

    def load(self, index: int, layer: nn.Module) -> None:
        """Make the layer's parameters real before it is pruned (in memory: they are)."""

    def record(self, index: int, layer: nn.Module, targets: Mapping[str, tuple[nn.Module, SparsityPattern]]
               ) -> dict[str, torch.Tensor]:
        """The tensors the resume state records for a finished layer: its pruned linears' weights."""
        return {name: weight_matrix(linear) for name, (linear, _) in targets.items()}

    def restore(self, weights: list[dict[str, torch.Tensor]],
                plan: list[dict[str, tuple[nn.Module, SparsityPattern]]]) -> None:
        """Resuming: put the completed layers' recorded weights back into the model."""
        for layer_weights, targets in zip(weights, plan):
            for name, weight in layer_weights.items():
                weight_matrix(targets[name][0]).data.copy_(weight)

    def load_recorded(self, index: int, layer: nn.Module, targets: Mapping, folder: str) -> None:
        """Resuming from a state without activations (distributed, offloaded): give the loaded layer its recorded
        pruned weights before it is replayed (in memory, ``restore`` already did)."""

    def release(self, index: int, layer: nn.Module, recorded: bool) -> None:
        """The layer is finished (and recorded, when there is a resume state): in memory, it stays."""


def prune_layers(
    model: nn.Module,
    method: Method,
    pattern: SparsityPattern,
    calibration: torch.Tensor | None,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    true_sequential: bool = False,
    overrides: Mapping[str, PatternSpec | None] | None = None,
    progress: bool = True,
    resume_dir: str | None = None,
    layer_io: InMemoryLayers | None = None,
    ranks: Ranks | None = None,
    offload_activations: str | None = None,
) -> tuple[list[LinearReport], float]:
    """Prune every decoder-layer linear of ``model`` in place, one layer at a time. Returns the per-linear reports
    and the seconds earlier runs spent on the layers this one resumed from (0.0 without resuming).

    calibration: LongTensor [nsamples, seqlen] of token ids (unused by data-free methods).
    device: where each layer is pruned; the model's parameters stay where they are between layers.
    resume_dir: where each finished layer is recorded (see ``sparsekern.resume``); a run with the same model,
        settings and calibration continues from the first unfinished layer.
    layer_io: where layers come from and go (default: the model in memory; ``sparsekern.streaming`` streams them
        from a checkpoint, the model's decoder layers then being on the meta device between visits).
    ranks: a distributed run (``sparsekern.distributed``): this rank calibrates on its share of the batches and
        prunes the linears it owns; every rank gets every pruned weight; only rank 0 records progress.
    offload_activations: a folder where the calibration activations live between layers (``offload``), one batch in
        memory at a time. The resume state then holds no activations: resuming replays the finished layers.
    """
    with ranks if ranks is not None else contextlib.nullcontext():
        try:
            return _prune_layers(model, method, pattern, calibration, device, batch_size, true_sequential, overrides,
                                 progress, resume_dir, layer_io, ranks, offload_activations)
        except BaseException as exc:
            if ranks is not None:  # before this process ends: the other ranks read it to explain their failure
                ranks.report_error(exc)
            raise


def _prune_layers(model, method, pattern, calibration, device, batch_size, true_sequential, overrides, progress,
                  resume_dir, layer_io, ranks, offload_activations):
    start = time.perf_counter()
    io = layer_io if layer_io is not None else InMemoryLayers()
    layers_name, layers = find_decoder_layers(model)
    plan = _plan(layers_name, layers, method, pattern, overrides)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    reports: list[LinearReport] = []
    data_free = method.stats is None
    if not data_free and (calibration is None or calibration.numel() == 0):
        raise ValueError(f"method {method.name!r} needs calibration data")
    # Data-free methods record progress only when streamed (there the records are the output's layers).
    state, completed, earlier_s = None, 0, 0.0
    if resume_dir is not None and (not data_free or io.streamed) and (ranks is None or ranks.is_writer):
        settings = {"method": method.name, "options": method.options(), "pattern": str(pattern),
                    "overrides": dict(overrides or {}), "true_sequential": true_sequential, "batch_size": batch_size}
        ids = calibration if calibration is not None and not data_free else torch.zeros(0, dtype=torch.long)
        state = ResumeState(resume_dir, io.fingerprint(model, ids, settings))
        completed = state.completed_layers()
    if ranks is not None:
        completed = ranks.broadcast_object(completed, 0, "reading the resume state")
        progress = progress and ranks.is_writer
    bar = tqdm(total=len(layers), desc=f"{method.name} {pattern}", unit="layer", disable=not progress)
    hidden: MutableSequence[torch.Tensor] = []
    calls: list[list[LayerCall]] = [[] for _ in layers]
    # Activations not in the resume state (they are on every rank, or on disk): a resumed run replays the layers.
    replayed = ranks is not None or offload_activations is not None
    with _calibration_mode(model), _activation_store(offload_activations, device, data_free) as store:
        if not data_free:
            bar.set_postfix_str("capturing layer inputs")
            io.load(0, layers[0])  # the capture runs the first layer once, to learn its output structure
            restore = _move_outside_layers(model, layers, device)
            batches = list(calibration.split(batch_size))
            try:
                hidden, calls = capture_layer_inputs(model, layers, ranks.shard(batches) if ranks else batches,
                                                     device, store)
            finally:
                restore()
            if completed:
                io.release(0, layers[0], recorded=True)
        if completed:
            saved_reports, saved_hidden = None, []
            if state is not None:
                saved_weights, saved_hidden, saved_reports, earlier_s = state.load(completed, device,
                                                                                   weights=not io.streamed)
                io.restore(saved_weights, plan)
            if ranks is not None:
                saved_reports, earlier_s = ranks.broadcast_object((saved_reports, earlier_s), 0, "resuming")
            if not data_free and saved_hidden and not replayed:
                hidden = saved_hidden
            elif not data_free:  # a state without them: the samples through the recorded layers again
                _replay(io, layers_name, layers, plan, hidden, calls, completed, device, ranks, resume_dir)
            reports = [LinearReport(**{**r, "shape": tuple(r["shape"])}) for r in saved_reports]
            if ranks is None or ranks.is_writer:
                tqdm.write(f"resuming from {resume_dir}: {completed} of {len(layers)} layers already pruned",
                           file=sys.stderr)
            bar.update(completed)
        try:
            for index, (layer, targets) in enumerate(zip(layers, plan)):
                if index < completed:
                    continue
                where = f"{layers_name}.{index}"
                io.load(index, layer)
                if io.streamed:  # read just now: checked before it is used (in memory, _plan checked it)
                    for name, (linear, _) in targets.items():
                        _check_weight(weight_matrix(linear), f"{where}.{name}")
                if data_free:
                    with _on_device(layer, device):
                        owners = _owners(ranks, {name: linear for name, (linear, _) in targets.items()})
                        mine = [_prune_linear(method, linear, None, chosen, f"{where}.{name}")
                                for name, (linear, chosen) in targets.items() if _owns(ranks, owners, name)]
                        reports += _share(ranks, where, {n: linear for n, (linear, _) in targets.items()}, owners,
                                          list(targets), mine)
                else:
                    reports += _prune_and_advance(method, layer, targets, hidden, calls[index], device, where,
                                                  true_sequential, bar, batch_size, ranks)
                if state is not None:  # written while the next layer computes (distributed: no activations)
                    state.save(index + 1, io.record(index, layer, targets), [] if replayed else hidden,
                               [dataclasses.asdict(r) for r in reports], earlier_s + time.perf_counter() - start)
                io.release(index, layer, recorded=state is not None)
                bar.update()
            if state is not None:
                state.wait()
        except BaseException:
            if state is not None:  # keep the layer whose writes are under way, then report the first error
                try:
                    state.wait()
                except OSError:
                    pass
            raise
    bar.close()
    return reports, earlier_s


def _owners(ranks: Ranks | None, linears: Mapping[str, nn.Module]) -> dict[str, int] | None:
    """{name: owning rank} for a distributed run (by cost, ``distributed.assign_owners``), else None."""
    if ranks is None:
        return None
    return assign_owners({name: linear_cost(*weight_matrix(linear).shape) for name, linear in linears.items()},
                         ranks.world)


def _owns(ranks: Ranks | None, owners: dict[str, int] | None, name: str) -> bool:
    return ranks is None or owners[name] == ranks.rank


def _share(ranks: Ranks | None, where: str, linears: Mapping[str, nn.Module], owners: dict[str, int] | None,
           order: list[str], mine: list[LinearReport]) -> list[LinearReport]:
    """Distributed: every pruned weight from its owner to every rank, and every rank's reports, in ``order``.
    In one process: ``mine``."""
    if ranks is None:
        return mine
    ranks.broadcast_weights((f"{where}.{name}", linears[name].weight.data, owners[name]) for name in order)
    gathered = {r.name: r for reports in ranks.all_gather_objects(mine, f"{where}: reports") for r in reports}
    return [gathered[f"{where}.{name}"] for name in order]


@contextlib.contextmanager
def _activation_store(folder: str | None, device: torch.device, data_free: bool
                      ) -> Iterator[MutableSequence[torch.Tensor] | None]:
    """The calibration activations' home: None (a list in memory), or a ``DiskActivations`` in ``folder``, removed
    at the end."""
    if folder is None or data_free:
        yield None
        return
    with DiskActivations(folder, device) as store:
        yield store


def _replay(io: InMemoryLayers, layers_name: str, layers: nn.ModuleList, plan: list,
            hidden: MutableSequence[torch.Tensor], calls: list[list[LayerCall]], completed: int, device: torch.device,
            ranks: Ranks | None, folder: str) -> None:
    """Resuming from a state without activations (a distributed run: they are on every rank; offloaded ones): the
    finished layers, with their recorded pruned weights (broadcast by rank 0), run again on this process's samples."""
    for index in range(completed):
        where = f"{layers_name}.{index}"
        layer, targets = layers[index], plan[index]
        io.load(index, layer)
        if ranks is None or ranks.is_writer:
            io.load_recorded(index, layer, targets, folder)
        with _on_device(layer, device):
            if ranks is not None:
                ranks.broadcast_weights((f"{where}.{name}", linear.weight.data, 0)
                                        for name, (linear, _) in targets.items())
            _advance(layer, hidden, calls[index], where)
        io.release(index, layer, recorded=True)


def _prune_and_advance(method: Method, layer: nn.Module, targets: Mapping[str, tuple[nn.Module, SparsityPattern]],
                       hidden: list[torch.Tensor], calls: list[LayerCall], device: torch.device, where: str,
                       true_sequential: bool, bar: tqdm, batch_size: int,
                       ranks: Ranks | None = None) -> list[LinearReport]:
    """Prune one layer on ``device`` and turn ``hidden`` into the next layer's inputs.

    Out of GPU memory with the calibration activations on the GPU, the layer gets its dense weights back, the
    activations move to the CPU (each batch then visits the GPU with the layer) and the layer is pruned again, once;
    out of memory with them on the CPU already, the error names the layer, the sizes and the fixes. (Distributed,
    no rank retries alone: the others are already in the next collective.)"""
    dense = {name: weight_matrix(linear).detach().to("cpu", copy=True) for name, (linear, _) in targets.items()} \
        if device.type == "cuda" and ranks is None else None
    for attempt in range(2):
        try:
            with _on_device(layer, device):
                reports = _prune_layer(method, layer, targets, hidden, calls, device, where, true_sequential, bar,
                                       ranks)
                bar.set_postfix_str(f"{where}: outputs")
                _advance(layer, hidden, calls, where)
            return reports
        except torch.OutOfMemoryError as exc:
            on_disk = isinstance(hidden, DiskActivations)
            offloaded = on_disk or hidden[0].device.type == "cpu"
            first = hidden.meta(0) if on_disk else hidden[0]
            total = hidden.nbytes if on_disk else sum(h.numel() * h.element_size() for h in hidden)
            sizes = (f"{len(calls)} batches of {tuple(first.shape)} {str(first.dtype).removeprefix('torch.')} "
                     f"activations, {total / 2**30:.2f} GiB")
            if offloaded or attempt or dense is None:
                raise MemoryError(
                    f"{where}: out of {device.type.upper()} memory ({str(exc).splitlines()[0][:200]}) with {sizes}"
                    f"{' kept on disk' if on_disk else ' kept on the CPU' if offloaded else ''}: lower --batch-size "
                    f"(now {batch_size}) or "
                    "--nsamples, or prune on a device with more memory") from None
            for name, (linear, _) in targets.items():  # a partly pruned layer is pruned again from dense
                weight_matrix(linear).data.copy_(dense[name])
            for b, h in enumerate(hidden):
                hidden[b] = h.to("cpu")
            torch.cuda.empty_cache()
            warnings.warn(f"{where}: out of GPU memory with {sizes} on the GPU; they are kept on the CPU from now "
                          "on (slower; a smaller --batch-size keeps them on the GPU)", stacklevel=2)
    raise AssertionError("unreachable")


def _prune_layer(method: Method, layer: nn.Module, targets: Mapping[str, tuple[nn.Module, SparsityPattern]],
                 hidden: list[torch.Tensor], calls: list[LayerCall], device: torch.device, where: str,
                 true_sequential: bool, bar: tqdm, ranks: Ranks | None = None) -> list[LinearReport]:
    """Collect statistics for one layer's linears and prune them, group by group (distributed: the linears this
    rank owns, from statistics combined over the ranks)."""
    linears = {name: linear for name, (linear, _) in targets.items()}
    if not linears:
        return []
    groups = input_groups(layer, linears, lambda: calls[0](layer, hidden[0]))
    called = {name for group in groups for name in group}
    for name in linears.keys() - called:
        raise RuntimeError(
            f"{where}.{name} was never called on the calibration data, so it has no statistics; "
            f"exclude it with an override such as '{where}.{name}=dense'"
        )
    stages = groups if true_sequential else [[name for group in groups for name in group]]
    reports = []
    for stage in stages:
        stage_groups = [[name for name in group if name in stage] for group in groups]
        stage_groups = [group for group in stage_groups if group]
        stats = _collect(method, layer, linears, stage_groups, hidden, calls, device, where)
        owners = _owners(ranks, {name: linears[name] for group in stage_groups for name in group})
        if ranks is not None:
            ranks.reduce_stats(stats, [{owners[name] for name in group} for group in stage_groups], where)
        mine = []
        for group, stat in zip(stage_groups, stats):
            if not any(_owns(ranks, owners, name) for name in group):
                continue
            bar.set_postfix_str(f"{where}: {', '.join(group)}")
            if ranks is not None:
                ranks.mark(f"{where}: pruning {', '.join(group)}")
            permutation = getattr(method, "group_permutation", None)
            perm = permutation(stat, [weight_matrix(linears[name]) for name in group],
                               [targets[name][1] for name in group], f"{where}.{group[0]}") if permutation else None
            prepared = method.prepare(stat, f"{where}.{group[0]}")
            for name in group:
                if _owns(ranks, owners, name):
                    mine.append(_prune_linear(method, linears[name], prepared, targets[name][1], f"{where}.{name}",
                                              perm))
        reports += _share(ranks, where, linears, owners, [name for group in stage_groups for name in group], mine)
    return reports


def _advance(layer: nn.Module, hidden: list[torch.Tensor], calls: list[LayerCall], where: str) -> None:
    """Replace each batch's layer input by the (pruned) layer's output: the next layer's input."""
    for b, call in enumerate(calls):
        out = _first_output(call(layer, hidden[b]))
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                f"{where}: outputs contain NaN or Inf after pruning; try float32 (--dtype) "
                "or a lower sparsity for this layer"
            )
        # stays where the activations are kept (the CPU after an out-of-memory fallback; on disk: written from here)
        hidden[b] = out if isinstance(hidden, DiskActivations) else out.to(hidden[b].device)


def _collect(method: Method, layer: nn.Module, linears: Mapping[str, nn.Module], groups: list[list[str]],
             hidden: list[torch.Tensor], calls: list[LayerCall], device: torch.device, where: str) -> list:
    """Run every calibration batch through ``layer`` and accumulate one statistic per input group.

    The forward stops right after the last linear of interest has read its input.
    """
    stats = []
    handles = []
    last = groups[-1][0]
    for group in groups:
        columns = weight_matrix(linears[group[0]]).shape[1]
        stat = method.new_stats(columns, device, f"{where}.{group[0]}")
        stats.append(stat)

        def hook(module, args, stat=stat, stop=group[0] == last):
            stat.add(args[0])
            if stop:
                raise _StopForward

        handles.append(linears[group[0]].register_forward_pre_hook(hook))
    try:
        for b, call in enumerate(calls):
            with contextlib.suppress(_StopForward):
                call(layer, hidden[b])
    finally:
        for handle in handles:
            handle.remove()
    return stats


@contextlib.contextmanager
def _on_device(layer: nn.Module, device: torch.device) -> Iterator[None]:
    """Hold one layer on ``device``, then send it back where it was (offload)."""
    home = next(layer.parameters()).device
    layer.to(device)
    try:
        yield
    finally:
        layer.to(home)
