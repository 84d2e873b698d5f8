"""Load cell-image datasets into one shape: ``datasets.DatasetDict`` with ``image``, ``label``, ``group``, ``file``.

Sources accepted by :func:`load_cell_dataset`:

- a Kaggle "Blood Cell Images" download (the unzipped folder or any folder inside it that holds
  ``dataset2-master/.../images/{TRAIN,TEST,TEST_SIMPLE}/{EOSINOPHIL,...}``);
- a Kaggle malaria download (``cell_images/{Parasitized,Uninfected}``; the zip's nested copy
  ``cell_images/cell_images/...`` is recognised and never counted twice);
- any image-folder tree: class folders, optionally under split folders (``train``, ``test``,
  ``validation``/``val``/``valid``/``dev``, ``test_simple``, any case), read through
  ``datasets``' ``imagefolder`` builder;
- a folder written by ``train/prepare_dataset.py --output-dir`` (Parquet shards + dataset card),
  or by ``DatasetDict.save_to_disk``;
- a Hugging Face Hub dataset id (or a task name, meaning that task's default Hub dataset).

Every split gets the task's fixed label order and a ``group`` column: the unit that must never be
split between training and evaluation (the slide/patient for malaria, the source smear for blood
cells). :func:`split_by_group` draws a validation split that respects it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from .tasks import TASKS, Task, get_task, malaria_group

__all__ = [
    "load_cell_dataset",
    "split_by_group",
    "ensure_validation",
    "cache_resized",
    "infer_task",
    "LoadReport",
    "DatasetLayoutError",
    "IMAGE_EXTENSIONS",
    "default_cache_dir",
    "check_image",
]

logger = logging.getLogger(__name__)

#: file extensions read as images (compared lower-case)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"})

#: split-folder name (lower-case, ``-``/space as ``_``) -> canonical split name
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test",
    "test_simple": "test_simple", "testsimple": "test_simple",
}
SPLIT_ORDER = ("train", "validation", "test", "test_simple")

_IGNORED_DIRS = {"__macosx", "__pycache__"}
# folders of a Kaggle blood-cells download that hold full smears, not crops
_SMEAR_DIRS = {"jpegimages", "annotations"}
_MAX_DEPTH = 6
_VALIDATION_CACHE_VERSION = 1


class DatasetLayoutError(ValueError):
    """A dataset folder does not have a layout :func:`load_cell_dataset` understands."""


@dataclass
class LoadReport:
    """What :func:`load_cell_dataset` found: where, how it grouped, and which files it skipped."""

    source: str
    task: str
    source_kind: str  # kaggle-blood-cells | kaggle-malaria | imagefolder | parquet-folder | saved-to-disk | hub
    root: str | None = None
    #: split -> number of images kept
    splits: dict[str, int] = field(default_factory=dict)
    #: (path, reason) of every file that was not loaded
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: split -> how its groups were computed
    #: (smear | field | smear+fallback | field+fallback | fallback | filename-prefix | column | per-image)
    group_method: dict[str, str] = field(default_factory=dict)
    #: split -> fraction of images attributed to a source smear (blood cells with smears only)
    smear_attribution: dict[str, float] = field(default_factory=dict)
    smear_dir: str | None = None
    #: files of a nested duplicate tree (Kaggle malaria zip) that were recognised and not counted again
    ignored_duplicates: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d


# --------------------------------------------------------------------------------------------
# small helpers


def default_cache_dir() -> Path:
    """``$CELLHUB_CACHE`` or ``~/.cache/cellhub``: where validation results and resized images go."""
    env = os.environ.get("CELLHUB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cellhub"


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_DIRS


def _split_name(folder: str) -> str | None:
    key = re.sub(r"[\s\-]+", "_", folder.strip()).lower()
    return SPLIT_ALIASES.get(key)


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not _is_hidden(p.name))
    except OSError:
        return []


def _files(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return []


def _has_image_files(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return any(e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in it)
    except OSError:
        return False


def _label_for(folder: str, tasks: Iterable[Task]) -> dict[str, str]:
    """task name -> label for a class-folder name, for every task that knows the name."""
    out = {}
    for t in tasks:
        lab = t.label_from_folder(folder)
        if lab is not None:
            out[t.name] = lab
    return out


def check_image(path: str | Path) -> str | None:
    """``None`` when ``path`` decodes as an image, else why not (empty, not an image, truncated...).

    JPEGs are decoded in draft mode (at 1/8 scale): every byte of the stream is still read, so a
    truncated file is caught, at a fraction of the cost of a full decode.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with PILImage.open(path) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
            if im.width < 1 or im.height < 1:
                return "image has no pixels"
    except UnidentifiedImageError:
        return "not an image (Pillow cannot identify it)"
    except PILImage.DecompressionBombError as exc:
        return f"refused: {exc}"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower():
            return f"truncated image ({msg})"
        return f"corrupt image ({msg})"
    return None


