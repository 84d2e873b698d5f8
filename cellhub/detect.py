"""Finding cells in a photo of a microscope field: white cells, red cells and platelets, with boxes.

Image processing (OpenCV, numpy, scipy), and a small trained network for red cells:

* **scale** — the red-cell radius is measured on a thumbnail (the distance transform of the cell
  mask, pale cells filled by their redness, peaks at one radius) and the photo resized so that it
  is :attr:`DetectParams.work_radius` pixels. Every size below is a multiple of it, so the same
  settings work for a 640x480 field, a 4000x3000 photo or a 128x128 crop.
* **white cells** — the nucleus stains purple (``blue - red`` high): the thresholded mask is
  cleaned, the lobes of one nucleus merged, and each large purple group expanded to the cell's box.
  A small purple group cut by the border (a sliver of a cell outside the photo) is not counted.
* **platelets** — small purple blobs away from white cells and not inside a red cell (a purple dot
  inside a red cell is a parasite or a stain speck, part of that red cell).
* **red cells** — :mod:`cellhub.fieldnet`'s network, trained on annotated BCCD fields, predicts
  their centres and boxes on the working image (it learned which clumped and border-cut cells
  annotators box); centres inside a white cell are dropped. With ``red_cells="hough"`` or without
  the weights file: Hough circles of about one radius whose disk is mostly red-cell mask (touching
  cells each give a circle; a border-cut cell counts when mostly visible).
* **tiles** — a working image over :attr:`DetectParams.tile` pixels a side is processed in
  overlapping tiles; a cell is kept by the tile whose core holds its centre (and of two claims on
  a cell centred on a seam, one is kept), so a cell where tiles meet is counted once.

Boxes are ``(x0, y0, x1, y1)`` in the original image's pixels (x1, y1 exclusive).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from cellhub.fieldnet import box_iou, centre_in, find_cells, load_fieldnet, net_extra_white_cells, net_red_cells
from cellhub.masks import fill_holes, label_centroids

__all__ = ["Cell", "Detection", "DetectParams", "DEFAULT_PARAMS", "detect_cells", "box_iou", "field_problem",
           "estimate_radius", "white_cell_centre", "working_image"]

logger = logging.getLogger(__name__)

Kind = Literal["wbc", "rbc", "platelet"]
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class DetectParams:
    """Detector settings. Sizes are in red-cell radii (``r``) unless the name says pixels.

    The defaults were tuned on the tuning part of the BCCD fields (``bench/field_accuracy.py``).
    """

    #: red-cell radius in the working image, pixels (the photo is resized to this scale)
    work_radius: float = 16.0
    #: longest side of the thumbnail the scale is measured on, pixels
    thumb_side: int = 384
    #: the scale's cell mask also takes pixels this much redder than the background (0: off)
    scale_redness: float = 16.0
    #: working images with a side over this many pixels are processed in tiles
    tile: int = 768
    #: ``blue - red`` above which a pixel is nucleus (0-255 scale, after a small blur)
    nucleus_threshold: float = 28.0
    #: a purple blob of at least this area (in r^2) is a nucleus lobe (smaller: a platelet or a granule)
    lobe_min_area: float = 0.2
    #: nucleus lobes closer than this (in r) are one nucleus
    lobe_merge: float = 0.5
    #: a purple group with at least this area (in r^2) is a white cell
    wbc_min_area: float = 1.5
    #: a purple group cut by the image border is a white cell only from this area (in r^2)
    wbc_border_min_area: float = 2.0
    #: a smaller purple group (at least this, in r^2) is a white cell when cytoplasm surrounds it:
    #: at least ``cytoplasm_fraction`` of a ring round it has blue - red > ``cytoplasm_blue`` and is
    #: ``cytoplasm_dark`` darker in green than the background
    wbc_small_area: float = 0.6
    cytoplasm_fraction: float = 0.8
    cytoplasm_blue: float = 0.0
    cytoplasm_dark: float = 12.0
    #: a purple blob with an area between these (in r^2) is a platelet candidate
    platelet_min_area: float = 0.015
    platelet_max_area: float = 0.35
    #: white-cell box = nucleus box grown by this fraction of its size plus ``wbc_margin_r`` r each side
    wbc_margin_frac: float = 0.06
    wbc_margin_r: float = 0.2
    #: cell mask: darker (green channel) than the background by this much (0-255), or Otsu's threshold if lower
    fg_margin: float = 30.0
    #: red-cell circles: centres at least this far apart (in r), Canny edge threshold, votes (per r)
    rbc_min_dist: float = 1.6
    hough_edge: float = 40.0
    rbc_min_radius: float = 0.7
    rbc_max_radius: float = 1.4
    hough_votes: float = 0.8
    #: a circle is a red cell when this fraction of its disk is cell mask
    rbc_cover: float = 0.8
    #: the red-cell mask also takes pixels this much redder (``red - green``, 0-255) than the background,
    #: holes filled: a pale red cell is only a ring in the darkness mask (0: off)
    rbc_redness: float = 12.0
    #: smallest red-cell region counted (in r^2)
    rbc_min_area: float = 0.6
    #: a red cell cut by the border counts from this visible area (in r^2, ~3/4 of a cell): the BCCD
    #: annotators boxed few border cells, and this matched their counts best on the tuning fields
    rbc_border_min_area: float = 2.8
    #: red cells by ``"net"`` (:mod:`cellhub.fieldnet`, ``train/train_detector.py``; Hough when its weights
    #: are absent) or ``"hough"`` (the circles above); ``fieldnet``: a weights file (None: the bundled one)
    red_cells: str = "net"
    fieldnet: str | None = None
    #: with the network: also a white cell, each of its white cells of at least this score that no
    #: finder box overlaps (None: the finder's white cells only; chosen out of fold, RESULTS.md)
    wbc_net_add: float | None = 0.3


DEFAULT_PARAMS = DetectParams()


@dataclass
class Cell:
    """One found cell: its kind and box in the original image's pixels."""

    kind: Kind
    box: Box
    #: pixel area in the original image (mask area for red cells, nucleus area for white cells)
    area: float = 0.0


