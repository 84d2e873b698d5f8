"""Preprocessing resolved from a model's data config -- never hard-coded by the caller.

The evaluation transform is timm's own (``timm.data.create_transform(..., is_training=False)``),
which is also what ``transformers``' ``TimmWrapperImageProcessor`` and therefore
``pipeline("image-classification")`` apply to a published checkpoint: cellhub, timm and
transformers see the same pixels and give the same logits.

The training transform keeps the evaluation geometry and adds label-preserving changes: flips,
90-degree rotations, colour jitter (stain variation) and, when asked, a mild random zoom
(magnification variation). A model may also ask for a **cell-centred crop** (``cell_crop`` in
its cellhub config): a square centred on the white cell's nucleus, sized in red-cell radii, taken
before timm's transform, so that a cell fills the same share of the input whatever the lab's
camera and crop size. cellhub applies it everywhere (training, predict, evaluate, the app);
plain timm / transformers users of such a checkpoint crop with :func:`cell_crop` first. A model may
also ask for **stain normalisation** (``stain_norm``): each image's colour moments in CIELAB
mapped to fixed ones (Reinhard et al. 2001), after the resize, so that every lab's stain and white
balance reach the network alike (:func:`stain_normalise`; timm / transformers users call it on
the resized image).
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .images import to_rgb

__all__ = ["eval_transform", "preprocess", "resolve_data_config", "to_pil", "train_transform", "CELL_CROPS",
           "cell_crop_spec", "cell_box", "cell_crop", "crop_padded", "CellCrop", "STAIN_NORMS", "stain_norm_spec",
           "stain_normalise", "StainNorm", "rgb_to_lab", "lab_to_rgb"]

logger = logging.getLogger(__name__)

_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode", "cell_crop", "stain_norm")

#: cell-centred crops a model may ask for (``cellhub_config["cell_crop"]``): ``nucleus`` centres a
#: square on the white cell's nucleus, ``side_rbc_radii`` red-cell radii a side (a red cell is
#: about 7.5 um across in every lab, so this is a physical scale: the same cell fills the same
#: share of the crop whatever the camera and the crop's own size). Where the square runs past the
#: image's edge, ``nucleus`` shifts it back inside (the cell then sits off-centre, or partly
#: outside the square, in a crop cut close to it); ``nucleus-pad`` (``border: "pad"``) keeps it
#: centred and fills what lies outside the image with the image's median colour.
CELL_CROPS: dict[str, dict[str, Any]] = {
    "nucleus": {"method": "nucleus", "side_rbc_radii": 10.0},
    "nucleus-pad": {"method": "nucleus", "side_rbc_radii": 10.0, "border": "pad"},
}
_CROP_METHODS = ("nucleus",)
_CROP_BORDERS = ("shift", "pad")

#: stain normalisations a model may ask for (``cellhub_config["stain_norm"]``). ``reinhard``: each
#: image's CIELAB channels shifted and scaled to these means and standard deviations (L in 0..100;
#: the averages of the per-image moments of 80 px nucleus crops over 2,000 Kaggle and PBC
#: development images, ``bench/stain_targets.py``): the stain's hue and strength and the
#: camera's white balance no longer differ between labs; the shapes and the contrast between a
#: cell's parts remain.
#: ``reinhard-cell``: the same for a single cell cut out on black (the NIH malaria crops, whole-field
#: red cells): the moments of the pixels whose brightest channel reaches ``black_below`` only, the
#: black left black; targets from 1,000 NIH and 1,000 BCCD red-cell crops at 64 px (2026-12-07,
#: ``bench/stain_targets.py --black-below 20``; across NIH images the a and b means vary with an sd
#: of 9.0 and 9.7, across BCCD's 1.9 and 2.4).
STAIN_NORMS: dict[str, dict[str, Any]] = {
    "reinhard": {"method": "reinhard", "mean": (75.77, 8.99, 1.31), "std": (16.17, 9.66, 14.27)},
    "reinhard-cell": {"method": "reinhard", "mean": (65.21, 11.88, 0.06), "std": (9.83, 4.39, 4.26),
                      "black_below": 20},
}
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def resolve_data_config(model_or_config: Any) -> dict[str, Any]:
    """Preprocessing of a model: ``{input_size, mean, std, interpolation, crop_pct, crop_mode}``.

    Accepts a model (``model.cellhub_config`` or timm's ``model.pretrained_cfg``), a cellhub
    config dict, a checkpoint's ``config.json`` dict, a timm ``pretrained_cfg`` or an already
    resolved data config.
    """
    obj = model_or_config
    if isinstance(obj, torch.nn.Module):
        cfg = getattr(obj, "cellhub_config", None)
        if cfg and cfg.get("pretrained_cfg"):
            return resolve_data_config(cfg)
        pcfg = getattr(obj, "pretrained_cfg", None)
        if pcfg:
            return resolve_data_config(pcfg)
        raise ValueError(f"{type(obj).__name__} carries no preprocessing config (no cellhub_config or "
                         "pretrained_cfg); create it with cellhub.create_model or load it with "
                         "cellhub.load_pretrained.")
    if isinstance(obj, Mapping):
        if "input_size" in obj:
            return _normalise(obj)
        for key in ("cellhub", "pretrained_cfg"):
            if isinstance(obj.get(key), Mapping):
                out = resolve_data_config(obj[key])
                if out["cell_crop"] is None and obj.get("cell_crop"):  # cellhub's config beside timm's
                    out["cell_crop"] = cell_crop_spec(obj["cell_crop"])
                if out["stain_norm"] is None and obj.get("stain_norm"):
                    out["stain_norm"] = stain_norm_spec(obj["stain_norm"])
                return out
    raise ValueError(f"Cannot find preprocessing (input_size/mean/std) in {type(obj).__name__}: "
                     f"{str(obj)[:200]}")


def _normalise(cfg: Mapping[str, Any]) -> dict[str, Any]:
    size = tuple(int(v) for v in cfg["input_size"])
    if len(size) == 2:
        size = (3, *size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be (C, H, W), got {cfg['input_size']!r}")
    interpolation = str(cfg.get("interpolation", "bilinear"))
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"Unknown interpolation {interpolation!r}; choose one of {', '.join(_INTERPOLATIONS)}")
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    if len(mean) != size[0] or len(std) != size[0]:
        raise ValueError(f"mean {mean} / std {std} do not match {size[0]} input channels")
    return {
        "input_size": size,
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "crop_pct": float(cfg.get("crop_pct", 1.0) or 1.0),
        "crop_mode": str(cfg.get("crop_mode", "center")),
        "cell_crop": cell_crop_spec(cfg.get("cell_crop")),
        "stain_norm": stain_norm_spec(cfg.get("stain_norm")),
    }


def cell_crop_spec(spec: Any) -> dict[str, Any] | None:
    """A validated cell-crop spec (``None``, a :data:`CELL_CROPS` name or its dict) or ``None``."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, str):
        if spec not in CELL_CROPS:
            raise ValueError(f"Unknown cell crop {spec!r}; choose none or {', '.join(CELL_CROPS)}.")
        return dict(CELL_CROPS[spec])
    if not isinstance(spec, Mapping) or spec.get("method") not in _CROP_METHODS:
        raise ValueError(f"cell_crop must name a method ({', '.join(_CROP_METHODS)}), got {spec!r}.")
    side = float(spec.get("side_rbc_radii", CELL_CROPS[spec["method"]]["side_rbc_radii"]))
    if not side > 0:
        raise ValueError(f"cell_crop side_rbc_radii must be positive, got {side}.")
    border = str(spec.get("border", "shift"))
    if border not in _CROP_BORDERS:
        raise ValueError(f"cell_crop border must be one of {', '.join(_CROP_BORDERS)}, got {border!r}.")
    out: dict[str, Any] = {"method": str(spec["method"]), "side_rbc_radii": side}
    if border != "shift":  # a spec saved before borders existed reads back unchanged
        out["border"] = border
    return out


def cell_box(image: Any, spec: Any) -> tuple[int, int, int, int]:
    """The square (left, top, right, bottom) a cell-centred crop takes from a single-cell image.

    Centred on the white cell's nucleus (:func:`cellhub.detect.white_cell_centre`; the image's
    middle when none stains), ``side_rbc_radii`` red-cell radii a side
    (:func:`cellhub.detect.estimate_radius`), at most the image's short side and at least 0.7 of it.
    Border ``shift`` (the default): moved to lie inside the image; ``pad``: kept centred on the
    nucleus, so it may run past the image's edge (:func:`crop_padded` fills that part).
    """
    from .detect import estimate_radius, white_cell_centre

    spec = cell_crop_spec(spec)
    pil = to_pil(image)
    w, h = pil.size
    short = min(w, h)
    if spec is None:
        left, top = (w - short) // 2, (h - short) // 2
        return left, top, left + short, top + short
    arr = np.asarray(pil)
    centre = white_cell_centre(arr) or (w / 2, h / 2)
    r = estimate_radius(arr)
    side = short if not r else int(round(min(short, max(0.7 * short, spec["side_rbc_radii"] * r))))
    left, top = int(round(centre[0] - side / 2)), int(round(centre[1] - side / 2))
    if spec.get("border", "shift") == "shift":
        left, top = min(max(left, 0), w - side), min(max(top, 0), h - side)
    return left, top, left + side, top + side


def crop_padded(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """``image.crop(box)``, where the part of ``box`` outside the image is the image's median
    colour (PIL would fill it with black)."""
    w, h = image.size
    left, top, right, bottom = (int(v) for v in box)
    if left >= 0 and top >= 0 and right <= w and bottom <= h:
        return image.crop((left, top, right, bottom))
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    fill = tuple(int(v) for v in np.median(np.asarray(rgb)[::2, ::2].reshape(-1, 3), axis=0))
    out = Image.new("RGB", (right - left, bottom - top), fill)
    inner = (max(left, 0), max(top, 0), min(right, w), min(bottom, h))
    if inner[2] > inner[0] and inner[3] > inner[1]:
        out.paste(rgb.crop(inner), (inner[0] - left, inner[1] - top))
    return out


def cell_crop(image: Any, spec: Any) -> Image.Image:
    """The cell-centred square of ``image`` (RGB PIL), see :func:`cell_box`."""
    pil = to_pil(image)
    return crop_padded(pil, cell_box(pil, spec))


class CellCrop:
    """Transform step: the cell-centred crop of a model whose config asks for one."""

    def __init__(self, spec: Any) -> None:
        self.spec = cell_crop_spec(spec)

    def __call__(self, image: Any) -> Image.Image:
        return cell_crop(image, self.spec)

    def __repr__(self) -> str:
        return f"CellCrop({self.spec})"


_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], dtype=np.float64)
_WHITE = _XYZ_FROM_RGB.sum(axis=1)  # D65, the XYZ of RGB white


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (uint8, or float in 0..1; ..., 3) -> CIELAB (D65; L in 0..100), float64."""
    x = np.asarray(rgb, dtype=np.float64)
    if np.asarray(rgb).dtype == np.uint8:
        x = x / 255.0
    lin = np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = lin @ _XYZ_FROM_RGB.T / _WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) -> sRGB uint8, clipped to the gamut."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _WHITE
    lin = np.clip(xyz @ np.linalg.inv(_XYZ_FROM_RGB).T, 0.0, 1.0)
    x = np.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin)
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def stain_norm_spec(spec: Any) -> dict[str, Any] | None:
    """A validated stain-normalisation spec (``None``, a :data:`STAIN_NORMS` name or its dict) or ``None``."""
    if spec in (None, "", "none"):
        return None
    if isinstance(spec, str):
        if spec not in STAIN_NORMS:
            raise ValueError(f"Unknown stain_norm {spec!r}; choose none or one of {', '.join(STAIN_NORMS)}.")
        spec = STAIN_NORMS[spec]
    if not isinstance(spec, Mapping) or spec.get("method") != "reinhard":
        raise ValueError(f"stain_norm must name a method ({', '.join(STAIN_NORMS)}), got {spec!r}.")
    mean, std = tuple(float(v) for v in spec.get("mean", ())), tuple(float(v) for v in spec.get("std", ()))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"stain_norm needs three LAB means and three positive standard deviations, got {spec!r}.")
    out: dict[str, Any] = {"method": "reinhard", "mean": mean, "std": std}
    if spec.get("black_below") is not None:
        black = spec["black_below"]
        if isinstance(black, bool) or not isinstance(black, (int, float)) or not 1 <= black <= 255:
            raise ValueError(f"stain_norm black_below must be a brightness in 1..255, got {black!r}.")
        out["black_below"] = int(black)
    return out


def stain_normalise(image: Any, spec: Any = "reinhard") -> Image.Image:
    """Map the image's per-channel CIELAB mean and standard deviation to the spec's (Reinhard)."""
    spec = stain_norm_spec(spec)
    img = to_pil(image)
    if spec is None:
        return img
    arr = np.asarray(img)
    lab = rgb_to_lab(arr)
    if spec.get("black_below"):  # a cell cut out on black: its own pixels' moments; the black stays
        cell = arr.max(axis=2) >= spec["black_below"]
        if cell.sum() < 16:
            return img  # (nearly) all black: nothing to normalise
        flat = lab[cell]
    else:
        cell, flat = None, lab.reshape(-1, 3)
    mu, sd = flat.mean(0), flat.std(0)
    out = lab_to_rgb((lab - mu) / np.maximum(sd, 1e-3) * np.asarray(spec["std"]) + np.asarray(spec["mean"]))
    if cell is not None:
        out = np.where(cell[..., None], out, arr)
    return Image.fromarray(out)


class StainNorm:
    """:func:`stain_normalise` as a transform step."""

    def __init__(self, spec: Any) -> None:
        self.spec = stain_norm_spec(spec)

    def __call__(self, image: Any) -> Image.Image:
        return stain_normalise(image, self.spec)

    def __repr__(self) -> str:
        return f"StainNorm({self.spec['method'] if self.spec else None})"


def to_pil(image: Any) -> Image.Image:
    """PIL image or uint8 array (HWC, HW) -> RGB PIL image; a clear TypeError otherwise."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"Expected a uint8 image array (HWC), got dtype {image.dtype}; "
                            "convert with (x * 255).clip(0, 255).astype('uint8').")
        if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
            pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
            return pil.convert("RGB")
        if image.ndim == 2:
            return Image.fromarray(image).convert("RGB")
        raise TypeError(f"Expected an HWC or HW image array, got shape {image.shape}")
    raise TypeError(f"Expected a PIL image or a uint8 numpy array, got {type(image).__name__}")