def _validate_files(paths: Sequence[Path], cache_dir: Path | None, progress: bool) -> dict[str, str | None]:
    """Check every file once (in threads); results are cached by (path, size, mtime)."""
    from tqdm.auto import tqdm

    cache_file = None
    cached: dict[str, list] = {}
    if cache_dir is not None and paths:
        key = hashlib.sha1(os.path.dirname(os.path.dirname(str(paths[0]))).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / "validated" / f"v{_VALIDATION_CACHE_VERSION}-{key}.json"
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}
    results: dict[str, str | None] = {}
    todo: list[tuple[str, tuple[int, int]]] = []
    for p in paths:
        sp = str(p)
        try:
            st = os.stat(sp)
        except OSError as exc:
            results[sp] = f"unreadable ({exc.strerror or exc})"
            continue
        ident = (st.st_size, st.st_mtime_ns)
        hit = cached.get(sp)
        if hit is not None and tuple(hit[:2]) == ident:
            results[sp] = hit[2]
        else:
            todo.append((sp, ident))
    if todo:
        workers = min(8, (os.cpu_count() or 1) + 2, len(todo))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            it = pool.map(check_image, [sp for sp, _ in todo], chunksize=32)
            bar = tqdm(it, total=len(todo), desc="checking images", unit="img", disable=not progress or len(todo) < 200)
            for (sp, ident), reason in zip(todo, bar):
                results[sp] = reason
                cached[sp] = [ident[0], ident[1], reason]
        if cache_file is not None:
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile("w", dir=cache_file.parent, delete=False, suffix=".tmp") as fh:
                    json.dump(cached, fh)
                os.replace(fh.name, cache_file)
            except OSError as exc:
                logger.warning("Could not write the image-validation cache %s: %s", cache_file, exc)
    return results


# --------------------------------------------------------------------------------------------
# finding the layout of a local folder


@dataclass
class _Layout:
    root: Path
    kind: str  # kaggle-blood-cells | kaggle-malaria | imagefolder
    task: Task
    #: split -> list of (class_label, class_dir, list of duplicate class dirs to merge)
    splits: dict[str, list[tuple[str, Path, list[Path]]]]


def _classify_class_root(d: Path, tasks: Sequence[Task]) -> tuple[dict[str, Path], list[Path], list[Path]] | None:
    """For a folder whose subfolders hold images: (folder name -> dir) of known-looking class
    folders, the unknown folders holding images, and nested class roots (duplicate copies)."""
    subs = _subdirs(d)
    known, unknown, nested = {}, [], []
    for s in subs:
        if s.name.lower() in _SMEAR_DIRS:
            continue
        if _label_for(s.name, tasks):
            known[s.name] = s
        elif _has_image_files(s):
            unknown.append(s)
        elif any(_label_for(g.name, tasks) and _has_image_files(g) for g in _subdirs(s)):
            nested.append(s)
    if not known and not unknown:
        return None
    return known, unknown, nested


def _pick_task(folder_names: Iterable[str], task: Task | None, where: Path) -> Task:
    if task is not None:
        return task
    votes: Counter[str] = Counter()
    for name in folder_names:
        for tname in _label_for(name, TASKS.values()):
            votes[tname] += 1
    if not votes:
        raise DatasetLayoutError(
            f"Cannot tell the task of {where}: none of its folders is named after a class. "
            + _expected_text()
        )
    best = votes.most_common()
    if len(best) > 1 and best[0][1] == best[1][1]:
        raise DatasetLayoutError(
            f"Cannot tell the task of {where}: its folders match {best[0][0]!r} and {best[1][0]!r} equally. "
            "Pass task='blood-cells' or task='malaria' (--task on the command line)."
        )
    return get_task(best[0][0])


def _expected_text(task: Task | None = None) -> str:
    tasks = [task] if task else list(TASKS.values())
    parts = []
    for t in tasks:
        names = sorted(set(t.folder_aliases) or set(t.labels))
        parts.append(f"{', '.join(names)} ({t.name})")
    return (
        "Expected class folders named " + " or ".join(parts)
        + ", optionally under split folders (train, validation, test, test_simple — any case); "
        "e.g. a Kaggle download: dataset2-master/dataset2-master/images/TRAIN/EOSINOPHIL/*.jpeg "
        "or cell_images/Parasitized/*.png."
    )