@dataclass
class Detection:
    """Every cell found in one image, with the scale it was found at."""

    cells: list[Cell]
    width: int
    height: int
    #: red-cell radius in original pixels (measured, or assumed when the image had too few cells)
    rbc_radius: float
    #: working-image pixels per original pixel
    scale: float
    tiles: int = 1
    notes: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[Cell]:
        return [c for c in self.cells if c.kind == kind]

    def counts(self) -> dict[str, int]:
        return {k: len(self.of_kind(k)) for k in ("wbc", "rbc", "platelet")}


# ------------------------------------------------------------------------------------ channels
def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise TypeError(f"expected an RGB PIL image or a uint8 (H, W, 3) array, got {arr.dtype} {arr.shape}")
    return arr


def _resize(arr: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 1e-6:
        return arr
    h, w = arr.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(arr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _nucleus_channel(arr: np.ndarray) -> np.ndarray:
    f = cv2.GaussianBlur(arr, (0, 0), 1.0).astype(np.float32)
    return f[..., 2] - f[..., 0]


def _foreground(arr: np.ndarray, p: DetectParams, r: float | None = None) -> np.ndarray:
    """Cells vs background: darker than the bright background in the green channel (red cells
    absorb green; so does the stain), holes (the pale centres of red cells) filled."""
    f = cv2.GaussianBlur(arr, (0, 0), 1.2)
    dark = (255 - f[..., 1]).astype(np.uint8)
    bg = float(np.percentile(dark, 5))
    otsu, _ = cv2.threshold(dark, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    brightest = np.maximum(np.maximum(f[..., 0], f[..., 1]), f[..., 2])  # = f.max(axis=2), faster
    mask = (dark > min(otsu, bg + p.fg_margin)) & (brightest > 40)  # a black crop border is not a cell
    if r is not None and r >= 3:  # close the rings of pale cells so that their centres fill
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(0.3 * r) | 1,) * 2)
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, k).astype(bool)
    mask = fill_holes(mask)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, k).astype(bool)


