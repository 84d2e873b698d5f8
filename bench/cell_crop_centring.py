"""Where does the white cell sit in a cell-centred crop? Per crop spec (``cellhub.transforms.CELL_CROPS``).

    python bench/cell_crop_centring.py --data ../shared/data/blood-cells/dataset2-master/dataset2-master/images/TRAIN \
        [--n 50] [--specs nucleus nucleus-pad]

For a seeded sample of ``--n`` images per class folder of ``--data``: the distance from the
crop's centre to the nucleus centre (:func:`cellhub.detect.white_cell_centre`), the larger of its
x and y parts, as a share of the crop's side (0 = centred, 0.5 = on the crop's edge; beyond 0.25
the cell's middle lies in the outer quarter and a large cell is cut), its median and 75th / 90th
percentiles and how many images exceed 0.15 and 0.25; and the median share of the crop that lies
outside the image (filled, for ``nucleus-pad``). The Kaggle crops are shifted copies of one cell,
so many hold it near an edge: that is where ``nucleus`` (moved inside the image) and
``nucleus-pad`` (kept centred) differ. Images without a stained nucleus are counted and skipped.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub.detect import white_cell_centre  # noqa: E402
from cellhub.images import is_image_file, read_image  # noqa: E402
from cellhub.transforms import CELL_CROPS, cell_box  # noqa: E402


def offset_share(centre: tuple[float, float], box: tuple[int, int, int, int]) -> float:
    """The nucleus centre's distance from the box's centre (the larger of x and y) over the box's side."""
    left, top, right, bottom = box
    return max(abs(centre[0] - (left + right) / 2), abs(centre[1] - (top + bottom) / 2)) / (right - left)


def outside_share(size: tuple[int, int], box: tuple[int, int, int, int]) -> float:
    """The share of the box's area that lies outside an image of ``size`` = (W, H)."""
    w, h = size
    left, top, right, bottom = box
    inside = max(0, min(right, w) - max(left, 0)) * max(0, min(bottom, h) - max(top, 0))
    return 1.0 - inside / ((right - left) * (bottom - top))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a folder of class folders")
    ap.add_argument("--n", type=int, default=50, help="images per class folder (seeded sample)")
    ap.add_argument("--specs", nargs="+", default=list(CELL_CROPS), choices=list(CELL_CROPS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        ap.error(f"--data {args.data} is not a folder")
    rng = random.Random(args.seed)
    files = []
    for folder in sorted(p for p in args.data.iterdir() if p.is_dir()):
        found = sorted(f for f in folder.iterdir() if is_image_file(f))
        files += rng.sample(found, min(args.n, len(found)))
    if not files:
        ap.error(f"no images in the class folders of {args.data}")
    offsets: dict[str, list[float]] = {s: [] for s in args.specs}
    outside: dict[str, list[float]] = {s: [] for s in args.specs}
    skipped = 0
    for f in files:
        image = read_image(f)
        centre = white_cell_centre(np.asarray(image))
        if centre is None:
            skipped += 1
            continue
        for spec in args.specs:
            box = cell_box(image, spec)
            offsets[spec].append(offset_share(centre, box))
            outside[spec].append(outside_share(image.size, box))
    for spec in args.specs:
        o = np.asarray(offsets[spec])
        p50, p75, p90 = np.percentile(o, [50, 75, 90]) if len(o) else (float("nan"),) * 3
        print(f"cell-crop-centring[{spec}]: images={len(o)} no_nucleus={skipped} offset_median={p50:.3f} "
              f"offset_p75={p75:.3f} offset_p90={p90:.3f} over_0.15={float(np.mean(o > 0.15)):.3f} "
              f"over_0.25={float(np.mean(o > 0.25)):.3f} outside_median={float(np.median(outside[spec])):.3f}")
    print(f"cmd='python bench/cell_crop_centring.py --data {args.data} --n {args.n} --specs {' '.join(args.specs)}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