def _find_layout(path: Path, task: Task | None) -> _Layout:
    tasks = [task] if task else list(TASKS.values())
    split_roots: list[tuple[int, Path]] = []
    class_roots: list[tuple[int, Path]] = []
    unknown_seen: list[Path] = []
    queue: list[tuple[Path, int]] = [(path, 0)]
    images_directly_in_path = _has_image_files(path)
    while queue:
        d, depth = queue.pop(0)
        subs = _subdirs(d)
        split_subs = [s for s in subs if _split_name(s.name)]
        if split_subs and any(_classify_class_root(s, tasks) for s in split_subs):
            split_roots.append((depth, d))
            continue
        cls = _classify_class_root(d, tasks)
        if cls is not None:
            known, unknown, _nested = cls
            if known:
                class_roots.append((depth, d))
                continue
            unknown_seen.extend(unknown)
        if depth < _MAX_DEPTH:
            queue.extend((s, depth + 1) for s in subs if s.name.lower() not in _SMEAR_DIRS)
    if split_roots:
        root = min(split_roots)[1]
        splits: dict[str, list] = {}
        names: list[str] = []
        for s in _subdirs(root):
            cls = _classify_class_root(s, tasks)
            split = _split_name(s.name)
            if split is None:
                if cls is not None:
                    raise DatasetLayoutError(
                        f"Unknown split folder {s.name!r} in {root}: expected train, validation "
                        "(val, valid, dev), test or test_simple (any case). Rename or move it."
                    )
                continue
            if cls is None:
                logger.warning("Split folder %s holds no class folders with images; ignored.", s)
                continue
            if split in splits:
                raise DatasetLayoutError(f"Two folders in {root} name the split {split!r}; keep one.")
            splits[split] = [s]
            names.extend(cls[0])
            names.extend(u.name for u in cls[1])
        the_task = _pick_task(names, task, root)
        layout_splits = {sp: _class_dirs(dirs[0], the_task) for sp, dirs in splits.items()}
        upper = all(s.name.isupper() for s in _subdirs(root) if _split_name(s.name))
        kind = "kaggle-blood-cells" if the_task.name == "blood-cells" and (
            upper or any("dataset2-master" in p for p in root.parts)) else "imagefolder"
        return _Layout(root=root, kind=kind, task=the_task, splits=layout_splits)
    if class_roots:
        root = min(class_roots)[1]
        known, unknown, _ = _classify_class_root(root, tasks)  # type: ignore[misc]
        the_task = _pick_task(list(known) + [u.name for u in unknown], task, root)
        split = _split_name(root.name) or "train"
        kind = "kaggle-malaria" if the_task.name == "malaria" and root.name.lower() == "cell_images" else "imagefolder"
        if the_task.name == "blood-cells" and any("dataset2-master" in p for p in root.parts):
            kind = "kaggle-blood-cells"
        return _Layout(root=root, kind=kind, task=the_task, splits={split: _class_dirs(root, the_task)})
    if images_directly_in_path and not _subdirs(path):
        raise DatasetLayoutError(
            f"{path} holds images directly but no class folders: pass the folder that contains the "
            "class folders (its parent, if this is one class). " + _expected_text(task)
        )
    if unknown_seen:
        shown = ", ".join(repr(u.name) for u in unknown_seen[:8])
        raise DatasetLayoutError(
            f"Unknown class folder(s) {shown} under {path}. " + _expected_text(task)
        )
    raise DatasetLayoutError(f"No images in class folders found under {path}. " + _expected_text(task))


def _class_dirs(root: Path, task: Task) -> list[tuple[str, Path, list[Path]]]:
    """Class folders of one split root, checked against ``task``; nested copies are merged."""
    cls = _classify_class_root(root, list(TASKS.values()))
    if cls is None:
        raise DatasetLayoutError(f"No class folders with images in {root}. " + _expected_text(task))
    known, unknown, nested = cls
    bad = [name for name in known if task.label_from_folder(name) is None] + [u.name for u in unknown]
    if bad:
        raise DatasetLayoutError(
            f"Unknown class folder(s) {', '.join(map(repr, sorted(bad)))} in {root} for task {task.name!r}. "
            + _expected_text(task)
        )
    out: dict[str, tuple[str, Path, list[Path]]] = {}
    for name, d in known.items():
        label = task.label_from_folder(name)
        assert label is not None
        if label in out:
            raise DatasetLayoutError(
                f"Folders {out[label][1].name!r} and {name!r} in {root} both mean {label!r}; keep one."
            )
        out[label] = (label, d, [])
    for n in nested:  # e.g. cell_images/cell_images/{Parasitized,Uninfected}
        for g in _subdirs(n):
            label = task.label_from_folder(g.name)
            if label is not None and label in out:
                out[label][2].append(g)
    return [out[lab] for lab in task.labels if lab in out]


# --------------------------------------------------------------------------------------------
# groups


def _find_smear_dir(start: Path) -> Path | None:
    """The Kaggle ``dataset-master/.../JPEGImages`` folder of full smears next to the crops, if any."""
    for anc in [start, *start.parents][:6]:
        for cand in (anc / "dataset-master" / "dataset-master" / "JPEGImages",
                     anc / "dataset-master" / "JPEGImages", anc / "JPEGImages"):
            if cand.is_dir() and _has_image_files(cand):
                return cand
    return None


def _fallback_groups(paths: list[str], cache_dir: Path | None, progress: bool) -> dict[str, str]:
    """Weaker grouping when a crop cannot be traced to a smear: :func:`cellhub.smears.fallback_groups`
    (crop-to-crop matching within each class folder), cached like the smear matches."""
    try:
        from . import smears
    except ImportError:
        smears = None  # type: ignore[assignment]
    if smears is None or not hasattr(smears, "fallback_groups"):
        logger.warning("cellhub.smears is not available: every blood-cell crop is its own group.")
        return {p: f"image:{Path(p).name}" for p in paths}
    cache_file = None
    if cache_dir is not None:
        h = hashlib.sha1()
        for p in sorted(paths):
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns};".encode())
        cache_file = Path(cache_dir) / "groups" / f"fallback-{h.hexdigest()[:20]}.json"
        try:
            cached = json.loads(cache_file.read_text())
            if set(cached) == set(paths):
                logger.info("fallback groups for %d crops loaded from cache %s", len(paths), cache_file)
                return cached
        except (OSError, ValueError):
            pass
    groups = {str(k): str(v) for k, v in smears.fallback_groups(paths, progress=progress).items()}
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(groups))
        except OSError as exc:
            logger.warning("Could not cache fallback groups in %s: %s", cache_file, exc)
    return groups


