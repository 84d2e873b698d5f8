"""Decode once: every image of a split resized to one size, stored as uint8 pixels in an Arrow file.

:func:`cache_resized` writes the file (keyed by the images' identity and the size) and memory-maps it
on later runs; :func:`pixels_array` reads its ``pixels`` column as one uint8 array without the
int64 widening ``datasets`` applies; :class:`ImageRowDataset` serves either column to a
``torch`` ``DataLoader`` through a model's transform (training and evaluation alike).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from ..cache import (atomic_write_json, default_cache_dir, file_identity, mark_used, read_json, update_with_files,
                     warn_if_large)
from .refs import local_files, undecoded

__all__ = ["cache_resized", "pixels_array", "ImageRowDataset", "CACHE_INTERPOLATION"]

#: how :func:`cache_resized` resamples: what every trained model saw, so training records it as
#: the model's interpolation (timm's ImageNet configs say bicubic; predicting with another
#: resampling than training's cost 1.8 points on PBC, RESULTS.md)
CACHE_INTERPOLATION = "bilinear"
_CACHE_RESAMPLE = PILImage.Resampling[CACHE_INTERPOLATION.upper()]

logger = logging.getLogger(__name__)


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        vals = [int(v) for v in size]
        if len(vals) != 2:
            raise ValueError(f"size must be an int or (height, width), got {size!r}.")
        h, w = vals
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size!r}.")
    return h, w


def _cover(im: PILImage.Image, w: int, h: int) -> PILImage.Image:
    """``im`` scaled to cover (w, h) and centre-cropped to it (a plain resize when the aspect matches)."""
    iw, ih = im.size
    scale = max(w / iw, h / ih)
    cw, ch = min(w / scale, iw), min(h / scale, ih)  # (rounding may overshoot the image by a hair)
    left, top = max((iw - cw) / 2, 0.0), max((ih - ch) / 2, 0.0)
    return im.resize((w, h), _CACHE_RESAMPLE, box=(left, top, left + cw, top + ch), reducing_gap=3.0)


def _crop_tag(spec: dict[str, Any]) -> str:
    """A cell-crop spec in a cache file name (``nucleus10``, ``nucleus10-pad``)."""
    return f"{spec['method']}{spec['side_rbc_radii']:g}" + (f"-{spec['border']}" if spec.get("border") else "")


def _cell_boxes(ds, spec: dict[str, Any], cache_root: Path, progress: bool) -> list[list[int]]:
    """The cell-centred crop box of every row (:func:`cellhub.transforms.cell_box`), found once per
    image file: boxes are kept in ``cache_root/cellboxes-<spec>.json`` keyed by path, size and
    content digest, so the folds of a cross-validation (each its own subset) only crop and resize.
    A file whose bytes changed gets its box again, which replaces the old one in the store."""
    from tqdm.auto import tqdm

    from ..transforms import cell_box

    store_path = cache_root / f"cellboxes-{_crop_tag(spec)}.json"
    store = read_json(store_path, {}, warn=True)
    store = store if isinstance(store, dict) else {}
    raw = undecoded(ds)
    boxes, added = [], 0
    by_path: dict[str, list[str]] = {}  # a file's keys: an edited file's old box goes when its new one comes
    for k in store:
        by_path.setdefault(k.rsplit("|", 2)[0], []).append(k)
    for row in tqdm(raw, total=len(raw), desc="finding the cells", unit="img", disable=not progress,
                    mininterval=1.0):
        x = row["image"]
        path, data = x.get("path"), x.get("bytes")
        ident = file_identity(path) if path and not data else None
        key = f"{path}|{ident[0]}|{ident[1]}" if ident else None
        if key and key in store:
            boxes.append(list(store[key]))
            continue
        with PILImage.open(io.BytesIO(data) if data else path) as im:
            box = list(cell_box(im.convert("RGB"), spec))
        boxes.append(box)
        if key:
            for stale in by_path.pop(path, []):
                store.pop(stale, None)
            store[key], added = box, added + 1
    if added:
        atomic_write_json(store_path, store)
    return boxes


def _dataset_key(ds) -> str:
    """A key that changes when the rows or their files change (path+size+content digest, or the fingerprint)."""
    from datasets import Image

    h = hashlib.sha1()
    h.update(json.dumps(ds.features.to_dict(), sort_keys=True, default=str).encode())
    if "image" in ds.column_names and isinstance(ds.features["image"], Image):
        paths = local_files(ds)
        if paths is not None:  # images are local files
            update_with_files(h, paths)
            h.update(json.dumps([list(ds[c]) for c in ("label", "group") if c in ds.column_names]).encode())
            return h.hexdigest()[:20]
    h.update(str(ds._fingerprint).encode())
    return h.hexdigest()[:20]


def cache_resized(ds, size: int | Sequence[int], cache_dir: str | os.PathLike | None = None, *,
                  keep_image: bool = False, num_proc: int | None = None, progress: bool = True,
                  cell_crop: Any = None):
    """Decode every image once, resized to ``size`` (int or (height, width)), as uint8 HWC ``pixels``.

    An image of another aspect ratio is scaled to cover ``size`` and centre-cropped, never
    stretched: the geometry of the models' eval transform (short side resized, centre crop), so
    that what training and its validation pass see is what ``evaluate`` and ``predict`` see.

    The result is written to an Arrow file under ``cache_dir`` (default
    :func:`default_cache_dir`/``resized``), keyed by the images and the size, so a second run
    (or the next epoch, or the next training run) memory-maps it instead of decoding JPEGs.
    ``image`` is dropped unless ``keep_image`` (keeping it would make every row decode again).

    ``cell_crop``: a model's cell-centred crop (:func:`cellhub.transforms.cell_crop`), taken from
    the original image before resizing.

    Read the arrays as uint8 with ``ds.with_format("numpy", dtype=np.uint8)`` (or
    ``with_format("torch", dtype=torch.uint8)``): ``datasets`` widens integer arrays to int64
    otherwise, eight times the memory. Plain ``ds[i]["pixels"]`` gives nested lists (slow).
    """
    from datasets import Array3D, Features, Image, disable_progress_bars, enable_progress_bars

    h, w = _size_hw(size)
    if "image" not in ds.column_names:
        raise ValueError(f"cache_resized needs an 'image' column; the dataset has {ds.column_names}.")
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_root = cache_root / "resized"
    cache_root.mkdir(parents=True, exist_ok=True)
    key = _dataset_key(ds)
    from ..transforms import cell_crop_spec, crop_padded

    spec = cell_crop_spec(cell_crop)
    crop_tag = f"-{_crop_tag(spec)}" if spec else ""
    cache_file = cache_root / f"{key}-{h}x{w}-fit{crop_tag}.arrow"  # "-fit": centre-cropped, not stretched
    feats = {k: v for k, v in ds.features.items() if keep_image or k != "image"}
    feats["pixels"] = Array3D(shape=(h, w, 3), dtype="uint8")
    features = Features(feats)

    def _resize(batch: dict[str, list]) -> dict[str, list]:
        out = []
        for k, im in enumerate(batch["image"]):
            im = im.convert("RGB")
            if spec:
                im = crop_padded(im, tuple(batch["_cell_box"][k]))
            if im.size != (w, h):
                im = _cover(im, w, h)
            out.append(np.asarray(im, dtype=np.uint8))
        return {"pixels": out}

    hit = cache_file.exists()
    if hit:
        logger.info("Using resized images cached in %s", cache_file)
        mark_used(cache_file)
    else:
        logger.info("Decoding %d images once at %dx%d%s into %s", len(ds), h, w,
                    " (cell-centred crops)" if spec else "", cache_file)
    src = ds.cast_column("image", Image(decode=True))
    drop = [] if keep_image else ["image"]
    if spec and not cache_file.exists():  # boxes found once per file (cached across subsets)
        src = src.add_column("_cell_box", _cell_boxes(ds, spec, cache_root, progress))
        drop.append("_cell_box")
    if not progress:
        disable_progress_bars()
    try:
        out = src.map(_resize, batched=True, batch_size=64, features=features, num_proc=num_proc,
                      remove_columns=drop, cache_file_name=str(cache_file),
                      load_from_cache_file=True, writer_batch_size=256, desc=f"resizing to {h}x{w}")
    finally:
        if not progress:
            enable_progress_bars()
    if not hit:
        warn_if_large(cache_root.parent)
    return out


def pixels_array(cached: Any) -> np.ndarray:
    """The ``pixels`` column of a :func:`cache_resized` split as one uint8 (N, H, W, 3) array,
    read straight from Arrow (``datasets`` formats Array3D uint8 columns as int64, 8x the memory)."""
    if getattr(cached, "_indices", None) is not None:
        cached = cached.flatten_indices()
    shape = tuple(getattr(cached.features["pixels"], "shape", None) or ())
    try:
        col = cached.data.column("pixels").combine_chunks()
        vals = getattr(col, "storage", col)
        for _ in range(len(shape)):
            vals = vals.flatten()
        out = vals.to_numpy(zero_copy_only=False)
        if shape and out.dtype == np.uint8 and out.size == len(cached) * int(np.prod(shape)):
            return out.reshape((len(cached), *shape))
    except Exception as exc:  # pragma: no cover - a different Arrow layout
        logger.debug("Arrow fast path failed (%s); converting row by row.", exc)
    return np.stack([np.asarray(r["pixels"], dtype=np.uint8) for r in cached.with_format("numpy")])


class ImageRowDataset:
    """Rows of a split -> ``transform(image)`` (and the label, when ``with_labels``): a map-style
    dataset for ``torch.utils.data.DataLoader`` (no torch import needed to define it).

    Reads the ``pixels`` column of a :func:`cache_resized` split when present (held in RAM when it
    fits in ``max_ram_bytes``, else memory-mapped), otherwise decodes the ``image`` column.
    """

    def __init__(self, ds: Any, transform: Any, *, with_labels: bool = True,
                 max_ram_bytes: int = 2 * 1024**3) -> None:
        self.transform = transform
        self.labels = np.asarray(ds["label"], dtype=np.int64) if with_labels else None
        self.pixels: np.ndarray | None = None
        self._rows: Any = None
        if "pixels" in ds.column_names:
            shape = getattr(ds.features["pixels"], "shape", None)  # Array3D from cache_resized; else unknown
            nbytes = len(ds) * int(np.prod(shape)) if shape else 0
            if nbytes <= max_ram_bytes:
                self.pixels = pixels_array(ds)
            else:
                self._rows = ds.with_format("numpy", columns=["pixels"])
            self._column = "pixels"
        elif "image" in ds.column_names:
            self._rows, self._column = ds, "image"
        else:
            raise ValueError(f"Need an 'image' or 'pixels' column; the split has {ds.column_names}.")
        self._n = len(ds)

    def __len__(self) -> int:
        return self._n

    def image(self, i: int) -> Any:
        """Row ``i`` as a uint8 HWC array or an RGB PIL image (before the transform)."""
        if self.pixels is not None:
            return self.pixels[i]
        x = self._rows[int(i)][self._column]
        if hasattr(x, "convert"):
            return x.convert("RGB")
        return np.asarray(x, dtype=np.uint8)  # datasets hands Array3D uint8 back as int64

    def __getitem__(self, i: int) -> Any:
        x = self.transform(self.image(i))
        return x if self.labels is None else (x, int(self.labels[i]))
