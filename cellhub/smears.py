"""Attribute blood-cell crops to the full smear they were cut from, for grouped validation.

Why: the Kaggle "Blood Cell Images" TRAIN split holds ~10,000 crops that are augmented copies
(rotations, shears, flips, shifts, zoom, padding) of only ~276 white cells. A validation split drawn
at random puts copies of one cell on both sides and means nothing. File names do not identify the
source, but the source smears ship with the download (``dataset-master/JPEGImages``), so every crop
can be traced back to its smear geometrically, and splits grouped by smear.

:func:`match_crops_to_smears` (strong, needs the smears)
    1. Each smear is downscaled (``smear_scale``) and described with RootSIFT local features
       (scale and rotation invariant); all descriptors go into one FLANN kd-tree index.
    2. Each crop is downscaled (``crop_scale``); black padding from the augmentation is masked
       out; its descriptors vote (Lowe ratio test) for smears. SIFT is not mirror invariant, so a
       crop that does not match well is also tried mirrored (the crops include flips).
    3. Geometric check: for the ``candidates`` smears with most votes, a full affine transform
       (rotation, shear, zoom, shift) is fitted with RANSAC (``cv2.estimateAffine2D``); the smear
       with most inliers wins if it has at least ``min_inliers`` and a sane scale.
    4. Crops still unmatched are retried once against dense, uncapped full-resolution smear
       features (crops zoomed *into* a small part of a smear need them); then ``None``.
    Results are cached as JSON under ``cache_dir`` (default ``$CELLHUB_CACHE/smears`` or
    ``~/.cache/cellhub/smears``), one file per smear set and parameter set, keyed by the crop's
    absolute path with its size and content digest: a second call on unchanged files does no image work.
    Unreadable crops or smears are logged and skipped (a crop maps to ``None``), never a crash.
    On the real Kaggle TRAIN split (9,957 crops, 366 smears) 99.85% of the crops are attributed
    to 276 distinct smears (75/27/16/158 per class), all agreeing with ``labels.csv``; the rest are
    the copies of one cell whose smear is not in the download. About 7 minutes on one core, once
    (``bench/smear_matching.py``, ``bench/smears_notes.md``).

    >>> groups = match_crops_to_smears(sorted(Path("TRAIN").glob("*/*.jpeg")),
    ...                                "dataset-master/dataset-master/JPEGImages")  # doctest: +SKIP

:func:`fallback_groups` (weaker, crops only)
    When the smears are not available, crops are grouped with one another: the same features and
    geometric check, applied crop against crop within each class folder; each crop joins the group
    of the first earlier "exemplar" crop it verifiably matches, or starts a new group. Copies of
    one cell mostly share a group, but two copies whose visible areas overlap too little can end up
    in different groups (over-splitting lets some copies leak across a split). It logs a warning.

:func:`smear_fields` (optional, stricter grouping)
    Some smears are consecutive frames of the same microscope field, so one physical cell can be
    in two smears. This maps each smear id to a field id (connected components of smears that
    verifiably overlap); grouping by field instead of smear removes that last leak.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from . import cache
from .images import IMAGE_EXTENSIONS, is_image_file

__all__ = [
    "MatchParams",
    "match_crops_to_smears",
    "fallback_groups",
    "smear_fields",
    "default_cache_dir",
]

logger = logging.getLogger(__name__)

_CACHE_VERSION = 2  # 2: files known by size and content digest (1: size and mtime)
_FLUSH_EVERY = 1000  # crops between cache writes, so an interrupted run keeps its work


@dataclass(frozen=True)
class MatchParams:
    """Tuning knobs of the matcher (part of the cache key)."""

    smear_scale: float = 0.5  # smears are downscaled by this before feature extraction
    crop_scale: float = 0.75  # crops likewise (Kaggle crops are ~0.5x zoomed smear regions)
    smear_features: int = 800  # cap on keypoints per smear
    crop_features: int = 300  # cap on keypoints per crop
    contrast_threshold: float = 0.02  # SIFT; lower than OpenCV's 0.04: smears are soft
    ratio: float = 0.8  # Lowe ratio test
    candidates: int = 3  # smears verified geometrically per crop (and per orientation)
    min_inliers: int = 12  # RANSAC inliers needed to accept a match
    ransac_threshold: float = 8.0  # reprojection error in full-resolution target pixels
    min_scale: float = 0.15  # accepted zoom range of the fitted affine (crop -> target)
    max_scale: float = 8.0
    # rescue pass for crops the first pass could not match (e.g. crops zoomed *into* a small region
    # of the smear): dense, uncapped features at full resolution. ``None`` disables it.
    rescue_smear_scale: float | None = 1.0
    rescue_crop_scale: float = 1.0
    rescue_smear_features: int = 0  # 0 = no cap
    rescue_contrast_threshold: float = 0.01

    def rescue_params(self) -> "MatchParams":
        """The parameters of the dense rescue pass."""
        return replace(
            self,
            smear_scale=self.rescue_smear_scale or self.smear_scale,
            crop_scale=self.rescue_crop_scale,
            smear_features=self.rescue_smear_features,
            contrast_threshold=self.rescue_contrast_threshold,
            rescue_smear_scale=None,
        )


@dataclass(frozen=True)
class _Match:
    target: int | None
    inliers: int
    runner_up: int
    flipped: bool


# --------------------------------------------------------------------------- image helpers


def _read_gray(path: str | os.PathLike) -> np.ndarray | None:
    """Grayscale uint8 image, or None (logged) when the file is missing or cannot be decoded."""
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
        image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    except (OSError, ValueError, cv2.error) as exc:
        logger.warning("cannot read image %s (%s); skipped", path, exc)
        return None
    if image is None or image.size == 0:
        logger.warning("cannot decode image %s (corrupt or not an image); skipped", path)
        return None
    return image


def _padding_mask(gray: np.ndarray) -> np.ndarray:
    """255 where the image has content, 0 on (and just inside) black augmentation padding."""
    mask = (gray > 8).astype(np.uint8)
    mask = cv2.erode(mask, np.ones((7, 7), np.uint8))
    return mask * 255


def _root_sift(desc: np.ndarray) -> np.ndarray:
    desc = desc.astype(np.float32)
    desc /= desc.sum(axis=1, keepdims=True) + 1e-7
    return np.sqrt(desc)


class _Extractor:
    """SIFT at a given scale; points are returned in full-resolution pixel coordinates."""

    def __init__(self, n_features: int, scale: float, contrast_threshold: float):
        self.scale = scale
        self.sift = cv2.SIFT_create(nfeatures=n_features, contrastThreshold=contrast_threshold)

    def __call__(self, gray: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        if self.scale != 1.0:
            gray = cv2.resize(gray, None, fx=self.scale, fy=self.scale, interpolation=cv2.INTER_AREA)
            if mask is not None:
                mask = cv2.resize(mask, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_NEAREST)
        keypoints, desc = self.sift.detectAndCompute(gray, mask)
        if desc is None or not keypoints:
            return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
        points = np.float32([kp.pt for kp in keypoints]) / self.scale
        return points, _root_sift(desc)




# --------------------------------------------------------------------------- feature bank


class _FeatureBank:
    """Descriptors of many target images in one FLANN index, with a RANSAC-verified lookup."""

    def __init__(self, points: list[np.ndarray], descs: list[np.ndarray], params: MatchParams):
        self.params = params
        self.points = points
        sizes = [len(d) for d in descs]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.owner = np.repeat(np.arange(len(descs)), sizes)
        self.descs = np.vstack(descs).astype(np.float32) if sum(sizes) else np.zeros((0, 128), np.float32)
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self.points)

    def _matcher(self) -> cv2.DescriptorMatcher:
        matcher = getattr(self._local, "matcher", None)
        if matcher is None:  # one index per thread: cv2 matchers are not documented thread-safe
            if len(self.descs) >= 64:
                matcher = cv2.FlannBasedMatcher(dict(algorithm=1, trees=4), dict(checks=64))
            else:
                matcher = cv2.BFMatcher(cv2.NORM_L2)
            matcher.add([self.descs])
            matcher.train()
            self._local.matcher = matcher
        return matcher

    def knn(self, desc: np.ndarray) -> list[tuple[int, int, float, float]]:
        """(query index, bank index, best distance, second distance) for every query descriptor."""
        if len(self.descs) < 2 or len(desc) == 0:
            return []
        out = []
        for m in self._matcher().knnMatch(desc, k=2):
            if len(m) == 2:
                out.append((m[0].queryIdx, m[0].trainIdx, m[0].distance, m[1].distance))
        return out

    def verify(self, points: np.ndarray, good: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Candidates ranked by votes, each as (target, RANSAC inliers), best first."""
        p = self.params
        votes = Counter(int(self.owner[t]) for _, t in good)
        scored = []
        for target, n_votes in votes.most_common(p.candidates):
            if n_votes < 3:
                break
            pairs = [(q, t) for q, t in good if self.owner[t] == target]
            src = points[[q for q, _ in pairs]]
            dst = self.points[target][[t - self.offsets[target] for _, t in pairs]]
            scored.append((target, _affine_inliers(src, dst, p)))
        scored.sort(key=lambda x: -x[1])
        return scored


