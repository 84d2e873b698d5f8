"""Would an ensemble of independently trained models beat one? Out of fold, from finished CV runs.

    python bench/cv_ensemble.py RUN_A RUN_B [RUN_C ...] [--source kaggle] [--n-boot 2000] \
        [--record CHECKPOINT_A CHECKPOINT_B ...]

Each RUN is a ``train/finetune.py --cv K`` folder of the same recipe and data, trained with a
different ``--seed`` (which also draws other folds: that is allowed here). Every image was held out
once in every run, so each run holds an out-of-fold probability for it from a model that never saw
it; the images are matched across runs by source and file (``holdout.npz``'s ``files``), and the
ensemble's prediction is the label of the highest mean probability (what
:func:`cellhub.predict.consensus` picks for two loaded models: their label when they agree, the higher
mean probability of the two when they do not, then flagged uncertain; with three or more it takes a
majority vote first). Printed: each run alone, the ensemble, and ensemble minus RUN_A
with a 95% interval from a paired bootstrap over groups (``bench/cv_compare.py``); also RUN_B minus
RUN_A, how far two seeds of one recipe differ by chance, and how often the runs agree (a consensus
flags the rest uncertain) with the accuracy there. ``--source`` keeps one source's images.

``--record``: the published checkpoints the runs' final models are (one per run, in the same order;
each checkpoint's cross-validation accuracy must be its run's): the consensus's out-of-fold figures,
pooled and per source, go into each one's ``metrics.json`` (``cross_validation.consensus``) and its
model card is rebuilt, so a card says what the models score used together, as the app uses them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cv_compare import fold_holdouts, paired_difference  # noqa: E402

from cellhub.cache import atomic_write_json  # noqa: E402
from cellhub.metrics import classification_metrics  # noqa: E402

#: what a checkpoint's metrics.json keeps of the consensus's figures (what its model card shows)
_KEPT = ("accuracy", "ci95", "macro_f1", "macro_f1_ci95", "auc", "n_images", "n_groups")


def run_predictions(run: Path) -> dict[tuple[str, str], tuple[np.ndarray, int, str]]:
    """``(source, file) -> (probabilities, label, group)`` over every fold of a finished CV run."""
    out: dict[tuple[str, str], tuple[np.ndarray, int, str]] = {}
    for _, probs, labels, groups, files in fold_holdouts(run, with_files=True):
        for p, y, g, f in zip(probs, labels, groups, files):
            key = (str(g).split("|", 1)[0], f)
            if key in out:
                raise SystemExit(f"{run}: {key[1]} of source {key[0]} is held out twice: not a K-fold run.")
            out[key] = (np.asarray(p, dtype=np.float64), int(y), str(g))
    return out


def ensemble(runs: list[Path], source: str | None = None, n_boot: int = 2000, preds: list[dict] | None = None) -> dict:
    """The figures printed (see the module docstring); ``preds``: the runs' :func:`run_predictions`, if read."""
    preds = preds if preds is not None else [run_predictions(r) for r in runs]
    keys = sorted(k for k in preds[0] if source is None or k[0] == source)
    if not keys:
        raise SystemExit(f"{runs[0]}: no held-out image of source {source!r}")
    for r, p in zip(runs[1:], preds[1:]):
        missing = [k for k in keys if k not in p]
        if missing:
            raise SystemExit(f"{r} never held out {len(missing)} of {runs[0]}'s images (e.g. {missing[0][1]}): "
                             "not the same data.")
        if any(p[k][1] != preds[0][k][1] for k in keys):
            raise SystemExit(f"{r} labels some images differently from {runs[0]}: not the same task and data.")
    y = np.array([preds[0][k][1] for k in keys])
    groups = np.array([preds[0][k][2] for k in keys])
    probs = np.stack([np.stack([p[k][0] for k in keys]) for p in preds])  # (runs, images, classes)
    correct = (probs.argmax(-1) == y).astype(np.float64)
    mean_ok = (probs.mean(0).argmax(-1) == y).astype(np.float64)
    diff, ci = paired_difference(correct[0], mean_ok, groups, n_boot)
    seed_diff, seed_ci = paired_difference(correct[0], correct[1], groups, n_boot)
    agree = (probs.argmax(-1) == probs[0].argmax(-1)).all(0)  # every run gives the same label
    n_labels = probs.shape[-1]
    m = classification_metrics(y, probs.mean(0), [str(k) for k in range(n_labels)], groups, n_boot=1000)
    return {"runs": [float(c.mean()) for c in correct], "ensemble": float(mean_ok.mean()),
            "ensemble_ci95": m["ci95"], "ensemble_macro_f1": m["macro_f1"],
            "ensemble_recall": [m["per_class"][str(k)]["recall"] for k in range(n_labels)],
            "ensemble_auc": m.get("auc"),
            "runs_auc": [classification_metrics(y, p, [str(k) for k in range(n_labels)], groups, n_boot=0).get("auc")
                         for p in probs] if n_labels == 2 else None,
            "agree": float(agree.mean()), "agree_accuracy": float(mean_ok[agree].mean()) if agree.any() else None,
            "ensemble_minus_a": diff, "ci95": ci, "b_minus_a": seed_diff, "b_minus_a_ci95": seed_ci,
            "n_images": len(keys), "n_groups": len(set(groups.tolist())),
            "pooled": {k: m[k] for k in _KEPT if m.get(k) is not None}}


