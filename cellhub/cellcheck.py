"""Is this a stained blood-cell image? A check before anything is classified.

A classifier answers with one of its classes whatever it is shown. Before a crop is classified,
three properties every stained blood-smear image shares are checked (on a copy at most 96 pixels
a side, black padding left out):

- **contrast**: a cell has structure; a blank image or an empty field is uniform
  (pixel standard deviation under :data:`MIN_CONTRAST`);
- **stain colour**: Giemsa / Wright / May-Grünwald stains colour the image; a text scan, a
  grayscale photo or a fluorescence micrograph has no saturation (mean under :data:`MIN_SATURATION`);
- **stain palette**: almost every pixel's chromaticity (r, g of r+g+b) falls in the bins where
  stained smear images put theirs (:data:`PALETTE`, fitted on real Kaggle, NIH malaria and PBC
  cells by ``bench/fit_cellcheck.py``); photos of people, animals, food, fundus images and tissue
  stained with other dyes (DAB) have many pixels elsewhere (fraction under :data:`MIN_PALETTE`);
- **no white page**: the background of a smear is tinted by the stain and the light; a document,
  a drawing or a screenshot is mostly blank white, unsaturated paper (fraction of such pixels over
  :data:`MAX_WHITE`; real cells reach at most 0.32, PBC's brightest backgrounds).

``bench/fit_cellcheck.py`` measures it: real cells not used for the palette, 0 of 900 flagged
(Kaggle, NIH malaria, PBC: 300 each); images that are not cells (scikit-image's sample photos,
text scans, a retina, DAB-stained tissue, a fluorescence micrograph, whole and cropped; drawn empty
fields; rendered text) 233 of 238 flagged (98%, but these set the thresholds); an independent set
that set nothing (the pictures shipped inside the installed Python packages) 186 of 195 (95%). It
cannot tell a blood cell from another cell stained with the same dyes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["CellCheck", "check_cell_image", "chromaticity_histogram", "PALETTE", "BINS",
           "MIN_CONTRAST", "MIN_SATURATION", "MIN_PALETTE", "MAX_WHITE"]

BINS = 24
#: chromaticity bins (r * BINS + g, of r, g = R/(R+G+B), G/(R+G+B)) of stained smear images
PALETTE: frozenset[int] = frozenset({
    146, 147, 148, 149, 150, 151, 169, 170, 171, 172, 173, 174, 175, 176, 194, 195, 196, 197, 198, 199, 200,
    219, 220, 221, 222, 223, 224, 244, 245, 246, 247, 266, 267, 268, 269, 289, 290,
})
_IN_PALETTE = np.isin(np.arange(BINS * BINS), sorted(PALETTE))  # built once: the check runs on every image
MIN_CONTRAST = 0.015
MIN_SATURATION = 0.02
MIN_PALETTE = 0.95
MAX_WHITE = 0.5
_SIDE = 96


@dataclass(frozen=True)
class CellCheck:
    """The verdict: ``ok`` or the ``reason`` it is not a blood-cell image, with the measured values."""

    ok: bool
    reason: str | None
    contrast: float
    saturation: float
    palette: float
    white: float = 0.0


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """The non-black pixels of a small copy, as float RGB rows."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    im = im.convert("RGB")
    im.thumbnail((_SIDE, _SIDE))
    a = np.asarray(im, dtype=np.float32).reshape(-1, 3)
    return a[a.sum(1) > 40]  # black padding (rotated crops, segmented NIH cells) is not the image


def chromaticity_histogram(image: Image.Image | np.ndarray) -> np.ndarray:
    """Counts of the image's pixels in ``BINS x BINS`` chromaticity bins (flattened)."""
    return _histogram(_pixels(image))


def _histogram(px: np.ndarray) -> np.ndarray:
    c = px / np.maximum(px.sum(1, keepdims=True), 1)
    i = np.clip((c[:, 0] * BINS).astype(int), 0, BINS - 1)
    j = np.clip((c[:, 1] * BINS).astype(int), 0, BINS - 1)
    return np.bincount(i * BINS + j, minlength=BINS * BINS)


def check_cell_image(image: Image.Image | np.ndarray) -> CellCheck:
    """Whether ``image`` looks like a stained blood-cell image (see the module docstring)."""
    px = _pixels(image)
    if len(px) < 30:
        return CellCheck(False, "it is (almost) all black", 0.0, 0.0, 0.0)
    contrast = float(px.std(0).mean() / 255)
    mx, mn = px.max(1), px.min(1)
    saturation = float(((mx - mn) / np.maximum(mx, 1)).mean())
    hist = _histogram(px)
    palette = float((hist * _IN_PALETTE).sum() / hist.sum())
    white = float(((mn > 225) & (mx - mn < 0.06 * mx)).mean())  # blank, unsaturated paper-white pixels
    reason = None
    if contrast < MIN_CONTRAST:
        reason = "it is nearly uniform (a blank image or an empty field, no cell in it)"
    elif saturation < MIN_SATURATION:
        reason = "it has no stain colour (a grayscale image, e.g. a text scan or a fluorescence micrograph)"
    elif white > MAX_WHITE:
        reason = (f"{white:.0%} of it is blank white page, not the tinted background of a smear (a document, a "
                  "drawing or a screenshot)")
    elif palette < MIN_PALETTE:
        reason = (f"its colours are not those of a stained blood smear ({1 - palette:.0%} of its pixels are "
                  "outside the stain palette: a photo, or tissue with another stain)")
    return CellCheck(reason is None, reason, contrast, saturation, palette, white)
