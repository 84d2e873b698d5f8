"""On-disk caches: where they live, how a file set is keyed, and writes that never leave half a file.

Every cellhub cache (image checks, smear matches, groups, resized pixels, CNN features) keys its
entries by *file identity* — path, size and a digest of the file's bytes — so an edited or replaced
file is never served from a stale entry, while a data set that is copied, re-synced or checked out
again (new modification times, same bytes) still finds its caches. A file's digest is read once per
change on disk: it is remembered by (path, size, mtime, ctime, inode) in ``digests/digests.sqlite``.
Writes go to a temporary file renamed into place, so a killed process leaves the previous complete
file or the new one, never a torn one.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "default_cache_dir",
    "file_identity",
    "content_digest",
    "update_with_files",
    "files_key",
    "json_default",
    "to_jsonable",
    "read_json",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "cached_json",
    "CACHE_KINDS",
    "CacheEntry",
    "cache_entries",
    "mark_used",
    "prune_cache",
    "warn_if_large",
]

logger = logging.getLogger(__name__)


def default_cache_dir(*parts: str) -> Path:
    """``$CELLHUB_CACHE`` or ``~/.cache/cellhub`` (joined with ``parts``): the root of every cellhub cache."""
    env = os.environ.get("CELLHUB_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "cellhub"
    return root.joinpath(*parts)


class _DigestMemo:
    """Content digests remembered by file stamp (path, size, mtime_ns, ctime_ns, inode): in memory, and
    in a SQLite file shared by every process (written in short batches, so parallel trainings do not
    wait on each other). Any SQLite trouble (read-only home, locked too long) falls back to memory."""

    FLUSH_EVERY = 2000

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.memory: dict[tuple, str] = {}
        self.pending: list[tuple] = []
        self.conn: sqlite3.Connection | None = None
        self.where: tuple[str, int] | None = None  # (db path, pid) the connection belongs to
        self.broken: set[str] = set()
        self.flushed = time.monotonic()

    def _db(self) -> sqlite3.Connection | None:
        path = str(default_cache_dir("digests", "digests.sqlite"))
        if self.where != (path, os.getpid()):
            self._flush()
            self.conn, self.where = None, (path, os.getpid())  # a forked child opens its own
            if path not in self.broken:
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=OFF")
                    # one row per path (its latest stamp): the file stays as large as the set of files seen
                    conn.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, mtime_ns INT,"
                                 " ctime_ns INT, ino INT, digest TEXT)")
                    self.conn = conn
                except (OSError, sqlite3.Error) as exc:
                    self._give_up(path, exc)
        return self.conn

    def _give_up(self, path: str, exc: Exception) -> None:
        logger.warning("File digests are not remembered on disk (%s: %s); files are read again by each run.", path, exc)
        self.broken.add(path)
        self.conn = None

    def _flush(self) -> None:
        self.flushed = time.monotonic()
        if self.conn is None or not self.pending:
            self.pending.clear()
            return
        try:
            with self.conn:
                self.conn.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", self.pending)
        except sqlite3.Error as exc:
            self._give_up(self.where[0] if self.where else "?", exc)
        self.pending.clear()

    def flush(self) -> None:
        with self.lock:
            if self.where is not None and self.where[1] == os.getpid():
                self._flush()

    def get(self, path: str | os.PathLike) -> tuple[int, str]:
        """``(size, digest)``; raises ``OSError`` when the file cannot be stat'ed or read."""
        st = os.stat(path)
        stamp = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        with self.lock:
            hit = self.memory.get(stamp)
            if hit is not None:
                return st.st_size, hit
            conn = self._db()
            if conn is not None:
                try:
                    row = conn.execute("SELECT digest FROM files WHERE path=? AND size=? AND mtime_ns=? AND ctime_ns=?"
                                       " AND ino=?", stamp).fetchone()
                except sqlite3.Error as exc:
                    self._give_up(self.where[0] if self.where else "?", exc)
                    row = None
                if row is not None:
                    self.memory[stamp] = row[0]
                    return st.st_size, row[0]
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        with self.lock:
            self.memory[stamp] = digest
            if self.conn is not None:
                self.pending.append((*stamp, digest))
                if len(self.pending) >= self.FLUSH_EVERY or time.monotonic() - self.flushed > 5:
                    self._flush()
        return st.st_size, digest


