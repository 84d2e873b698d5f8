"""Finding the layout of a local dataset folder: split folders, class folders, nested copies.

:func:`find_layout` walks a folder (a Kaggle download, any folder inside it, an image-folder
tree) and says which task it is, which split folders it has and which class folder holds which
label; an unknown class or split folder is a :class:`DatasetLayoutError` naming what was expected.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..images import is_image_file
from ..tasks import TASKS, Task, get_task
from .report import DatasetLayoutError

__all__ = ["Layout", "find_layout", "find_smear_dir", "expected_text", "pick_task", "split_name", "is_hidden",
           "has_image_files", "SPLIT_ALIASES", "SPLIT_ORDER"]

logger = logging.getLogger(__name__)

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


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_DIRS


def split_name(folder: str) -> str | None:
    key = re.sub(r"[\s\-]+", "_", folder.strip()).lower()
    return SPLIT_ALIASES.get(key)


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not is_hidden(p.name))
    except OSError:
        return []


def has_image_files(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            return any(e.is_file() and is_image_file(e.name) for e in it)
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




@dataclass
class Layout:
    root: Path
    kind: str  # kaggle-blood-cells | kaggle-malaria | imagefolder
    task: Task
    #: split -> list of (class_label, class_dir, list of duplicate class dirs to merge)
    splits: dict[str, list[tuple[str, Path, list[Path]]]]
    #: False when the folder has no split folders (its one split is called "train" by convention)
    named_splits: bool = True
    #: class folders of other tasks' labels that this task does not have (left out, reported)
    ignored: list[Path] = field(default_factory=list)


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
        elif has_image_files(s):
            unknown.append(s)
        elif any(_label_for(g.name, tasks) and has_image_files(g) for g in _subdirs(s)):
            nested.append(s)
    if not known and not unknown:
        return None
    return known, unknown, nested


def pick_task(folder_names: Iterable[str], task: Task | None, where: Path) -> Task:
    if task is not None:
        return task
    votes: Counter[str] = Counter()
    for name in folder_names:
        for tname in _label_for(name, TASKS.values()):
            votes[tname] += 1
    if not votes:
        raise DatasetLayoutError(
            f"Cannot tell the task of {where}: none of its folders is named after a class. "
            + expected_text()
        )
    # the task that knows the most folders; between equals, the one with fewer classes (Kaggle's four
    # white-cell folders are blood-cells, not the 8-class PBC task that shares their names)
    best = sorted(votes.items(), key=lambda kv: (-kv[1], get_task(kv[0]).num_classes))
    if len(best) > 1 and best[0][1] == best[1][1] and \
            get_task(best[0][0]).num_classes == get_task(best[1][0]).num_classes:
        raise DatasetLayoutError(
            f"Cannot tell the task of {where}: its folders match {best[0][0]!r} and {best[1][0]!r} equally. "
            "Pass task='blood-cells' or task='malaria' (--task on the command line)."
        )
    return get_task(best[0][0])


def expected_text(task: Task | None = None) -> str:
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


def find_layout(path: Path, task: Task | None) -> Layout:
    tasks = [task] if task else list(TASKS.values())
    split_roots: list[tuple[int, Path]] = []
    class_roots: list[tuple[int, Path]] = []
    unknown_seen: list[Path] = []
    queue: list[tuple[Path, int]] = [(path, 0)]
    images_directly_in_path = has_image_files(path)
    while queue:
        d, depth = queue.pop(0)
        subs = _subdirs(d)
        split_subs = [s for s in subs if split_name(s.name)]
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
            split = split_name(s.name)
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
        the_task = pick_task(names, task, root)
        ignored: list[Path] = []
        layout_splits = {sp: _class_dirs(dirs[0], the_task, ignored) for sp, dirs in splits.items()}
        upper = all(s.name.isupper() for s in _subdirs(root) if split_name(s.name))
        kind = "kaggle-blood-cells" if the_task.name == "blood-cells" and (
            upper or any("dataset2-master" in p for p in root.parts)) else "imagefolder"
        if not any(layout_splits.values()):
            raise DatasetLayoutError(f"None of the class folders under {root} holds a class for task {the_task.name!r}. "
                                     + expected_text(the_task))
        return Layout(root=root, kind=kind, task=the_task, splits=layout_splits, ignored=ignored)
    if class_roots:
        root = min(class_roots)[1]
        known, unknown, _ = _classify_class_root(root, tasks)  # type: ignore[misc]
        the_task = pick_task(list(known) + [u.name for u in unknown], task, root)
        split = split_name(root.name)
        named = split is not None
        split = split or "train"
        kind = "kaggle-malaria" if the_task.name == "malaria" and root.name.lower() == "cell_images" else "imagefolder"
        if the_task.name == "blood-cells" and any("dataset2-master" in p for p in root.parts):
            kind = "kaggle-blood-cells"
        ignored = []
        dirs = _class_dirs(root, the_task, ignored)
        if not dirs:
            raise DatasetLayoutError(f"None of the class folders in {root} holds a class for task {the_task.name!r}. "
                                     + expected_text(the_task))
        return Layout(root=root, kind=kind, task=the_task, splits={split: dirs}, named_splits=named,
                      ignored=ignored)
    if images_directly_in_path and not _subdirs(path):
        raise DatasetLayoutError(
            f"{path} holds images directly but no class folders: pass the folder that contains the "
            "class folders (its parent, if this is one class). " + expected_text(task)
        )
    if unknown_seen:
        shown = ", ".join(repr(u.name) for u in unknown_seen[:8])
        raise DatasetLayoutError(
            f"Unknown class folder(s) {shown} under {path}. " + expected_text(task)
        )
    raise DatasetLayoutError(f"No images in class folders found under {path}. " + expected_text(task))


def _class_dirs(root: Path, task: Task, ignored: list[Path] | None = None) -> list[tuple[str, Path, list[Path]]]:
    """Class folders of one split root, checked against ``task``; nested copies are merged. With
    ``ignored``, folders of other tasks' classes are left out and appended to it (else an error)."""
    cls = _classify_class_root(root, list(TASKS.values()))
    if cls is None:
        raise DatasetLayoutError(f"No class folders with images in {root}. " + expected_text(task))
    known, unknown, nested = cls
    foreign = [d for name, d in known.items() if task.label_from_folder(name) is None]
    if foreign and ignored is not None:  # another task's classes (PBC's basophils for the 4-class task)
        ignored.extend(foreign)
        known = {name: d for name, d in known.items() if task.label_from_folder(name) is not None}
    bad = [name for name in known if task.label_from_folder(name) is None] + [u.name for u in unknown]
    if bad:
        raise DatasetLayoutError(
            f"Unknown class folder(s) {', '.join(map(repr, sorted(bad)))} in {root} for task {task.name!r}. "
            + expected_text(task)
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



def find_smear_dir(start: Path) -> Path | None:
    """The Kaggle ``dataset-master/.../JPEGImages`` folder of full smears next to the crops, if any."""
    for anc in [start, *start.parents][:6]:
        for cand in (anc / "dataset-master" / "dataset-master" / "JPEGImages",
                     anc / "dataset-master" / "JPEGImages", anc / "JPEGImages"):
            if cand.is_dir() and has_image_files(cand):
                return cand
    return None
