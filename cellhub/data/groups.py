"""The ``group`` of every example: the unit that must never straddle a train/evaluation split.

``group_by`` says which unit; the choices a source allows:

- ``field``: blood-cell crops with the full smears beside them — the microscope field each crop was
  cut from (:mod:`cellhub.smears` matches crops to smears, and smears showing the same field to
  each other: re-imaged fields, consecutive frames);
- ``smear``: the same, one group per source smear (a re-imaged field's smears stay apart);
- ``patient``: the slide/patient prefix of NIH malaria file names (``C100P61``);
- ``near-duplicates``: copies of one cell (rotated, mirrored, shifted, resized) found by
  :mod:`cellhub.data.neardup`, for folders that carry none of the above;
- ``file``: each image is its own group (images known to be distinct cells);
- ``none``: the same split behaviour as ``file``, reported as "no grouping" (images assumed
  independent, which the report then says it could not check).

``auto`` (the default) picks ``field`` for blood cells with smears, ``patient`` for malaria and
``near-duplicates`` otherwise. Crops a smear search could not place get near-duplicate groups.
Every matcher runs once and is cached by the files' identity.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .. import smears
from ..cache import cached_json, files_key
from ..images import is_image_file
from ..tasks import GROUP_BY, GROUP_METHOD_TEXT, Task, malaria_group
from .neardup import near_duplicate_groups
from .report import LoadReport

__all__ = ["GROUP_BY", "GROUP_METHOD_TEXT", "groups_for", "blood_groups", "resolve_group_by", "group_by_choices"]

logger = logging.getLogger(__name__)



def group_by_choices(task: Task, has_smears: bool) -> list[str]:
    """The ``group_by`` values that make sense for a local folder of ``task`` (``auto`` first)."""
    choices = ["auto"]
    if task.name == "blood-cells" and has_smears:
        choices += ["field", "smear"]
    if task.name == "malaria":
        choices.append("patient")
    return choices + ["near-duplicates", "file", "none"]


def resolve_group_by(group_by: str, task: Task, has_smears: bool) -> str:
    """``group_by`` with ``auto`` replaced by the default for the data; a clear error when it does not apply."""
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}; got {group_by!r}.")
    if group_by == "auto":
        if task.name == "blood-cells" and has_smears:
            return "field"
        return "patient" if task.name == "malaria" else "near-duplicates"
    allowed = group_by_choices(task, has_smears)
    if group_by not in allowed:
        why = ("needs the full smears the crops were cut from (dataset-master/dataset-master/JPEGImages of the "
               "Kaggle download, found next to the crops, or pass smear_dir / --smear-dir)"
               if group_by in ("field", "smear") and task.name == "blood-cells" else
               f"does not apply to task {task.name!r}")
        raise ValueError(f"group_by={group_by!r} {why}. Choices for this data: {', '.join(allowed)}.")
    return group_by


def _near_cached(paths: list[str], files: list[str], cache_dir: Path | None, progress: bool) -> dict[str, str]:
    """:func:`near_duplicate_groups` of ``paths`` (named by ``files``), cached by the files' identity."""
    cache_file = (Path(cache_dir) / "groups" / f"near-{files_key(sorted(paths))}.json"
                  if cache_dir is not None else None)

    def compute() -> dict[str, str]:
        return dict(zip(paths, near_duplicate_groups(paths, files, progress=progress)))

    return cached_json(cache_file, compute, what=f"near-duplicate groups of {len(paths)} images",
                       valid=lambda hit: isinstance(hit, dict) and set(hit) == set(paths))


