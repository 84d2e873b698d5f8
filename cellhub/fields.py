"""Whole-field analysis: find the cells of a microscope field, classify them, count with intervals.

* :func:`analyze_field` — one photo: :func:`cellhub.detect.detect_cells` finds every white cell,
  red cell and platelet; the cells a task classifies (white cells for ``blood-cells``, red
  cells for ``malaria``) are cropped the way that task's training crops look and sent through each
  :class:`~cellhub.predict.Predictor` in one batched call; each cell gets every model's answer and
  their :func:`~cellhub.predict.consensus`.
* :func:`analyze_fields` — many photos of one smear (files, folders, ``.zip``): per-field results and
  the pooled differential (white-cell fractions) or parasitemia (infected / red cells), each with a
  95% Wilson interval and how many more cells would narrow it to a chosen half-width.
* :func:`annotate` / :func:`result_rows` — a picture and a table of a result (for the app and CLI).

Bad input raises :class:`~cellhub.images.InputError` with what is wrong and what to do: a blank or
over-exposed photo, a photo that is not of a stained blood smear (:func:`cellhub.cellcheck.check_cell_image`,
the check ``predict`` makes on crops: 0 of the 366 BCCD fields fail it), a field with no cells, a
single-cell crop where a field is expected.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage as ndi

from .cellcheck import check_cell_image
from .detect import DEFAULT_PARAMS, Cell, Detection, DetectParams, detect_cells, field_problem
from .images import DEFAULT_LIMITS, ImageRef, InputError, Limits, collect_images, read_image
from .masks import fill_holes
from .predict import Prediction, Predictor, consensus

__all__ = [
    "CellResult", "FieldResult", "FieldsResult", "analyze_field", "analyze_fields", "annotate", "result_rows",
    "wilson_interval", "cells_needed", "planning_proportion", "wbc_crop", "rbc_crop", "cell_crops", "DEFAULT_HALF_WIDTH",
    "classified_kind",
    "whole_field_problem", "FIELD_CHECK_MIN_SIDE", "FIELD_MIN_CELLS",
]

logger = logging.getLogger(__name__)

#: default target half-width of the 95% interval for "how many more cells": 5 percentage points for a
#: differential, 0.5 for parasitemia (a parasitemia of a few percent needs a tighter interval)
DEFAULT_HALF_WIDTH = {"blood-cells": 0.05, "malaria": 0.005}
#: the size of a Kaggle blood-cell crop, and how much of its width the white cell fills
WBC_CROP_SIZE = (320, 240)
WBC_CROP_FILL = 0.3
RBC_CROP_SIZE = 128


def classified_kind(task: str | None) -> str:
    """The kind of cell a task's models classify: red cells for malaria, white cells otherwise."""
    return "rbc" if task == "malaria" else "wbc"