_DIGESTS = _DigestMemo()
atexit.register(_DIGESTS.flush)


def content_digest(path: str | os.PathLike) -> str:
    """A hex digest of the file's bytes (BLAKE2b, 128 bits), read once per change of the file on disk.

    Raises ``OSError`` when the file cannot be stat'ed or read.
    """
    return _DIGESTS.get(path)[1]


def file_identity(path: str | os.PathLike) -> tuple[int, str] | None:
    """``(size, content digest)`` of a file, or ``None`` when it cannot be read.

    The same bytes give the same identity wherever and whenever the file was written: a re-synced or
    copied data set keeps its cache entries; an edited one does not."""
    try:
        return _DIGESTS.get(path)
    except OSError:
        return None


def update_with_files(h: Any, paths: Iterable[str | os.PathLike], *, resolve: bool = False) -> Any:
    """Feed ``path|size|digest;`` of every path into the hash object ``h`` (in the order given).

    Raises ``OSError`` for a path that does not exist (a key over missing files means nothing).
    """
    for p in paths:
        name = str(Path(p).resolve()) if resolve else str(p)
        size, digest = _DIGESTS.get(p)
        h.update(f"{name}|{size}|{digest};".encode())
    _DIGESTS.flush()
    return h


def files_key(paths: Iterable[str | os.PathLike], *, resolve: bool = False, length: int = 20,
              algorithm: str = "sha1") -> str:
    """A short hex key that changes when any file of ``paths`` (or the list itself) changes."""
    return update_with_files(hashlib.new(algorithm), paths, resolve=resolve).hexdigest()[:length]


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for what cellhub stores: numpy scalars/arrays, paths, sets, tuples."""
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):  # numpy arrays and scalars, torch tensors
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (a deep copy)."""
    return json.loads(json.dumps(obj, default=json_default))


def read_json(path: str | os.PathLike, default: Any = None, *, warn: bool = True) -> Any:
    """The JSON in ``path``, or ``default`` when it is missing or unreadable (logged when ``warn``)."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        if warn:
            logger.warning("Ignoring unreadable %s: %s", path, exc)
        return default


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, else removed.

    For writers that take a file name (``safetensors.save_file``, ``json.dump`` to an open file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = None) -> Path:
    """Write ``data`` as JSON (numpy values and paths converted) to ``path`` atomically."""
    text = json.dumps(data, indent=indent, default=json_default)
    return atomic_write_text(path, text + ("\n" if indent is not None else ""))


def cached_json(path: Path | None, compute: Any, *, what: str, valid: Any = None) -> Any:
    """The JSON cached at ``path`` if present (and ``valid(value)``), else ``compute()``, stored there.

    ``path=None`` disables the cache. A cache that cannot be written is logged, not raised.
    """
    if path is not None:
        hit = read_json(path)
        if hit is not None and (valid is None or valid(hit)):
            logger.info("%s loaded from cache %s", what, path)
            mark_used(path)
            return hit
    value = compute()
    if path is not None:
        try:
            atomic_write_json(path, value)
        except OSError as exc:
            logger.warning("Could not cache %s in %s: %s", what, path, exc)
    return value


# ------------------------------------------------------------------------------ upkeep
#: the folders cellhub writes under its cache root, and what each holds; upkeep touches nothing else
CACHE_KINDS = {
    "resized": "decoded training images (one Arrow file per data set, size and crop)",
    "hf-datasets": "datasets' own cache of local image folders",
    "validated": "image checks of data set folders",
    "groups": "patient / field groups of data sets",
    "smears": "crop-to-field matches of the Kaggle crops",
    "features": "CNN features for the SVM baseline",
    "weights": "ImageNet weights converted from an installed package",
    "digests": "digests of data files' bytes, so a copied or re-synced data set finds its caches",
}
#: ``warn_if_large`` speaks above this many bytes
WARN_BYTES = 10 * 1024 ** 3


@dataclass(frozen=True)
class CacheEntry:
    """One item of a cache folder (a file, or a folder counted whole): its size and when it was last used."""

    kind: str
    path: Path
    size: int
    last_used: float  # newest modification time of its files (``mark_used`` refreshes it on a hit)


def _walk_size(path: Path) -> tuple[int, float]:
    if not path.is_dir():
        st = path.stat()
        return st.st_size, st.st_mtime
    size, newest = 0, path.stat().st_mtime
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(dirpath, name))
                size, newest = size + st.st_size, max(newest, st.st_mtime)
    return size, newest


def cache_entries(root: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Every item in the known cache folders (``CACHE_KINDS``) under ``root``, least recently used first."""
    root = Path(root).expanduser() if root is not None else default_cache_dir()
    out = []
    for kind in CACHE_KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        for item in folder.iterdir():
            with contextlib.suppress(OSError):  # removed meanwhile by another process
                out.append(CacheEntry(kind, item, *_walk_size(item)))
    return sorted(out, key=lambda e: (e.last_used, str(e.path)))


