"""A small learned cell finder for field photos: centre heatmaps (CenterNet-style) on the detector's
scale-normalised working image.

:mod:`cellhub.detect` measures the red-cell radius ``r`` first and resizes the photo so that a red
cell is ``work_radius`` pixels across its radius; on that image this fully convolutional network
predicts, every ``STRIDE`` pixels, a heatmap per cell kind (its peaks are cell centres), the box's
width and height (as ``log(size / r)``) and the centre's sub-cell offset. Because the input is
already at a canonical scale, a network of ~0.2 M parameters with a receptive field of ~8 red-cell
radii is enough; it learns what the annotators box (clumped and border-cut cells) from
annotated fields instead of hand-set thresholds. ``train/train_detector.py`` trains it
(grouped cross-validation over fields, then the final fit); the trained weights ship with the
package (``cellhub/assets/fieldnet.safetensors``, with its config in the file's metadata).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KINDS", "box_iou", "STRIDE", "FieldNet", "FieldNetConfig", "targets", "focal_loss", "detection_loss", "decode", "find_cells", "to_input", "net_red_cells", "net_extra_white_cells",
           "load_fieldnet", "save_fieldnet", "BUNDLED_FIELDNET"]

logger = logging.getLogger(__name__)

KINDS = ("wbc", "rbc", "platelet")
STRIDE = 4
BUNDLED_FIELDNET = Path(__file__).with_name("assets") / "fieldnet.safetensors"


@dataclass
class FieldNetConfig:
    """What a saved network needs to be rebuilt and used (stored in the safetensors metadata)."""

    width: int = 48
    #: the working red-cell radius the network was trained at (``DetectParams.work_radius``)
    work_radius: float = 16.0
    #: per kind, the heatmap peak above which a centre is a cell (chosen by cross-validation)
    thresholds: dict[str, float] = field(default_factory=lambda: {k: 0.4 for k in KINDS})
    #: mean / std of the RGB input (0-1 scale)
    mean: tuple[float, float, float] = (0.78, 0.70, 0.72)
    std: tuple[float, float, float] = (0.12, 0.14, 0.10)
    #: how it was trained (fields, epochs, CV figures): recorded, not used
    trained: dict = field(default_factory=dict)


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FieldNet(nn.Module):
    """Stride-4 fully convolutional net: ``len(KINDS)`` heatmap logits, 2 log-sizes, 2 offsets."""

    def __init__(self, width: int = 48):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _block(3, w // 2, 2), _block(w // 2, w // 2), _block(w // 2, w, 2),
            _block(w, w), _block(w, w, dilation=2), _block(w, w, dilation=4), _block(w, w, dilation=8),
            _block(w, w),
        )
        self.heat = nn.Conv2d(w, len(KINDS), 1)
        self.size = nn.Conv2d(w, 2, 1)
        self.offset = nn.Conv2d(w, 2, 1)
        nn.init.constant_(self.heat.bias, -4.0)  # start from "no cell anywhere" (CenterNet's prior)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return self.heat(f), self.size(f), self.offset(f)


# ------------------------------------------------------------------------------ targets, loss
def targets(boxes: list[tuple[int, tuple[float, float, float, float]]], shape: tuple[int, int], r: float
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training targets on the output grid of a ``shape`` (H, W) working image.

    ``boxes``: (kind index, (x0, y0, x1, y1)) in working pixels. Returns the heatmap (K, h, w),
    Gaussian bumps of a sigma a third of the cell's radius on the grid; log-size (2, h, w) and
    offset (2, h, w) targets at each centre cell; and the mask (h, w) of those centre cells.
    """
    h, w = math.ceil(shape[0] / STRIDE), math.ceil(shape[1] / STRIDE)
    heat = np.zeros((len(KINDS), h, w), np.float32)
    size = np.zeros((2, h, w), np.float32)
    offset = np.zeros((2, h, w), np.float32)
    mask = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[:h, :w]
    for k, (x0, y0, x1, y1) in boxes:
        bw, bh = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
        cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
        ix, iy = min(w - 1, max(0, int(cx))), min(h - 1, max(0, int(cy)))
        sigma = max(0.6, min(bw, bh) / 2 / STRIDE / 3)
        g = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma**2))
        heat[k] = np.maximum(heat[k], g)
        size[:, iy, ix] = (math.log(bw / r), math.log(bh / r))
        offset[:, iy, ix] = (cx - ix, cy - iy)
        mask[iy, ix] = 1.0
    return heat, size, offset, mask


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of centres."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1.0).float()
    neg = 1.0 - pos
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p**2 * (1 - target) ** 4 * neg
    if valid is not None:
        pos_loss, neg_loss = pos_loss * valid, neg_loss * valid
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def detection_loss(net: FieldNet, x: torch.Tensor, heat: torch.Tensor, size: torch.Tensor, offset: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """Focal loss on the heatmaps + L1 on log-size (weight 0.5) and offset at the centres
    (batched :func:`targets`)."""
    ph, ps, po = net(x)
    m = mask[:, None]
    n = mask.sum().clamp(min=1.0)
    return focal_loss(ph, heat) + 0.5 * (torch.abs(ps - size) * m).sum() / n + (torch.abs(po - offset) * m).sum() / n


# ------------------------------------------------------------------------------------ decode
def decode(heat: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, r: float,
           thresholds: dict[str, float]) -> list[tuple[str, tuple[float, float, float, float], float]]:
    """(kind, box in working pixels, score) for every heatmap peak over its kind's threshold.

    ``heat`` (K, h, w) logits, ``size`` / ``offset`` (2, h, w) for one image. A peak is a
    3x3 local maximum of its kind's heatmap.
    """
    p = torch.sigmoid(heat)
    peaks = (p == F.max_pool2d(p[None], 3, 1, 1)[0])
    out = []
    for k, kind in enumerate(KINDS):
        sel = peaks[k] & (p[k] >= thresholds.get(kind, 1.1))
        ys, xs = torch.nonzero(sel, as_tuple=True)
        for y, x in zip(ys.tolist(), xs.tolist()):
            cx = (x + float(offset[0, y, x])) * STRIDE
            cy = (y + float(offset[1, y, x])) * STRIDE
            bw, bh = r * math.exp(float(size[0, y, x])), r * math.exp(float(size[1, y, x]))
            out.append((kind, (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), float(p[k, y, x])))
    return out


def to_input(arr: np.ndarray, cfg: FieldNetConfig) -> torch.Tensor:
    """(1, 3, H', W') normalised tensor of a uint8 RGB working image, padded to a multiple of STRIDE."""
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
    x = (x - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    h, w = arr.shape[:2]
    return F.pad(x, (0, (-w) % STRIDE, 0, (-h) % STRIDE))[None]


@torch.inference_mode()
def find_cells(net: FieldNet, cfg: FieldNetConfig, arr: np.ndarray, r: float, nms_iou: float = 0.5,
               thresholds: dict[str, float] | None = None) -> list[tuple[str, tuple[float, float, float, float], float]]:
    """Cells in one uint8 RGB working image (red-cell radius ``r`` px): (kind, box, score), boxes in
    its pixels, best first; of two peaks of one kind whose boxes overlap by IoU > ``nms_iou`` the
    lower is dropped. ``thresholds`` overrides the config's score thresholds of the kinds it names."""
    heat, size, offset = net(to_input(arr, cfg))
    h, w = arr.shape[:2]
    out: list[tuple[str, tuple[float, float, float, float], float]] = []
    found = sorted(decode(heat[0], size[0], offset[0], r, {**cfg.thresholds, **(thresholds or {})}), key=lambda c: -c[2])
    for kind, (x0, y0, x1, y1), s in found:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if not (0 <= cx < w and 0 <= cy < h):
            continue  # a peak in the padding is not a cell
        box = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
        if any(k == kind and box_iou(box, b) > nms_iou for k, b, _ in out):
            continue  # a second peak on a cell already found (a higher one)
        out.append((kind, box, s))
    return out


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 for empty ones)."""
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def centre_in(box: tuple[float, ...], boxes) -> bool:
    """Whether the centre of ``box`` lies inside (or on the edge of) any of ``boxes``."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes)


def net_red_cells(found: list[tuple[str, tuple[float, float, float, float], float]], keep: np.ndarray
                  ) -> list[tuple[tuple[int, int, int, int], float, tuple[int, int]]]:
    """(box, area, centre (row, col)) per red cell of :func:`find_cells`'s ``found`` in a working
    image, as :mod:`cellhub.detect` wants them; a centre where ``keep`` is False (inside a white
    cell: its cytoplasm) is dropped."""
    h, w = keep.shape
    out = []
    for kind, (x0, y0, x1, y1), _score in found:
        col, row = min(w - 1, int((x0 + x1) / 2)), min(h - 1, int((y0 + y1) / 2))
        if kind != "rbc" or not keep[row, col]:
            continue
        box = (int(x0), int(y0), min(w, math.ceil(x1)), min(h, math.ceil(y1)))
        out.append((box, math.pi / 4 * (x1 - x0) * (y1 - y0), (row, col)))
    return out


def net_extra_white_cells(found: list[tuple[str, tuple[float, float, float, float], float]],
                          finder: list[tuple[int, int, int, int]], min_score: float, overlap: float = 0.3
                          ) -> list[tuple[int, int, int, int]]:
    """The network's white cells of score >= ``min_score`` that overlap no ``finder`` box (IoU <
    ``overlap``, centre outside it: a smaller box inside a white cell is that cell): the cells the
    image-processing finder missed. The rule ("add@0.3") was chosen among a few on out-of-fold
    predictions of the tuning fields (``bench/wbc_combine.py``)."""
    def new(box) -> bool:
        return not centre_in(box, finder) and all(box_iou(box, b) < overlap for b in finder)

    return [(int(b[0]), int(b[1]), math.ceil(b[2]), math.ceil(b[3]))
            for kind, b, score in found if kind == "wbc" and score >= min_score and new(b)]


# ------------------------------------------------------------------------------ save / load
def save_fieldnet(net: FieldNet, cfg: FieldNetConfig, path: str | Path) -> Path:
    """The weights as safetensors (float32) with the config as JSON in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"cellhub_fieldnet": json.dumps(asdict(cfg))})
    return path


def _load(path: Path) -> tuple[FieldNet, FieldNetConfig]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "cellhub_fieldnet" not in meta:
        raise ValueError(f"{path} is not a cellhub field network (no 'cellhub_fieldnet' metadata); "
                         "train one with `python train/train_detector.py`")
    raw = json.loads(meta["cellhub_fieldnet"])
    raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
    cfg = FieldNetConfig(**raw)
    net = FieldNet(cfg.width)
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval(), cfg


@lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> tuple[FieldNet, FieldNetConfig]:
    return _load(Path(path))


def load_fieldnet(path: str | Path | None = None) -> tuple[FieldNet, FieldNetConfig] | None:
    """The network at ``path`` (default: the bundled one), loaded once per process; None when the
    bundled file is absent (the detector then falls back to its classical red-cell finder)."""
    p = Path(path) if path is not None else BUNDLED_FIELDNET
    if not p.is_file():
        if path is not None:
            raise FileNotFoundError(f"no field network at {p}")
        return None
    return _load_cached(str(p.resolve()), p.stat().st_mtime)
