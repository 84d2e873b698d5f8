"""On-disk caches: where they live, how a file set is keyed, and writes that never leave half a file.

Every cellhub cache (image checks, smear matches, groups, resized pixels, CNN features) keys its
entries by *file identity* — path, size and modification time — so an edited or replaced file is
never served from a stale entry, and writes go to a temporary file renamed into place, so a
killed process leaves the previous complete file or the new one, never a torn one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "default_cache_dir",
    "file_identity",
    "update_with_files",
    "files_key",
    "json_default",
    "to_jsonable",
    "read_json",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_json",
    "cached_json",
]

logger = logging.getLogger(__name__)


def default_cache_dir(*parts: str) -> Path:
    """``$CELLHUB_CACHE`` or ``~/.cache/cellhub`` (joined with ``parts``): the root of every cellhub cache."""
    env = os.environ.get("CELLHUB_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "cellhub"
    return root.joinpath(*parts)


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a file, or ``None`` when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def update_with_files(h: Any, paths: Iterable[str | os.PathLike], *, resolve: bool = False) -> Any:
    """Feed ``path|size|mtime_ns;`` of every path into the hash object ``h`` (in the order given).

    Raises ``OSError`` for a path that does not exist (a key over missing files means nothing).
    """
    for p in paths:
        name = str(Path(p).resolve()) if resolve else str(p)
        st = os.stat(p)
        h.update(f"{name}|{st.st_size}|{st.st_mtime_ns};".encode())
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
            return hit
    value = compute()
    if path is not None:
        try:
            atomic_write_json(path, value)
        except OSError as exc:
            logger.warning("Could not cache %s in %s: %s", what, path, exc)
    return value