class _ToPIL:
    def __call__(self, image: Any) -> Image.Image:
        return to_pil(image)

    def __repr__(self) -> str:
        return "ToRGBPIL()"


class RandomRot90:
    """Rotate a PIL image by a random multiple of 90 degrees (cells have no up)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        k = random.randint(0, 3)
        if k == 0:
            return image
        return image.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                Image.Transpose.ROTATE_270)[k - 1])

    def __repr__(self) -> str:
        return "RandomRot90()"


def eval_transform(cfg: Any, *, cell_crop: bool = True) -> T.Compose:
    """Deterministic transform: image -> normalised float tensor (C, H, W).

    Exactly timm's eval transform for the resolved config (resize the short side to
    ``size / crop_pct``, center-crop ``size``, to tensor, normalise), preceded by conversion of
    uint8 arrays / non-RGB images to RGB PIL and, when the config has a ``cell_crop`` (and
    ``cell_crop`` is true: pixels decoded once by training are cropped already), by the
    cell-centred crop.
    """
    import timm.data

    data = resolve_data_config(cfg)
    tf = timm.data.create_transform(
        input_size=data["input_size"], is_training=False, interpolation=data["interpolation"],
        mean=data["mean"], std=data["std"], crop_pct=data["crop_pct"], crop_mode=data["crop_mode"],
    )
    crop = [CellCrop(data["cell_crop"])] if cell_crop and data["cell_crop"] else []
    steps = list(tf.transforms)
    if data["stain_norm"]:  # on the resized image, before it becomes a tensor
        at = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
        steps.insert(at, StainNorm(data["stain_norm"]))
    return T.Compose([_ToPIL(), *crop, *steps])


def train_transform(cfg: Any, *, jitter: float = 0.1, hue: float | None = None, scale_jitter: float = 0.0,
                    cell_crop: bool = True) -> T.Compose:
    """Training transform: the eval geometry + random flips, 90-degree rotations, colour jitter
    (brightness, contrast and saturation by ``jitter``, hue by ``hue``, default ``jitter / 5``:
    stain variation) and, with ``scale_jitter`` s > 0, a random zoom of up to 1 + s (a random
    square of the view, its side 1/(1+s) to 1 of it: magnification variation)."""
    data = resolve_data_config(cfg)
    _, h, w = data["input_size"]
    interp = T.InterpolationMode(data["interpolation"])
    scale = math.floor(min(h, w) / data["crop_pct"])
    hue = jitter / 5 if hue is None else hue
    steps: list[Any] = [_ToPIL()]
    if cell_crop and data["cell_crop"]:
        steps.append(CellCrop(data["cell_crop"]))
    steps += [T.Resize(scale, interpolation=interp), T.CenterCrop((h, w))]
    if scale_jitter > 0:
        steps.append(T.RandomResizedCrop((h, w), scale=(1 / (1 + scale_jitter) ** 2, 1.0), ratio=(1.0, 1.0),
                                         interpolation=interp))
    if data["stain_norm"]:  # before the colour jitter, which then varies around the normalised colours
        steps.append(StainNorm(data["stain_norm"]))
    steps += [T.RandomHorizontalFlip(), T.RandomVerticalFlip()]
    if h == w:
        steps.append(RandomRot90())
    if jitter > 0 or hue > 0:
        steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=min(hue, 0.5)))
    steps += [T.ToTensor(), T.Normalize(data["mean"], data["std"])]
    return T.Compose(steps)


def preprocess(images: Any | Iterable[Any], cfg: Any, *, transform: Any = None) -> torch.Tensor:
    """One image or a list of images -> a batch tensor (B, C, H, W) with the eval transform.

    ``transform``: the already built ``eval_transform(cfg)`` (a :class:`~cellhub.predict.Predictor`
    builds it once), so it is not rebuilt on every call.
    """
    tf = transform if transform is not None else eval_transform(cfg)
    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    batch = [tf(img) for img in images]
    if not batch:
        raise ValueError("preprocess() got no images")
    return torch.stack(batch)
