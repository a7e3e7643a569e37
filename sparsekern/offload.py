"""Calibration activations kept on disk (``--offload-activations DIR``): only the batch in use is in memory.

The pipeline keeps one activation tensor per calibration batch ([batch, seqlen, hidden]) and replaces each by the
layer's output after the layer's forward. For the largest models that list no longer fits anywhere (70B: 128
windows x 2048 tokens x 8192 x 2 bytes = 4 GiB per layer; 405B more), so :class:`DiskActivations` offers the same
list interface with its items stored as files:

- one raw file per batch in a fresh subfolder of DIR (``DIR/sparsekern-activations-XXXXXX/NNNNNN.bin``); the
  shape and dtype stay in memory, so a file is just the tensor's bytes, written and read with unbuffered bulk
  ``os.write``/``os.readv`` straight from/into the tensor's memory (no pickling, no extra copy on the CPU); items
  on an accelerator pass through one reused staging buffer of at most 64 MiB (pinned for CUDA);
- reading item b reads its file only, into fresh memory on :attr:`DiskActivations.device` (the prune device), with
  the stored dtype and shape; the returned tensor is the caller's: later writes never change it;
- replacing item b writes ``NNNNNN.bin.tmp`` and renames it over ``NNNNNN.bin`` (``os.replace``): a reader never
  sees half a file and the old bytes are dropped at once; deleting or clearing items deletes their files;
- :meth:`DiskActivations.close` (or leaving the ``with`` block) removes the subfolder, and so does a finalizer at
  garbage collection or interpreter exit if it was forgotten; DIR itself and anything else in it are never touched;
- a missing or read-only DIR, and a failed write (full disk), raise :class:`OffloadError` (an ``OSError``), which
  names DIR, the batch and the fix; a failed write leaves the list as it was.

Every ``acts[b]`` is a full read: code that wants only sizes uses :attr:`DiskActivations.nbytes` and
:meth:`DiskActivations.meta` (shape and dtype) instead, and a tensor on any device may be assigned (it is written
from where it is), so ``acts[b] = out`` needs no ``.to(acts[b].device)`` first.

Throughput on the development machine (2 shared CPU cores under load ~4, virtio disk, ext4, 23 GiB RAM; 16 items of
64 MiB, bf16, CPU device), 3 runs each: into the page cache, write 1.5-2.2 GiB/s and read 1.2-2.2 GiB/s (a run's
first GiB of writes 0.3 GiB/s); from the disk itself (``--cold``: fsync, then the pages are dropped before
reading) write 0.3-0.45 GiB/s and read 0.4-0.5 GiB/s, the sustained rate once the activations outgrow the page
cache. Measure a machine with::

    python -m sparsekern.offload DIR --mib 64 --items 16 [--cold]
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, MutableSequence
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

OPTION = "--offload-activations"
PREFIX = "sparsekern-activations-"
_STAGING = 64 << 20  # bytes of the staging buffer for items on an accelerator
_IO_CHUNK = 1 << 30  # bytes per os.write/os.readv call (Linux moves at most ~2 GiB per call)


class OffloadError(OSError):
    """The activation folder cannot be used or written; the message names the folder and the fix."""


@dataclass(frozen=True)
class _Item:
    name: str  # the file's name in the subfolder
    shape: torch.Size
    dtype: torch.dtype
    nbytes: int


def _remove_folder(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked child never deletes its parent's files
        shutil.rmtree(path, ignore_errors=True)


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        written = os.write(fd, data[:_IO_CHUNK])
        data = data[written:]


def _read_all(fd: int, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``fd``; returns the bytes read (fewer only at the end of the file)."""
    done = 0
    while done < len(buffer):
        got = os.readv(fd, [buffer[done:done + _IO_CHUNK]])
        if got == 0:
            break
        done += got
    return done


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's contents as a flat uint8 tensor (a view where it is contiguous already)."""
    return tensor.detach().reshape(-1).view(torch.uint8)