def _affine_inliers(src: np.ndarray, dst: np.ndarray, p: MatchParams) -> int:
    if len(src) < 3:
        return 0
    try:
        model, inliers = cv2.estimateAffine2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=p.ransac_threshold, maxIters=2000, confidence=0.995
        )
    except cv2.error:  # degenerate point sets
        return 0
    if model is None or inliers is None or not np.isfinite(model).all():
        return 0
    linear = model[:, :2]
    if np.linalg.det(linear) <= 0:  # a mirror image is handled by flipping the crop, not here
        return 0
    sv = np.linalg.svd(linear, compute_uv=False)
    if sv.min() < p.min_scale or sv.max() > p.max_scale or sv.max() / max(sv.min(), 1e-6) > 3.0:
        return 0
    return int(inliers.sum())


def _match_against(
    banks: Sequence[_FeatureBank], gray: np.ndarray, extractor: _Extractor, params: MatchParams
) -> list[_Match]:
    """Best verified target in each bank for one crop, trying the mirrored crop when needed."""
    mask = _padding_mask(gray)
    results: list[_Match] = [_Match(None, 0, 0, False) for _ in banks]
    for flipped in (False, True):
        if flipped:
            if all(r.inliers >= 2 * params.min_inliers for r in results):
                break  # confidently matched as is: skip the mirrored query (half the work)
            gray, mask = np.ascontiguousarray(gray[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
        points, desc = extractor(gray, mask)
        for b, bank in enumerate(banks):
            good = [(q, t) for q, t, d1, d2 in bank.knn(desc) if d1 < params.ratio * d2]
            scored = bank.verify(points, good)
            best = results[b]
            for target, n in scored:
                if n > best.inliers:
                    best = _Match(target, n, max(best.inliers, best.runner_up), flipped)
                elif n > best.runner_up and target != best.target:
                    best = _Match(best.target, best.inliers, n, best.flipped)
            results[b] = best
    return [r if r.inliers >= params.min_inliers else _Match(None, r.inliers, r.runner_up, r.flipped) for r in results]


def _effective_workers(workers: int | None) -> int:
    if workers is None:  # the machine is often shared: use half the cores, at most 4
        return max(1, min(4, (os.cpu_count() or 1) // 2))
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    return workers


class _cv_threads:
    """Limit OpenCV's own thread pool while we parallelise over crops ourselves."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.prev = cv2.getNumThreads()
        cv2.setNumThreads(self.n)

    def __exit__(self, *exc):
        cv2.setNumThreads(self.prev)


def _map(fn, items: Sequence, workers: int, progress: bool, desc: str) -> list:
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress)
    try:
        if workers == 1:
            out = []
            for item in items:
                out.append(fn(item))
                bar.update()
            return out
        with ThreadPoolExecutor(max_workers=workers) as pool:
            out = []
            for result in pool.map(fn, items):
                out.append(result)
                bar.update()
            return out
    finally:
        bar.close()


# --------------------------------------------------------------------------- smear index


def _list_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and is_image_file(p))


def _resolve_smear_dir(smear_dir: str | os.PathLike) -> tuple[Path, list[Path]]:
    directory = Path(smear_dir).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"smear folder {str(directory)!r} does not exist; pass the folder of full smears "
            "(Kaggle: dataset-master/dataset-master/JPEGImages), or use fallback_groups() without smears"
        )
    paths = _list_images(directory)
    if not paths:
        raise ValueError(
            f"no smear images ({', '.join(IMAGE_EXTENSIONS)}) in {str(directory)!r}; "
            "pass the folder that holds BloodImage_*.jpg"
        )
    return directory, paths


def _build_bank(
    paths: Sequence[Path], extractor: _Extractor, params: MatchParams, workers: int, progress: bool, desc: str
) -> tuple[list[str], _FeatureBank]:
    def features(path: Path):
        gray = _read_gray(path)
        return None if gray is None else extractor(gray)

    feats = _map(features, list(paths), workers, progress, desc)
    names, points, descs = [], [], []
    for path, f in zip(paths, feats):
        if f is None:
            continue
        if len(f[1]) == 0:
            logger.warning("no features found in %s (blank image?); it can never be matched", path)
        names.append(path.stem)
        points.append(f[0])
        descs.append(f[1])
    return names, _FeatureBank(points, descs, params)


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$CELLHUB_CACHE/smears`` if that variable is set, else ``~/.cache/cellhub/smears``."""
    return cache.default_cache_dir("smears")


def _smear_set_key(paths: Sequence[Path], params: MatchParams) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": _CACHE_VERSION, "params": asdict(params)}, sort_keys=True).encode())
    for p in paths:
        ident = cache.file_identity(p)
        h.update(f"{p.name}\0{ident}\n".encode())
    return h.hexdigest()[:20]


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("version") == _CACHE_VERSION and isinstance(data.get("entries"), dict):
            return data["entries"]
        logger.warning("ignoring smear-match cache %s: unknown format or version", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable smear-match cache %s (%s)", path, exc)
    return {}


class _file_lock:
    """Advisory lock (POSIX ``flock``) so processes sharing a cache merge instead of overwriting."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = None

    def __enter__(self):
        try:
            import fcntl

            self.fh = open(self.path, "a")
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (Windows) or read-only folder: best effort
            if self.fh is not None:
                self.fh.close()
            self.fh = None
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # closing releases the lock


def _save_cache(path: Path, entries: dict, meta: dict) -> None:
    """Merge ``entries`` into the cache file (another process may have added its own) atomically."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.with_name(path.name + ".lock")):
            merged = _load_cache(path)
            merged.update(entries)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump({"version": _CACHE_VERSION, **meta, "entries": merged}, fh)
            os.replace(tmp, path)
    except OSError as exc:
        logger.warning("could not write smear-match cache %s (%s); results are not cached", path, exc)


# --------------------------------------------------------------------------- public API


def match_crops_to_smears(
    crop_paths: Iterable[str | os.PathLike],
    smear_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
    params: MatchParams | None = None,
) -> dict[str, str | None]:
    """Map each crop path to the id (file stem, e.g. ``"BloodImage_00012"``) of the smear it was cut from.

    A crop maps to ``None`` when no smear passes the geometric check, or when the crop cannot be
    read (logged). Keys are the crop paths as given, as strings, in input order. Results are cached
    on disk under ``cache_dir`` (see the module docstring). ``workers`` threads match crops in
    parallel (default: half the CPU cores, at most 4). ``params`` tunes the matcher (:class:`MatchParams`).
    """
    params = params or MatchParams()
    n_workers = _effective_workers(workers)
    crops = [str(p) for p in crop_paths]
    smear_root, smear_paths = _resolve_smear_dir(smear_dir)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache_root / f"crops-to-smears-{_smear_set_key(smear_paths, params)}.json"
    entries = _load_cache(cache_file)
    meta = {"smear_dir": str(smear_root.resolve()), "n_smears": len(smear_paths), "params": asdict(params)}

    result: dict[str, str | None] = {}
    todo: list[tuple[str, str, tuple[int, str] | None]] = []
    for crop in crops:
        key = str(Path(crop).expanduser().resolve())
        ident = cache.file_identity(Path(key))
        hit = entries.get(key)
        if ident is not None and isinstance(hit, dict) and (hit.get("size"), hit.get("digest")) == ident:
            result[crop] = hit.get("smear")
        else:
            todo.append((crop, key, ident))
    if not todo:
        logger.info("smear matches for %d crops loaded from cache %s", len(crops), cache_file)
        return {c: result[c] for c in crops}

    t0 = time.perf_counter()
    passes = [params] + ([params.rescue_params()] if params.rescue_smear_scale else [])
    pending = todo
    with _cv_threads(1):  # parallelism is ours (``workers``), so OpenCV stays on one thread each
        for n_pass, pass_params in enumerate(passes):
            last = n_pass == len(passes) - 1
            if not pending:
                break
            if n_pass:
                logger.info("%d crops unmatched: retrying with dense full-resolution smear features", len(pending))
            outcomes = _match_pass(pending, smear_paths, pass_params, n_workers, progress, n_pass,
                                   flush=lambda: _save_cache(cache_file, entries, meta), entries=entries,
                                   result=result, final=last)
            # crops that could be read but matched nothing go to the next pass
            pending = [item for item, (smear, readable) in zip(pending, outcomes) if smear is None and readable]

    n_none = sum(result[c] is None for c, _, _ in todo)
    logger.info(
        "matched %d crops to smears in %.1fs: %d attributed, %d without a verified match",
        len(todo), time.perf_counter() - t0, len(todo) - n_none, n_none,
    )
    return {c: result[c] for c in crops}


def _match_pass(
    items: list[tuple[str, str, tuple[int, str] | None]],
    smear_paths: Sequence[Path],
    params: MatchParams,
    n_workers: int,
    progress: bool,
    n_pass: int,
    *,
    flush,
    entries: dict,
    result: dict,
    final: bool,
) -> list[tuple[str | None, bool]]:
    """One matching pass; fills ``result`` and (for matches, or on the final pass) cache ``entries``."""
    t0 = time.perf_counter()
    extractor = _Extractor(params.smear_features, params.smear_scale, params.contrast_threshold)
    label = "smear features" + (" (dense)" if n_pass else "")
    names, bank = _build_bank(smear_paths, extractor, params, 1, progress, label)
    logger.info("indexed %d smears (%d descriptors) in %.1fs", len(names), len(bank.descs), time.perf_counter() - t0)
    local = threading.local()

    def match_one(item: tuple[str, str, tuple[int, str] | None]) -> tuple[str | None, int, bool]:
        crop, _, ident = item
        if ident is None:
            logger.warning("crop %s does not exist; mapped to None", crop)
            return None, 0, False
        gray = _read_gray(crop)
        if gray is None:
            return None, 0, False
        ext = getattr(local, "extractor", None)
        if ext is None:
            ext = local.extractor = _Extractor(params.crop_features, params.crop_scale, params.contrast_threshold)
        try:
            (m,) = _match_against([bank], gray, ext, params)
        except (cv2.error, ValueError) as exc:  # e.g. a degenerate (1-pixel) image
            logger.warning("cannot match crop %s (%s); mapped to None", crop, exc)
            return None, 0, False
        return (names[m.target] if m.target is not None else None), m.inliers, True

    outcomes: list[tuple[str | None, bool]] = []
    for start in range(0, len(items), _FLUSH_EVERY):
        chunk = items[start : start + _FLUSH_EVERY]
        desc = "matching crops" + (" (dense)" if n_pass else "")
        if len(items) > _FLUSH_EVERY:
            desc += f" {start + 1}-{start + len(chunk)}/{len(items)}"
        for (crop, key, ident), (smear, inliers, readable) in zip(chunk, _map(match_one, chunk, n_workers, progress, desc)):
            result[crop] = smear
            outcomes.append((smear, readable))
            # an unmatched crop is only cached as None once every pass has tried it
            if ident is not None and (smear is not None or final or not readable):
                entries[key] = {"size": ident[0], "digest": ident[1], "smear": smear, "inliers": inliers}
        flush()
    return outcomes


def fallback_groups(
    crop_paths: Iterable[str | os.PathLike],
    *,
    progress: bool = True,
    params: MatchParams | None = None,
) -> dict[str, str]:
    """Group crops by source cell *without* the smears — weaker than :func:`match_crops_to_smears`.

    Crops are compared with each other (same features and affine RANSAC check), separately per
    parent folder (class). Each crop joins the group of the best verified earlier exemplar, or starts
    a new group named ``"<folder>/cell-<n>"``. Unreadable crops get a group of their own
    (``"unreadable:<path>"``). Copies of one cell can be split over several groups when their
    visible areas overlap too little, so grouped splits may still leak a little: prefer the smears.
    """
    params = params or MatchParams()
    crops = [str(p) for p in crop_paths]
    logger.warning(
        "fallback_groups: grouping %d crops by crop-to-crop feature matching, without the source smears. "
        "This is weaker than match_crops_to_smears(): copies of one cell may be split over several groups, "
        "so a grouped validation split can still leak. Use the smears (dataset-master/JPEGImages) when you can.",
        len(crops),
    )
    by_folder: dict[str, list[str]] = {}
    for crop in crops:
        by_folder.setdefault(Path(crop).parent.name or ".", []).append(crop)

    extractor = _Extractor(params.crop_features, params.crop_scale, params.contrast_threshold)
    groups: dict[str, str] = {}
    bar = tqdm(total=len(crops), desc="grouping crops (fallback)", unit="img", disable=not progress)
    try:
        for folder, members in sorted(by_folder.items()):
            # exemplars in a FLANN bank rebuilt in batches, plus a small brute-force bank of recent ones
            frozen_pts: list[np.ndarray] = []
            frozen_desc: list[np.ndarray] = []
            frozen_ids: list[int] = []
            pending_pts: list[np.ndarray] = []
            pending_desc: list[np.ndarray] = []
            pending_ids: list[int] = []
            frozen = _FeatureBank([], [], params)
            n_groups = 0
            for crop in members:
                bar.update()
                gray = _read_gray(crop)
                if gray is None:
                    groups[crop] = f"unreadable:{crop}"
                    continue
                pending = _FeatureBank(pending_pts, pending_desc, params) if pending_pts else None
                banks = [b for b in (frozen, pending) if b is not None and len(b)]
                try:
                    matches = _match_against(banks, gray, extractor, params) if banks else []
                except (cv2.error, ValueError) as exc:
                    logger.warning("cannot match crop %s (%s); it gets a group of its own", crop, exc)
                    groups[crop] = f"unreadable:{crop}"
                    continue
                best_group, best_n = None, 0
                for bank, m in zip(banks, matches):
                    ids = frozen_ids if bank is frozen else pending_ids
                    if m.target is not None and m.inliers > best_n:
                        best_group, best_n = ids[m.target], m.inliers
                if best_group is None:
                    best_group = n_groups
                    n_groups += 1
                    points, desc = extractor(gray, _padding_mask(gray))  # becomes an exemplar
                    if len(desc):
                        pending_pts.append(points)
                        pending_desc.append(desc)
                        pending_ids.append(best_group)
                    if len(pending_pts) >= 32:
                        frozen_pts += pending_pts
                        frozen_desc += pending_desc
                        frozen_ids += pending_ids
                        pending_pts, pending_desc, pending_ids = [], [], []
                        frozen = _FeatureBank(frozen_pts, frozen_desc, params)
                groups[crop] = f"{folder}/cell-{best_group:04d}"
            logger.info("fallback_groups: %d crops in %r -> %d groups", len(members), folder, n_groups)
    finally:
        bar.close()
    return groups


def smear_fields(
    smear_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    params: MatchParams | None = None,
) -> dict[str, str]:
    """Map each smear id to a field id shared by smears that show overlapping areas of one slide.

    The field id is the smallest smear id of its connected component (a smear alone is its own
    field). Use it instead of the smear id to group splits: in the Kaggle data some "different"
    cells are the same cell cut from two consecutive frames (e.g. BloodImage_00382 and _00395).
    Unreadable smears are logged and left out. Cached like :func:`match_crops_to_smears`.
    """
    params = params or MatchParams()
    _, smear_paths = _resolve_smear_dir(smear_dir)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file = cache_root / f"smear-fields-{_smear_set_key(smear_paths, params)}.json"
    cached = _load_cache(cache_file)
    if cached:
        return {str(k): str(v) for k, v in cached.items()}
    fields = _smear_fields(smear_paths, params, progress)
    _save_cache(cache_file, fields, {"n_smears": len(smear_paths)})
    return fields


def _smear_fields(smear_paths: Sequence[Path], params: MatchParams, progress: bool) -> dict[str, str]:
    extractor = _Extractor(params.smear_features, params.smear_scale, params.contrast_threshold)
    names, bank = _build_bank(smear_paths, extractor, params, 1, progress, "smear features")
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    matcher = bank._matcher()
    for i in tqdm(range(len(names)), desc="smear overlaps", disable=not progress):
        lo, hi = bank.offsets[i], bank.offsets[i + 1]
        if hi - lo == 0:
            continue
        good = []
        for m in matcher.knnMatch(bank.descs[lo:hi], k=3):
            others = [x for x in m if bank.owner[x.trainIdx] != i]  # drop the smear's own descriptor
            if len(others) >= 2 and others[0].distance < params.ratio * others[1].distance:
                good.append((others[0].queryIdx, others[0].trainIdx))
        for target, n in bank.verify(bank.points[i], good):
            if n >= params.min_inliers:
                parent[find(i)] = find(target)
    components: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        components.setdefault(find(i), []).append(name)
    fields = {name: min(members) for members in components.values() for name in members}
    logger.info("smear_fields: %d smears in %d fields", len(names), len(components))
    return fields