def _smear_fields_cached(smear_dir: Path, cache_dir: Path | None, progress: bool) -> dict[str, str]:
    """:func:`cellhub.smears.smear_fields` (smear id -> field id), cached by the smears' identity."""
    from . import smears

    files = sorted(p for p in Path(smear_dir).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    h = hashlib.sha1()
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns};".encode())
    cache_file = Path(cache_dir) / "groups" / f"fields-{h.hexdigest()[:20]}.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        try:
            return json.loads(cache_file.read_text())
        except ValueError:
            pass
    logger.info("Finding smears that show the same microscope field (once; cached)...")
    fields = {str(k): str(v) for k, v in smears.smear_fields(smear_dir, progress=progress).items()}
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(fields))
        except OSError as exc:
            logger.warning("Could not cache smear fields in %s: %s", cache_file, exc)
    return fields


def _blood_groups(paths: list[str], smear_dir: Path | None, cache_dir: Path | None, progress: bool,
                  split: str, report: LoadReport, group_by: str = "smear") -> list[str]:
    matched: dict[str, str | None] = {}
    if smear_dir is not None:
        try:
            from . import smears
        except ImportError:
            smears = None  # type: ignore[assignment]
            logger.warning("cellhub.smears is not installed; cannot match crops to smears.")
        if smears is not None:
            smear_cache = Path(cache_dir) / "smears" if cache_dir is not None else None
            raw = smears.match_crops_to_smears(paths, smear_dir, cache_dir=smear_cache, progress=progress)
            matched = {str(k): v for k, v in raw.items()}
            if group_by == "field":
                fields = _smear_fields_cached(smear_dir, cache_dir, progress)
                matched = {k: (f"field:{fields.get(v, v)}" if v else v) for k, v in matched.items()}
    else:
        logger.warning(
            "No full smears (dataset-master/dataset-master/JPEGImages) found for the %s split: blood-cell "
            "crops cannot be traced to their source cell, so a weaker grouping is used. Crops of one cell "
            "may then land on both sides of a validation split; pass smear_dir=... to fix this.", split)
    unmatched = [p for p in paths if not matched.get(p)]
    fallback = _fallback_groups(unmatched, cache_dir, progress) if unmatched else {}
    n_matched = len(paths) - len(unmatched)
    if paths:
        if smear_dir is not None:
            report.smear_attribution[split] = n_matched / len(paths)
        unit = "field" if group_by == "field" and smear_dir is not None else "smear"
        report.group_method[split] = (unit if not unmatched else
                                      "fallback" if not n_matched else f"{unit}+fallback")
        if smear_dir is not None and unmatched:
            logger.warning("%s: %d of %d crops matched no smear; they get fallback groups.",
                           split, len(unmatched), len(paths))
    # Fallback groups are computed per split and named per class folder, so they carry the split
    # name (they say nothing about cells shared between splits), and "unmatched:" when smears were
    # searched, so that they never equal a smear id.
    prefix = ("unmatched:" if smear_dir is not None else "") + f"{split}/"
    return [matched.get(p) or f"{prefix}{fallback[p]}" for p in paths]


def _groups_for(task: Task, paths: list[str], files: list[str], smear_dir: Path | None, cache_dir: Path | None,
                progress: bool, split: str, report: LoadReport, group_by: str = "smear") -> list[str]:
    if task.name == "malaria":
        report.group_method[split] = "filename-prefix"
        return [malaria_group(f) for f in files]
    if task.name == "blood-cells":
        return _blood_groups(paths, smear_dir, cache_dir, progress, split, report, group_by)
    report.group_method[split] = "per-image"
    return [f"image:{f}" for f in files]


# --------------------------------------------------------------------------------------------
# building datasets


def _features(task: Task):
    from datasets import ClassLabel, Features, Image, Value

    return Features(image=Image(), label=ClassLabel(names=list(task.labels)), group=Value("string"),
                    file=Value("string"))


def _collect_split(entries: list[tuple[str, Path, list[Path]]], task: Task, report: LoadReport
                   ) -> list[tuple[Path, str, str]]:
    """(path, label, file relative to the split root) for every candidate file; skips non-images."""
    out: list[tuple[Path, str, str]] = []
    for label, d, nested in entries:
        seen: set[str] = set()
        for tree in [d, *nested]:
            for dirpath, dirnames, filenames in os.walk(tree):
                dirnames[:] = sorted(x for x in dirnames if not _is_hidden(x))
                for fn in sorted(filenames):
                    if fn.startswith("."):
                        continue
                    p = Path(os.path.abspath(os.path.join(dirpath, fn)))
                    rel = p.relative_to(tree).as_posix()
                    if tree is not d and rel in seen:
                        report.ignored_duplicates += 1
                        continue
                    if p.suffix.lower() not in IMAGE_EXTENSIONS:
                        report.skipped.append((str(p), f"not an image file (extension {p.suffix or 'none'!r})"))
                        continue
                    seen.add(rel)
                    out.append((p, label, f"{d.name}/{rel}"))
    return out


