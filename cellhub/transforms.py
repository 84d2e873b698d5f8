"""Preprocessing resolved from a model's data config -- never hard-coded by the caller.

The evaluation transform is timm's own (``timm.data.create_transform(..., is_training=False)``),
which is also what ``transformers``' ``TimmWrapperImageProcessor`` and therefore
``pipeline("image-classification")`` apply to a published checkpoint: cellhub, timm and
transformers see the same pixels and give the same logits.

Cells fill their crops and the microscope magnification is fixed, so the training transform
keeps the evaluation geometry (no random zoom) and adds only label-preserving changes: flips,
90-degree rotations and mild colour jitter (stain variation).
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

__all__ = ["eval_transform", "preprocess", "resolve_data_config", "to_pil", "train_transform"]

logger = logging.getLogger(__name__)

_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
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
            return resolve_data_config(cfg["pretrained_cfg"])
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
                return resolve_data_config(obj[key])
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
    }


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


def eval_transform(cfg: Any) -> T.Compose:
    """Deterministic transform: image -> normalised float tensor (C, H, W).

    Exactly timm's eval transform for the resolved config (resize the short side to
    ``size / crop_pct``, center-crop ``size``, to tensor, normalise), preceded by conversion of
    uint8 arrays / non-RGB images to RGB PIL.
    """
    import timm.data

    data = resolve_data_config(cfg)
    tf = timm.data.create_transform(
        input_size=data["input_size"], is_training=False, interpolation=data["interpolation"],
        mean=data["mean"], std=data["std"], crop_pct=data["crop_pct"], crop_mode=data["crop_mode"],
    )
    return T.Compose([_ToPIL(), *tf.transforms])


def train_transform(cfg: Any, *, jitter: float = 0.1, hue: float = 0.02) -> T.Compose:
    """Training transform: the eval geometry + random flips, 90-degree rotations, colour jitter."""
    data = resolve_data_config(cfg)
    _, h, w = data["input_size"]
    interp = T.InterpolationMode(data["interpolation"])
    scale = math.floor(min(h, w) / data["crop_pct"])
    steps: list[Any] = [
        _ToPIL(),
        T.Resize(scale, interpolation=interp),
        T.CenterCrop((h, w)),
        T.RandomHorizontalFlip(),
        T.RandomVerticalFlip(),
    ]
    if h == w:
        steps.append(RandomRot90())
    if jitter > 0 or hue > 0:
        steps.append(T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=hue))
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
