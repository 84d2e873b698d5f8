"""``cross_validate(cfg)``: grouped K-fold cross-validation of a training recipe, then the final model.

Each fold is one :func:`cellhub.training.fit` run in ``OUTPUT_DIR/cv/fold-I``: it trains on the
other folds (its epoch and abstention threshold chosen on a grouped validation split of them,
exactly as a run without ``--cv`` chooses), and scores its own held-out groups, which no choice
ever saw. The folds' held-out predictions are pooled into out-of-fold metrics with a
group-bootstrap CI; per-fold figures give mean +- sd. ``cv.json`` holds it all, and the final
model (trained on all the data by the same recipe, unless ``cv_only``) carries it in
``metrics.json`` and its model card. ``resume`` skips finished folds and resumes the others.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import atomic_write_json, read_json
from .config import TrainConfig
from .pipeline import evaluate_splits
from .state import load_holdout
from .trainer import fit

__all__ = ["cross_validate", "fold_dir", "fold_config", "format_cv_table", "CV_FILENAME", "CV_METRICS"]

logger = logging.getLogger(__name__)

CV_FILENAME = "cv.json"
#: the per-fold figures summarised as mean +- sd
CV_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


def fold_dir(output_dir: str | Path, fold: int) -> Path:
    """Where fold ``fold`` (0-based) of a ``--cv`` run lives."""
    return Path(output_dir) / "cv" / f"fold-{fold + 1}"


def fold_config(cfg: TrainConfig, fold: int) -> TrainConfig:
    """The config of fold ``fold`` (0-based) of ``cfg``'s cross-validation: what ``cross_validate``
    trains there, and what ``finetune.py --cv-fold`` trains alone."""
    return dataclasses.replace(cfg, cv_fold=fold, cv_only=False, output_dir=str(fold_dir(cfg.output_dir, fold)),
                               notes=list(cfg.notes))


def _fold_row(fold: int, m: dict[str, Any]) -> dict[str, Any]:
    row = {"fold": fold + 1, "n_train_images": m.get("n_train_images"), "n_train_groups": m.get("n_train_groups"),
           "n_images": m["n_images"], "n_groups": m["n_groups"], "best_epoch": m.get("best_epoch"),
           "seconds": m.get("seconds"), "ci95": m.get("ci95")}
    row.update({k: m.get(k) for k in CV_METRICS if k in m})
    row["recall"] = {name: pc["recall"] for name, pc in (m.get("per_class") or {}).items()}
    if m.get("per_source"):
        row["per_source_accuracy"] = {src: sm["accuracy"] for src, sm in m["per_source"].items()}
    return row


def _mean_sd(rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    mean, sd = {}, {}
    for k in CV_METRICS:
        vals = [float(r[k]) for r in rows if r.get(k) is not None]
        if vals:
            mean[k] = float(np.mean(vals))
            sd[k] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return mean, sd


def _fold_done(path: Path) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray, list[str]]] | None:
    m = read_json(path / "metrics.json", warn=False)
    held = load_holdout(path)
    if not isinstance(m, dict) or held is None or m.get("split", {}).get("name") != "holdout":
        return None
    return m, held


def cross_validate(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg.cv`` grouped folds, pool them, write ``cv.json``; then the final model.

    Returns the final model's ``metrics.json`` dict (with ``cross_validation``), or, with
    ``cfg.cv_only``, the cross-validation summary itself.
    """
    cfg.validate()
    if not cfg.cv:
        raise ValueError("cross_validate needs cfg.cv (the number of folds), e.g. --cv 5.")
    k, out = int(cfg.cv), Path(cfg.output_dir)
    rows, P, Y, G = [], [], [], []
    last: dict[str, Any] = {}
    for i in range(k):
        path = fold_dir(out, i)
        done = _fold_done(path) if cfg.resume else None
        if done is None:
            logger.info("cross-validation: fold %d of %d -> %s", i + 1, k, path)
            fit(fold_config(cfg, i))
            done = _fold_done(path)
            if done is None:  # pragma: no cover - fit always writes both on the main process
                raise RuntimeError(f"fold {i + 1} finished without writing {path}/holdout.npz")
        else:
            logger.info("cross-validation: fold %d of %d already done in %s", i + 1, k, path)
        m, (p, y, g) = done
        rows.append(_fold_row(i, m))
        P.append(p)
        Y.append(y)
        G += g
        last = m
    labels = list(last["labels"])
    pooled = evaluate_splits({"holdout": (np.concatenate(P), np.concatenate(Y))}, {"holdout": G}, labels,
                             n_boot=cfg.n_boot, seed=cfg.seed, sources=last.get("sources") or ())["holdout"]
    mean, sd = _mean_sd(rows)
    summary = {"k": k, "seed": cfg.seed, "task": last.get("task"), "model": last.get("model"),
               "grouping": last.get("grouping"), "labels": labels, "folds": rows, "mean": mean, "sd": sd,
               "pooled": pooled, "n_images": pooled["n_images"], "n_groups": pooled["n_groups"],
               # the folds' own training + evaluation time (a resumed run does not count them again)
               "seconds": round(sum(float(r.get("seconds") or 0) for r in rows), 1),
               "description": f"grouped {k}-fold cross-validation: every group in exactly one held-out fold; "
                              "each fold's epoch and abstention threshold chosen on a grouped validation split "
                              "of the other folds; pooled = all out-of-fold predictions, CI by group bootstrap"}
    atomic_write_json(out / CV_FILENAME, summary, indent=2)
    logger.info("cross-validation: pooled out-of-fold accuracy %.4f (95%% CI %s) over %d images / %d groups; "
                "per fold %.4f +- %.4f", pooled["accuracy"], pooled.get("ci95"), pooled["n_images"],
                pooled["n_groups"], mean.get("accuracy", float("nan")), sd.get("accuracy", float("nan")))
    if cfg.cv_only:
        return summary
    final = dataclasses.replace(cfg, cv_fold=None, cv_only=False, notes=list(cfg.notes))
    return fit(final, extra={"cross_validation": {k2: v for k2, v in summary.items() if k2 != "labels"}})


