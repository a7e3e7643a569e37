"""Distributed pruning over ``torch.distributed``: calibration samples split across ranks, linears across owners.

Launched with ``torchrun --nproc-per-node N [--nnodes M ...] -m sparsekern prune ...`` (the CLI joins the process
group: NCCL when it prunes on CUDA, Gloo on the CPU), or from Python by calling ``sparsekern.prune`` in every rank of
an initialized process group. Per decoder layer (``pipeline.prune_layers`` calls the methods of :class:`Ranks`):

1. every rank forwards its own contiguous run of calibration batches (:meth:`Ranks.shard`), so each sample sees the
   batch it would see in one process, and accumulates the layer's statistics (Hessians, Wanda norms, moments) over it;
2. every linear has one owner, chosen by cost (:func:`assign_owners`: longest-processing-time bin packing on
   rows * cols^2 + cols^3, SparseGPT's sweep plus its factorization), so different ranks prune different linears at
   once; a statistic goes to the one owner of its input group with ``reduce``, or to all ranks with ``all_reduce``
   when its linears have several owners (every owner then holds the same bits). Every statistic in ``prune.stats`` is a
   count-weighted mean, so ranks combine as sum(count_r * value_r) / sum(count_r);
3. each owner prunes its linears and broadcasts the new weights; every rank then computes its samples' inputs to the
   next layer. Only rank 0 writes the checkpoint and the resume state.

Failures: a rank that raises records its error in the job's store (the ``torch.distributed`` key-value store of the
default group) before it exits; a rank that dies or hangs stops answering. The others' next collective then fails
(Gloo: at once when the peer's process ended, after the group's timeout when it hangs) and they raise
:class:`RankFailure` naming the rank, the layer and the fix, from the progress marks and heartbeats every rank keeps
in the store. Resuming: rank 0's state holds the finished layers (not the activations, which live on every rank);
a rerun replays those layers' forwards on each rank's samples, with the weights rank 0 broadcasts, and continues.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

HEARTBEAT_S = 2.0  # how often each rank tells the store it is alive
_KEY = "sparsekern"
_CURRENT = None  # (process group, its Ranks): see Ranks.current

__all__ = ["RankFailure", "Ranks", "assign_owners", "joined_process_group", "linear_cost", "split_batches"]


class RankFailure(RuntimeError):
    """Another rank failed, died or hung: the message names it, the layer, and how to resume."""


def linear_cost(rows: int, cols: int) -> float:
    """Relative work of pruning one [rows, cols] linear: SparseGPT's sweep (rows * cols^2) plus its factorization of
    the cols x cols Hessian (cols^3). Score methods are cheaper but scale the same way between linears."""
    return float(rows) * cols * cols + float(cols) ** 3


def assign_owners(costs: Mapping[str, float], world: int) -> dict[str, int]:
    """{name: rank}: each item to the least loaded rank, largest first (LPT: within 4/3 of the best makespan).
    Deterministic (ties by name, then rank), so every rank computes the same answer without communicating."""
    loads = [0.0] * world
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += costs[name]
    return owners


@contextlib.contextmanager
def joined_process_group(device: torch.device, timeout_s: float) -> Iterator[tuple[torch.device, Ranks | None]]:
    """(this rank's device, its :class:`Ranks`) for the CLI: under torchrun (``WORLD_SIZE`` > 1 in the environment)
    joins the process group, unless one exists (NCCL when ``device`` is CUDA, each rank on ``cuda:LOCAL_RANK``;
    else Gloo) and leaves it at the end; in one process, (device, None). An error raised inside is recorded for the
    other ranks' messages."""
    import torch.distributed as dist

    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        created = True
    ranks = Ranks.current()
    try:
        with ranks if ranks is not None else contextlib.nullcontext():
            try:
                yield device, ranks
            except BaseException as exc:
                if ranks is not None:
                    ranks.report_error(exc)
                raise
    finally:
        if created:
            dist.destroy_process_group()


def split_batches(batches: list, rank: int, world: int) -> list:
    """Rank ``rank``'s contiguous run of ``batches`` (the first ``len % world`` ranks get one more): each sample is
    forwarded in the batch it has in one process, so its activations are the same bits."""
    if len(batches) < world:
        raise ValueError(f"{world} ranks but only {len(batches)} calibration batch(es): every rank needs at least one; "
                         "lower --batch-size or raise --nsamples")
    base, extra = divmod(len(batches), world)
    start = rank * base + min(rank, extra)
    return batches[start:start + base + (rank < extra)]


class Ranks:
    """This process's view of a distributed pruning run: rank, world size, collectives with failure diagnosis.

    Use as a context manager (starts and stops the heartbeat). ``bytes_moved`` counts the payload of every
    collective this rank took part in (a statistic or a weight counted once per collective, all_reduce twice)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        self.bytes_moved = 0
        self._seq = 0
        self._where = "starting"
        self._store = _default_store()
        self._stop = threading.Event()
        self._heart: threading.Thread | None = None
        self._depth = 0  # nested ``with`` blocks (the CLI's and the pruning loop's): one heartbeat
        if self.backend == "nccl":
            self.comm_device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.comm_device = torch.device("cpu")

    @classmethod
    def current(cls, distributed: bool | None = None) -> Ranks | None:
        """The Ranks of the default process group when ``distributed`` (None: when one with more than one rank is
        initialized), else None. One per group and process, so its count of collectives matches the other ranks'."""
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and not active:
            raise ValueError("distributed=True needs an initialized torch.distributed process group with more than "
                             "one rank (torchrun, or torch.distributed.init_process_group)")
        if not active or distributed is False:
            return None
        global _CURRENT
        if _CURRENT is None or _CURRENT[0] is not dist.group.WORLD:
            _CURRENT = (dist.group.WORLD, cls())
        return _CURRENT[1]

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # -- heartbeat and progress marks --------------------------------------------------------------------------

    def __enter__(self) -> Ranks:
        self._depth += 1
        if self._store is not None and self._heart is None:
            self._stop.clear()
            self._heart = threading.Thread(target=self._beat, name="sparsekern-heartbeat", daemon=True)
            self._heart.start()
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self._heart is not None:
            self._stop.set()
            self._heart.join(timeout=HEARTBEAT_S * 2)
            self._heart = None

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._set(f"alive/{self.rank}", f"{time.time():.3f}")
            self._stop.wait(HEARTBEAT_S)

    def _set(self, key: str, value: str) -> None:
        try:
            self._store.set(f"{_KEY}/{key}", value)
        except Exception:  # noqa: BLE001 - the store is only for diagnosis; a dead store shows up in collectives
            pass

    def _get(self, key: str) -> str | None:
        try:
            if not self._store.check([f"{_KEY}/{key}"]):
                return None
            return self._store.get(f"{_KEY}/{key}").decode()
        except Exception:  # noqa: BLE001
            return None

    def mark(self, where: str) -> None:
        """Say what this rank is doing now (for the others' failure messages)."""
        self._where = where
        self._set(f"at/{self.rank}", f"{self._seq}|{where}")

    def report_error(self, exc: BaseException) -> None:
        """Record this rank's own error where the other ranks will look for it, before this process exits."""
        if not isinstance(exc, RankFailure):
            text = str(exc).splitlines()[0] if str(exc) else ""
            self._set(f"error/{self.rank}", f"{self._where}: {type(exc).__name__}: {text}"[:1000])

    # -- collectives -------------------------------------------------------------------------------------------

    def _collective(self, what: str, fn: Callable[[], Any]) -> Any:
        self._seq += 1
        self.mark(what)
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - Gloo/NCCL raise RuntimeError subclasses (DistBackendError...)
            raise RankFailure(self._diagnose(what, exc)) from None

    def _diagnose(self, what: str, exc: BaseException) -> str:
        """The message for a collective that failed: which rank stopped, where, and how to go on."""
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if self._store is None:
            return (f"rank {self.rank}: {what} failed ({detail}); another rank failed or stopped responding: see "
                    "its output; rerun the same command to resume from the last finished layer")
        time.sleep(HEARTBEAT_S * 2.5)  # long enough that a dead rank's heartbeat is visibly stale
        now = time.time()
        blamed = []
        for rank in range(self.world):
            if rank == self.rank:
                continue
            error = self._get(f"error/{rank}")
            at = self._get(f"at/{rank}")
            seq, _, where = (at or "0|starting").partition("|")
            beat = self._get(f"alive/{rank}")
            if error:
                blamed.append(f"rank {rank} failed at {error}")
            elif beat is None or now - float(beat) > HEARTBEAT_S * 2:
                blamed.append(f"rank {rank} stopped responding (its process ended or hung) at {where}")
            elif int(seq) < self._seq:
                blamed.append(f"rank {rank} did not reach this step in time (hung or much slower: it is at {where})")
        if not blamed:
            store_ok = self._get(f"alive/{self.rank}") is not None
            blamed.append("another rank stopped responding" if store_ok else
                          "lost contact with the job's store (rank 0 or the launcher hosting it ended)")
        return (f"rank {self.rank}: {what} failed ({detail}): {'; '.join(blamed)}. The whole job stops; rerun the "
                "same command to resume from the last finished layer (a hang within the timeout: raise "
                "--dist-timeout)")

    def _comm(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.device == self.comm_device else tensor.to(self.comm_device)

    def barrier(self, what: str) -> None:
        self._collective(what, lambda: self.dist.barrier(group=self.group))

    def broadcast_object(self, value: Any, src: int, what: str) -> Any:
        box = [value if self.rank == src else None]
        self._collective(what, lambda: self.dist.broadcast_object_list(box, src=src, group=self.group,
                                                                       device=self.comm_device))
        return box[0]

    def all_gather_objects(self, value: Any, what: str) -> list:
        out: list = [None] * self.world
        self._collective(what, lambda: self.dist.all_gather_object(out, value, group=self.group))
        return out

    def shard(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's share of the calibration batches (:func:`split_batches`)."""
        return split_batches(batches, self.rank, self.world)

    def reduce_stats(self, stats: list, owners: list[set[int]], where: str) -> None:
        """Combine each input group's statistic over the ranks, in place, on the group's owners (``owners[i]``: the
        ranks owning a linear of group i). Ranks that own none of a group's linears keep a meaningless value."""
        parts = [list(_parts(stat)) for stat in stats]
        counts = torch.tensor([float(part.count) for group in parts for part in group], dtype=torch.float64,
                              device=self.comm_device)
        local = counts.clone()
        self._collective(f"{where}: statistics' row counts", lambda: self.dist.all_reduce(counts, group=self.group))
        self.bytes_moved += counts.numel() * counts.element_size() * 2
        index = 0
        for group_parts, group_owners, stat in zip(parts, owners, stats):
            tensors = []
            for part in group_parts:
                share = float(local[index] / counts[index]) if counts[index] > 0 else 0.0
                part.count = int(counts[index])
                index += 1
                for _, value in sorted(vars(part).items()):
                    if isinstance(value, torch.Tensor):
                        tensors.append(value.mul_(share))
            flat = torch.cat([self._comm(value.reshape(-1)) for value in tensors])
            what = f"{where}: {getattr(stat, 'where', 'statistics')} to rank(s) {sorted(group_owners)}"
            if len(group_owners) == 1:
                (owner,) = group_owners
                self._collective(what, lambda: self.dist.reduce(flat, dst=owner, group=self.group))
                self.bytes_moved += flat.numel() * flat.element_size()
            else:
                self._collective(what, lambda: self.dist.all_reduce(flat, group=self.group))
                self.bytes_moved += 2 * flat.numel() * flat.element_size()
            offset = 0
            for value in tensors:
                value.copy_(flat[offset:offset + value.numel()].view_as(value))
                offset += value.numel()

    def broadcast_weights(self, weights: Iterable[tuple[str, torch.Tensor, int]]) -> None:
        """Send each (name, parameter tensor, owner) from its owner to every rank, in place."""
        for name, tensor, owner in weights:
            if not tensor.is_contiguous():
                raise ValueError(f"{name}: its weight is not contiguous; it cannot be broadcast in place")
            buffer = tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor.view(torch.int16) \
                if tensor.element_size() == 2 else tensor  # Gloo moves 2-byte floats as plain 16-bit words
            on_comm = self._comm(buffer)
            self._collective(f"{name}: weights from rank {owner}",
                             lambda: self.dist.broadcast(on_comm, src=owner, group=self.group))
            if on_comm is not buffer:
                buffer.copy_(on_comm)
            self.bytes_moved += buffer.numel() * buffer.element_size()


def _parts(stat) -> Iterable:
    """The running statistics inside a layer statistic (``prune.stats.LayerStats``) or the statistic itself."""
    return stat.parts.values() if hasattr(stat, "parts") else [stat]


def _default_store():
    """The default process group's key-value store (private API, present since torch 1.x), or None."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001
        return None
