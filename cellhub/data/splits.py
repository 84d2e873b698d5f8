"""Grouped splits: no group (source cell, field, patient) on both sides."""
from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np

__all__ = ["split_by_group", "ensure_validation", "group_kfold", "cv_fold"]

logger = logging.getLogger(__name__)


def _labels_and_groups(ds, who: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``label`` and ``group`` columns as arrays (groups as strings); a clear error without them."""
    for col in ("label", "group"):
        if col not in ds.column_names:
            raise ValueError(f"{who} needs a {col!r} column; the dataset has {ds.column_names}.")
    return np.asarray(list(ds["label"])), np.asarray([str(g) for g in ds["group"]])


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
    labels, groups = _labels_and_groups(ds, "split_by_group")
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


def group_kfold(ds, k: int, seed: int = 0) -> np.ndarray:
    """The fold (0..k-1) of every row: grouped K-fold, stratified by label (scikit-learn's
    ``StratifiedGroupKFold``), so every group lies in exactly one fold and each fold holds about
    1/k of every label. Raises ``ValueError`` when there are fewer groups than folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    if int(k) < 2:
        raise ValueError(f"--cv needs at least 2 folds, got {k}.")
    labels, groups = _labels_and_groups(ds, "group_kfold")
    n_groups = len(set(groups.tolist()))
    if n_groups < k:
        raise ValueError(f"{k}-fold cross-validation needs at least {k} groups; the data has {n_groups}. "
                         f"Use --cv {max(2, n_groups)} or fewer folds, or a finer --group-by.")
    folds = np.full(len(ds), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=int(k), shuffle=True, random_state=int(seed))
    for i, (_, held) in enumerate(splitter.split(np.zeros(len(ds)), labels, groups)):
        folds[held] = i
    return folds


def cv_fold(dsd, k: int, fold: int, *, val_fraction: float = 0.2, seed: int = 0):
    """Fold ``fold`` of grouped ``k``-fold cross-validation of ``dsd``'s development data.

    Train and any given validation split are pooled; the fold's groups become ``holdout`` (scored,
    never used for a choice); the other folds are split again by group into ``train`` and
    ``validation`` (which picks the epoch and the abstention threshold, as in a run without
    cross-validation). Test splits are left out: they are scored by the final model only.
    """
    from datasets import DatasetDict, concatenate_datasets

    if not 0 <= int(fold) < int(k):
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold}.")
    if "train" not in dsd:
        raise ValueError(f"Cross-validation needs a 'train' split; splits are {list(dsd)}.")
    pool = dsd["train"]
    if "validation" in dsd:
        cols = pool.column_names
        pool = concatenate_datasets([pool, dsd["validation"].select_columns(cols)])
    folds = group_kfold(pool, k, seed)
    held = np.flatnonzero(folds == fold)
    rest = pool.select(np.flatnonzero(folds != fold))
    inner = split_by_group(rest, val_fraction=val_fraction, seed=seed)
    return DatasetDict(train=inner["train"], validation=inner["validation"], holdout=pool.select(held))