def mark_used(path: str | os.PathLike) -> None:
    """Refresh a cache file's time so upkeep (``prune_cache(older_than_days=)``) sees it was used."""
    with contextlib.suppress(OSError):
        os.utime(path)


def prune_cache(root: str | os.PathLike | None = None, *, kinds: Iterable[str] | None = None,
                older_than_days: float | None = None, max_bytes: int | None = None, clear: bool = False,
                dry_run: bool = False, now: float | None = None) -> tuple[list[CacheEntry], list[tuple[CacheEntry, str]]]:
    """Remove cache items, least recently used first; returns ``(removed, failed)`` (``failed``: item, why).

    ``clear`` removes every item of ``kinds`` (default: all of ``CACHE_KINDS``); ``older_than_days``
    those not used for that long; ``max_bytes`` the oldest until the rest fits. Nothing outside the
    known folders is touched, and every item is rebuilt by the next run that needs it.
    """
    if not (clear or older_than_days is not None or max_bytes is not None):
        raise ValueError("say what to remove: clear=True, older_than_days=N or max_bytes=N")
    if (older_than_days is not None and older_than_days < 0) or (max_bytes is not None and max_bytes < 0):
        raise ValueError("older_than_days and max_bytes must be >= 0")
    kinds = list(CACHE_KINDS) if kinds is None else list(kinds)
    unknown = sorted(set(kinds) - set(CACHE_KINDS))
    if unknown:
        raise ValueError(f"unknown cache kind(s) {unknown}; choose from {sorted(CACHE_KINDS)}")
    entries = [e for e in cache_entries(root) if e.kind in kinds]
    cutoff = (now if now is not None else time.time()) - 86400 * older_than_days if older_than_days is not None else None
    left = sum(e.size for e in entries)
    chosen = []
    for e in entries:  # oldest first
        if clear or (cutoff is not None and e.last_used < cutoff) or (max_bytes is not None and left > max_bytes):
            chosen.append(e)
            left -= e.size
    removed, failed = [], []
    for e in chosen:
        try:
            if not dry_run:
                shutil.rmtree(e.path) if e.path.is_dir() else e.path.unlink()
            removed.append(e)
        except OSError as exc:  # e.g. a file another process has open on Windows
            failed.append((e, str(exc)))
    return removed, failed


def warn_if_large(root: str | os.PathLike | None = None, limit: int = WARN_BYTES) -> int:
    """Log a warning with the upkeep command when the cache holds more than ``limit`` bytes; returns its size."""
    total = sum(e.size for e in cache_entries(root))
    if total > limit:
        logger.warning("The cellhub cache holds %.1f GB. `python -m cellhub cache` lists it; `python -m cellhub "
                       "cache --older-than 30` frees what no run has used for 30 days.", total / 1024 ** 3)
    return total
