"""Binary-mask helpers of the cell finders (:mod:`cellhub.detect`, :mod:`cellhub.fields`).

They give exactly what ``scipy.ndimage`` gives (tests/test_fields.py checks pixels and sums), in a
fraction of its time on the small masks the nucleus-centred crop builds for every image
(``python bench/bench_cellcrop.py``: 0.44 of the time per crop).
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["fill_holes", "label_centroids"]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` (background 4-connected) by one OpenCV flood fill from
    the border: the same pixels, several times faster."""
    m = np.asarray(mask, dtype=bool)
    pad = np.zeros((m.shape[0] + 2, m.shape[1] + 2), np.uint8)
    pad[1:-1, 1:-1] = m
    cv2.floodFill(pad, None, (0, 0), 2, loDiff=0, upDiff=0, flags=4)  # the background the border reaches
    return pad[1:-1, 1:-1] != 2


def label_centroids(labels: np.ndarray, n: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(weight, row, col)`` of each of labels 1..n: what ``ndi.sum`` and ``ndi.center_of_mass``
    give (the same sums in the same order; ``weights`` default 1 on every labelled pixel)."""
    sel = labels > 0 if weights is None else (labels > 0) & (np.asarray(weights) != 0)
    rows, cols = np.nonzero(sel)
    lab = labels[rows, cols]
    w = None if weights is None else np.asarray(weights)[rows, cols].astype(np.float64)
    total = np.bincount(lab, weights=w, minlength=n + 1)[1:].astype(np.float64)
    wr = rows.astype(np.float64) if w is None else rows * w
    wc = cols.astype(np.float64) if w is None else cols * w
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total, np.bincount(lab, weights=wr, minlength=n + 1)[1:] / total,
                np.bincount(lab, weights=wc, minlength=n + 1)[1:] / total)