def _peaks(dt: np.ndarray, min_value: float, sep: float) -> np.ndarray:
    """(N, 2) row/col of distance-transform peaks: local maxima over a ``sep`` radius, plateaus merged."""
    size = max(3, int(2 * sep) | 1)
    local = (dt == ndi.maximum_filter(dt, size=size)) & (dt >= min_value)
    lab, n = ndi.label(local, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    _, rows, cols = label_centroids(lab, n)
    centres = np.stack([rows, cols], axis=1)
    # several peaks of one broad plateau: keep the highest within `sep`
    order = np.argsort(-dt[centres[:, 0].astype(int), centres[:, 1].astype(int)])
    tree = cKDTree(centres)
    suppressed = np.zeros(len(centres), bool)
    kept = []
    for i in order:
        if not suppressed[i]:
            kept.append(i)
            suppressed[tree.query_ball_point(centres[i], sep - 1e-9)] = True
    return np.round(centres[kept]).astype(np.int64)


def _redder(arr: np.ndarray, margin: float) -> np.ndarray:
    """Pixels whose ``red - green`` is ``margin`` above the background's: red cells, pale ones too
    (their green is close to the background's, their redness is not)."""
    f = cv2.GaussianBlur(arr, (0, 0), 1.2).astype(np.float32)
    redness = f[..., 0] - f[..., 1]
    return redness > float(np.percentile(redness, 5)) + margin


def estimate_radius(arr: np.ndarray, p: DetectParams = DEFAULT_PARAMS) -> float | None:
    """The typical red-cell radius in ``arr``'s pixels (median distance-transform peak), or None."""
    mask = _foreground(arr, p)
    if p.scale_redness > 0:  # pale red cells are rings in the darkness mask: fill them by their redness
        mask = fill_holes(mask | _redder(arr, p.scale_redness))
    if mask.mean() < 0.01:
        return None
    dt = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    pk = _peaks(dt, 2.0, 3.0)
    if len(pk) < 1:
        return None
    values = dt[pk[:, 0], pk[:, 1]]
    # the larger half of the peaks: small ones are platelets, specks and cell fragments
    return float(np.median(values[values >= np.median(values)]))


# --------------------------------------------------------------------------------- one tile
def _purple_groups(arr: np.ndarray, r: float, p: DetectParams) -> tuple[list[tuple[Box, float]], list[tuple[Box, float]]]:
    """(white cells, platelet candidates) as (nucleus box, nucleus area) in working pixels.

    Blobs of at least ``lobe_min_area`` are nucleus lobes and are merged with lobes nearby;
    smaller blobs are never merged (a platelet next to a white cell stays a platelet).
    """
    nuc = _nucleus_channel(arr) > p.nucleus_threshold
    nuc = cv2.morphologyEx(nuc.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(nuc, connectivity=8)
    r2 = r * r
    area = stats[:, cv2.CC_STAT_AREA].astype(float)
    is_lobe = area >= p.lobe_min_area * r2
    is_lobe[0] = False
    lobes = is_lobe[lab].astype(np.uint8)
    merge = max(1, int(round(p.lobe_merge * r)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * merge + 1, 2 * merge + 1))
    _, group = cv2.connectedComponents(cv2.dilate(lobes, kernel), connectivity=8)
    group = group * lobes
    g_area = np.bincount(group.ravel())
    wbc: list[tuple[Box, float]] = []
    small: list[tuple[Box, float]] = []
    for i, sl in enumerate(ndi.find_objects(group), start=1):
        if sl is None:
            continue
        box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        a = float(g_area[i])
        cut = box[0] == 0 or box[1] == 0 or box[2] == arr.shape[1] or box[3] == arr.shape[0]
        if cut and a < p.wbc_border_min_area * r2:
            continue  # the sliver of a white cell cut by the border: not counted (nor a platelet)
        if a >= p.wbc_min_area * r2 or (a >= p.wbc_small_area * r2 and _has_cytoplasm(arr, group == i, r, p)):
            wbc.append((box, a))
        elif a <= p.platelet_max_area * r2:
            small.append((box, a))
    for i in range(1, n):
        if not is_lobe[i] and area[i] >= p.platelet_min_area * r2:
            x, y, w, h = stats[i, :4]
            small.append(((int(x), int(y), int(x + w), int(y + h)), float(area[i])))
    return wbc, small


def _has_cytoplasm(arr: np.ndarray, nucleus: np.ndarray, r: float, p: DetectParams) -> bool:
    """Whether a ring around a (small) nucleus is mostly cytoplasm: stained (darker than the
    background in green) but not red (blue >= red - a little), as round a white cell's nucleus
    and unlike the red cell or bare background round a platelet."""
    ys, xs = np.nonzero(nucleus)
    pad = int(math.ceil(0.6 * r)) + 2
    y0, y1 = max(0, ys.min() - pad), min(arr.shape[0], ys.max() + pad + 1)
    x0, x1 = max(0, xs.min() - pad), min(arr.shape[1], xs.max() + pad + 1)
    sub = nucleus[y0:y1, x0:x1].astype(np.uint8)
    k = lambda d: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * max(1, int(d * r)) + 1,) * 2)  # noqa: E731
    ring = (cv2.dilate(sub, k(0.5)) > 0) & ~(cv2.dilate(sub, k(0.12)) > 0)
    if not ring.any():
        return False
    f = cv2.GaussianBlur(arr[y0:y1, x0:x1], (0, 0), 1.0).astype(np.float32)
    bg_green = float(np.percentile(arr[..., 1], 95))
    cyto = (f[..., 2] - f[..., 0] > p.cytoplasm_blue) & (f[..., 1] < bg_green - p.cytoplasm_dark)
    return float(cyto[ring].mean()) >= p.cytoplasm_fraction