def format_cv_table(cv: dict[str, Any]) -> str:
    """A plain-text table of a cross-validation summary: one line per fold, mean +- sd, pooled."""
    keys = [key for key in CV_METRICS if key in cv["mean"]]
    head = f"{'fold':>6} {'images':>7} {'groups':>7} " + " ".join(f"{key:>19}" for key in keys)
    lines = [f"grouped {cv['k']}-fold cross-validation ({cv.get('model')} on {cv.get('task')})", head]
    for r in cv["folds"]:
        lines.append(f"{r['fold']:>6} {r['n_images']:>7} {r['n_groups']:>7} "
                     + " ".join(f"{r[key]:>19.4f}" if r.get(key) is not None else f"{'n/a':>19}" for key in keys))
    lines.append(f"{'mean':>6} {'':>7} {'':>7} "
                 + " ".join(f"{cv['mean'][key]:>9.4f} +- {cv['sd'][key]:.4f}".rjust(19) for key in keys))
    p = cv["pooled"]
    ci = p.get("ci95")
    lines.append(f"pooled out-of-fold: accuracy {p['accuracy']:.4f}"
                 + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f}, group bootstrap)" if ci else "")
                 + f", macro-F1 {p['macro_f1']:.4f}" + (f", AUC {p['auc']:.4f}" if p.get("auc") is not None else "")
                 + f"; {p['n_images']} images, {p['n_groups']} groups")
    for src, sm in (p.get("per_source") or {}).items():
        sci = sm.get("ci95")
        lines.append(f"  {src}: accuracy {sm['accuracy']:.4f}" + (f" ({sci[0]:.4f}-{sci[1]:.4f})" if sci else "")
                     + f", {sm['n_images']} images, {sm['n_groups']} groups")
    return "\n".join(lines)
