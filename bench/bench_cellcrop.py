"""Benchmark `cell-crop`: where the nucleus-centred crop's time goes, and what the mask helpers save.

Every white-cell model bundled here crops its input around the nucleus first
(``cellhub.transforms.cell_box``: the nucleus centre, ``detect.white_cell_centre``, and the red-cell
radius, ``detect.estimate_radius``). Both build masks: holes filled, blobs' centres. Since
2026-12-07 ``detect.fill_holes`` (one OpenCV flood fill from the border) and
``detect.label_centroids`` (bincount sums) do what ``scipy.ndimage.binary_fill_holes`` and
``ndimage.sum`` / ``center_of_mass`` did, pixel for pixel (checked here on every image, and in
tests/test_fields.py). The baseline arm puts the scipy functions back in their place, in the same
process, on the same images, the arms interleaved.

ratio = median(helpers) / median(scipy); target <= 0.8. The boxes of the two arms must be equal.

    python bench/bench_cellcrop.py [--quick] [--data FOLDER] [--images N] [--repeats N]

Without ``--data`` the images are drawn single-cell crops (``cellhub.synthetic.draw_blood_cell``,
320x240); with it, real crops spread evenly over the folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.8


def _scipy_centroids(labels, n, weights=None):
    """The baseline: what detect did before label_centroids."""
    import numpy as np
    from scipy import ndimage as ndi

    ids = np.arange(1, n + 1)
    ref = (labels > 0) if weights is None else weights
    com = np.asarray(ndi.center_of_mass(ref, labels, ids)).reshape(-1, 2)
    return np.asarray(ndi.sum(ref, labels, ids), dtype=np.float64), com[:, 0], com[:, 1]


def run(args) -> list[C.Result]:
    from PIL import Image
    from scipy import ndimage as ndi

    from cellhub import detect
    from cellhub.synthetic import draw_blood_cell
    from cellhub.transforms import cell_box

    n = args.images or (40 if args.quick else 200)
    rounds = args.repeats or (3 if args.quick else 7)
    if args.data:
        images = [Image.open(f).convert("RGB") for f in C.real_images(args.data, n)]
        what = f"{len(images)} real crops from {args.data}"
    else:
        images = [draw_blood_cell(C.BLOOD_LABELS[i % 4], size=(320, 240), seed=i) for i in range(n)]
        what = f"{n} drawn crops (320x240)"
    helpers = (detect.fill_holes, detect.label_centroids)

    def boxes(use_scipy: bool) -> list[tuple[int, int, int, int]]:
        detect.fill_holes, detect.label_centroids = ((ndi.binary_fill_holes, _scipy_centroids) if use_scipy
                                                     else helpers)
        try:
            return [cell_box(im, "nucleus") for im in images]
        finally:
            detect.fill_holes, detect.label_centroids = helpers

    if boxes(True) != boxes(False):
        raise SystemExit("cell-crop: the two arms give different boxes: the helpers are not equivalent")
    times = C.interleaved({"scipy": lambda: boxes(True), "helpers": lambda: boxes(False)}, rounds)
    base, new = C.median(times["scipy"]), C.median(times["helpers"])
    ratio = new / base
    C.detail(f"{what}: scipy.ndimage {1000 * base / len(images):.2f} ms/img, helpers {1000 * new / len(images):.2f} "
             "ms/img, boxes equal")
    fields = {"ms_per_img": f"{1000 * base / len(images):.2f}/{1000 * new / len(images):.2f}",
              "images": len(images), "repeats": rounds, **C.env_fields(), "target": f"<={TARGET}",
              "status": "PASS" if ratio <= TARGET else "FAIL"}
    return [C.Result("cell-crop", ratio, "nucleus-centred crop box with the mask helpers / with scipy.ndimage;",
                     fields, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--images", type=int, default=None, help="images per round (default 200; --quick 40)")
    p.add_argument("--data", default=None, help="a folder of real single-cell crops (default: drawn ones)")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