def _load_local(path: Path, task: Task | None, cache_dir: Path | None, smear_dir: Path | None,
                progress: bool, report: LoadReport, group_by: str = "smear"):
    from datasets import Dataset, DatasetDict

    path = Path(os.path.abspath(path))
    layout = _find_layout(path, task)
    task = layout.task
    report.task, report.source_kind, report.root = task.name, layout.kind, str(layout.root)
    if task.name == "blood-cells" and smear_dir is None:
        smear_dir = _find_smear_dir(layout.root)
    if smear_dir is not None:
        smear_dir = Path(smear_dir)
        if not smear_dir.is_dir():
            raise FileNotFoundError(f"smear_dir {smear_dir} does not exist: pass the folder of full smears "
                                    "(dataset-master/dataset-master/JPEGImages of the Kaggle download).")
        report.smear_dir = str(smear_dir) if task.name == "blood-cells" else None
    collected = {split: _collect_split(entries, task, report) for split, entries in layout.splits.items()}
    if report.ignored_duplicates:
        note = (f"ignored {report.ignored_duplicates} files of a nested duplicate copy "
                "(the Kaggle zip's cell_images/cell_images)")
        report.notes.append(note)
        logger.info(note)
    all_paths = [p for items in collected.values() for p, _, _ in items]
    verdicts = _validate_files(all_paths, cache_dir, progress)
    out = {}
    for split in sorted(collected, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99):
        good = []
        for p, label, rel in collected[split]:
            reason = verdicts.get(str(p))
            if reason:
                report.skipped.append((str(p), reason))
            else:
                good.append((p, label, rel))
        if not good:
            logger.warning("Split %r in %s has no readable images; left out.", split, layout.root)
            continue
        paths = [str(p) for p, _, _ in good]
        files = [rel for _, _, rel in good]
        labels = [task.label2id[lab] for _, lab, _ in good]
        groups = _groups_for(task, paths, files, smear_dir if task.name == "blood-cells" else None,
                             cache_dir, progress, split, report, group_by)
        if layout.kind == "imagefolder":
            ds = _via_imagefolder(paths, labels, groups, files, task, cache_dir)
        else:
            ds = Dataset.from_dict({"image": paths, "label": labels, "group": groups, "file": files},
                                   features=_features(task))
        out[split] = ds
        report.splits[split] = len(ds)
    if not out:
        if report.skipped:
            raise DatasetLayoutError(f"No readable images under {layout.root}: all {len(report.skipped)} files "
                                     f"were skipped ({_skip_summary(report.skipped)}).")
        raise DatasetLayoutError(f"No images in class folders under {layout.root}: they are empty. "
                                 + _expected_text(task))
    return DatasetDict(out)


def _via_imagefolder(paths: list[str], labels: list[int], groups: list[str], files: list[str], task: Task,
                     cache_dir: Path | None):
    """Read validated files through ``datasets``' imagefolder builder, then set our columns.

    imagefolder names classes after the folders, sorted alphabetically; rows are matched back to
    our labels/groups by path, so the task's label order is what comes out.
    """
    from datasets import Image, load_dataset

    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir) / "hf-datasets")
    raw = load_dataset("imagefolder", data_files={"train": paths}, split="train", drop_labels=True, **kwargs)
    info = {p: (lab, g, f) for p, lab, g, f in zip(paths, labels, groups, files)}
    raw_paths = [os.path.abspath(x["path"]) for x in raw.cast_column("image", Image(decode=False))["image"]]
    missing = [p for p in raw_paths if p not in info]
    if missing:  # pragma: no cover - imagefolder returned a file we did not give it
        raise RuntimeError(f"imagefolder returned unexpected files, e.g. {missing[0]}")
    ds = raw.select_columns(["image"])
    for i, name in enumerate(("label", "group", "file")):
        ds = ds.add_column(name, [info[p][i] for p in raw_paths])
    return ds.cast(_features(task))


def _skip_summary(skipped: list[tuple[str, str]], n: int = 3) -> str:
    if not skipped:
        return "none"
    reasons = Counter(r.split(" (")[0] for _, r in skipped)
    return "; ".join(f"{c} {r}" for r, c in reasons.most_common(n))


