"""Honest classification metrics: per-class scores, calibration, grouped bootstrap CIs, plots.

Every number a cellhub model reports comes from :func:`classification_metrics`. Point estimates
(confusion matrix, precision/recall/F1, balanced accuracy, ROC AUC) are scikit-learn's; confidence
intervals are computed by resampling *groups* (source cells for blood-cells, patients/slides
for malaria), not images: copies of one cell are not independent evidence, so an image-level
bootstrap would give intervals that are far too narrow.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "classification_metrics",
    "macro_f1",
    "group_vote_accuracy",
    "grouped_bootstrap",
    "paired_bootstrap",
    "paired_difference",
    "expected_calibration_error",
    "choose_abstention_threshold",
    "format_metrics_table",
    "format_ci",
    "format_comparison",
    "plot_history",
    "plot_confusion",
]

logger = logging.getLogger(__name__)


def _as_probs(y_prob: Any, n_labels: int) -> np.ndarray:
    p = np.asarray(y_prob, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != n_labels:
        raise ValueError(
            f"y_prob must have shape (n_images, {n_labels}) for {n_labels} labels; got {p.shape}."
        )
    if not np.all(np.isfinite(p)):
        raise ValueError("y_prob contains NaN or infinite values.")
    return p


def _macro_f1_from_counts(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> np.ndarray:
    """Macro-F1 over the classes present in truth or prediction (scikit-learn's default).

    Arrays are (..., K); returns (...).
    """
    denom = n_pred + n_true
    present = denom > 0
    f1 = np.where(present, 2.0 * tp / np.where(present, denom, 1.0), 0.0)
    n_present = present.sum(axis=-1)
    return np.where(n_present > 0, f1.sum(axis=-1) / np.maximum(n_present, 1), 0.0)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Macro-F1 over the classes present in truth or prediction (scikit-learn's ``f1_score``)."""
    from sklearn.metrics import f1_score

    if len(y_true) == 0:
        return float("nan")
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def expected_calibration_error(y_true: Sequence[int], y_prob: Any, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence (equal-width bins, L1).

    ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|. 0 is perfectly calibrated.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_prob, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # bin b holds confidences in (b/n_bins, (b+1)/n_bins]; confidence 0 goes into bin 0
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _group_index(groups: Sequence[Any] | None, n: int) -> tuple[np.ndarray, int]:
    """``(each image's group number, number of groups)``; ``groups=None``: every image its own group."""
    if groups is None:
        return np.arange(n), n
    _, gidx = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return gidx, int(gidx.max()) + 1 if n else 0


def _group_draws(rng: np.random.Generator, n_groups: int, size: int) -> np.ndarray:
    """(size, n_groups): how often each group is drawn in each bootstrap replicate (n_groups draws each)."""
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=size).astype(np.float64)


def grouped_bootstrap(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    groups: Sequence[Any] | None,
    n_labels: int,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Bootstrap accuracy and macro-F1 by resampling whole groups with replacement.

    Each replicate draws ``n_groups`` groups with replacement and keeps every image of every
    drawn group (a group drawn twice counts twice). With ``groups=None`` every image is its own
    group (the ordinary image bootstrap). Returns ``{"accuracy": (n_boot,), "macro_f1": (n_boot,)}``.
    """
    y = np.asarray(y_true, dtype=np.int64)
    yp = np.asarray(y_pred, dtype=np.int64)
    n = len(y)
    gidx, n_groups = _group_index(groups, n)
    if n == 0 or n_boot <= 0:
        return {"accuracy": np.empty(0), "macro_f1": np.empty(0)}
    rng = np.random.default_rng(seed)
    out_acc = np.empty(n_boot)
    out_f1 = np.empty(n_boot)
    correct = (y == yp).astype(np.float64)
    onehot_true = np.eye(n_labels)[y]  # (n, K)
    onehot_pred = np.eye(n_labels)[yp]
    tp_img = onehot_true * correct[:, None]
    chunk = max(1, int(2_000_000 // max(n, 1)))  # bound memory of the (chunk, n) weight matrix
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        w = _group_draws(rng, n_groups, m)[:, gidx]  # (m, n): how often each image is in the replicate
        tot = w.sum(axis=1)
        out_acc[start : start + m] = (w @ correct) / tot
        out_f1[start : start + m] = _macro_f1_from_counts(w @ tp_img, w @ onehot_pred, w @ onehot_true)
    return {"accuracy": out_acc, "macro_f1": out_f1}


def paired_bootstrap(a: Any, b: Any, groups: Sequence[Any] | None, n_boot: int, seed: int = 0) -> np.ndarray:
    """Replicates of mean(b) - mean(a), resampling whole groups; ``a``, ``b``: per-image 0/1 correctness.

    Both are scored on the same draw of groups, so what they share (hard cells, hard patients)
    cancels out. ``groups=None``: every image is its own group.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_bootstrap needs two equal, non-empty 1-D arrays (got {a.shape} and {b.shape}).")
    gidx, n_groups = _group_index(groups, len(a))
    per_group = np.zeros((n_groups, 3))
    np.add.at(per_group, gidx, np.stack([a, b, np.ones_like(a)], axis=1))
    sums = _group_draws(np.random.default_rng(seed), n_groups, n_boot) @ per_group
    return (sums[:, 1] - sums[:, 0]) / sums[:, 2]


def paired_difference(a: Any, b: Any, groups: Sequence[Any] | None, n_boot: int = 2000,
                      seed: int = 0) -> tuple[float, list[float]]:
    """mean(b) - mean(a) of per-image correctness and its 95% paired group-bootstrap interval."""
    lo, hi = np.quantile(paired_bootstrap(a, b, groups, n_boot, seed), [0.025, 0.975])
    return float(np.mean(b) - np.mean(a)), [float(lo), float(hi)]


def group_vote_accuracy(y_true: Sequence[int], y_prob: Any, groups: Sequence[Any]) -> dict[str, Any]:
    """Accuracy with one vote per group: what a lab reads as "cells right" when a cell has several images.

    Each group's prediction is the majority of its images' predicted labels (a tie goes to the
    label with the highest summed probability); it is right when it equals the group's true label
    (the majority of its images' labels). Returns ``group_accuracy``, ``n_groups_correct``,
    ``n_groups``.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_prob, dtype=np.float64)
    k = p.shape[1]
    _, gidx = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_groups = int(gidx.max()) + 1 if len(gidx) else 0
    pred = p.argmax(1)
    votes = np.zeros((n_groups, k))
    np.add.at(votes, (gidx, pred), 1.0)
    mass = np.zeros((n_groups, k))
    np.add.at(mass, gidx, p)
    group_pred = np.lexsort((mass.T, votes.T), axis=0)[-1] if n_groups else np.zeros(0, dtype=np.int64)
    truth = np.zeros((n_groups, k))
    np.add.at(truth, (gidx, y), 1.0)
    group_true = truth.argmax(1)
    correct = int((group_pred == group_true).sum())
    return {"group_accuracy": correct / n_groups if n_groups else float("nan"), "n_groups_correct": correct,
            "n_groups": n_groups}


def _bootstrap_cis(y: np.ndarray, pred: np.ndarray, groups: Sequence[Any] | None, k: int, *, n_boot: int,
                   seed: int) -> dict[str, Any]:
    """95% percentile intervals of accuracy and macro-F1 from :func:`grouped_bootstrap`, and how they were made."""
    out: dict[str, Any] = {}
    boot = grouped_bootstrap(y, pred, groups, k, n_boot=n_boot, seed=seed)
    if len(boot["accuracy"]):
        out["ci95"] = [float(np.percentile(boot["accuracy"], 2.5)), float(np.percentile(boot["accuracy"], 97.5))]
        out["macro_f1_ci95"] = [
            float(np.percentile(boot["macro_f1"], 2.5)),
            float(np.percentile(boot["macro_f1"], 97.5)),
        ]
    else:
        out["ci95"] = None
        out["macro_f1_ci95"] = None
    out["ci_method"] = (
        f"percentile bootstrap over {'groups' if groups is not None else 'images'}, "
        f"{n_boot} replicates, seed {seed}"
    )
    return out


def classification_metrics(
    y_true: Sequence[int],
    y_prob: Any,
    labels: Sequence[str],
    groups: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All the metrics cellhub reports for one evaluation set.

    Args:
        y_true: true label indices (0..K-1, in ``labels`` order).
        y_prob: (n_images, K) class probabilities.
        labels: label names, in index order.
        groups: one group id per image (source cell / patient); ``None`` = each image its own group.
        n_boot: bootstrap replicates for the 95% intervals (0 disables them).
        seed: bootstrap seed.

    Returns a JSON-serialisable dict: ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
    ``auc`` (two classes only, else absent; ``None`` when one class is missing), ``ece``,
    ``nll``, ``ci95`` (accuracy, grouped percentile bootstrap), ``macro_f1_ci95``,
    ``n_images``, ``n_groups``, ``per_class`` {label: precision/recall/f1/support},
    ``confusion_matrix`` (rows = true, columns = predicted), ``labels``.
    """
    labels = [str(x) for x in labels]
    k = len(labels)
    if k < 2:
        raise ValueError(f"Need at least two labels, got {labels!r}.")
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = _as_probs(y_prob, k)
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} entries but y_prob has {len(p)} rows.")
    if len(y) == 0:
        raise ValueError("Cannot compute metrics on an empty evaluation set.")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true values must be in 0..{k - 1} for labels {labels}; got {sorted(set(y.tolist()))}.")
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} entries but there are {len(y)} images.")

    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

    pred = p.argmax(axis=1)
    idx = list(range(k))
    cm = confusion_matrix(y, pred, labels=idx)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=idx, zero_division=0)
    accuracy = float((pred == y).mean())
    present = support > 0
    balanced = float(recall[present].mean())  # scikit-learn's balanced_accuracy_score, without its warning
    macro = macro_f1(y, pred)

    n_groups = len(set(map(str, groups))) if groups is not None else len(y)
    out: dict[str, Any] = {
        "accuracy": accuracy,
        "balanced_accuracy": balanced,
        "macro_f1": macro,
    }
    if k == 2:
        out["auc"] = float(roc_auc_score(y, p[:, 1])) if len(set(y.tolist())) == 2 else None
    out["ece"] = expected_calibration_error(y, p)
    out["nll"] = float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))
    out.update(_bootstrap_cis(y, pred, groups, k, n_boot=n_boot, seed=seed))
    out["n_images"] = int(len(y))
    out["n_groups"] = int(n_groups)
    if groups is not None:
        out.update(group_vote_accuracy(y, p, groups))
    out["per_class"] = {
        labels[i]: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i in range(k)
    }
    out["confusion_matrix"] = cm.astype(int).tolist()
    out["labels"] = labels
    if n_groups < 30 and groups is not None:
        logger.info(
            "Only %d groups: the 95%% interval is wide because the evidence is %d independent units, "
            "not %d images.", n_groups, n_groups, len(y),
        )
    return out


