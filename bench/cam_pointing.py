"""Does a model's heat map point at the cell? The pointing game, per heat-map method.

    python bench/cam_pointing.py CHECKPOINT [CHECKPOINT ...] --data ../shared/data/pbc [--n 100] \
        [--classes eosinophil lymphocyte monocyte neutrophil] [--methods exact occlusion]

For models with a cell-centred crop (``cell_crop`` in the checkpoint's config) the white cell sits in
the middle of what the model sees, so a heat map that explains the prediction should peak in the
central half of the input (the middle 50% of each side; a quarter of the area). Printed per
checkpoint and method: how many of ``--n`` seeded images have their peak there, the median share
of the map's mass there (0.25 for a uniform map), and seconds per image against the exact CAM's
(the baseline, same images, same process). Images: ``--data``'s class folders (``*.jpg``, ``*.png``),
a seeded sample over ``--classes`` (default: all).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub.images import is_image_file, read_image  # noqa: E402
from cellhub.predict import Predictor  # noqa: E402


def pointing(maps: list[np.ndarray]) -> tuple[int, float]:
    """(images whose peak lies in the central half, median share of the map's mass there)."""
    hits, shares = 0, []
    for m in maps:
        h, w = m.shape
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        hits += int(h / 4 <= y < 3 * h / 4 and w / 4 <= x < 3 * w / 4)
        total = float(m.sum())
        shares.append(float(m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].sum()) / total if total > 0 else 0.0)
    return hits, float(np.median(shares)) if shares else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", type=Path, required=True, help="a folder of class folders")
    ap.add_argument("--classes", nargs="*", default=None)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--methods", nargs="+", default=["exact", "occlusion"], choices=["exact", "gradcam", "occlusion"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    folders = [d for d in sorted(args.data.iterdir()) if d.is_dir() and (not args.classes or d.name in args.classes)]
    files = [f for d in folders for f in sorted(d.iterdir()) if is_image_file(f) and not f.name.startswith(".")]
    if not files:
        raise SystemExit(f"no images under {args.data} (classes {args.classes or 'all'})")
    sample = random.Random(args.seed).sample(files, min(args.n, len(files)))
    images = []
    for f in sample:
        try:
            images.append(read_image(f))
        except Exception as exc:  # noqa: BLE001 - a bad file is reported and skipped
            print(f"  skipped {f}: {exc}")
    for ckpt in args.checkpoints:
        base = None
        default = Predictor.from_pretrained(ckpt).cam_method
        default = "exact" if default == "auto" else default  # auto: exact for these GAP + linear heads
        for method in args.methods:
            p = Predictor.from_pretrained(ckpt, cam_method=method)
            t0 = time.perf_counter()
            out = p.predict(images, with_cam=True)
            sec = (time.perf_counter() - t0) / len(images)
            base = sec if base is None else base
            hits, share = pointing([o.cam for o in out if o.cam is not None])
            print(f"{Path(ckpt).name} [{method}{', the default' if method == default else ''}]: "
                  f"peak on the cell {hits}/{len(images)}, median mass there {share:.2f} (uniform 0.25), "
                  f"{sec:.3f} s/image ({sec / base:.1f}x {args.methods[0]})")
    print("cmd='python bench/cam_pointing.py " + " ".join(sys.argv[1:]) + "'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