def _normalize_external(dsd, task: Task | None, report: LoadReport, *, source: str):
    """Map a Hub / Parquet / saved dataset onto our four columns and the task's label order."""
    from datasets import ClassLabel, DatasetDict, Image, Value

    out = {}
    # label names across splits decide the task when it is not given
    first = next(iter(dsd.values()))
    label_col = _pick_column(first, ("label", "labels", "category", "class", "cell_type"), ClassLabel)
    if label_col is None:
        raise DatasetLayoutError(f"{source}: no label column (looked for label, labels, category, class "
                                 f"or a ClassLabel feature); columns are {first.column_names}.")
    feat = first.features[label_col]
    if task is None:
        names = feat.names if isinstance(feat, ClassLabel) else sorted({str(v) for v in list(first[label_col])})
        task = _pick_task(names, None, Path(source))
    report.task = task.name
    for split_name, ds in dsd.items():
        split = _split_name(split_name) or split_name
        img_col = _pick_column(ds, ("image", "img", "images", "pixel_values"), Image)
        lab_col = _pick_column(ds, ("label", "labels", "category", "class", "cell_type"), ClassLabel)
        if img_col is None or lab_col is None:
            raise DatasetLayoutError(f"{source} split {split_name!r}: need an image and a label column; "
                                     f"columns are {ds.column_names}.")
        lfeat = ds.features[lab_col]
        if isinstance(lfeat, ClassLabel):
            src_names = list(lfeat.names)
        else:
            values = list(ds[lab_col])
            if all(isinstance(v, (int, np.integer)) for v in values):
                if max(values, default=0) >= task.num_classes:
                    raise DatasetLayoutError(f"{source}: integer labels up to {max(values)} but task "
                                             f"{task.name!r} has {task.num_classes} classes.")
                logger.warning("%s: labels are plain integers; assuming the task's order %s.", source, task.labels)
                src_names = list(task.labels)
            else:
                src_names = sorted({str(v) for v in values})
        mapping = {}
        bad = []
        for i, n in enumerate(src_names):
            lab = task.label_from_folder(n)
            (bad.append(n) if lab is None else mapping.__setitem__(i, task.label2id[lab]))
        if bad:
            raise DatasetLayoutError(f"{source}: label name(s) {bad} are not classes of task {task.name!r} "
                                     f"({', '.join(task.labels)}).")
        name_index = {n: i for i, n in enumerate(src_names)}
        raw_labels = list(ds[lab_col])
        new_labels = [mapping[v if isinstance(v, (int, np.integer)) else name_index[str(v)]] for v in raw_labels]
        if "file" in ds.column_names:
            files = [str(f) for f in ds["file"]]
        else:  # the stored file name of each image, when the dataset kept one
            img_paths: list[str | None] = [None] * len(ds)
            if isinstance(ds.features[img_col], Image):
                paths_only = ds.select_columns([img_col]).cast_column(img_col, Image(decode=False)).with_format("arrow")
                column = paths_only[:][img_col]  # a pyarrow table slice: respects select()/shuffle()
                img_paths = column.combine_chunks().field("path").to_pylist()
            files = [Path(p).name if p else f"{split}/{i:06d}" for i, p in enumerate(img_paths)]
        if "group" in ds.column_names:
            groups = [str(g) for g in ds["group"]]
            report.group_method[split] = "column"
        elif task.name == "malaria":
            groups = [malaria_group(f) for f in files]
            report.group_method[split] = "filename-prefix"
        else:
            logger.warning("%s split %r has no group column: each image is its own group, so a validation "
                           "split cannot keep copies of one cell together.", source, split)
            groups = [f"image:{f}" for f in files]
            report.group_method[split] = "per-image"
        ds = ds.select_columns([img_col])
        if img_col != "image":
            ds = ds.rename_column(img_col, "image")
        ds = ds.add_column("label", new_labels).add_column("group", groups).add_column("file", files)
        ds = ds.cast(_features(task))
        out[split] = ds
        report.splits[split] = len(ds)
    return DatasetDict(out), task


def _pick_column(ds, names: Sequence[str], feature_type) -> str | None:
    for n in names:
        if n in ds.column_names:
            return n
    for n, f in ds.features.items():
        if isinstance(f, feature_type):
            return n
    return None


