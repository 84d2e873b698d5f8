"""The CIELAB targets of ``stain_norm="reinhard"`` (``cellhub.transforms.STAIN_NORMS``).

    python bench/stain_targets.py --dataset ../shared/data/blood-cells --dataset ../shared/data/pbc [--n 1000]
    python bench/stain_targets.py --task malaria --dataset ../shared/data/malaria \
        --dataset /tmp/cellhub-bundle/bccd-rbc-negatives --cell-crop none --size 64 --black-below 20

For ``--n`` images drawn at random (seed 0) from each development dataset: the 80 px nucleus crop
every bundled blood-cell model sees, its per-channel CIELAB mean and standard deviation; printed:
the average of each over all images (what STAIN_NORMS["reinhard"] holds), and per dataset, to show
how far apart the labs' colours are. ``--cell-crop none --size 64 --black-below 20``: the malaria
model's input (the whole crop at 64 px), moments over the cell's pixels only, not the black
background the segmented red-cell crops are cut out on (what STAIN_NORMS["reinhard-cell"] holds).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub import data as data_mod  # noqa: E402
from cellhub import transforms  # noqa: E402
from cellhub.batch import iter_decoded  # noqa: E402
from cellhub.evaluation import select_split  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append", required=True)
    p.add_argument("--task", default="blood-cells")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--size", type=int, default=80)
    p.add_argument("--cell-crop", default="nucleus", help="nucleus (default) or none: the whole image")
    p.add_argument("--black-below", type=int, default=0,
                   help="moments over the pixels whose brightest channel reaches this (0: all pixels)")
    args = p.parse_args(argv)
    crop = transforms.CellCrop(args.cell_crop) if args.cell_crop != "none" else (lambda im: im)
    allm, alls = [], []
    for path in args.dataset:
        dsd = data_mod.load_cell_dataset(path, task=args.task, progress=False)
        _, ds = select_split(dsd, None if len(dsd) == 1 else "train", source=path)
        rows = np.random.default_rng(0).choice(len(ds), min(args.n, len(ds)), replace=False).tolist()

        def moments(i: int, _raw: object) -> tuple[np.ndarray, np.ndarray]:
            img = np.asarray(crop(ds[i]["image"].convert("RGB")).resize((args.size, args.size)))
            lab = transforms.rgb_to_lab(img)[img.max(axis=2) >= args.black_below].reshape(-1, 3)
            return lab.mean(0), lab.std(0)

        got = [m for _s, _c, ms in iter_decoded(rows, moments, chunk_size=128) for m in ms]
        mean, std = np.array([g[0] for g in got]), np.array([g[1] for g in got])
        allm.append(mean)
        alls.append(std)
        print(f"{path} ({len(rows)} images): mean L,a,b {np.round(mean.mean(0), 2).tolist()} "
              f"(sd across images {np.round(mean.std(0), 2).tolist()}); std {np.round(std.mean(0), 2).tolist()}")
    m, s = np.concatenate(allm).mean(0), np.concatenate(alls).mean(0)
    print(f"all: mean {np.round(m, 2).tolist()}, std {np.round(s, 2).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