def record(runs: list[Path], checkpoints: list[Path], n_boot: int = 2000, preds: list[dict] | None = None) -> dict:
    """Write the consensus's out-of-fold figures into each checkpoint's ``metrics.json`` and rebuild
    its card; returns what was written. ``preds``: the runs' :func:`run_predictions`, if read."""
    from cellhub.modelcard import CARD_NAME, build_model_card

    if len(checkpoints) != len(runs):
        raise SystemExit(f"--record takes one checkpoint per run, in the runs' order: {len(runs)} runs, "
                         f"{len(checkpoints)} checkpoints.")
    preds = preds if preds is not None else [run_predictions(r) for r in runs]
    pooled = ensemble(runs, None, n_boot, preds)
    sources = sorted({k[0] for k in preds[0]})
    per_source = {s: ensemble(runs, s, n_boot, preds)["pooled"] for s in sources} if len(sources) > 1 else {}
    entry = {"models": [c.name for c in checkpoints], "pooled": pooled["pooled"], "per_source": per_source,
             "agree": pooled["agree"], "agree_accuracy": pooled["agree_accuracy"],
             "rule": "label of the highest mean probability (cellhub.predict.consensus); "
                     "images the models label differently are flagged uncertain"}
    metrics_of = []
    for ckpt, run, acc in zip(checkpoints, runs, pooled["runs"]):
        path = ckpt / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"{ckpt} has no metrics.json: pass the published checkpoint folders.")
        metrics = json.loads(path.read_text())
        own = ((metrics.get("cross_validation") or {}).get("pooled") or {}).get("accuracy")
        if own is None or abs(float(own) - acc) > 5e-4:
            raise SystemExit(f"{ckpt}: its cross-validation accuracy ({own}) is not {run}'s out-of-fold accuracy "
                             f"({acc:.4f}): pass each run's own checkpoint, in the runs' order.")
        metrics_of.append(metrics)
    for ckpt, metrics in zip(checkpoints, metrics_of):  # checked all first: nothing half written
        metrics["cross_validation"]["consensus"] = entry
        atomic_write_json(ckpt / "metrics.json", metrics, indent=2)
        build_model_card(ckpt).save(ckpt / CARD_NAME)
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--source", help="only this source's images (e.g. blood-cells)")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--record", type=Path, nargs="+", metavar="CHECKPOINT",
                    help="write the consensus's figures into these checkpoints' metrics.json and cards")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("give at least two runs")
    preds = [run_predictions(r) for r in args.runs]  # read once, for --record and the figures printed
    if args.record:
        entry = record(args.runs, args.record, args.n_boot, preds)
        lo, hi = entry["pooled"]["ci95"]
        print(f"consensus of {', '.join(entry['models'])}: {entry['pooled']['accuracy']:.4f} [{lo:.4f}, {hi:.4f}] "
              f"out of fold; written into " + ", ".join(f"{c}/metrics.json" for c in args.record) + " and their cards")
    r = ensemble(args.runs, args.source, args.n_boot, preds)
    for run, acc in zip(args.runs, r["runs"]):
        print(f"{run}: {acc:.4f}")
    pts = lambda d, ci: f"{100 * d:+.2f} points [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"  # noqa: E731
    lo, hi = r["ensemble_ci95"]
    print(f"ensemble of {len(args.runs)}: {r['ensemble']:.4f} [{lo:.4f}, {hi:.4f}] (group bootstrap), macro-F1 "
          f"{r['ensemble_macro_f1']:.4f}, recall per class " + " ".join(f"{x:.3f}" for x in r["ensemble_recall"])
          + (f", AUC {r['ensemble_auc']:.4f} (runs: " + ", ".join(f"{a:.4f}" for a in r["runs_auc"]) + ")"
             if r["ensemble_auc"] is not None and r["runs_auc"] else ""))
    print(f"ensemble - A = {pts(r['ensemble_minus_a'], r['ci95'])}; "
          f"B - A = {pts(r['b_minus_a'], r['b_minus_a_ci95'])} (paired bootstrap over {r['n_groups']} groups, "
          f"{r['n_images']} images" + (f", source {args.source}" if args.source else "") + ")")
    if r["agree_accuracy"] is not None:
        print(f"the runs agree on {100 * r['agree']:.1f}% of the images (the rest a consensus flags uncertain), "
              f"{100 * r['agree_accuracy']:.2f}% right there")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
