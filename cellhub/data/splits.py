"""Grouped splits: no group (source cell, field, patient) on both sides."""
from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np

__all__ = ["split_by_group", "ensure_validation"]

logger = logging.getLogger(__name__)


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
