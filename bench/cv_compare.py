"""Two cross-validation runs of one data set, fold by fold: which recipe is better, and by how much?

    python bench/cv_compare.py RUN_A RUN_B [--source malaria] [--n-boot 2000]

Each RUN is a ``train/finetune.py --cv K`` output folder (``cv/fold-I/holdout.npz``: every held-out
image's probabilities, label, group and file). The two runs must have held out the same images in the
same order — the same ``--dataset``s, ``--seed`` and ``--cv`` — which is checked (labels and groups
equal). Printed: per fold and pooled accuracy of A and of B, and B minus A with a 95% interval from
a *paired* bootstrap over groups (patients, fields): each replicate draws groups with replacement
and scores both runs on the same draw, so what the two share (hard patients) cancels out.
``--source`` keeps the images of one source (the part before ``|`` in a multi-source group name).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub.metrics import paired_bootstrap, paired_difference  # noqa: E402,F401 (re-exported for the other bench scripts)
from cellhub.training.cv import fold_dir  # noqa: E402
from cellhub.training.state import holdout_files, load_holdout  # noqa: E402


def fold_holdouts(run: Path, with_files: bool = False):
    """Yield ``(fold folder, probabilities, labels, groups, files)`` for each fold of a finished CV
    run, in order (``files`` is None unless ``with_files``); an unfinished fold is an error."""
    i = 0
    while fold_dir(run, i).is_dir():
        fold = fold_dir(run, i)
        held = load_holdout(fold)
        files = holdout_files(fold) if with_files else None
        if held is None or (with_files and files is None):
            raise SystemExit(f"{fold} has no holdout.npz" + (" with the held-out files" if with_files else "")
                             + ": the fold is unfinished, or older than that record (rerun with --resume).")
        yield (fold, *held, files)
        i += 1
    if i == 0:
        raise SystemExit(f"{run} holds no cv/fold-1: not a --cv run folder.")


def load_run(run: Path, source: str | None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per fold (probabilities, labels, groups) of a finished CV run, optionally one source only."""
    folds = []
    for i, (_, p, y, g, _) in enumerate(fold_holdouts(run)):
        g = np.asarray(g)
        if source is not None:
            keep = np.array([str(x).split("|", 1)[0] == source for x in g], dtype=bool)
            if not keep.any():
                raise SystemExit(f"{run}: no held-out image of source {source!r} in fold {i + 1}; "
                                 f"sources there: {sorted({str(x).split('|', 1)[0] for x in g})}")
            p, y, g = p[keep], y[keep], g[keep]
        folds.append((p, y, g))
    return folds


def compare(run_a: Path, run_b: Path, source: str | None = None, n_boot: int = 2000) -> dict:
    fa, fb = load_run(run_a, source), load_run(run_b, source)
    if len(fa) != len(fb):
        raise SystemExit(f"{run_a} has {len(fa)} folds, {run_b} {len(fb)}: not the same cross-validation.")
    rows = []
    for k, ((pa, ya, ga), (pb, yb, gb)) in enumerate(zip(fa, fb)):
        if len(ya) != len(yb) or not (np.array_equal(ya, yb) and np.array_equal(ga, gb)):
            raise SystemExit(f"fold {k + 1}: the runs held out different images (same --dataset, --seed and --cv?).")
        rows.append({"fold": k + 1, "n": len(ya), "a": float((pa.argmax(1) == ya).mean()),
                     "b": float((pb.argmax(1) == yb).mean())})
    ca = np.concatenate([(p.argmax(1) == y) for p, y, _ in fa]).astype(np.float64)
    cb = np.concatenate([(p.argmax(1) == y) for p, y, _ in fb]).astype(np.float64)
    groups = np.concatenate([g for _, _, g in fa]).astype(str)
    diff, ci = paired_difference(ca, cb, groups, n_boot)
    diffs = [r["b"] - r["a"] for r in rows]
    return {"folds": rows, "a": float(ca.mean()), "b": float(cb.mean()), "b_minus_a": diff, "ci95": ci, "n_images": len(ca),
            "n_groups": len(set(groups)), "fold_diff_mean": float(np.mean(diffs)),
            "fold_diff_sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--source", help="only this source's images (e.g. malaria)")
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args(argv)
    r = compare(args.run_a, args.run_b, args.source, args.n_boot)
    print(f"A = {args.run_a}\nB = {args.run_b}" + (f"\nsource: {args.source}" if args.source else ""))
    print(f"{'fold':>5} {'images':>7} {'A':>8} {'B':>8} {'B-A':>8}")
    for row in r["folds"]:
        print(f"{row['fold']:>5} {row['n']:>7} {row['a']:>8.4f} {row['b']:>8.4f} {row['b'] - row['a']:>+8.4f}")
    print(f"pooled: A {r['a']:.4f}, B {r['b']:.4f}; B - A = {100 * r['b_minus_a']:+.2f} points "
          f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}] (paired bootstrap over {r['n_groups']} groups, "
          f"{r['n_images']} images); per fold {100 * r['fold_diff_mean']:+.2f} +- {100 * r['fold_diff_sd']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
