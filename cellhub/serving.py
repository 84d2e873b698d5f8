"""Running a long-lived server: bounded disk, flat memory, a queue sized to the machine, clean shutdown.

Nothing here imports gradio (``app.py`` wires these into its Gradio server):

* :class:`CacheJanitor` keeps a folder of uploads and outputs under a size cap, oldest files first,
  never deleting a file younger than ``min_age`` seconds (a client may still be fetching it).
* :func:`limit_malloc_arenas` / :func:`trim_memory`: glibc gives each thread its own malloc arena
  and keeps freed pages; a server that decodes images in many threads grows without bound unless
  arenas are capped and free memory is handed back (``malloc_trim``).
* :func:`serving_plan`: workers, torch threads per worker and queue length from the cores and the
  measured time of one request, so the queue holds what the machine serves within a minute.
* :class:`InFlight` counts running requests, so a shutdown can wait for them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CacheJanitor", "InFlight", "ServingPlan", "serving_plan", "worker_plan", "forget_files",
           "limit_malloc_arenas", "trim_memory", "folder_bytes", "cpu_cores"]

logger = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc mallopt parameter


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas at ``n`` (for arenas created from now on); False off glibc."""
    lib = _libc()
    return bool(lib is not None and lib.mallopt(_M_ARENA_MAX, int(n)) == 1)


def trim_memory() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim(0)``); False off glibc."""
    lib = _libc()
    return bool(lib is not None and lib.malloc_trim(0))


def cpu_cores() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one): the one count that
    sizes the app's workers and the batch pipeline's decoding threads."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def folder_bytes(root: str | os.PathLike) -> int:
    """Bytes of the regular files under ``root`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue
    return total


@dataclass(frozen=True)
class ServingPlan:
    """How many requests run at once, with how many torch threads each, and how many may wait."""

    workers: int
    threads_per_worker: int
    queue_size: int
    request_seconds: float

    def describe(self) -> str:
        return (f"{self.workers} worker(s) x {self.threads_per_worker} torch thread(s), queue of "
                f"{self.queue_size} (one request ~{self.request_seconds * 1000:.0f} ms: about a minute of work)")


def worker_plan(cores: int | None = None, workers: int | None = None) -> tuple[int, int]:
    """``(workers, torch threads per worker)``: one worker per core (at most 8) unless given, and the
    cores shared out between the workers so that they never oversubscribe the CPU."""
    cores = max(1, cores or cpu_cores())
    w = max(1, workers if workers is not None else min(cores, 8))
    return w, max(1, cores // w)


def serving_plan(request_seconds: float, *, workers: int, threads_per_worker: int, queue_size: int | None = None,
                 backlog_seconds: float = 60.0, min_queue: int = 64, max_queue: int = 10_000) -> ServingPlan:
    """The queue holds what ``workers`` serve in ``backlog_seconds`` (at least ``min_queue``), unless
    ``queue_size`` is given; ``request_seconds`` is one request's time measured with this many threads."""
    if request_seconds <= 0 or not math.isfinite(request_seconds):
        raise ValueError(f"request_seconds must be a positive number, got {request_seconds!r}")
    q = queue_size if queue_size is not None else int(min(max_queue, max(min_queue,
                                                                          backlog_seconds * workers / request_seconds)))
    return ServingPlan(workers=workers, threads_per_worker=threads_per_worker, queue_size=max(1, q),
                       request_seconds=request_seconds)


class InFlight:
    """A thread-safe count of running requests (``with inflight: ...``), and a wait for zero."""

    def __init__(self) -> None:
        self._n = 0
        self._cond = threading.Condition()

    def __enter__(self) -> InFlight:
        with self._cond:
            self._n += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._n -= 1
            self._cond.notify_all()

    @property
    def count(self) -> int:
        return self._n

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request runs (True) or ``timeout`` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout=timeout)


class CacheJanitor:
    """Keep ``root`` (uploads and outputs) under ``max_bytes``.

    Every ``interval`` seconds: delete files older than ``max_age``; then, while the folder is over
    ``max_bytes``, delete the oldest files that are at least ``min_age`` seconds old; remove empty
    folders; call ``on_deleted(paths)`` (e.g. to forget them in the server's file registry); hand
    freed memory back to the OS. Run it in its own daemon thread with :meth:`start`.
    """

    def __init__(self, root: str | os.PathLike, max_bytes: int, *, min_age: float = 60.0, max_age: float = 900.0,
                 interval: float = 15.0, on_deleted: Callable[[list[str]], None] | None = None,
                 trim: bool = True) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes, self.min_age, self.max_age, self.interval = int(max_bytes), min_age, max_age, interval
        self.on_deleted = on_deleted
        self.trim = trim
        self.deleted_files = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _files(self) -> list[tuple[float, int, str]]:
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, p))  # Gradio touches a cached file it hands out again
        return sorted(out)

    def sweep(self, now: float | None = None) -> list[str]:
        """One pass; returns the deleted paths."""
        now = time.time() if now is None else now
        files = self._files()
        total = sum(size for _, size, _ in files)
        deleted: list[str] = []
        for stamp, size, path in files:  # oldest first
            age = now - stamp
            if age < self.min_age:
                break
            if age > self.max_age or total > self.max_bytes:
                try:
                    os.unlink(path)
                except OSError:
                    continue
                total -= size
                deleted.append(path)
        self._remove_empty_dirs()
        if deleted:
            self.deleted_files += len(deleted)
            if self.on_deleted is not None:
                self.on_deleted(deleted)
        if self.trim:
            trim_memory()
        return deleted

    def _remove_empty_dirs(self) -> None:
        for dirpath, dirs, files in os.walk(self.root, topdown=False):
            if Path(dirpath) != self.root and not dirs and not files:
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:  # a sweep must never take the server down
                logger.exception("cache sweep failed")

    def start(self) -> CacheJanitor:
        self._thread = threading.Thread(target=self._run, name="cellhub-cache-janitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def forget_files(registries: Iterable[set[str]], deleted: list[str]) -> None:
    """Drop ``deleted`` paths from each set (Gradio's per-component ``temp_files``)."""
    gone = set(deleted)
    for reg in registries:
        reg.difference_update(gone)
