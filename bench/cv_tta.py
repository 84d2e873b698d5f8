"""Test-time augmentation on a malaria cross-validation run: does averaging flipped views help?

    python bench/cv_tta.py RUN_DIR [--data ../shared/data/malaria] [--n-boot 2000]

RUN_DIR is a ``train/finetune.py --task malaria --cv K`` folder. For each fold its model
(``cv/fold-I``) predicts the NIH cells of the patients that fold held out (read from the image
files through the checkpoint's own preprocessing) three ways: as is, averaged over the 4 flips,
and over the 8 flips and transposes of the square. Printed: per fold and pooled accuracy of each,
and flips minus plain with a paired bootstrap over patients (``bench/cv_compare.py``). The plain
figures reproduce the run's own out-of-fold NIH accuracy, which checks that the right cells are
scored.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cv_compare import load_run, paired_difference  # noqa: E402

from cellhub.hub import load_pretrained  # noqa: E402
from cellhub.images import read_image  # noqa: E402
from cellhub.tasks import malaria_group  # noqa: E402
from cellhub.training.cv import fold_dir  # noqa: E402
from cellhub.transforms import eval_transform, resolve_data_config  # noqa: E402

VIEWS = ("plain", "flips4", "dihedral8")


def views(x):
    """The 8 symmetries of the square, plain first; the first 4 are the flips."""
    base = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    return base + [v.transpose(-1, -2) for v in base]


def fold_predictions(fold: Path, files: list[Path], batch: int = 256) -> dict[str, np.ndarray]:
    import torch

    model = load_pretrained(str(fold)).eval()
    labels = list(model.cellhub_config["labels"])
    tf = eval_transform(resolve_data_config(model))
    out = {v: [] for v in VIEWS}
    for s in range(0, len(files), batch):
        x = torch.stack([tf(read_image(p)) for p in files[s:s + batch]])
        with torch.no_grad():
            probs = [model(v).softmax(-1).numpy() for v in views(x)]
        out["plain"].append(probs[0])
        out["flips4"].append(np.mean(probs[:4], axis=0))
        out["dihedral8"].append(np.mean(probs, axis=0))
    y = np.array([labels.index("parasitized" if p.parent.name.lower() == "parasitized" else "uninfected") for p in files])
    return {v: (np.concatenate(out[v]).argmax(1) == y).astype(np.float64) for v in VIEWS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "malaria")
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args(argv)
    files = sorted(p for p in args.data.rglob("*.png") if p.parent.name.lower() in ("parasitized", "uninfected"))
    if not files:
        raise SystemExit(f"no NIH malaria cells (Parasitized/ or Uninfected/ *.png) under {args.data}")
    correct = {v: [] for v in VIEWS}
    groups: list[str] = []
    for i, (_, _, held_groups) in enumerate(load_run(args.run, "malaria")):
        patients = {str(g).split("|", 1)[1] for g in held_groups}
        sel = [p for p in files if malaria_group(p.name) in patients]
        c = fold_predictions(fold_dir(args.run, i), sel)
        print(f"fold {i + 1}: {len(sel)} cells / {len(patients)} patients  "
              + "  ".join(f"{v} {c[v].mean():.4f}" for v in VIEWS), flush=True)
        for v in VIEWS:
            correct[v].append(c[v])
        groups += [malaria_group(p.name) for p in sel]
    if not groups:
        raise SystemExit(f"none of the held-out patients of {args.run} has a cell under {args.data}")
    g = np.array(groups)
    plain = np.concatenate(correct["plain"])
    for v in VIEWS[1:]:
        other = np.concatenate(correct[v])
        diff, (lo, hi) = paired_difference(plain, other, g, args.n_boot)
        print(f"pooled: plain {plain.mean():.4f}, {v} {other.mean():.4f}; {v} - plain = "
              f"{100 * diff:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}] "
              f"(paired bootstrap over {len(set(groups))} patients, {len(g)} cells)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