# ------------------------------------------------------------------------------------ intervals
def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` (``(0, 1)`` when ``n`` is 0)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def cells_needed(p: float, half_width: float, z: float = 1.959964) -> int:
    """Smallest ``n`` whose Wilson interval at proportion ``p`` has a half-width <= ``half_width``."""
    if not 0 < half_width < 0.5:
        raise ValueError(f"half_width must be in (0, 0.5), got {half_width}")

    def half(n: int) -> float:
        lo, hi = wilson_interval(round(p * n), n, z)
        return (hi - lo) / 2

    lo, hi = 1, 1
    while half(hi) > half_width:
        lo, hi = hi, hi * 2
    while lo < hi:  # binary search (the half-width shrinks with n up to rounding)
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if half(mid) > half_width else (lo, mid)
    return hi


def planning_proportion(k: int, n: int) -> float:
    """The proportion to plan a sample size with: the value of the 95% Wilson interval of ``k`` in
    ``n`` nearest 0.5. After a few cells the observed share says little (one neutrophil is 100%
    neutrophils, which would need only ~35 cells for +-5 points); this takes the least favourable
    share the data still allow, and tends to the observed one as the interval narrows."""
    lo, hi = wilson_interval(k, n)
    return min(max(0.5, lo), hi)


def _proportion(k: int, n: int, half_width: float) -> dict[str, Any]:
    lo, hi = wilson_interval(k, n)
    p = k / n if n else 0.0
    need = cells_needed(planning_proportion(k, n), half_width) if n else None
    return {"count": k, "fraction": p, "ci95": [lo, hi],
            "more_cells_needed": None if need is None else max(0, need - n)}


# ------------------------------------------------------------------------------------ crops
def wbc_crop(image: Image.Image, box: Sequence[int], size: tuple[int, int] = WBC_CROP_SIZE,
             fill: float = WBC_CROP_FILL) -> Image.Image:
    """A crop like a Kaggle blood-cell image: ``size`` (320x240), the white cell centred, filling
    ``fill`` of the width (the training crops: a quarter to a third). Outside the photo: mirrored."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    cell = max(x1 - x0, y1 - y0, 1)
    w = cell / fill
    h = w * size[1] / size[0]
    left, top = int(round(cx - w / 2)), int(round(cy - h / 2))
    right, bottom = left + int(round(w)), top + int(round(h))
    arr = np.asarray(image)
    pad = max(0, -left, -top, right - arr.shape[1], bottom - arr.shape[0])
    if pad:
        arr = np.pad(arr, ((pad, pad), (pad, pad), (0, 0)), mode="reflect" if pad < min(arr.shape[:2]) else "edge")
    region = arr[top + pad : bottom + pad, left + pad : right + pad]
    return Image.fromarray(region).resize(size, Image.BILINEAR)


def rbc_crop(image: Image.Image, box: Sequence[int], size: int = RBC_CROP_SIZE,
             background_green: float | None = None, exclude: np.ndarray | None = None) -> Image.Image:
    """A crop like the NIH malaria cells: the red cell alone, filling a square image, on black.

    The cell is the ellipse in its box; with ``background_green`` (the field's background level in
    the green channel) only the pixels darker than the background inside it, the blob at the
    centre, are kept, so that specks on the background beside the cell are not part of it.
    ``exclude`` (a field-sized bool mask, e.g. the white cells) is blacked out.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    region = image.crop((x0, y0, x1, y1))
    ell = Image.new("L", region.size, 0)
    ImageDraw.Draw(ell).ellipse([0, 0, region.width - 1, region.height - 1], fill=255)
    mask = np.asarray(ell) > 0
    if exclude is not None:
        mask &= ~exclude[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
    if background_green is not None:
        cell = fill_holes(mask & (np.asarray(region)[..., 1] < background_green - 15))
        lab, n = ndi.label(cell)
        if n:
            keep = lab == (np.bincount(lab.ravel())[1:].argmax() + 1)
            if keep.sum() > 0.4 * mask.sum():
                mask = ndi.binary_dilation(keep, iterations=1) & mask
    side = max(region.size)
    out = Image.new("RGB", (side, side), (0, 0, 0))
    out.paste(region, ((side - region.width) // 2, (side - region.height) // 2),
              Image.fromarray(mask.astype(np.uint8) * 255))
    return out.resize((size, size), Image.BILINEAR)


# ------------------------------------------------------------------------------------ results
@dataclass
class CellResult:
    """One cell of a field: where it is and, when its kind is classified, what the models say."""

    kind: str
    box: tuple[int, int, int, int]
    label: str | None = None
    confidence: float | None = None
    uncertain: bool = False
    #: model name -> its prediction (only for classified cells)
    predictions: dict[str, Prediction] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "box": [int(v) for v in self.box], "label": self.label,
                "confidence": None if self.confidence is None else round(float(self.confidence), 6),
                "uncertain": bool(self.uncertain)}


@dataclass
class FieldResult:
    """Everything found in one field photo."""

    file: str
    width: int
    height: int
    cells: list[CellResult]
    tasks: list[str]
    models: list[str]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, Any]:
        """Cells of each kind, consensus labels (``by_label``), and how many are uncertain."""
        kinds = Counter(c.kind for c in self.cells)
        labels = Counter(c.label for c in self.cells if c.label is not None)
        return {"wbc": kinds.get("wbc", 0), "rbc": kinds.get("rbc", 0), "platelet": kinds.get("platelet", 0),
                "by_label": dict(sorted(labels.items())),
                "uncertain": sum(c.uncertain for c in self.cells)}

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "width": self.width, "height": self.height,
                "cells": [c.as_dict() for c in self.cells], "counts": self.counts}


@dataclass
class FieldsResult:
    """Many fields of one smear, and their pooled counts."""

    tasks: list[str]
    models: list[str]
    images: list[FieldResult]
    skipped: list[tuple[str, str]]
    half_width: dict[str, float]
    labels: dict[str, list[str]] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        """Pooled over all fields: per-task differential / parasitemia with 95% Wilson intervals."""
        out: dict[str, Any] = {"fields": len(self.images), "skipped": len(self.skipped)}
        for task in self.tasks:
            kind = classified_kind(task)
            cells = [c for im in self.images for c in im.cells if c.kind == kind and c.label is not None]
            hw = self.half_width[task]
            counts = Counter(c.label for c in cells)
            n = len(cells)
            if task == "malaria":
                k = counts.get("parasitized", 0)
                prop = _proportion(k, n, hw)
                sure = [c for c in cells if not c.uncertain]
                k_sure = sum(c.label == "parasitized" for c in sure)
                out.update(parasitemia=prop["fraction"], ci95=prop["ci95"], n_rbc=n, n_parasitized=k,
                           malaria_half_width=hw, malaria_more_cells_needed=prop["more_cells_needed"],
                           # the same over the cells no model was unsure of (the others go to review)
                           parasitemia_confident=k_sure / len(sure) if sure else 0.0,
                           ci95_confident=list(wilson_interval(k_sure, len(sure))), n_rbc_confident=len(sure))
            else:
                labels = self.labels.get(task) or sorted(counts)
                diff = {lab: _proportion(counts.get(lab, 0), n, hw) for lab in labels}
                more = [d["more_cells_needed"] for d in diff.values() if d["more_cells_needed"] is not None]
                out.update(n_wbc=n, differential=diff, differential_half_width=hw,
                           differential_more_cells_needed=max(more) if more else None)
            out[f"n_uncertain_{kind}"] = sum(c.uncertain for c in cells)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.tasks[0] if len(self.tasks) == 1 else list(self.tasks), "models": list(self.models),
                "images": [im.as_dict() for im in self.images], "summary": self.summary,
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped]}

    def write_csv(self, path: str | Path) -> Path:
        """One row per cell of every field (:func:`result_rows`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(ROW_HEADER)
            for im in self.images:
                writer.writerows(result_rows(im))
        return path


# ----------------------------------------------------------------------------------- analysis
def _select(predictors: Sequence[Predictor], task: str | None) -> dict[str, list[Predictor]]:
    """task -> its predictors (all tasks of the predictors when ``task`` is None)."""
    if not predictors:
        raise InputError("No model was given; load at least one checkpoint (e.g. checkpoints/smallcnn-blood-cells).")
    by_task: dict[str, list[Predictor]] = {}
    for p in predictors:
        by_task.setdefault(str(p.task), []).append(p)
    if task is None:
        return by_task
    if task not in by_task:
        raise InputError(f"No loaded model is for task {task!r}; the models are for: {', '.join(sorted(by_task))}.")
    return {task: by_task[task]}


def _single_cell_problem(det: Detection, arr: np.ndarray) -> str | None:
    """Why this image looks like one cell's crop rather than a field, or None."""
    h, w = det.height, det.width
    black = float((arr.max(axis=2) < 20).mean())
    if black > 0.15 and len(det.cells) <= 2 and (not det.cells or any(
            (c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) > 0.25 * w * h for c in det.cells)):
        return "it looks like a single red-cell crop (one cell on a black background)"
    wbc = det.of_kind("wbc")
    if len(wbc) == 1:
        x0, y0, x1, y1 = wbc[0].box
        centred = abs((x0 + x1) / 2 - w / 2) < 0.15 * w and abs((y0 + y1) / 2 - h / 2) < 0.15 * h
        if centred and (min(w, h) < 300 or (x1 - x0) > 0.6 * w):
            return "it looks like a single white-cell crop (one white cell in the middle, filling the image)"
    return None


#: a single-cell crop is checked for being a whole field only from this short side on (pixels): the
#: crops of the development data are at most 363 px (Kaggle 320x240, PBC 360x363, malaria <= 128),
#: so they are never slowed down or flagged; microscope fields (640x480 and up) are
FIELD_CHECK_MIN_SIDE = 400
#: how many cells of the classified kind make an image a field rather than one cell's crop
FIELD_MIN_CELLS = {"wbc": 2, "rbc": 5}


def whole_field_problem(image: Image.Image, task: str | None) -> str | None:
    """Why an image given as one cell's crop looks like a whole microscope field, or None.

    A crop classifier given a field would label the whole photo with one class (one white cell
    picked, or one "parasitized" call for hundreds of red cells). Images with a short side under
    :data:`FIELD_CHECK_MIN_SIDE` are taken as crops without looking; larger ones are run through
    the field detector, and :data:`FIELD_MIN_CELLS` or more cells of the kind the task classifies
    make it a field. A large photo of one white cell (one found) passes.
    """
    if min(image.size) < FIELD_CHECK_MIN_SIDE:
        return None
    kind = classified_kind(task)
    found = detect_cells(image).of_kind(kind)
    if len(found) < FIELD_MIN_CELLS[kind]:
        return None
    what = "white cells" if kind == "wbc" else "red cells"
    return (f"it looks like a photo of a whole microscope field ({len(found)} {what} found), not one cell's crop; "
            "analyze fields with `python -m cellhub analyze` or the app's Whole field tab, which find and "
            "classify every cell")


def _check_field(det: Detection, arr: np.ndarray, name: str, allow_single_cell: bool) -> None:
    if not allow_single_cell:
        problem = _single_cell_problem(det, arr)
        if problem:
            raise InputError(f"{name}: {problem}; analyze expects a photo of a whole microscope field. "
                             "Classify single-cell crops with `python -m cellhub predict` instead.")
    if not det.cells:
        raise InputError(f"{name}: no cells were found in this field; check the focus, the stain and that "
                         "this is a blood-smear photo.")


def cell_crops(image: Image.Image, boxes: Sequence[Sequence[int]], kind: str,
               wbc_boxes: Sequence[Sequence[int]] = ()) -> list[Image.Image]:
    """The crops the classifiers of ``kind`` see for the cells in ``boxes`` (what analysis and CAM use)."""
    if kind == "wbc":
        return [wbc_crop(image, b) for b in boxes]
    bg = float(np.percentile(np.asarray(image)[::4, ::4, 1], 95))
    wbc = Image.new("L", image.size, 0)
    for b in wbc_boxes:  # a white cell's edge inside a red cell's box is not part of that cell
        ImageDraw.Draw(wbc).ellipse(list(b), fill=255)
    exclude = np.asarray(wbc) > 0 if wbc_boxes else None
    return [rbc_crop(image, b, background_green=bg, exclude=exclude) for b in boxes]


def _classify(image: Image.Image, cells: list[Cell], kind: str, predictors: list[Predictor],
              wbc_boxes: Sequence[Sequence[int]] = ()) -> list[CellResult]:
    crops = cell_crops(image, [c.box for c in cells], kind, wbc_boxes)
    answers = {p.name: p.predict(crops, with_cam=False) if crops else [] for p in predictors}  # one call per model
    out = []
    for i, c in enumerate(cells):
        preds = {name: a[i] for name, a in answers.items()}
        cons = consensus(list(preds.values()))
        conf = float(np.mean([p.probs.get(cons.label, 0.0) for p in preds.values()])) if cons.label else None
        out.append(CellResult(c.kind, c.box, cons.label, conf, cons.uncertain, preds, cons.reasons))
    return out


def analyze_field(
    image: Image.Image | np.ndarray | str | Path | bytes | ImageRef,
    predictors: Sequence[Predictor],
    task: str | None = None,
    *,
    name: str | None = None,
    params: DetectParams = DEFAULT_PARAMS,
    limits: Limits = DEFAULT_LIMITS,
    allow_single_cell: bool = False,
    detection: Detection | None = None,
    check_cells: bool = True,
) -> FieldResult:
    """Find, crop and classify every cell of one field photo.

    ``task`` None classifies with every task of ``predictors`` (white cells with the blood-cell
    models, red cells with the malaria models); a task name uses only that task's models.
    Raises :class:`InputError` for a photo that cannot be a field (see the module docstring);
    ``check_cells=False`` skips the stained-smear check (a stain or camera it does not know).
    """
    t0 = time.perf_counter()
    by_task = _select(predictors, task)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        name = name or (image.name if isinstance(image, ImageRef) else Path(str(image)).name
                        if isinstance(image, (str, Path)) else "image")
        image = read_image(image, name=name, limits=limits)
    name = name or "image"
    if image.width * image.height > limits.max_pixels:
        raise InputError(f"{name}: {image.width}x{image.height} pixels is over the {limits.max_pixels / 1e6:g} MP "
                         "limit; downscale the photo.")
    image = image.convert("RGB")
    arr = np.asarray(image)
    problem = field_problem(arr)
    if problem:
        raise InputError(f"{name}: {problem}.")
    if check_cells and not (verdict := check_cell_image(image)).ok:
        raise InputError(f"{name}: not analysed as a blood-smear field: {verdict.reason}.")
    det = detection or detect_cells(arr, params)
    _check_field(det, arr, name, allow_single_cell)
    results: dict[int, CellResult] = {}
    for t, preds in by_task.items():
        kind = classified_kind(t)
        idx = [i for i, c in enumerate(det.cells) if c.kind == kind]
        wbc_boxes = [c.box for c in det.of_kind("wbc")]
        for i, res in zip(idx, _classify(image, [det.cells[i] for i in idx], kind, preds, wbc_boxes)):
            results[i] = res
    cells = [results.get(i) or CellResult(c.kind, c.box) for i, c in enumerate(det.cells)]
    models = [p.name for ps in by_task.values() for p in ps]
    return FieldResult(name, image.width, image.height, cells, list(by_task), models,
                       time.perf_counter() - t0, list(det.notes))


def analyze_fields(
    inputs: Sequence[str | Path] | str | Path,
    predictors: Sequence[Predictor],
    task: str | None = None,
    *,
    half_width: float | None = None,
    params: DetectParams = DEFAULT_PARAMS,
    limits: Limits = DEFAULT_LIMITS,
    progress: Callable[[int, int], None] | None = None,
    on_field: Callable[[FieldResult, Image.Image], None] | None = None,
    check_cells: bool = True,
) -> FieldsResult:
    """Analyse every field photo in ``inputs`` (files, folders, ``.zip``) as fields of one smear.

    A photo that cannot be analysed is skipped with its reason (``result.skipped``), not raised.
    ``half_width`` is the target half-width of the 95% interval for ``more_cells_needed``
    (default :data:`DEFAULT_HALF_WIDTH` of each task). ``on_field(result, image)`` after each.
    ``check_cells``: see :func:`analyze_field`.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    by_task = _select(predictors, task)
    refs, skipped = collect_images(list(inputs), limits=limits)
    images: list[FieldResult] = []
    for k, ref in enumerate(refs):
        try:
            img = read_image(ref, limits=limits)
            res = analyze_field(img, [p for ps in by_task.values() for p in ps], task, name=ref.name,
                                params=params, limits=limits, check_cells=check_cells)
        except InputError as exc:
            logger.warning("skipped %s", exc)
            skipped.append((ref.name, str(exc).removeprefix(f"{ref.name}: ")))
        else:
            images.append(res)
            if on_field is not None:
                on_field(res, img)
        if progress is not None:
            progress(k + 1, len(refs))
    hw = {t: half_width if half_width is not None else DEFAULT_HALF_WIDTH.get(t, 0.05) for t in by_task}
    labels = {t: list(ps[0].labels) for t, ps in by_task.items()}
    models = [p.name for ps in by_task.values() for p in ps]
    return FieldsResult(list(by_task), models, images, skipped, hw, labels)


# ----------------------------------------------------------------------------- presentation
ROW_HEADER = ["file", "cell", "kind", "x0", "y0", "x1", "y1", "label", "confidence", "uncertain", "reasons"]
KIND_COLOURS = {"wbc": (40, 90, 230), "rbc": (200, 40, 40), "platelet": (30, 160, 60)}
LABEL_COLOURS = [(40, 90, 230), (230, 120, 20), (150, 40, 200), (20, 170, 170), (220, 40, 120),
                 (120, 120, 20), (30, 160, 60), (90, 60, 30)]
UNCERTAIN_COLOUR = (255, 215, 0)


def result_rows(result: FieldResult) -> list[list[Any]]:
    """One row per cell (columns :data:`ROW_HEADER`): a table for the app or a CSV."""
    return [[result.file, i + 1, c.kind, *c.box, c.label,
             None if c.confidence is None else round(c.confidence, 4), c.uncertain, "; ".join(c.reasons)]
            for i, c in enumerate(result.cells)]


def annotate(image: Image.Image, result: FieldResult) -> Image.Image:
    """The field with a box per cell: coloured by label (by kind when not classified); uncertain
    cells get a second, yellow box and a ``?``."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    labels = sorted({c.label for c in result.cells if c.label})
    width = max(1, round(max(out.size) / 400))
    heights = [c.box[3] - c.box[1] for c in result.cells]  # labels scale with the cells, not the photo
    font = ImageFont.load_default(size=max(11, round(0.16 * float(np.median(heights)))) if heights else 11)
    for c in result.cells:
        colour = LABEL_COLOURS[labels.index(c.label) % len(LABEL_COLOURS)] if c.label else KIND_COLOURS[c.kind]
        draw.rectangle(list(c.box), outline=colour, width=width + (c.kind == "wbc"))
        if c.uncertain:
            x0, y0, x1, y1 = c.box
            draw.rectangle([x0 - 2 * width, y0 - 2 * width, x1 + 2 * width, y1 + 2 * width],
                           outline=UNCERTAIN_COLOUR, width=width)
        if c.label and (c.kind == "wbc" or c.uncertain):
            _label_tag(draw, c.box, c.label + ("?" if c.uncertain else ""),
                       UNCERTAIN_COLOUR if c.uncertain else colour, font)
    return out


def _label_tag(draw: ImageDraw.ImageDraw, box: Any, text: str, colour: Any, font: Any) -> None:
    """``text`` on a filled tag of ``colour`` just above ``box`` (inside it at the image's top edge),
    in black or white, whichever reads better on that colour: legible on any stain."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    x, y = max(0, min(int(box[0]), draw.im.size[0] - w)), int(box[1]) - h  # inside the image on both sides
    if y < 0:
        y = int(box[1])
    rgb = tuple(colour)
    ink = (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)
    draw.rectangle([x, y, x + w, y + h], fill=rgb)
    draw.text((x + 2 - left, y + 2 - top), text, fill=ink, font=font)
