"""Zero-shot task accuracy with lm-evaluation-harness, as the pruning papers report it beside perplexity.

SparseGPT and Wanda report lm-evaluation-harness accuracy on piqa, arc_easy, arc_challenge, hellaswag, winogrande,
boolq, rte and openbookqa. ``zero_shot(model, tokenizer, tasks)`` runs such tasks on an in-memory model (wrapped in
lm-eval's ``HFLM``, so requests are built and scored exactly as ``lm_eval`` itself does) and returns per-task
metrics (``acc``, ``acc_norm`` and their standard errors).

A task is named in three ways: a built-in lm-eval task (``piqa``; its dataset comes from the Hugging Face hub), the
path of a task YAML, or a folder of task YAMLs (every group and task defined in it, as lm-eval's ``include_path``
indexes them). Machines without the hub run local copies: a YAML with ``dataset_path: json`` and ``dataset_kwargs:
{data_files: ...}`` naming a local JSON/JSONL file (relative paths are resolved against the working directory, as
lm-eval does).

lm-eval is an optional dependency: ``pip install 'sparsekern[tasks]'``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import importlib.util
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Iterable

import torch

__all__ = ["TaskSet", "format_table", "load_tasks", "zero_shot"]

INSTALL_HINT = "pip install 'sparsekern[tasks]'"
LOCAL_TASK_FILE = ("the path of a task YAML (or a folder of them) whose dataset_path is json, with dataset_kwargs: "
                   "{data_files: ...} naming a local JSON/JSONL file")
# `datasets` builders that read local files: a task using one of them needs no hub.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder", "audiofolder"}


@dataclasses.dataclass
class TaskSet:
    """Tasks resolved and with their datasets loaded (``load_tasks``); reusable across ``zero_shot`` calls, e.g.
    the same tasks before and after pruning."""

    specs: list[str]
    manager: Any  # lm_eval.tasks.TaskManager
    objects: list  # lm-eval Task / Group objects, one or more per spec
    fewshot: dict = dataclasses.field(default_factory=dict)  # each task's own num_fewshot, by id(task)

    def __post_init__(self):
        self.fewshot = {id(task): task.get_config("num_fewshot") for task in self.leaf_tasks()}

    @property
    def names(self) -> list[str]:
        return [getattr(obj, "task_name", None) or getattr(obj, "name", str(obj)) for obj in self.objects]

    def leaf_tasks(self) -> list:
        return [task for obj in self.objects
                for task in (obj.get_all_tasks() if hasattr(obj, "get_all_tasks") else [obj])]

    def reset(self) -> None:
        """lm-eval's simple_evaluate writes num_fewshot into the tasks' configs: undo it before another run."""
        for task in self.leaf_tasks():
            task.set_config(key="num_fewshot", value=self.fewshot.get(id(task)))


def _lm_eval():
    """The lm_eval module, or a ValueError saying how to install it."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager  # noqa: F401  (the parts zero_shot needs)
    except ImportError as exc:
        raise ValueError(f"zero-shot tasks need lm-evaluation-harness, which is not installed ({exc}); "
                         f"{INSTALL_HINT}") from None
    if importlib.util.find_spec("accelerate") is None:  # lm-eval's HF model wrapper imports it
        raise ValueError(f"zero-shot tasks need accelerate beside lm-evaluation-harness; {INSTALL_HINT}")
    return lm_eval


def _split_specs(tasks: str | Iterable[str]) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    if not all(isinstance(item, (str, Path)) for item in items):
        raise TypeError(f"tasks must be a comma-separated string or a list of task names / YAML paths, got {tasks!r}")
    specs = [str(item).strip() for item in items if str(item).strip()]
    if not specs:
        raise ValueError("no tasks given: name lm-eval tasks (piqa,arc_easy,...) or task YAML files / folders")
    if len(set(specs)) != len(specs):
        raise ValueError(f"a task is given twice in {','.join(specs)}")
    return specs


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or spec.startswith((".", "~"))


def _manager(folders: tuple[str, ...], builtin: bool):
    """lm-eval's TaskManager over the given folders, with its built-in tasks when ``builtin``. Indexing those
    ~15k YAMLs takes ~15 s, so it is done only when a task is named that the folders do not define, and kept for
    later calls; folders alone are indexed afresh each time (milliseconds), so edits to them are seen."""
    from lm_eval.tasks import TaskManager

    if builtin:
        return _builtin_manager(folders)
    return TaskManager(include_path=list(folders) or None, include_defaults=False)


@functools.lru_cache(maxsize=2)
def _builtin_manager(folders: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(folders) or None, include_defaults=True)


