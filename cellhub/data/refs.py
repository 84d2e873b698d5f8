"""Where a dataset's images are stored, read without decoding one.

A ``datasets`` image column decodes to PIL on every access. Code that needs only the files behind a
split (hashing, smear matching, cache keys, file names, sizes) reads them here instead: one Arrow read
of the column cast to ``Image(decode=False)``, which respects ``select()``/``shuffle()``/``filter()``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["undecoded", "image_refs", "image_paths", "local_files", "file_backed_paths"]


def undecoded(ds: Any, column: str = "image") -> Any:
    """``ds`` reduced to ``column``, cast so that a row gives ``{"path": ..., "bytes": ...}``."""
    from datasets import Image

    if column not in ds.column_names:
        raise ValueError(f"The dataset has no {column!r} column (columns: {ds.column_names}).")
    if not isinstance(ds.features[column], Image):
        raise ValueError(f"Column {column!r} holds {type(ds.features[column]).__name__}, not images.")
    return ds.select_columns([column]).cast_column(column, Image(decode=False))


def _struct(ds: Any, column: str) -> Any:
    import pyarrow as pa

    raw = undecoded(ds, column)
    if len(raw) == 0:
        return pa.array([], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    col = raw.with_format("arrow")[:][column]
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def image_refs(ds: Any, column: str = "image") -> list[dict[str, Any]]:
    """Each row's stored image as ``{"path": str | None, "bytes": bytes | None}``, in row order."""
    return _struct(ds, column).to_pylist()


def image_paths(ds: Any, column: str = "image") -> list[str | None]:
    """Each row's image file path (``None`` where the image is stored only as bytes), in row order."""
    return _struct(ds, column).field("path").to_pylist()


def local_files(ds: Any, column: str = "image") -> list[str] | None:
    """Every row's image file path when all of them are files on disk (no embedded bytes), else ``None``."""
    paths = file_backed_paths(ds, column)
    return paths if paths and len(paths) == len(ds) else None


def file_backed_paths(ds: Any, column: str = "image") -> list[str]:
    """The file paths of the rows whose image is not embedded (no bytes stored), in row order: what
    still lives on disk. The embedded bytes are never copied out of Arrow to find them."""
    import pyarrow.compute as pc

    col = _struct(ds, column)
    data, paths = col.field("bytes"), col.field("path")
    no_bytes = pc.fill_null(pc.equal(pc.binary_length(data), 0), True)
    has_path = pc.fill_null(pc.greater(pc.utf8_length(paths), 0), False)
    return paths.filter(pc.and_(no_bytes, has_path)).to_pylist()
