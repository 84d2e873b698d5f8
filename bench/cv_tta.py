"""Test-time augmentation on a cross-validation run: does averaging flipped views help?

    python bench/cv_tta.py RUN_DIR [--data DIR ...] [--source S] [--n-boot 2000]

RUN_DIR is a ``train/finetune.py --cv K`` folder (any task). For each fold its model
(``cv/fold-I``) predicts the images that fold held out (``holdout.npz``'s files and labels, read
from the image files through the checkpoint's own preprocessing, cell-centred crop included) three
ways: as is, averaged over the 4 flips, and over the 8 flips and transposes of the square.
``--data`` names each source folder of the run (repeat it; default ``../shared/data/malaria``); a
held-out file is found through the same loader training used (:func:`cellhub.data.load_cell_dataset`,
train and validation splits only: a test split is never read). Printed: per fold and pooled
accuracy of each, and each view minus plain with a paired bootstrap over groups
(``bench/cv_compare.py``). The plain figures reproduce the run's own out-of-fold accuracy, which
checks that the right images are scored.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cv_compare import fold_holdouts, paired_difference  # noqa: E402

from cellhub.data import image_paths, load_cell_dataset  # noqa: E402
from cellhub.hub import load_pretrained  # noqa: E402
from cellhub.images import read_image  # noqa: E402
from cellhub.training.cv import fold_dir  # noqa: E402
from cellhub.transforms import eval_transform, resolve_data_config  # noqa: E402

VIEWS = ("plain", "flips4", "dihedral8")


def views(x):
    """The 8 symmetries of the square, plain first; the first 4 are the flips."""
    base = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    return base + [v.transpose(-1, -2) for v in base]


def fold_predictions(fold: Path, paths: list[Path], y: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    """Per view, whether the fold's model gets each image right (0/1)."""
    import torch

    model = load_pretrained(str(fold)).eval()
    tf = eval_transform(resolve_data_config(model))
    out = {v: [] for v in VIEWS}
    for s in range(0, len(paths), batch):
        x = torch.stack([tf(read_image(p)) for p in paths[s:s + batch]])
        with torch.no_grad():
            probs = [model(v).softmax(-1).numpy() for v in views(x)]
        out["plain"].append(probs[0])
        out["flips4"].append(np.mean(probs[:4], axis=0))
        out["dihedral8"].append(np.mean(probs, axis=0))
    return {v: (np.concatenate(out[v]).argmax(1) == y).astype(np.float64) for v in VIEWS}


def source_files(dirs: list[Path], task: str) -> dict[tuple[str, str], Path]:
    """``(source, file) -> image path`` for the train/validation images of each source folder (the
    source is the folder's name, as a multi-source run names it)."""
    out: dict[tuple[str, str], Path] = {}
    for d in dirs:
        dsd = load_cell_dataset(d, task=task, progress=False)
        for split in ("train", "validation"):
            if split in dsd:
                ds = dsd[split]
                out.update({(d.name, str(f)): Path(p) for f, p in zip(ds["file"], image_paths(ds))})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, action="append", default=None,
                    help="a source folder of the run (repeat for each; default ../shared/data/malaria)")
    ap.add_argument("--source", help="score only this source's images (e.g. blood-cells)")
    ap.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args(argv)
    dirs = args.data or [Path(__file__).resolve().parents[2] / "shared" / "data" / "malaria"]
    if not (fold_dir(args.run, 0) / "config.json").is_file():
        raise SystemExit(f"{args.run} holds no cv/fold-1 model: not a finished --cv run folder.")
    task = load_pretrained(str(fold_dir(args.run, 0))).cellhub_config["task"]
    where = source_files(dirs, task)
    correct = {v: [] for v in VIEWS}
    groups: list[str] = []
    for i, (fold, probs, y, g, files) in enumerate(fold_holdouts(args.run, with_files=True)):
        src = [str(x).split("|", 1)[0] if "|" in str(x) else dirs[0].name for x in g]
        keep = [k for k in range(len(y)) if args.source is None or src[k] == args.source]
        missing = [files[k] for k in keep if (src[k], files[k]) not in where]
        if missing:
            raise SystemExit(f"fold {i + 1}: {len(missing)} held-out images are in none of the --data folders "
                             f"({', '.join(d.name for d in dirs)}), e.g. {missing[0]}: give each source folder of the run.")
        c = fold_predictions(fold, [where[(src[k], files[k])] for k in keep], np.asarray(y)[keep])
        own = float((np.asarray(probs)[keep].argmax(1) == np.asarray(y)[keep]).mean())
        print(f"fold {i + 1}: {len(keep)} images (the run's own accuracy {own:.4f})  "
              + "  ".join(f"{v} {c[v].mean():.4f}" for v in VIEWS), flush=True)
        for v in VIEWS:
            correct[v].append(c[v])
        groups += [str(g[k]) for k in keep]
    if not groups:
        raise SystemExit(f"{args.run}: no held-out image" + (f" of source {args.source!r}" if args.source else ""))
    g = np.array(groups)
    plain = np.concatenate(correct["plain"])
    for v in VIEWS[1:]:
        other = np.concatenate(correct[v])
        diff, (lo, hi) = paired_difference(plain, other, g, args.n_boot)
        print(f"pooled: plain {plain.mean():.4f}, {v} {other.mean():.4f}; {v} - plain = "
              f"{100 * diff:+.2f} points [{100 * lo:+.2f}, {100 * hi:+.2f}] "
              f"(paired bootstrap over {len(set(groups))} groups, {len(g)} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
