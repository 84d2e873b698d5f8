"""Re-estimating BatchNorm (AdaBN) on a lab the model *was* trained on: does it cost anything there?

    python bench/adapt_bn_in_lab.py RUN --root blood-cells=../shared/data/blood-cells \
        --root pbc=../shared/data/pbc [--n 64] [--draws 3] [--json OUT]

RUN is a finished ``--cv`` run of a recipe trained on several sources (the bundled two-lab
blood-cell recipe). Each fold's model learned its BatchNorm statistics on a mixture of the
sources; a lab using it on images of one of them may still run ``python -m cellhub adapt`` on its
folder. For every fold and source, on that fold's held-out images of the source (which the fold's
model never saw): accuracy as trained, after re-estimating on all of them (transductive: the
folder to be classified is the one adapted on) and after re-estimating on ``--n`` of them drawn at
random (``--draws`` times). Pooled over the folds per source, with the paired group-bootstrap
difference to "as trained" (``bench/cv_compare.py``'s resampling).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapt_bn_sample_size import adapted, probabilities  # noqa: E402
from cv_compare import fold_holdouts, paired_difference  # noqa: E402
from cv_errors import find_base  # noqa: E402

from cellhub import transforms  # noqa: E402
from cellhub.batch import iter_decoded  # noqa: E402
from cellhub.hub import load_pretrained  # noqa: E402
from cellhub.images import to_rgb  # noqa: E402


def preprocess_files(model: torch.nn.Module, paths: list[Path]) -> torch.Tensor:
    tf = transforms.eval_transform(transforms.resolve_data_config(model))
    out = []
    for _s, _c, tensors in iter_decoded(paths, lambda p, _r: tf(to_rgb(Image.open(p))), chunk_size=256):
        out += tensors
    return torch.stack(out).contiguous(memory_format=torch.channels_last)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--root", action="append", required=True, metavar="SOURCE=DIR",
                   help="the folder a source's held-out file names are relative to (once per source)")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--keep", type=float, default=0.0, help="share of the model's own statistics kept")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    roots = dict(r.split("=", 1) for r in args.root)
    variants = ["as trained", "transductive"] + [f"{args.n} random, draw {d}" for d in range(args.draws)]
    pooled: dict[str, dict[str, list]] = {s: {v: [] for v in variants + ["groups"]} for s in roots}
    folds = []
    for k, (fold, _probs, y, g, files) in enumerate(fold_holdouts(args.run, with_files=True)):
        model = load_pretrained(str(fold)).eval()
        y, g = np.asarray(y), np.asarray(g)
        src = np.array([str(x).split("|", 1)[0] for x in g])
        for s, root in roots.items():
            idx = np.flatnonzero(src == s)
            if not len(idx):
                raise SystemExit(f"fold {k + 1} holds no image of source {s!r} (sources: {sorted(set(src))})")
            base = find_base(Path(root), str(files[idx[0]]))
            x = preprocess_files(model, [base / str(files[i]) for i in idx])
            ys = y[idx]
            row = {"fold": k + 1, "source": s, "n": len(idx)}
            rng = np.random.default_rng(k)
            for v in variants:
                if v == "as trained":
                    m = model
                elif v == "transductive":
                    m = adapted(model, x, rng.permutation(len(idx)), keep=args.keep)
                else:
                    m = adapted(model, x, rng.choice(len(idx), args.n, replace=False), keep=args.keep)
                correct = (probabilities(m, x).argmax(1) == ys).astype(np.float64)
                row[v] = float(correct.mean())
                pooled[s][v].append(correct)
            pooled[s]["groups"].append(g[idx].astype(str))
            folds.append(row)
            print(f"fold {row['fold']} {s} ({row['n']} held out): " +
                  ", ".join(f"{v} {row[v]:.4f}" for v in variants), flush=True)
    out = {"run": str(args.run), "keep": args.keep, "folds": folds, "pooled": {}}
    print("\npooled out of fold (paired difference to 'as trained', group bootstrap):")
    for s, d in pooled.items():
        groups = np.concatenate(d["groups"])
        base = np.concatenate(d["as trained"])
        res = {"n_images": len(base), "n_groups": int(len(np.unique(groups))), "as trained": float(base.mean())}
        line = [f"{s} ({len(base)} images / {res['n_groups']} groups): as trained {base.mean():.4f}"]
        for v in variants[1:]:
            c = np.concatenate(d[v])
            diff, ci = paired_difference(base, c, groups, args.n_boot)
            res[v] = {"accuracy": float(c.mean()), "minus_as_trained": 100 * diff, "ci95": [100 * ci[0], 100 * ci[1]]}
            line.append(f"{v} {c.mean():.4f} ({100 * diff:+.2f} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}])")
        out["pooled"][s] = res
        print("  " + "; ".join(line))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
