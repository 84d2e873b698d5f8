"""How many of a lab's own images does re-estimating BatchNorm (AdaBN) need, and which ones?

    python bench/adapt_bn_sample_size.py CHECKPOINT --data ../shared/data/pbc [--json OUT]

CHECKPOINT was trained without DATA's lab (e.g. the Kaggle-only model of
``bench/leave_one_lab_out.sh kaggle``). DATA's groups are split in two halves, once (seed 0): the
*pool*, from which the adaptation images are drawn as a user's unlabelled folder would be, and the
*scored* half, on which every variant is measured, so no variant is scored on the images it adapted
on (except the "transductive" row, which adapts on the scored half itself, as
``python -m cellhub adapt`` on the very images to be classified would). Rows:

- ``as trained``: the checkpoint's own statistics;
- ``n random``: n images drawn at random from the pool, ``--draws`` times (mean, min, max);
- ``n as a differential``: n images drawn with a blood differential's proportions
  (neutrophil 60%, lymphocyte 30%, monocyte 6%, eosinophil 4%): what a lab's folder of
  consecutive white cells looks like. The labels only build the draw; adaptation never reads them;
- ``one class only``: the pool's images of a single class (a folder sorted by type);
- ``whole pool`` and ``transductive``.

Each image is preprocessed once (the model's own eval transform, nucleus crop included); every
variant starts from the checkpoint's weights and statistics. Accuracy intervals are group
bootstraps over the scored half.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub import data as data_mod  # noqa: E402
from cellhub import transforms  # noqa: E402
from cellhub.batch import iter_decoded  # noqa: E402
from cellhub.evaluation import reestimate_batchnorm, select_split  # noqa: E402
from cellhub.hub import load_pretrained  # noqa: E402
from cellhub.images import to_rgb  # noqa: E402
from cellhub.metrics import classification_metrics, format_ci  # noqa: E402

DIFFERENTIAL = {"neutrophil": 0.60, "lymphocyte": 0.30, "monocyte": 0.06, "eosinophil": 0.04}


def preprocess(model: torch.nn.Module, ds) -> torch.Tensor:
    """Every row of ``ds`` through the model's eval transform, as one tensor."""
    tf = transforms.eval_transform(transforms.resolve_data_config(model))
    rows = list(range(len(ds)))
    out = []
    t0 = time.time()
    for start, _chunk, tensors in iter_decoded(rows, lambda i, _raw: tf(to_rgb(ds[i]["image"])), chunk_size=256):
        out += tensors
        print(f"\r  preprocessed {start + len(tensors)}/{len(rows)} ({time.time() - t0:.0f} s)", end="", flush=True)
    print()
    return torch.stack(out)


@torch.no_grad()
def probabilities(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval().to(memory_format=torch.channels_last)  # ~1.5x faster CPU convolutions
    return torch.cat([torch.softmax(model(x[i : i + 256]), 1) for i in range(0, len(x), 256)]).numpy()


def adapted(model: torch.nn.Module, x: torch.Tensor, order: np.ndarray, batch_size: int = 64,
            keep: float = 0.0) -> torch.nn.Module:
    m = copy.deepcopy(model)
    idx = torch.as_tensor(order)
    reestimate_batchnorm(m, (x[idx[i : i + batch_size]] for i in range(0, len(idx), batch_size)), device="cpu",
                         keep=keep)
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--sizes", default="8,16,32,64,128,256")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--keep", type=float, default=0.0,
                   help="share of the checkpoint's own statistics kept (python -m cellhub adapt --keep)")
    p.add_argument("--no-mix", action="store_true", help="skip the differential and one-class rows")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)

    model = load_pretrained(args.checkpoint).eval()
    task = model.cellhub_config["task"]
    names = list(model.cellhub_config["labels"])
    dsd = data_mod.load_cell_dataset(args.data, task=task, cache_dir=args.cache_dir, progress=False)
    _, ds = select_split(dsd, None if len(dsd) == 1 else "train", source=args.data)
    y = np.asarray(ds["label"], dtype=np.int64)
    groups = np.asarray([str(g) for g in ds["group"]])
    ug = np.unique(groups)
    rng = np.random.default_rng(0)
    pool_groups = set(rng.permutation(ug)[: len(ug) // 2])
    in_pool = np.array([g in pool_groups for g in groups])
    pool, scored = np.flatnonzero(in_pool), np.flatnonzero(~in_pool)
    print(f"{args.data}: {len(y)} images / {len(ug)} groups; pool {len(pool)}, scored {len(scored)}")
    x = preprocess(model, ds).contiguous(memory_format=torch.channels_last)
    ys, gs = y[scored], list(groups[scored])

    rows: list[dict] = []
    t_start = time.time()

    def record(name: str, m: torch.nn.Module, n: int, ci: bool = False) -> float:
        probs = probabilities(m, x[torch.as_tensor(scored)])
        acc = float((probs.argmax(1) == ys).mean())
        row = {"variant": name, "n_images": n, "accuracy": acc}
        if ci:
            met = classification_metrics(ys, probs, names, groups=gs, n_boot=args.n_boot, seed=0)
            row.update(ci95=met["ci95"], macro_f1=met["macro_f1"],
                       recall={k: met["per_class"][k]["recall"] for k in names})
        rows.append(row)
        extra = f" {format_ci(row['ci95'])}, macro-F1 {row['macro_f1']:.3f}" if ci else ""
        print(f"  {name:<34} n={n:<5} accuracy {acc:.4f}{extra}  ({time.time() - t_start:.0f} s)", flush=True)
        return acc

    record("as trained", model, 0, ci=True)
    record("whole pool", adapted(model, x, rng.permutation(pool), keep=args.keep), len(pool), ci=True)
    record("transductive (the scored half)", adapted(model, x, rng.permutation(scored), keep=args.keep), len(scored), ci=True)
    summary: dict[str, dict] = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        accs = [record(f"{n} random, draw {d}", adapted(model, x, np.random.default_rng(100 + d).choice(pool, n, replace=False), keep=args.keep), n)
                for d in range(args.draws)]
        summary[f"{n} random"] = {"n": n, "mean": float(np.mean(accs)), "min": min(accs), "max": max(accs)}
    for n in () if args.no_mix else (50, 100):
        accs = []
        for d in range(args.draws):
            r = np.random.default_rng(200 + d)
            take = np.concatenate([r.choice(pool[y[pool] == names.index(lab)], max(1, round(n * share)), replace=False)
                                   for lab, share in DIFFERENTIAL.items()])
            accs.append(record(f"{n} as a differential, draw {d}", adapted(model, x, r.permutation(take), keep=args.keep), len(take)))
        summary[f"{n} as a differential"] = {"n": n, "mean": float(np.mean(accs)), "min": min(accs), "max": max(accs)}
    for k, lab in enumerate([] if args.no_mix else names):
        only = pool[y[pool] == k]
        acc = record(f"{lab} only", adapted(model, x, rng.permutation(only), keep=args.keep), len(only))
        summary[f"{lab} only"] = {"n": len(only), "mean": acc, "min": acc, "max": acc}

    print("\nsummary (accuracy on the scored half):")
    for name, s in summary.items():
        print(f"  {name:<26} n={s['n']:<5} mean {s['mean']:.4f}  [min {s['min']:.4f}, max {s['max']:.4f}]")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "data": args.data, "keep": args.keep,
                                               "n_pool": len(pool), "n_scored": len(scored),
                                               "n_scored_groups": len(set(gs)), "rows": rows,
                                               "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