def choose_abstention_threshold(
    y_true: Sequence[int],
    y_prob: Any,
    target_accuracy: float = 0.99,
    min_coverage: float = 0.05,
) -> dict[str, Any]:
    """Pick the max-softmax confidence below which a prediction should be referred to a human.

    Rule: the *lowest* threshold ``t`` such that the predictions with confidence >= ``t`` are
    at least ``target_accuracy`` accurate on this (validation) data — i.e. keep as many
    predictions as possible while the kept ones meet the target. If the whole set already meets
    the target, ``t`` is the lowest confidence seen (nothing in validation is flagged). If no
    threshold that keeps at least ``min_coverage`` of the images reaches the target, ``t`` is the
    one with the best selective accuracy among those, and ``met_target`` is False.

    Returns ``{"threshold", "target_accuracy", "coverage", "selective_accuracy", "met_target",
    "n_images", "rule"}``.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_prob, dtype=np.float64)
    if len(y) == 0:
        raise ValueError("Cannot choose an abstention threshold on an empty set.")
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy}.")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    order = np.argsort(-conf, kind="mergesort")  # most confident first
    c_sorted = conf[order]
    cum_acc = np.cumsum(correct[order]) / np.arange(1, len(y) + 1)
    # only cut between distinct confidence values: a threshold keeps all ties
    last_of_tie = np.r_[c_sorted[1:] != c_sorted[:-1], True]
    n_keep = np.arange(1, len(y) + 1)
    coverage = n_keep / len(y)
    ok = last_of_tie & (coverage >= min_coverage)
    if not ok.any():
        ok = last_of_tie
    meets = ok & (cum_acc >= target_accuracy)
    if meets.any():
        i = int(np.nonzero(meets)[0].max())  # lowest threshold = most images kept
        met = True
    else:
        cand = np.nonzero(ok)[0]
        i = int(cand[np.argmax(cum_acc[cand])])
        met = False
        logger.warning(
            "No confidence threshold reaches %.0f%% accuracy on the validation data; "
            "using the best one (%.1f%% accuracy, %.0f%% kept).",
            100 * target_accuracy, 100 * cum_acc[i], 100 * coverage[i],
        )
    return {
        "threshold": float(c_sorted[i]),
        "target_accuracy": float(target_accuracy),
        "coverage": float(coverage[i]),
        "selective_accuracy": float(cum_acc[i]),
        "met_target": met,
        "n_images": int(len(y)),
        "rule": (
            "lowest max-softmax confidence t such that validation predictions with confidence >= t "
            f"are at least {target_accuracy:.0%} accurate; predictions below t are 'uncertain - refer "
            "for manual review'"
        ),
    }


def format_ci(ci: Any, *, digits: int = 3, scale: float = 1.0, missing: str = "n/a") -> str:
    """``[lo, hi]`` of a 95% interval (``scale=100, digits=1`` for percent), or ``missing``."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        return f"[{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"
    return missing


def format_comparison(c: dict[str, Any]) -> str:
    """One :func:`cellhub.evaluation.compare_models` comparison, in words."""
    lo, hi = c["ci95"]
    verdict = ("better" if lo > 0 else "worse" if hi < 0 else
               "no difference shown: the interval includes 0")
    return (f"{c['checkpoint']} - {c['baseline']}: accuracy {100 * c['accuracy_difference']:+.2f} points "
            f"[{100 * lo:+.2f}, {100 * hi:+.2f}] (95%, paired bootstrap over {c['n_groups']} groups of "
            f"{c['n_images']} images) -> {verdict}; right only by {c['checkpoint']}: {c['right_only_checkpoint']}, "
            f"only by {c['baseline']}: {c['right_only_baseline']}")


def format_metrics_table(m: dict[str, Any], title: str | None = None) -> str:
    """A plain-text report of :func:`classification_metrics` output, for terminals and logs."""
    labels = m.get("labels") or list(m["per_class"])
    lines = []
    if title:
        lines += [title, "=" * len(title)]
    lines.append(
        f"images: {m['n_images']}   groups: {m['n_groups']}   "
        f"(CI: {m.get('ci_method', 'bootstrap')})"
    )
    lines.append(f"accuracy          {m['accuracy']:.4f}   95% CI {format_ci(m.get('ci95'))}")
    lines.append(f"macro-F1          {m['macro_f1']:.4f}   95% CI {format_ci(m.get('macro_f1_ci95'))}")
    if m.get("group_accuracy") is not None and m["n_groups"] < m["n_images"]:
        lines.append(f"per group (vote)  {m['group_accuracy']:.4f}   {m['n_groups_correct']}/{m['n_groups']} groups "
                     "right, one majority vote per group (cell / patient)")
    if "balanced_accuracy" in m:
        lines.append(f"balanced accuracy {m['balanced_accuracy']:.4f}")
    if "auc" in m:
        auc = m["auc"]
        lines.append(f"ROC AUC           {'n/a (one class only)' if auc is None else f'{auc:.4f}'}")
    if "ece" in m:
        lines.append(f"calibration (ECE) {m['ece']:.4f}")
    w = max(12, max(len(x) for x in labels) + 2)
    lines.append("")
    lines.append(f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for name in labels:
        pc = m["per_class"][name]
        lines.append(
            f"{name:<{w}}{pc['precision']:>10.4f}{pc['recall']:>10.4f}{pc['f1']:>10.4f}{pc['support']:>10d}"
        )
    lines.append("")
    lines.append("confusion matrix (rows = true, columns = predicted)")
    cw = max(8, max(len(x[:10]) for x in labels) + 2)
    lines.append(" " * w + "".join(f"{x[:10]:>{cw}}" for x in labels))
    for name, row in zip(labels, m["confusion_matrix"]):
        lines.append(f"{name:<{w}}" + "".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Train-vs-validation loss and accuracy per epoch, as a two-panel PNG.

    ``history`` is a list of per-epoch dicts with ``epoch``, ``train_loss``, ``train_accuracy``,
    ``val_loss``, ``val_accuracy`` (missing keys are skipped).
    """
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            key = f"{split}_{metric}"
            pts = [(e, h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label="train" if split == "train" else "validation (grouped)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if any(h.get("best") for h in history):
        best = [e for e, h in zip(epochs, history) if h.get("best")][-1]
        for ax in axes:
            ax.axvline(best, color="grey", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(cm: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Confusion matrix PNG: counts and row-normalised colour (rows = true class)."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.3 * k + 2.5, 1.1 * k + 2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels, rotation=30, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.6 else "black", fontsize=9)
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
