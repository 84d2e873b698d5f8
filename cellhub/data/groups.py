"""The ``group`` of every example: the unit that must never straddle a train/evaluation split.

Malaria: the slide/patient (file-name prefix). Blood-cell crops: the microscope field of the smear
each crop was cut from (:mod:`cellhub.smears` matches crops to smears, and smears showing the same
field to each other), or a weaker crop-to-crop grouping when no smears are at hand. Other tasks:
one group per image. Every matcher runs once and is cached by the files' identity.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .. import smears
from ..cache import cached_json, files_key
from ..images import is_image_file
from ..tasks import Task, malaria_group
from .report import LoadReport

__all__ = ["groups_for", "blood_groups"]

logger = logging.getLogger(__name__)


def _fallback_groups(paths: list[str], cache_dir: Path | None, progress: bool) -> dict[str, str]:
    """Weaker grouping when a crop cannot be traced to a smear: :func:`cellhub.smears.fallback_groups`
    (crop-to-crop matching within each class folder), cached by the crops' identity."""
    cache_file = (Path(cache_dir) / "groups" / f"fallback-{files_key(sorted(paths))}.json"
                  if cache_dir is not None else None)

    def compute() -> dict[str, str]:
        return {str(k): str(v) for k, v in smears.fallback_groups(paths, progress=progress).items()}

    return cached_json(cache_file, compute, what=f"fallback groups for {len(paths)} crops",
                       valid=lambda hit: isinstance(hit, dict) and set(hit) == set(paths))


def _smear_fields_cached(smear_dir: Path, cache_dir: Path | None, progress: bool) -> dict[str, str]:
    """:func:`cellhub.smears.smear_fields` (smear id -> field id), cached by the smears' identity."""
    files = sorted(p for p in Path(smear_dir).iterdir() if is_image_file(p))
    cache_file = (Path(cache_dir) / "groups" / f"fields-{files_key(files, resolve=True)}.json"
                  if cache_dir is not None else None)

    def compute() -> dict[str, str]:
        logger.info("Finding smears that show the same microscope field (once; cached)...")
        return {str(k): str(v) for k, v in smears.smear_fields(smear_dir, progress=progress).items()}

    return cached_json(cache_file, compute, what="smear fields", valid=lambda hit: isinstance(hit, dict))


def blood_groups(paths: list[str], smear_dir: Path | None, cache_dir: Path | None, progress: bool,
                 split: str, report: LoadReport, group_by: str = "smear") -> list[str]:
    """One group per crop: its smear's field (or smear), else a fallback group; records the method in ``report``."""
    matched: dict[str, str | None] = {}
    if smear_dir is not None:
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


def groups_for(task: Task, paths: list[str], files: list[str], smear_dir: Path | None, cache_dir: Path | None,
               progress: bool, split: str, report: LoadReport, group_by: str = "smear") -> list[str]:
    """The group of every example of one split of ``task`` (see the module docstring)."""
    if task.name == "malaria":
        report.group_method[split] = "filename-prefix"
        return [malaria_group(f) for f in files]
    if task.name == "blood-cells":
        return blood_groups(paths, smear_dir, cache_dir, progress, split, report, group_by)
    report.group_method[split] = "per-image"
    return [f"image:{f}" for f in files]