def field_of_smears(smear_dir: Path, cache_dir: Path | None, progress: bool) -> dict[str, str]:
    """:func:`cellhub.smears.smear_fields` (smear id -> field id), cached by the smears' identity."""
    files = sorted(p for p in Path(smear_dir).iterdir() if is_image_file(p))
    cache_file = (Path(cache_dir) / "groups" / f"fields-{files_key(files, resolve=True)}.json"
                  if cache_dir is not None else None)

    def compute() -> dict[str, str]:
        logger.info("Finding smears that show the same microscope field (once; cached)...")
        return {str(k): str(v) for k, v in smears.smear_fields(smear_dir, progress=progress).items()}

    return cached_json(cache_file, compute, what="smear fields", valid=lambda hit: isinstance(hit, dict))


def smear_of_crops(paths: list[str], smear_dir: Path, cache_dir: Path | None, progress: bool) -> dict[str, str | None]:
    """The source smear id of every crop (``None`` where no smear matched), cached."""
    smear_cache = Path(cache_dir) / "smears" if cache_dir is not None else None
    raw = smears.match_crops_to_smears(paths, smear_dir, cache_dir=smear_cache, progress=progress)
    return {str(k): v for k, v in raw.items()}


def blood_groups(paths: list[str], files: list[str], smear_dir: Path, cache_dir: Path | None, progress: bool,
                 split: str, report: LoadReport, group_by: str = "field") -> list[str]:
    """One group per crop: its smear's field (or smear); crops no smear matched get near-duplicate groups."""
    matched = smear_of_crops(paths, smear_dir, cache_dir, progress)
    if group_by == "field":
        fields = field_of_smears(smear_dir, cache_dir, progress)
        matched = {k: (f"field:{fields.get(v, v)}" if v else v) for k, v in matched.items()}
    unmatched = [i for i, p in enumerate(paths) if not matched.get(p)]
    near = _near_cached([paths[i] for i in unmatched], [files[i] for i in unmatched], cache_dir,
                        progress) if unmatched else {}
    if paths:
        report.smear_attribution[split] = (len(paths) - len(unmatched)) / len(paths)
        report.group_method[split] = group_by if not unmatched else f"{group_by}+near-duplicates"
        if unmatched:
            logger.warning("%s: %d of %d crops matched no smear; they get near-duplicate groups.",
                           split, len(unmatched), len(paths))
    # near-duplicate groups are computed per split and carry its name; "unmatched:" keeps them
    # apart from smear ids
    return [matched.get(p) or f"unmatched:{split}/{near[p]}" for p in paths]


def groups_for(task: Task, paths: list[str], files: list[str], smear_dir: Path | None, cache_dir: Path | None,
               progress: bool, split: str, report: LoadReport, group_by: str = "auto",
               smears_expected: bool = True) -> list[str]:
    """The group of every example of one split of ``task`` (see the module docstring).

    ``smears_expected``: the folder is one whose crops were cut from full smears (the Kaggle
    layout), so grouping without them is warned about; other folders (one cell per image, as PBC)
    are grouped by near-duplicates without a warning."""
    method = resolve_group_by(group_by, task, smear_dir is not None)
    report.group_by = method
    if method in ("field", "smear"):
        return blood_groups(paths, files, smear_dir, cache_dir, progress, split, report, method)
    report.group_method[split] = method
    if method == "patient":
        return [malaria_group(f) for f in files]
    if method == "near-duplicates":
        if task.name == "blood-cells" and smear_dir is None:
            if smears_expected:
                logger.warning(
                    "No full smears (dataset-master/dataset-master/JPEGImages) found for the %s split: blood-cell "
                    "crops are grouped as near-duplicates (copies of one crop), which cannot see two crops of one "
                    "field; put the smears where the Kaggle download has them (dataset-master/dataset-master/"
                    "JPEGImages beside dataset2-master), or pass smear_dir=... (load_cell_dataset; --smear-dir "
                    "of `cellhub audit`, `cellhub evaluate` and train/prepare_dataset.py).", split)
            else:
                logger.info("%s split: every image is grouped with its near-duplicates (copies of one cell).", split)
        near = _near_cached(paths, files, cache_dir, progress)
        return [f"{split}/{near[p]}" for p in paths]
    return [f"image:{f}" for f in files]
