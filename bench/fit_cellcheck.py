"""Fit and measure `cellhub.cellcheck` (is this a stained blood-cell image?).

    python bench/fit_cellcheck.py [--per-source 600] [--write]

Positives: real cells from ``../shared/data`` (Kaggle blood-cell TRAIN crops, NIH malaria cells,
PBC cells; a seeded sample of each). The first half of each sample fits the stain palette (the
chromaticity bins holding the colours of stained smear images); the second half measures the false
alarms. Negatives: scikit-image's sample images (photos, text scans, a retina, stained tissue, a
fluorescence micrograph) whole and in random crops, drawn empty fields and rendered text. The
contrast and saturation floors and the white-background ceiling were set with these negatives in
view, so their detection rate is optimistic for images unlike them. An independent set, never used
to set anything, measures that: every JPEG/PNG image shipped inside the installed Python packages
other than scikit-image (matplotlib's sample data, gradio's and networkx's documentation pictures,
...), whole and in random crops. ``--write`` prints the palette for ``cellhub/cellcheck.py``.
Needs ``pip install scikit-image`` (for the sample images only).
"""
from __future__ import annotations

import argparse
import glob
import random
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub import cellcheck  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = {"kaggle": "blood-cells/dataset2-master/dataset2-master/images/TRAIN/*/*.jpeg",
           "malaria": "malaria/cell_images/*/*.png", "pbc": "pbc/*/[A-Z]*.jpg"}
SKIMAGE = ["astronaut", "camera", "coffee", "chelsea", "hubble_deep_field", "immunohistochemistry", "moon", "page",
           "text", "horse", "rocket", "coins", "clock", "colorwheel", "brick", "grass", "gravel", "retina", "cat",
           "logo", "microaneurysms", "cell"]


def negatives(seed: int = 0) -> dict[str, list[Image.Image]]:
    import skimage.data as d

    rng = np.random.default_rng(seed)
    out: dict[str, list[Image.Image]] = defaultdict(list)
    for name in SKIMAGE:
        arr = getattr(d, name)()
        im = Image.fromarray(arr if arr.dtype == np.uint8 else (arr * 255).astype(np.uint8)).convert("RGB")
        out[name].append(im)
        for _ in range(8):
            s = int(rng.integers(48, max(49, min(im.size))))
            x, y = int(rng.integers(0, im.width - s + 1)), int(rng.integers(0, im.height - s + 1))
            out[name].append(im.crop((x, y, x + s, y + s)))
    for k in range(20):  # an empty field: the pale background of a smear, nothing on it
        tint = np.array([225, 215, 220]) + rng.normal(0, 6, 3)
        out["empty field"].append(Image.fromarray(np.clip(tint + rng.normal(0, 3, (120, 160, 3)), 0, 255).astype(np.uint8)))
        page = Image.new("RGB", (240, 160), tuple(int(v) for v in rng.integers(235, 256, 3)))
        draw = ImageDraw.Draw(page)
        for line in range(8):
            draw.text((8, 8 + 18 * line), "Lorem ipsum dolor sit amet, consectetur"[: int(rng.integers(10, 40))],
                      fill=(20, 20, 20))
        out["rendered text"].append(page)
    return out


def independent_negatives(seed: int = 0, crops: int = 4, min_side: int = 48) -> dict[str, list[Image.Image]]:
    """Images that are not blood cells and took no part in setting the check: the pictures shipped in
    the installed packages (scikit-image's excluded), by package, each whole and in ``crops`` crops."""
    import site
    import sysconfig

    roots = {Path(p) for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()}
    rng = np.random.default_rng(seed)
    out: dict[str, list[Image.Image]] = defaultdict(list)
    for root in sorted(roots):
        for f in sorted(root.rglob("*")):
            if f.suffix.lower() not in (".jpg", ".jpeg", ".png") or f.relative_to(root).parts[0] == "skimage":
                continue
            try:
                im = Image.open(f).convert("RGB")
            except Exception:  # noqa: BLE001 - a broken or exotic file is simply not part of the set
                continue
            if min(im.size) < min_side:
                continue
            pkg = f.relative_to(root).parts[0]
            out[pkg].append(im)
            for _ in range(crops):
                s = int(rng.integers(min_side, min(im.size) + 1))
                x, y = int(rng.integers(0, im.width - s + 1)), int(rng.integers(0, im.height - s + 1))
                out[pkg].append(im.crop((x, y, x + s, y + s)))
    return out


def _flag_rate(sets: dict[str, list[Image.Image]], label: str) -> tuple[int, int]:
    caught = total = 0
    for name, images in sets.items():
        ok = [cellcheck.check_cell_image(im).ok for im in images]
        caught, total = caught + ok.count(False), total + len(ok)
        if any(ok):
            print(f"  {label}: {name:<20} {ok.count(True)}/{len(ok)} passed as cells")
    return caught, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-source", type=int, default=600)
    p.add_argument("--write", action="store_true", help="print the fitted palette")
    args = p.parse_args(argv)
    random.seed(0)
    fit, held = [], {}
    for name, pat in SOURCES.items():
        files = sorted(glob.glob(str(DATA / pat)))
        random.shuffle(files)
        half = args.per_source // 2
        fit += files[:half]
        held[name] = files[half:args.per_source]
    hist = np.zeros(cellcheck.BINS * cellcheck.BINS)
    for f in fit:
        h = cellcheck.chromaticity_histogram(Image.open(f))
        hist += h / max(h.sum(), 1)
    hist /= hist.sum()
    palette = sorted(int(i) for i in np.nonzero(hist > 1e-4)[0])
    if args.write:
        print("PALETTE =", palette)
    print(f"fitted palette: {len(palette)} bins from {len(fit)} images; in use: {len(cellcheck.PALETTE)} bins, "
          f"same: {palette == sorted(cellcheck.PALETTE)}")
    alarms = n = 0
    for name, files in held.items():
        flagged = [f for f in files if not cellcheck.check_cell_image(Image.open(f)).ok]
        alarms, n = alarms + len(flagged), n + len(files)
        print(f"  real {name:<8} {len(flagged)}/{len(files)} flagged" + (f", e.g. {flagged[0]}" if flagged else ""))
    caught, total = _flag_rate(negatives(), "not a cell")
    ind = independent_negatives()
    i_caught, i_total = _flag_rate(ind, "independent")
    print(f"cellcheck: real cells flagged {alarms}/{n} = {alarms / n:.1%} (target <= 2%); non-cell images flagged "
          f"{caught}/{total} = {caught / total:.1%} (target >= 95%; set with these in view); independent non-cell "
          f"images ({len(ind)} packages, {i_total} images) flagged "
          f"{i_caught}/{i_total} = {i_caught / max(i_total, 1):.1%} cmd='python bench/fit_cellcheck.py'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
