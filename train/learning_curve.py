#!/usr/bin/env python
"""How many labelled cells does your lab need? Accuracy against labels per class, on your grouped validation.

    python train/learning_curve.py --dataset ~/my-lab-cells --init-from checkpoints/smallcnn-blood-cells
    python train/learning_curve.py --dataset ~/my-lab-cells --model smallcnn --sizes 5 10 25 50 100

The grouped validation split is drawn once (no cell / patient on both sides) and kept for every
point. For each size N, N labelled cells (groups) per class are drawn from the rest (every image of
a drawn cell comes with it; a class with fewer cells gives all it has), a model is trained on them
(from ``--init-from``'s checkpoint, or ``--model`` from scratch / ImageNet) with
:func:`cellhub.training.fit`, and scored on that validation split. Writes ``curve.json``,
``curve.png`` and ``curve.md`` (a table with the 95% intervals) to ``--output-dir``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# idle OpenMP threads sleep rather than spin (set before torch loads; see bench/RESULTS.md, finding 1)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from cellhub.cli import add_group_by_argument  # noqa: E402
from cellhub.metrics import format_ci  # noqa: E402
from cellhub.training import TrainConfig, fit  # noqa: E402
from cellhub.training.pipeline import prepare_splits  # noqa: E402

logger = logging.getLogger("learning_curve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/learning_curve.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help="your labelled cells: a folder of class folders, or any source "
                                                    "cellhub.load_cell_dataset reads")
    p.add_argument("--init-from", default=None, help="start every point from this checkpoint (folder or Hub id)")
    p.add_argument("--model", default="smallcnn", help="architecture when there is no --init-from")
    p.add_argument("--from-scratch", action="store_true", help="with --model: random initialisation")
    p.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 25, 50, 100], help="labelled cells per class")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.2)
    add_group_by_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--output-dir", default="runs/learning-curve")
    p.add_argument("--no-progress", action="store_true")
    return p


def cells_per_class(train: Any, n: int, seed: int) -> tuple[Any, dict[int, int]]:
    """``n`` groups of each label (all their images), drawn with ``seed``; and how many each label got."""
    labels = np.asarray(train["label"])
    groups = np.asarray([str(g) for g in train["group"]])
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    got: dict[int, int] = {}
    for lab in sorted(set(labels.tolist())):
        gs = sorted(set(groups[labels == lab]))
        take = [gs[i] for i in rng.permutation(len(gs))[: min(n, len(gs))]]
        chosen += take
        got[int(lab)] = len(take)
    idx = np.flatnonzero(np.isin(groups, chosen))
    return train.select(idx), got


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from datasets import DatasetDict

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare_splits(args.dataset, cache_dir=args.cache_dir, val_fraction=args.val_fraction,
                              seed=args.seed, progress=not args.no_progress, group_by=args.group_by)
    train, val = prepared.splits["train"], prepared.splits["validation"]
    names = prepared.labels
    points = []
    with tempfile.TemporaryDirectory(prefix="cellhub-curve-") as tmp:
        for n in sorted(set(args.sizes)):
            subset, got = cells_per_class(train, n, args.seed)
            folder = Path(tmp) / f"n{n}"
            DatasetDict(train=subset, validation=val).save_to_disk(str(folder))
            cfg = TrainConfig(dataset=str(folder), model=args.model, init_from=args.init_from, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
                              pretrained=not args.from_scratch, seed=args.seed, n_boot=args.n_boot,
                              output_dir=str(out / f"n{n}"), cache_dir=args.cache_dir, save_checkpoints=False,
                              progress=not args.no_progress,
                              notes=[f"learning curve: {n} labelled cells per class"])
            m = fit(cfg)["splits"]["validation"]
            points.append({"cells_per_class": n, "cells_used": {names[k]: v for k, v in got.items()},
                           "train_images": len(subset), "accuracy": m["accuracy"], "ci95": m["ci95"],
                           "macro_f1": m["macro_f1"], "group_accuracy": m.get("group_accuracy"),
                           "n_groups_correct": m.get("n_groups_correct"), "n_groups": m["n_groups"],
                           "n_images": m["n_images"]})
            logger.info("%d cells per class: validation accuracy %.4f %s", n, m["accuracy"], format_ci(m["ci95"]))
    _write(points, out, args, prepared.task)
    return points


def _write(points: list[dict[str, Any]], out: Path, args: argparse.Namespace, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "curve.json").write_text(json.dumps({"task": task, "dataset": Path(args.dataset).name,
                                                "init_from": args.init_from, "points": points}, indent=2))
    start = f"from {args.init_from}" if args.init_from else f"{args.model}"
    lines = [f"# Learning curve ({task}, {start})", "",
             f"Validation: {points[0]['n_images']} images of {points[0]['n_groups']} groups, the same for every "
             "point; 95% intervals resample groups.", "",
             "| cells per class | training images | accuracy | 95% CI | macro F1 | cells right |",
             "|---|---|---|---|---|---|"]
    for p in points:
        right = (f"{p['n_groups_correct']}/{p['n_groups']}" if p.get("n_groups_correct") is not None else "")
        lines.append(f"| {p['cells_per_class']} | {p['train_images']} | {p['accuracy']:.3f} | "
                     f"{format_ci(p['ci95'])} | {p['macro_f1']:.3f} | {right} |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [p["cells_per_class"] for p in points]
    ys = [p["accuracy"] for p in points]
    lo = [p["accuracy"] - p["ci95"][0] for p in points]
    hi = [p["ci95"][1] - p["accuracy"] for p in points]
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("labelled cells per class")
    ax.set_ylabel("grouped-validation accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{task}: {start}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if any(n < 1 for n in args.sizes):
        print(f"error: --sizes must be positive, got {args.sizes}", file=sys.stderr)
        return 2
    try:
        points = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.output_dir) / "curve.md").read_text())
    print(f"wrote {Path(args.output_dir) / 'curve.png'} and curve.json ({len(points)} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