def _looks_like_hub_id(s: str) -> bool:
    """``owner/name``: the only form tried on the Hub (anything else is taken for a local path)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s)) and not s.startswith((".", "/", "~"))


def _is_parquet_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    pats = ("*.parquet", "*.arrow")
    return any(any(path.glob(p)) for p in pats) or any(any((path / "data").glob(p)) for p in pats)


def load_cell_dataset(source: str | os.PathLike, task: str | Task | None = None, *,
                      cache_dir: str | os.PathLike | None = None, return_report: bool = False,
                      smear_dir: str | os.PathLike | None = None, group_by: str = "field", progress: bool = True):
    """Load a cell-image dataset as a ``DatasetDict`` with ``image``, ``label``, ``group``, ``file``.

    Args:
        source: a local folder (Kaggle download, any folder inside it, an image-folder tree, a
            folder written by ``prepare_dataset.py``/``save_to_disk``), a Hub dataset id, or a task
            name (its default Hub dataset).
        task: ``"blood-cells"`` or ``"malaria"``; inferred from class-folder/label names when omitted.
        cache_dir: where validation results, smear matches and Hub downloads are cached
            (default :func:`default_cache_dir`; Hub datasets use the ``datasets`` cache by default).
        return_report: also return a :class:`LoadReport` (skipped files, grouping, layout).
        smear_dir: folder of full smears for blood-cell grouping; found automatically next to a
            Kaggle download (``dataset-master/dataset-master/JPEGImages``).
        group_by: blood cells with smears: ``"field"`` (default: smears that show overlapping
            areas of one slide — consecutive frames, where Kaggle cut the same cell twice — share
            a group; computed once, cached) or ``"smear"`` (the source smear of each crop: one
            group per cut cell, which still lets the few twice-cut cells leak across a split).
        progress: show progress bars.

    Splits are ``train``, ``validation``, ``test``, ``test_simple`` — whichever exist. A file that
    cannot be decoded is skipped and listed in the report and the log; a missing path, an empty
    folder or an unknown class folder raises an error naming what was expected.
    """
    task_obj = get_task(task) if task is not None else None
    if group_by not in ("smear", "field"):
        raise ValueError(f"group_by must be 'smear' or 'field', got {group_by!r}.")
    src = str(source)
    path = Path(src).expanduser()
    report = LoadReport(source=src, task=task_obj.name if task_obj else "", source_kind="")
    local_cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if path.exists():
        if not path.is_dir():
            raise DatasetLayoutError(f"{path} is a file; pass the folder that holds the dataset. "
                                     + _expected_text(task_obj))
        if not any(path.iterdir()):
            raise DatasetLayoutError(f"{path} is an empty folder. " + _expected_text(task_obj))
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            from datasets import DatasetDict, load_from_disk

            raw = load_from_disk(str(path))
            if not isinstance(raw, DatasetDict):
                raw = DatasetDict(train=raw)
            report.source_kind, report.root = "saved-to-disk", str(path)
            dsd, task_obj = _normalize_external(raw, task_obj, report, source=src)
        elif _is_parquet_folder(path):
            from datasets import load_dataset

            raw = load_dataset(str(path), cache_dir=str(local_cache / "hf-datasets"))
            report.source_kind, report.root = "parquet-folder", str(path)
            dsd, task_obj = _normalize_external(raw, task_obj, report, source=src)
        else:
            dsd = _load_local(path, task_obj, local_cache, Path(smear_dir) if smear_dir else None, progress, report,
                              group_by)
            task_obj = get_task(report.task)
    else:
        hub_id = src
        if src.lower().replace("_", "-") in TASKS or src.lower() in ("blood", "wbc"):
            named = get_task(src)
            task_obj = task_obj or named
            if not named.hub_dataset:
                raise DatasetLayoutError(f"Task {named.name!r} has no default Hub dataset; pass a local folder.")
            hub_id = named.hub_dataset
        elif not _looks_like_hub_id(src) or src.count("/") != 1 or Path(src.split("/")[0]).is_dir():
            raise FileNotFoundError(f"Dataset folder {src!r} does not exist. Pass an existing folder (e.g. the "
                                    "unzipped Kaggle download) or a Hugging Face Hub dataset id such as "
                                    f"{TASKS['blood-cells'].hub_dataset!r}.")
        dsd, task_obj = _load_hub(hub_id, task_obj, cache_dir, report)
    if report.skipped:
        logger.warning("Skipped %d unreadable file(s): %s. First: %s (%s)", len(report.skipped),
                       _skip_summary(report.skipped), *report.skipped[0])
        for p, r in report.skipped[1:50]:
            logger.info("skipped %s: %s", p, r)
    logger.info("Loaded %s (%s, task %s): %s", src, report.source_kind, report.task,
                ", ".join(f"{k} {v}" for k, v in report.splits.items()))
    return (dsd, report) if return_report else dsd


def _load_hub(hub_id: str, task: Task | None, cache_dir, report: LoadReport):
    from datasets import DatasetDict, load_dataset

    report.source_kind, report.root = "hub", hub_id
    try:
        raw = load_dataset(hub_id, cache_dir=str(cache_dir) if cache_dir is not None else None)
    except Exception as exc:  # datasets raises many types (offline, missing, auth)
        raise FileNotFoundError(
            f"{hub_id!r} is not a local folder, and loading it as a Hugging Face Hub dataset failed: {exc}. "
            "Check the path or the dataset id (offline? set HF_HUB_OFFLINE=0, or pass the local download)."
        ) from exc
    if not isinstance(raw, DatasetDict):
        raw = DatasetDict(train=raw)
    return _normalize_external(raw, task, report, source=hub_id)


def infer_task(path: str | os.PathLike) -> Task:
    """The task a local dataset folder belongs to, from its class-folder (or label) names."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Dataset folder {path} does not exist.")
    if _is_parquet_folder(path) or (path / "dataset_dict.json").is_file():
        _, report = load_cell_dataset(path, return_report=True, progress=False)
        return get_task(report.task)
    return _find_layout(path, None).task


# --------------------------------------------------------------------------------------------
# grouped validation split