def _grow(box: Box, r: float, p: DetectParams, w: int, h: int) -> Box:
    x0, y0, x1, y1 = box
    mx = (x1 - x0) * p.wbc_margin_frac + p.wbc_margin_r * r
    my = (y1 - y0) * p.wbc_margin_frac + p.wbc_margin_r * r
    return (max(0, int(x0 - mx)), max(0, int(y0 - my)), min(w, int(math.ceil(x1 + mx))), min(h, int(math.ceil(y1 + my))))


def _inside_red_cell(fg: np.ndarray, box: Box, r: float) -> bool:
    """Whether the ring around a small purple blob is mostly red-cell (a dot on a red cell)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rad = max(x1 - x0, y1 - y0) / 2 + 0.25 * r
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    xs = np.clip(np.round(cx + rad * np.cos(angles)).astype(int), 0, fg.shape[1] - 1)
    ys = np.clip(np.round(cy + rad * np.sin(angles)).astype(int), 0, fg.shape[0] - 1)
    return float(fg[ys, xs].mean()) >= 0.75


def _red_cells(arr: np.ndarray, fg: np.ndarray, r: float, p: DetectParams) -> list[tuple[Box, float, tuple[int, int]]]:
    """(box, area, centre (row, col)) per red cell in working pixels.

    Circles of about one red-cell radius (Hough transform of the green channel, where red cells
    are dark on a bright background) whose disk is mostly cell mask: touching and overlapping
    cells each give their own circle, which a mask split by the distance transform does not.
    """
    h, w = fg.shape
    green = cv2.GaussianBlur(arr[..., 1], (0, 0), 1.5)
    circles = cv2.HoughCircles(
        green, cv2.HOUGH_GRADIENT, dp=1, minDist=max(2.0, p.rbc_min_dist * r), param1=p.hough_edge,
        param2=max(1.0, p.hough_votes * r), minRadius=max(1, int(p.rbc_min_radius * r)), maxRadius=max(2, int(p.rbc_max_radius * r)))
    if circles is None:
        return []
    out = []
    yy, xx = np.ogrid[:h, :w]
    for cx, cy, rad in circles[0]:
        x0, y0 = max(0, int(cx - rad)), max(0, int(cy - rad))
        x1, y1 = min(w, int(math.ceil(cx + rad))), min(h, int(math.ceil(cy + rad)))
        if x1 <= x0 or y1 <= y0:
            continue
        disk = (xx[:, x0:x1] - cx) ** 2 + (yy[y0:y1] - cy) ** 2 <= rad * rad
        cover = float(fg[y0:y1, x0:x1][disk].mean())
        if cover < p.rbc_cover:
            continue
        a = float(disk.sum()) * cover
        cut = x0 == 0 or y0 == 0 or x1 == w or y1 == h
        if a >= (p.rbc_border_min_area if cut else p.rbc_min_area) * r * r:
            out.append(((x0, y0, x1, y1), a, (int(cy), int(cx))))
    return out


def _detect_tile(arr: np.ndarray, r: float, p: DetectParams, net) -> list[tuple[str, Box, float, tuple[float, float]]]:
    """(kind, box, area, anchor (x, y)) in the tile's pixels; the anchor decides the owning tile."""
    h, w = arr.shape[:2]
    wbc_n, small = _purple_groups(arr, r, p)
    fg = _foreground(arr, p, r)
    out: list[tuple[str, Box, float, tuple[float, float]]] = []
    add = 1.1 if p.wbc_net_add is None else p.wbc_net_add  # 1.1: no white-cell peak is kept
    found = [] if net is None else find_cells(*net, arr, r, thresholds={"wbc": add})
    wbc_boxes = [_grow(box, r, p, w, h) for box, _ in wbc_n]
    extra = net_extra_white_cells(found, wbc_boxes, add)
    keep = np.ones((h, w), np.uint8)  # 0 inside white cells
    wbcs = [(c, a, b) for c, (b, a) in zip(wbc_boxes, wbc_n)]  # (box, nucleus area, nucleus box)
    for cell, a, box in wbcs + [(b, math.pi / 4 * (b[2] - b[0]) * (b[3] - b[1]), b) for b in extra]:
        out.append(("wbc", cell, a, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)))
        x0, y0, x1, y1 = cell
        centre = ((x0 + x1) // 2, (y0 + y1) // 2)
        cv2.ellipse(keep, centre, (max(1, (x1 - x0) // 2), max(1, (y1 - y0) // 2)), 0, 0, 360, 0, -1)
    for box, a in small:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if centre_in(box, wbc_boxes + extra) or _inside_red_cell(fg, box, r):
            continue
        pad = 1
        pbox = (max(0, box[0] - pad), max(0, box[1] - pad), min(w, box[2] + pad), min(h, box[3] + pad))
        out.append(("platelet", pbox, a, (cx, cy)))
    if net is not None:  # (FieldNet, FieldNetConfig), resolved once per photo by _fieldnet
        for box, a, (row, col) in net_red_cells(found, keep.astype(bool)):
            out.append(("rbc", box, a, (float(col), float(row))))
        return out
    red = fill_holes(fg | _redder(arr, p.rbc_redness)) if p.rbc_redness > 0 else fg
    for box, a, (row, col) in _red_cells(arr, red & keep.astype(bool), r, p):
        out.append(("rbc", box, a, (float(col), float(row))))
    return out


def _fieldnet(p: DetectParams):
    if p.red_cells not in ("net", "hough"):
        raise ValueError(f"DetectParams.red_cells must be 'net' or 'hough', not {p.red_cells!r}")
    return load_fieldnet(p.fieldnet) if p.red_cells == "net" else None


# ------------------------------------------------------------------------------------ tiling
def _tiles(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, core_start, core_stop) along one axis; cores partition [0, length)."""
    if length <= tile:
        return [(0, length, 0, length)]
    step = tile - overlap
    starts = list(range(0, max(1, length - tile) + 1, step))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    out = []
    for k, s in enumerate(starts):
        core0 = 0 if k == 0 else (s + starts[k - 1] + tile) // 2
        core1 = length if k == len(starts) - 1 else (starts[k + 1] + s + tile) // 2
        out.append((s, s + tile, core0, core1))
    return out


def _measure_scale(arr: np.ndarray, p: DetectParams) -> tuple[float, float, list[str]]:
    """(red-cell radius in original pixels, working scale, notes)."""
    h, w = arr.shape[:2]
    notes: list[str] = []
    t = min(2.0, p.thumb_side / max(h, w))
    r_thumb = estimate_radius(_resize(arr, t), p)
    if r_thumb is None or r_thumb < 1.5:
        r = max(h, w) / 16.0
        notes.append("too few cells to measure the scale; assumed a red-cell radius of 1/16 of the image")
    else:
        r = r_thumb / t
        if t < 1 and r_thumb < 8:  # the thumbnail was too coarse: measure again finer
            t2 = min(1.0, t * 16.0 / r_thumb)
            r2 = estimate_radius(_resize(arr, t2), p)
            if r2 is not None:
                r = r2 / t2
    scale = min(2.0, p.work_radius / r)
    return r, scale, notes


def working_image(image: Image.Image | np.ndarray, params: DetectParams = DEFAULT_PARAMS) -> tuple[np.ndarray, float, float, list[str]]:
    """(working image, red-cell radius in original pixels, working scale, notes): the photo resized
    so that a red cell is ``params.work_radius`` pixels across its radius, as the detector sees it."""
    arr = _as_array(image)
    r_orig, scale, notes = _measure_scale(arr, params)
    return _resize(arr, scale), r_orig, scale, notes


def detect_cells(image: Image.Image | np.ndarray, params: DetectParams = DEFAULT_PARAMS) -> Detection:
    """Every white cell, red cell and platelet in a field photo, boxes in the photo's pixels."""
    arr = _as_array(image)
    h, w = arr.shape[:2]
    net = _fieldnet(params)
    work, r_orig, scale, notes = working_image(arr, params)
    wh, ww = work.shape[:2]
    r = r_orig * scale
    overlap = int(min(params.tile // 2, math.ceil(8 * r)))
    ys, xs = _tiles(wh, params.tile, overlap), _tiles(ww, params.tile, overlap)
    cells: list[Cell] = []
    owner: list[int] = []
    for tile, (y0, y1, cy0, cy1, x0, x1, cx0, cx1) in enumerate((*a, *b) for a in ys for b in xs):
        for kind, box, area, (ax, ay) in _detect_tile(work[y0:y1, x0:x1], r, params, net):
            if not (cx0 <= ax + x0 < cx1 and cy0 <= ay + y0 < cy1):
                continue  # another tile owns this cell
            ob = (
                max(0, int((box[0] + x0) / scale)), max(0, int((box[1] + y0) / scale)),
                min(w, int(math.ceil((box[2] + x0) / scale))), min(h, int(math.ceil((box[3] + y0) / scale))),
            )
            cells.append(Cell(kind, ob, area / scale**2))  # type: ignore[arg-type]
            owner.append(tile)
    if len(cells) > 1 and len(ys) * len(xs) > 1:
        cells = _drop_seam_duplicates(cells, owner)
    order = {"wbc": 0, "rbc": 1, "platelet": 2}
    cells.sort(key=lambda c: (order[c.kind], c.box[1], c.box[0]))
    return Detection(cells, w, h, r_orig, scale, len(ys) * len(xs), notes)


def _drop_seam_duplicates(cells: list[Cell], owner: list[int]) -> list[Cell]:
    """A cell centred on a seam between tile cores can be claimed from both sides (each view puts
    its centre a pixel off): of two cells of one kind from different tiles at IoU > 0.5, keep one."""
    centres = np.array([((c.box[0] + c.box[2]) / 2, (c.box[1] + c.box[3]) / 2) for c in cells])
    reach = max(max(c.box[2] - c.box[0], c.box[3] - c.box[1]) for c in cells) / 2
    drop: set[int] = set()
    for i, j in sorted(cKDTree(centres).query_pairs(reach)):
        if (i not in drop and owner[i] != owner[j] and cells[i].kind == cells[j].kind
                and box_iou(cells[i].box, cells[j].box) > 0.5):
            drop.add(j)
    return [c for k, c in enumerate(cells) if k not in drop]


def white_cell_centre(image: Image.Image | np.ndarray, *, min_contrast: float = 20.0) -> tuple[float, float] | None:
    """The centre (x, y) of the white cell's nucleus in a single-cell crop, or ``None`` when no
    part of the crop stains like a nucleus.

    The nucleus is where ``blue - red`` is high (Otsu's threshold on it, at least ``min_contrast``
    above neutral); its lobes are merged by a dilation of 4% of the crop side, and of the purple
    groups the one that is large and near the middle wins (a crop is cut around its cell, but
    augmented copies are shifted). The centre is the mean of that group's nucleus pixels.
    """
    arr = _as_array(image)
    h, w = arr.shape[:2]
    ch = np.clip(_nucleus_channel(arr) + 128.0, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(ch, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (ch > max(float(otsu), 128.0 + min_contrast)).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    if mask.sum() < max(4, 0.002 * h * w):
        return None
    k = max(3, int(0.04 * min(h, w)) | 1)
    lab, n = ndi.label(cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))))
    area, cy, cx = label_centroids(lab, n, weights=mask)
    score = area * np.exp(-4.0 * (((cx - w / 2) / w) ** 2 + ((cy - h / 2) / h) ** 2))
    best = int(np.argmax(score))
    return float(cx[best]), float(cy[best])


def field_problem(image: Image.Image | np.ndarray) -> str | None:
    """Why this photo cannot be a stained field (blank, over- or under-exposed), or None."""
    arr = _as_array(image)
    small = _resize(arr, min(1.0, 256 / max(arr.shape[:2])))
    gray = small.mean(axis=2)
    if (gray >= 250).mean() > 0.9:
        return "the photo is over-exposed (almost all white): lower the exposure or the lamp and photograph again"
    if (gray <= 15).mean() > 0.9:
        return "the photo is almost black: check the lamp, the shutter and the exposure"
    sat = small.max(axis=2).astype(np.int16) - small.min(axis=2)
    if gray.std() < 3 and sat.std() < 3:
        return "the photo is blank (one flat colour): no cells to find"
    return None


def with_params(**changes: float | str | None) -> DetectParams:
    """:data:`DEFAULT_PARAMS` with some settings changed (for tuning scripts)."""
    return replace(DEFAULT_PARAMS, **changes)