class DiskActivations(MutableSequence[torch.Tensor]):
    """A list of tensors stored as files in a fresh subfolder of ``directory``; items read back onto ``device``.

    Supports what the pipeline does with its activation list: ``acts[b]``, ``acts[b] = t``, ``len(acts)``,
    iteration, ``append``/``insert``/``extend``, ``del acts[b]``, ``clear()``; plus :attr:`device` (settable),
    :attr:`nbytes`, :meth:`meta` (shape and dtype without reading), :meth:`close` and ``with``.

    ``option`` is how the user named the folder, used in error messages (the API may pass
    ``"offload_activations="``).
    """

    def __init__(self, directory: str | os.PathLike, device: str | torch.device = "cpu", *,
                 option: str = OPTION):
        self._option = option
        self.directory = Path(directory)
        self._device = torch.device(device)
        if not self.directory.exists():
            raise OffloadError(f"sparsekern: {option} {self.directory}: no such folder: create it or choose "
                               "another folder")
        if not self.directory.is_dir():
            raise OffloadError(f"sparsekern: {option} {self.directory}: not a folder: choose a folder")
        try:
            path = tempfile.mkdtemp(prefix=PREFIX, dir=self.directory)
        except OSError as exc:
            raise self._error(f"cannot create a folder in it ({exc.strerror or exc}): make it writable or "
                              "choose another folder", exc) from exc
        self.path = Path(path)
        self._finalizer = weakref.finalize(self, _remove_folder, path, os.getpid())
        self._items: list[_Item] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._staging: torch.Tensor | None = None
        self._force_staging = False  # tests: run the accelerator path with CPU tensors

    # -- properties ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where read items land (the prune device); set it to move later reads elsewhere."""
        return self._device

    @device.setter
    def device(self, device: str | torch.device) -> None:
        self._device = torch.device(device)
        self._staging = None

    @property
    def nbytes(self) -> int:
        """Bytes of all items together (their size in memory, which is also their size on disk)."""
        return sum(item.nbytes for item in self._items)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def meta(self, index: int) -> torch.Tensor:
        """Item ``index`` as a tensor on the meta device: its shape and dtype, without reading the file."""
        item = self._items[self._index(index)]
        return torch.empty(item.shape, dtype=item.dtype, device="meta")

    # -- the sequence ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._read(i) for i in range(*index.indices(len(self)))]
        return self._read(self._index(index))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):  # one item in memory at a time (the caller's reference aside)
            yield self._read(i)

    def __setitem__(self, index, value: torch.Tensor) -> None:
        if isinstance(index, slice):
            raise TypeError("DiskActivations does not support slice assignment; assign items one by one")
        index = self._index(index)
        old = self._items[index]
        self._items[index] = self._write(index, value, old.name)  # renamed over the old file: it is dropped

    def insert(self, index: int, value: torch.Tensor) -> None:
        self._check_open()
        index = min(max(index + len(self) if index < 0 else index, 0), len(self))
        item = self._write(index, value, f"{next(self._ids):06d}.bin")
        self._items.insert(index, item)

    def __delitem__(self, index) -> None:
        self._check_open()
        if isinstance(index, slice):
            doomed = self._items[index]
            del self._items[index]
        else:
            index = self._index(index)
            doomed = [self._items.pop(index)]
        for item in doomed:
            (self.path / item.name).unlink(missing_ok=True)

    def clear(self) -> None:  # MutableSequence.clear would read every item (pop) before deleting it
        del self[:]

    def reverse(self) -> None:  # no reads or writes: the order lives in memory
        self._items.reverse()

    def extend(self, values: Iterable[torch.Tensor]) -> None:
        for value in values:
            self.append(value)

    def __contains__(self, value) -> bool:
        raise TypeError("DiskActivations does not support 'in' (tensors have no single truth value)")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} items, {self.nbytes / 2**20:.1f} MiB"
        return f"DiskActivations({str(self.path)!r}, device={str(self._device)!r}, {state})"

    # -- life cycle ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete the subfolder and every item in it (DIR itself stays). Idempotent."""
        self._items = []
        self._staging = None
        self._finalizer()

    def __enter__(self) -> DiskActivations:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError("DiskActivations cannot be pickled or copied: its files belong to one object")

    # -- internals -------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"DiskActivations in {self.directory} is closed")

    def _index(self, index: int) -> int:
        self._check_open()
        if not isinstance(index, int):
            index = index.__index__()
        n = len(self._items)
        if not -n <= index < n:
            raise IndexError(f"activation batch {index} out of range ({n} batches)")
        return index % n

    def _error(self, what: str, exc: OSError) -> OffloadError:
        error = OffloadError(f"sparsekern: {self._option} {self.directory}: {what}")
        error.errno = exc.errno
        return error

    def _staged(self) -> bool:
        return self._device.type != "cpu" or self._force_staging

    def _staging_buffer(self, nbytes: int) -> torch.Tensor:
        size = min(nbytes, _STAGING)
        if self._staging is None or self._staging.numel() < size:
            pin = self._device.type == "cuda"
            self._staging = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=pin)
        return self._staging

    def _write(self, index: int, value: torch.Tensor, name: str) -> _Item:
        self._check_open()
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"activation batch {index}: expected a torch.Tensor, got {type(value).__name__}")
        flat = _bytes_of(value)
        path = self.path / name
        tmp = path.with_name(name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                if flat.device.type == "cpu":
                    _write_all(fd, memoryview(flat.numpy()))
                else:
                    with self._lock:
                        staging = self._staging_buffer(flat.numel())
                        for start in range(0, flat.numel(), staging.numel()):
                            part = flat[start:start + staging.numel()]
                            staging[:part.numel()].copy_(part)
                            _write_all(fd, memoryview(staging[:part.numel()].numpy()))
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._error(f"writing batch {index} failed ({exc.strerror or exc}): free space or choose "
                              "another folder", exc) from exc
        return _Item(name, value.shape, value.dtype, flat.numel())

    def _read(self, index: int) -> torch.Tensor:
        item = self._items[index]
        path = self.path / item.name
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                if not self._staged():
                    # numpy's allocator asks for huge pages on large arrays: ~2x faster than torch.empty here,
                    # whose fresh memory is faulted in 4 KiB at a time
                    out = torch.from_numpy(numpy.empty(item.nbytes, dtype=numpy.uint8))
                    got = _read_all(fd, memoryview(out.numpy()))
                    extra = _read_all(fd, memoryview(bytearray(1)))
                    if got != item.nbytes or extra:
                        raise OSError(errno.EIO, f"{path} holds a different number of bytes than written")
                    if not item.nbytes:  # numpy gives an empty array stride 0, which .view() refuses
                        return torch.empty(item.shape, dtype=item.dtype)
                    return out.view(item.dtype).reshape(item.shape)
                out = torch.empty(item.shape, dtype=item.dtype, device=self._device)
                flat = _bytes_of(out)
                with self._lock:
                    staging = self._staging_buffer(item.nbytes)
                    for start in range(0, item.nbytes, staging.numel()):
                        size = min(staging.numel(), item.nbytes - start)
                        if _read_all(fd, memoryview(staging[:size].numpy())) != size:
                            raise OSError(errno.EIO, f"{path} is shorter than written")
                        flat[start:start + size].copy_(staging[:size])  # synchronous: staging is reused next
                return out
            finally:
                os.close(fd)
        except OSError as exc:
            raise self._error(f"reading batch {index} failed ({exc.strerror or exc}): its file was removed or "
                              "changed while in use; keep the folder untouched during the run", exc) from exc


def _benchmark(argv: list[str] | None = None) -> None:
    """Write then read ``--items`` tensors of ``--mib`` MiB each through a DiskActivations in DIR."""
    parser = argparse.ArgumentParser(prog="python -m sparsekern.offload", description=_benchmark.__doc__)
    parser.add_argument("directory")
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cold", action="store_true", help="drop the files from the page cache before reading")
    args = parser.parse_args(argv)
    numel = args.mib * 2**20 // 2
    source = torch.randn(numel, dtype=torch.float32).to(torch.bfloat16).to(args.device)
    total = args.items * args.mib / 1024
    for _ in range(args.repeats):
        with DiskActivations(args.directory, args.device) as acts:
            t0 = time.perf_counter()
            for _ in range(args.items):
                acts.append(source)
            t1 = time.perf_counter()
            if args.cold:
                for item in acts._items:
                    fd = os.open(acts.path / item.name, os.O_RDONLY)
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    os.close(fd)
            t2 = time.perf_counter()
            for b in range(len(acts)):
                assert acts[b].numel() == numel
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t3 = time.perf_counter()
        print(f"{args.items} x {args.mib} MiB: write {total / (t1 - t0):.2f} GiB/s, "
              f"read{' (cold)' if args.cold else ''} {total / (t3 - t2):.2f} GiB/s")


if __name__ == "__main__":
    _benchmark()