def split_by_group(ds, val_fraction: float = 0.2, seed: int = 0):
    """Split ``ds`` into ``train``/``validation``: stratified by label, no group on both sides.

    Each group is assigned to its majority label; per label, groups are shuffled (``seed``) and
    moved to validation while that brings the label's validation share closer to
    ``val_fraction``. A label with a single group stays in train (with a warning), since it
    cannot be on both sides without leaking.
    """
    from datasets import DatasetDict

    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}.")
    for col in ("label", "group"):
        if col not in ds.column_names:
            raise ValueError(f"split_by_group needs a {col!r} column; the dataset has {ds.column_names}.")
    labels = np.asarray(list(ds["label"]))
    groups = np.asarray([str(g) for g in ds["group"]])
    rng = np.random.default_rng(seed)
    by_group: dict[str, Counter] = defaultdict(Counter)
    for g, lab in zip(groups, labels):
        by_group[g][int(lab)] += 1
    groups_of_label: dict[int, list[str]] = defaultdict(list)
    for g in sorted(by_group):
        groups_of_label[by_group[g].most_common(1)[0][0]].append(g)
    val_groups: set[str] = set()
    names = ds.features["label"].names if hasattr(ds.features["label"], "names") else None
    for lab in sorted(groups_of_label):
        gs = groups_of_label[lab]
        name = names[lab] if names else lab
        if len(gs) < 2:
            logger.warning("Label %r has %d group(s): none can go to validation without leaking.", name, len(gs))
            continue
        order = [gs[i] for i in rng.permutation(len(gs))]
        sizes = {g: sum(by_group[g].values()) for g in gs}
        target = val_fraction * sum(sizes.values())
        taken = 0
        chosen = []
        for g in order:
            if len(chosen) >= len(gs) - 1:
                break
            if not chosen or abs(taken + sizes[g] - target) < abs(taken - target):
                chosen.append(g)
                taken += sizes[g]
        val_groups.update(chosen)
    is_val = np.isin(groups, list(val_groups))
    val_idx = np.flatnonzero(is_val)
    train_idx = np.flatnonzero(~is_val)
    logger.info("Grouped split: %d train / %d validation images, %d / %d groups.", len(train_idx), len(val_idx),
                len(set(groups[train_idx])), len(val_groups))
    return DatasetDict(train=ds.select(train_idx), validation=ds.select(val_idx))


def ensure_validation(dsd, val_fraction: float = 0.2, seed: int = 0):
    """``dsd`` with a ``validation`` split: kept when present, else grouped out of ``train``."""
    from datasets import DatasetDict

    if "validation" in dsd:
        return dsd
    if "train" not in dsd:
        raise ValueError(f"Need a 'train' split to draw validation from; splits are {list(dsd)}.")
    parts = split_by_group(dsd["train"], val_fraction=val_fraction, seed=seed)
    out = {"train": parts["train"], "validation": parts["validation"]}
    out.update({k: v for k, v in dsd.items() if k != "train"})
    return DatasetDict(out)


# --------------------------------------------------------------------------------------------
# decode once


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


def _dataset_key(ds) -> str:
    """A key that changes when the rows or their files change (path+size+mtime, or the fingerprint)."""
    from datasets import Image

    h = hashlib.sha1()
    h.update(json.dumps(ds.features.to_dict(), sort_keys=True, default=str).encode())
    if "image" in ds.column_names and isinstance(ds.features["image"], Image):
        col = ds.select_columns(["image"]).cast_column("image", Image(decode=False)).with_format("arrow")[:]["image"]
        col = col.combine_chunks()
        paths = col.field("path").to_pylist()
        if len(ds) and all(paths) and col.field("bytes").null_count == len(ds):  # images are local files
            for path in paths:
                st = os.stat(path)
                h.update(f"{path}|{st.st_size}|{st.st_mtime_ns};".encode())
            h.update(json.dumps([list(ds[c]) for c in ("label", "group") if c in ds.column_names]).encode())
            return h.hexdigest()[:20]
    h.update(str(ds._fingerprint).encode())
    return h.hexdigest()[:20]


def cache_resized(ds, size: int | Sequence[int], cache_dir: str | os.PathLike | None = None, *,
                  keep_image: bool = False, num_proc: int | None = None, progress: bool = True):
    """Decode every image once, resized to ``size`` (int or (height, width)), as uint8 HWC ``pixels``.

    The result is written to an Arrow file under ``cache_dir`` (default
    :func:`default_cache_dir`/``resized``), keyed by the images and the size, so a second run
    (or the next epoch, or the next training run) memory-maps it instead of decoding JPEGs.
    ``image`` is dropped unless ``keep_image`` (keeping it would make every row decode again).

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
    cache_file = cache_root / f"{key}-{h}x{w}.arrow"
    feats = {k: v for k, v in ds.features.items() if keep_image or k != "image"}
    feats["pixels"] = Array3D(shape=(h, w, 3), dtype="uint8")
    features = Features(feats)

    def _resize(batch: dict[str, list]) -> dict[str, list]:
        out = []
        for im in batch["image"]:
            im = im.convert("RGB")
            if im.size != (w, h):
                im = im.resize((w, h), PILImage.BILINEAR, reducing_gap=3.0)
            out.append(np.asarray(im, dtype=np.uint8))
        return {"pixels": out}

    if cache_file.exists():
        logger.info("Using resized images cached in %s", cache_file)
    else:
        logger.info("Decoding %d images once at %dx%d into %s", len(ds), h, w, cache_file)
    src = ds.cast_column("image", Image(decode=True))
    if not progress:
        disable_progress_bars()
    try:
        out = src.map(_resize, batched=True, batch_size=64, features=features, num_proc=num_proc,
                      remove_columns=[] if keep_image else ["image"], cache_file_name=str(cache_file),
                      load_from_cache_file=True, writer_batch_size=256, desc=f"resizing to {h}x{w}")
    finally:
        if not progress:
            enable_progress_bars()
    return out