def _yaml_summary(path: Path) -> dict:
    """``task`` and ``dataset_path`` of a task YAML for error messages (lm-eval's ``!function`` tags ignored)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _hub_unreachable(exc: BaseException) -> bool:
    """The dataset was looked up on the Hugging Face hub and the hub could not be reached (offline, no network)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConnectionError) or type(exc).__name__ in (
                "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError"):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _dataset_error(what: str, dataset_path: str | None, exc: Exception) -> ValueError:
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(detail) > 300:
        detail = detail[:297] + "..."
    local = dataset_path in LOCAL_BUILDERS or (dataset_path is not None and Path(dataset_path).exists())
    if not local and _hub_unreachable(exc):
        source = f"the Hugging Face dataset {dataset_path!r}" if dataset_path else "a Hugging Face dataset"
        return ValueError(f"{what} needs {source}, which could not be reached (offline or no network: {detail}); "
                          f"pass a local task file instead: {LOCAL_TASK_FILE}")
    source = f" {dataset_path!r}" if dataset_path else ""
    return ValueError(f"{what}: could not load its dataset{source}: {detail}")


def _unknown_task(spec: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(spec, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ValueError(f"unknown task {spec!r}{hint}: not an lm-eval task, nor a task YAML file or folder; to run a "
                      f"task on local data, give {LOCAL_TASK_FILE}")


@contextlib.contextmanager
def _quiet(progress: bool):
    """Without ``progress``: no progress bars from lm-eval or datasets, and lm-eval logs errors only. lm-eval's
    warning about being handed a model object (rather than a name) is always silenced: that is how we use it."""
    lm_logger = logging.getLogger("lm_eval")
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    saved = lm_logger.level, hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    patches = contextlib.ExitStack()
    datasets_bars = None
    if not progress:
        lm_logger.setLevel(logging.ERROR)
        try:
            import datasets

            datasets_bars = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
        except ImportError:
            pass
        import lm_eval.api.task as task_module

        if hasattr(task_module, "tqdm"):  # "building contexts" has no switch of its own
            patches.enter_context(_patched(task_module, "tqdm", functools.partial(task_module.tqdm, disable=True)))
    try:
        with patches:
            yield
    finally:
        lm_logger.setLevel(saved[0])
        hf_logger.setLevel(saved[1])
        if datasets_bars:
            import datasets

            datasets.enable_progress_bars()


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def load_tasks(tasks: str | Iterable[str], progress: bool = True) -> TaskSet:
    """Resolve task names / YAML files / folders and load their datasets, so that a bad task fails before a
    model is loaded. ``tasks``: ``"piqa,arc_easy"``, ``["path/to/task.yaml", "folder/"]``, ...

    Raises ``ValueError`` (one line) when lm-eval is missing, a task is unknown, or a dataset cannot be loaded
    (for a hub dataset while offline, naming the task and the local-file alternative)."""
    _lm_eval()
    specs = _split_specs(tasks)
    folders, names = [], []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            folders.append(str(path.resolve()))
        elif path.is_file():
            if path.suffix not in (".yaml", ".yml"):
                raise ValueError(f"task file {spec}: not a task YAML (.yaml or .yml)")
        elif _looks_like_path(spec):
            raise ValueError(f"task file {spec}: no such file or folder")
        else:
            names.append(spec)

    local = _manager(tuple(folders), False)
    builtin = any(name not in local.task_index for name in names)
    manager = _manager(tuple(folders), True) if builtin else local
    index = manager.task_index
    for name in names:
        if name not in index:
            raise _unknown_task(name, manager.all_tasks)

    objects = []
    with _quiet(progress):
        for spec in specs:
            path = Path(spec).expanduser()
            if path.is_dir():
                objects += _load_folder(manager, path.resolve(), spec)
            elif path.is_file():
                summary = _yaml_summary(path)
                what = f"task {summary['task']!r} ({spec})" if isinstance(summary.get("task"), str) else \
                    f"task file {spec}"
                objects += _load_one(manager, str(path), what, summary.get("dataset_path"))[0]
            else:
                objects += _load_one(manager, spec, f"task {spec!r}", (index[spec].cfg or {}).get("dataset_path"))[0]
    return TaskSet(specs=specs, manager=manager, objects=objects)


def _load_one(manager, spec: str, what: str, dataset_path) -> tuple[list, set[str]]:
    """Build one spec's Task/Group objects (lm-eval loads the dataset while building a task): the top-level ones,
    and the names of every task and group they hold."""
    try:
        loaded = manager.load([spec])
    except Exception as exc:  # noqa: BLE001 - anything a task's config or data causes is reported with its name
        raise _dataset_error(what, dataset_path, exc) from exc
    inner = {child for children in loaded["group_map"].values() for child in children}
    tops = [group for name, group in loaded["groups"].items() if name not in inner]
    grouped = {task.task_name for group in tops for task in group.get_all_tasks()}
    tops += [task for name, task in loaded["tasks"].items() if name not in grouped]
    return tops, set(loaded["tasks"]) | set(loaded["groups"])


def _load_folder(manager, root: Path, spec: str) -> list:
    """Everything a folder defines, once: its groups (aggregated as lm-eval does, a group inside another coming
    with its parent) and its tasks that no group there holds."""
    kinds = {name: entry.kind.name for name, entry in manager.task_index.items()
             if entry.yaml_path is not None and root in Path(entry.yaml_path).resolve().parents}
    groups = sorted(name for name, kind in kinds.items() if kind == "GROUP")
    tasks = sorted(name for name, kind in kinds.items() if kind in ("TASK", "PY_TASK"))
    if not groups and not tasks:
        raise ValueError(f"task folder {spec}: defines no task (no YAML with a `task:` or `group:` key)")
    built, held = {}, set()
    for name in groups:
        built[name], names = _load_one(manager, name, f"task group {name!r} (from {spec})", None)
        held |= names - {name}
    objects = [obj for name in groups if name not in held for obj in built[name]]
    held |= set(groups)
    for name in tasks:
        if name not in held:
            cfg = manager.task_index[name].cfg or {}
            objects += _load_one(manager, name, f"task {name!r} (from {spec})", cfg.get("dataset_path"))[0]
    return objects


def zero_shot(
    model,
    tokenizer,
    tasks: str | Iterable[str] | TaskSet,
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    add_bos_token: bool | None = None,
    progress: bool = True,
) -> dict:
    """Accuracy of ``model`` on lm-evaluation-harness tasks, computed by lm-eval itself.

    ``tasks``: lm-eval task names, task YAML files or folders of them (a comma-separated string or a list), or a
    ``TaskSet`` from ``load_tasks``. ``limit``: score only the first N documents of each task (a quick look; not
    comparable with published numbers). ``num_fewshot``: None keeps each task's own setting (0 for the papers'
    tasks). ``add_bos_token``: None tokenizes as the tokenizer does; True/False force its special tokens on/off.
    The model runs where it is (move it to the GPU first); log-softmax is taken in fp32.

    Returns ``{"tasks": {name: {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "acc_norm_stderr": ...,
    "samples": n, "num_fewshot": k}}, "groups": {...} (only for task groups), "limit", "lm_eval", "time_s"}``;
    metrics under a filter other than lm-eval's "none" keep it in their key (``exact_match,strict-match``).
    The model's train/eval mode, the caller's tokenizer and the global RNG states are left as they were.
    """
    lm_eval = _lm_eval()
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents per task, got {limit!r}")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ValueError(f"num_fewshot must be a non-negative integer, got {num_fewshot!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    task_set = tasks if isinstance(tasks, TaskSet) else load_tasks(tasks, progress=progress)
    task_set.reset()

    from lm_eval.models.huggingface import HFLM

    class _LM(HFLM):
        """HFLM whose progress bars follow ``progress`` (lm-eval's evaluator has no switch for them)."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

    tokenizer = copy.deepcopy(tokenizer)  # HFLM gives a tokenizer without one a pad token: not the caller's
    # lm-eval conditions empty contexts on BOS, else EOS; a tokenizer with neither falls back to UNK (or id 0).
    prefix = None
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        prefix = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0

    was_training = model.training
    start = time.perf_counter()
    try:
        with _kept_rng_state(), _quiet(progress):
            lm = _LM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                     softmax_dtype=torch.float32, add_bos_token=add_bos_token, prefix_token_id=prefix)
            raw = lm_eval.simple_evaluate(model=lm, tasks=list(task_set.objects), task_manager=task_set.manager,
                                          limit=limit, num_fewshot=num_fewshot, log_samples=False)
    finally:
        model.train(was_training)
    result = {"tasks": {}, "groups": {}, "limit": limit, "lm_eval": lm_eval.__version__}
    for name, metrics in raw["results"].items():
        entry = _metrics(metrics)
        if name in raw.get("n-samples", {}):
            entry["samples"] = raw["n-samples"][name].get("effective")
        if name in raw.get("n-shot", {}):
            entry["num_fewshot"] = raw["n-shot"][name]
        result["groups" if name in raw.get("groups", {}) else "tasks"][name] = entry
    if not result["groups"]:
        del result["groups"]
    result["time_s"] = time.perf_counter() - start
    return result


def _metrics(raw: dict) -> dict:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, ...}`` as ``{"acc": x, "acc_stderr": s}``; a stderr it
    did not compute ("N/A") is None."""
    out = {}
    for key, value in raw.items():
        metric, sep, filt = key.partition(",")
        if not sep:
            continue  # alias, name, sample_len
        name = metric if filt == "none" else f"{metric},{filt}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            value = None if math.isnan(value) else value
        elif metric.endswith("_stderr"):
            value = None
        out[name] = value
    return out


@contextlib.contextmanager
def _kept_rng_state():
    """simple_evaluate seeds Python's, NumPy's and torch's global generators; the caller's are put back after."""
    import numpy as np

    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def format_table(result: dict) -> str:
    """``zero_shot``'s result as a table: task, metric, value, stderr (groups after their tasks)."""
    rows = [("task", "metric", "value", "stderr")]
    for section in ("tasks", "groups"):
        for name, metrics in result.get(section, {}).items():
            first = True
            for metric, value in metrics.items():
                base, sep, filt = metric.partition(",")
                if base.endswith("_stderr") or base in ("samples", "num_fewshot") or not isinstance(
                        value, (float, type(None))):
                    continue
                stderr = metrics.get(f"{base}_stderr{sep}{filt}")
                rows.append((name if first else "", metric, "-" if value is None else f"{value:.4f}",
                             "-" if stderr is None else f"{stderr:.4f}"))
                first = False
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}".rstrip()
                     for r in rows)
