"""Load cell-image datasets from wherever they are: local folders, saved datasets, the Hub.

:func:`load_cell_dataset` is the entry point; every source comes out in one shape (a
``DatasetDict`` with ``image``, ``label``, ``group``, ``file``), in the task's label order, with
unreadable files skipped and listed in the :class:`~cellhub.data.report.LoadReport`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import atomic_write_json, default_cache_dir, file_identity, read_json
from ..images import check_image, is_image_file
from ..tasks import TASKS, Task, get_task, malaria_group
from .groups import GROUP_BY, groups_for
from .layouts import SPLIT_ORDER, expected_text, find_layout, find_smear_dir, is_hidden, pick_task, split_name
from .refs import image_paths
from .report import DatasetLayoutError, LoadReport

__all__ = ["load_cell_dataset", "infer_task"]

logger = logging.getLogger(__name__)

_VALIDATION_CACHE_VERSION = 2  # 2: files known by size and content digest


def _validate_files(paths: Sequence[Path], cache_dir: Path | None, progress: bool) -> dict[str, str | None]:
    """Check every file once (in threads); results are cached by (path, size, content digest)."""
    from tqdm.auto import tqdm

    cache_file = None
    cached: dict[str, list] = {}
    if cache_dir is not None and paths:
        key = hashlib.sha1(os.path.dirname(os.path.dirname(str(paths[0]))).encode()).hexdigest()[:16]
        cache_file = Path(cache_dir) / "validated" / f"v{_VALIDATION_CACHE_VERSION}-{key}.json"
        cached = read_json(cache_file, {}, warn=False)
    results: dict[str, str | None] = {}
    todo: list[tuple[str, tuple[int, str]]] = []
    for p in paths:
        sp = str(p)
        ident = file_identity(sp)
        if ident is None:
            results[sp] = "unreadable (cannot stat the file)"
            continue
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
                atomic_write_json(cache_file, cached)
            except OSError as exc:
                logger.warning("Could not write the image-validation cache %s: %s", cache_file, exc)
    return results




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
                dirnames[:] = sorted(x for x in dirnames if not is_hidden(x))
                for fn in sorted(filenames):
                    p = Path(os.path.abspath(os.path.join(dirpath, fn)))
                    if fn.startswith("."):  # .DS_Store and the like; one with an image suffix is reported
                        if is_image_file(p):
                            report.skipped.append((str(p), "hidden file (name starts with '.'): not read"))
                        continue
                    rel = p.relative_to(tree).as_posix()
                    if tree is not d and rel in seen:
                        report.ignored_duplicates += 1
                        continue
                    if not is_image_file(p):
                        report.skipped.append((str(p), f"not an image file (extension {p.suffix or 'none'!r})"))
                        continue
                    seen.add(rel)
                    out.append((p, label, f"{d.name}/{rel}"))
    return out


def _load_local(path: Path, task: Task | None, cache_dir: Path | None, smear_dir: Path | None,
                progress: bool, report: LoadReport, group_by: str = "auto"):
    from datasets import Dataset, DatasetDict

    path = Path(os.path.abspath(path))
    layout = find_layout(path, task)
    task = layout.task
    report.task, report.source_kind, report.root = task.name, layout.kind, str(layout.root)
    report.named_splits = layout.named_splits
    for d in layout.ignored:
        n = sum(1 for f in d.rglob("*") if is_image_file(f))
        note = f"ignored {d.relative_to(layout.root)}/ ({n} images): not a class of task {task.name!r}"
        report.notes.append(note)
        logger.warning(note)
    if task.name == "blood-cells" and smear_dir is None:
        smear_dir = find_smear_dir(layout.root)
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
        groups = groups_for(task, paths, files, smear_dir if task.name == "blood-cells" else None,
                             cache_dir, progress, split, report, group_by,
                             smears_expected=layout.kind == "kaggle-blood-cells")
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
                                 + expected_text(task))
    return DatasetDict(out)


def _via_imagefolder(paths: list[str], labels: list[int], groups: list[str], files: list[str], task: Task,
                     cache_dir: Path | None):
    """Read validated files through ``datasets``' imagefolder builder, then set our columns.

    imagefolder names classes after the folders, sorted alphabetically; rows are matched back to
    our labels/groups by path, so the task's label order is what comes out.
    """
    from datasets import load_dataset

    kwargs: dict[str, Any] = {}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir) / "hf-datasets")
    raw = load_dataset("imagefolder", data_files={"train": paths}, split="train", drop_labels=True, **kwargs)
    info = {p: (lab, g, f) for p, lab, g, f in zip(paths, labels, groups, files)}
    raw_paths = [os.path.abspath(p) for p in image_paths(raw)]
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
    from datasets import ClassLabel, DatasetDict, Image

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
        task = pick_task(names, None, Path(source))
    report.task = task.name
    for split_key, ds in dsd.items():
        split = split_name(split_key) or split_key
        img_col = _pick_column(ds, ("image", "img", "images", "pixel_values"), Image)
        lab_col = _pick_column(ds, ("label", "labels", "category", "class", "cell_type"), ClassLabel)
        if img_col is None or lab_col is None:
            raise DatasetLayoutError(f"{source} split {split_key!r}: need an image and a label column; "
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
                img_paths = image_paths(ds, img_col)
            files = [Path(p).name if p else f"{split}/{i:06d}" for i, p in enumerate(img_paths)]
        groups = _external_groups(ds, files, task, report, split, source)
        ds = ds.select_columns([img_col])
        if img_col != "image":
            ds = ds.rename_column(img_col, "image")
        ds = ds.add_column("label", new_labels).add_column("group", groups).add_column("file", files)
        ds = ds.cast(_features(task))
        out[split] = ds
        report.splits[split] = len(ds)
    return DatasetDict(out), task


def _external_groups(ds, files: list[str], task: Task, report: LoadReport, split: str, source: str) -> list[str]:
    """Groups of a Hub / Parquet / saved split: its ``group`` column, the malaria prefix, or one per image."""
    asked = report.group_by_requested
    if asked in ("field", "smear", "near-duplicates"):
        raise ValueError(f"group_by={asked!r} works on local image folders (it reads the image files); {source} is a "
                         "saved or Hub dataset. Use its group column (auto), patient (malaria), file or none.")
    if asked == "patient" and task.name != "malaria":
        raise ValueError(f"group_by='patient' does not apply to task {task.name!r}. Choices: auto, file, none.")
    if asked == "auto" and "group" in ds.column_names:
        report.group_by = report.group_method[split] = "column"
        return [str(g) for g in ds["group"]]
    if asked == "patient" or (asked == "auto" and task.name == "malaria"):
        report.group_by = report.group_method[split] = "patient"
        return [malaria_group(f) for f in files]
    if asked == "auto":
        logger.warning("%s split %r has no group column: each image is its own group, so a validation "
                       "split cannot keep copies of one cell together.", source, split)
    report.group_by = report.group_method[split] = "none" if asked == "none" else "file"
    return [f"image:{f}" for f in files]


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
                      smear_dir: str | os.PathLike | None = None, group_by: str = "auto", progress: bool = True):
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
        group_by: the unit a split must not cut (:data:`cellhub.data.groups.GROUP_BY`): ``"auto"``
            (default: ``"field"`` for blood cells with smears — smears that show overlapping areas
            of one slide share a group —, ``"patient"`` for malaria, ``"near-duplicates"``
            otherwise), ``"field"``, ``"smear"``, ``"patient"``, ``"near-duplicates"``, ``"file"``
            or ``"none"``. The one used is ``report.group_by``; a choice the data cannot support
            raises ``ValueError`` naming the ones it can.
        progress: show progress bars.

    Splits are ``train``, ``validation``, ``test``, ``test_simple`` — whichever exist. A file that
    cannot be decoded is skipped and listed in the report and the log; a missing path, an empty
    folder or an unknown class folder raises an error naming what was expected.
    """
    task_obj = get_task(task) if task is not None else None
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}; got {group_by!r}.")
    src = str(source)
    path = Path(src).expanduser()
    report = LoadReport(source=src, task=task_obj.name if task_obj else "", source_kind="",
                        group_by_requested=group_by)
    local_cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if path.exists():
        if not path.is_dir():
            raise DatasetLayoutError(f"{path} is a file; pass the folder that holds the dataset. "
                                     + expected_text(task_obj))
        if not any(path.iterdir()):
            raise DatasetLayoutError(f"{path} is an empty folder. " + expected_text(task_obj))
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
    return find_layout(path, None).task
