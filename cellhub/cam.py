"""Class activation maps: where in the image a model found the evidence for a class.

Two ways to compute the same Grad-CAM map:

* **exact CAM** for models whose head is global average pooling followed by one linear layer
  (ResNets, the small CNN). For such a head the gradient of logit *c* with respect to feature map
  *k* is the constant ``w_ck / (h*w)``, so Grad-CAM equals ``ReLU(sum_k w_ck A_k)`` up to scale:
  one forward pass gives the logits *and* the maps of every class, no backward pass needed.
* **pytorch-grad-cam** (the ``grad-cam`` package) for any other head (VGG16's convolutional MLP).

Neither localises when the last feature map is a handful of units that each see the whole image:
EfficientNet-Lite0 at 128 px has a 4x4 map, and the bundled PBC model puts its evidence in one
corner unit whatever the cell. For such models (``cellhub.models`` registry: ``cam_method``)
:func:`occlusion_maps` measures instead how much the class probability drops when each patch of
the input is hidden: model-agnostic, one batched forward pass per patch position.

Both return maps in ``[0, 1]`` at the model's input size, normalised the way pytorch-grad-cam
does (per map: ReLU, min-max, bilinear upsampling, min-max), so the two agree for GAP+linear
heads (``tests/test_cam.py`` checks a correlation >= 0.999).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .models import cam_layer, is_gap_linear_head

__all__ = [
    "gradcam",
    "occlusion_maps",
    "class_activation_maps",
    "supports_exact_cam",
    "NotGapLinearError",
    "normalize_cams",
    "overlay",
]

logger = logging.getLogger(__name__)

Method = Literal["auto", "exact", "gradcam", "occlusion"]


def _linear_head(model: nn.Module) -> nn.Linear | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return head if isinstance(head, nn.Linear) else None


def supports_exact_cam(model: nn.Module) -> bool:
    """True when the model's head is global average pooling + one linear layer.

    Asks the model registry (``cellhub.models.is_gap_linear_head``); models from elsewhere
    qualify when ``get_classifier()`` is an ``nn.Linear``. :func:`class_activation_maps` still
    verifies the claim numerically on every call.
    """
    if _linear_head(model) is None:
        return False
    return bool(is_gap_linear_head(model))


class NotGapLinearError(ValueError):
    """The model's head is not global-average-pooling + linear over the CAM layer."""


def class_activation_maps(
    model: nn.Module, x: torch.Tensor, layer: nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> ``(logits (B,K), raw CAMs (B,K,h,w))`` for every class at once.

    The raw map of class *c* is ``sum_k w_ck A_k`` over the feature maps ``A`` of ``layer``
    (default: ``cellhub.models.cam_layer(model)``); apply :func:`normalize_cams` to get images.
    Raises :class:`NotGapLinearError` if the logits are not ``linear(mean(A))`` — i.e. the head
    is not of the form that makes this exact.
    """
    logits, feats, head = _verified_features(model, x, layer)
    with torch.inference_mode():
        cams = torch.einsum("kc,bchw->bkhw", head.weight.to(feats.dtype), feats)
    return logits, cams


def _verified_features(
    model: nn.Module, x: torch.Tensor, layer: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
    """One forward pass -> (logits, the CAM layer's features, the linear head), after checking
    that logits == head(global_average_pool(features)); :class:`NotGapLinearError` otherwise."""
    head = _linear_head(model)
    if head is None:
        raise NotGapLinearError(
            f"{type(model).__name__}.get_classifier() is not an nn.Linear; use method='gradcam'."
        )
    layer = layer if layer is not None else cam_layer(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.inference_mode():
            logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise NotGapLinearError(f"the CAM layer {type(layer).__name__} was not run by the forward pass")
    feats = captured[-1]
    if feats.ndim != 4 or feats.shape[1] != head.in_features:
        raise NotGapLinearError(
            f"CAM layer output has shape {tuple(feats.shape)}; expected (B, {head.in_features}, h, w)"
        )
    with torch.inference_mode():
        rebuilt = feats.float().mean(dim=(2, 3)) @ head.weight.float().T
        if head.bias is not None:
            rebuilt = rebuilt + head.bias.float()
        tol = 1e-3 * (1.0 + logits.float().abs().max().item())
        if rebuilt.shape != logits.shape or (rebuilt - logits.float()).abs().max().item() > tol:
            raise NotGapLinearError(
                "logits are not linear(global_average_pool(features)); the exact CAM does not apply"
            )
    return logits, feats, head


def normalize_cams(cams: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """ReLU, min-max to [0,1], bilinear upsampling to ``size`` = (H, W), min-max again.

    ``cams`` is (..., h, w); the result is float32 (..., H, W). Same steps as pytorch-grad-cam's
    ``scale_cam_image`` so that exact CAMs and Grad-CAMs are comparable.
    """
    t = torch.as_tensor(np.asarray(cams) if not isinstance(cams, torch.Tensor) else cams).float()
    lead = t.shape[:-2]
    t = t.reshape(-1, 1, *t.shape[-2:]).clamp_min(0)
    t = _minmax(t)
    t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    t = _minmax(t.clamp_min(0))
    return t.reshape(*lead, *size).cpu().numpy().astype(np.float32)


def _minmax(t: torch.Tensor) -> torch.Tensor:
    flat = t.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    t = t - lo
    hi = t.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    return t / (hi + 1e-7)


def _validate_classes(class_idx: int | Sequence[int] | None, batch: int, num_classes: int) -> list[int] | None:
    if class_idx is None:
        return None
    idx = [int(class_idx)] * batch if np.ndim(class_idx) == 0 else [int(c) for c in class_idx]  # type: ignore[union-attr]
    if len(idx) != batch:
        raise ValueError(f"class_idx has {len(idx)} entries for a batch of {batch} images")
    bad = [c for c in idx if not 0 <= c < num_classes]
    if bad:
        # pytorch-grad-cam's __exit__ swallows IndexError, so an out-of-range class would
        # silently yield no map: refuse it here with a clear message instead.
        raise ValueError(f"class index {bad[0]} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    return idx


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    out = getattr(head, "out_features", None) or getattr(head, "out_channels", None)
    if out:
        return int(out)
    n = getattr(model, "num_classes", None)
    if n:
        return int(n)
    with torch.inference_mode():
        return int(model(x[:1]).shape[-1])


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    class_idx: int | Sequence[int] | None = None,
    *,
    method: Method = "auto",
    layer: nn.Module | None = None,
    return_logits: bool = False,
) -> np.ndarray | tuple[np.ndarray, torch.Tensor]:
    """Grad-CAM maps ``(B, H, W)`` in ``[0, 1]`` at the input size of ``x`` (B,3,H,W).

    ``class_idx``: one class for all images, one per image, or ``None`` for each image's
    predicted class. ``method``: ``"exact"`` (GAP+linear heads, forward pass only),
    ``"gradcam"`` (pytorch-grad-cam, any head), ``"auto"`` (exact when the head allows it) or
    ``"occlusion"`` (:func:`occlusion_maps`, any model; no layer needed).
    With ``return_logits=True`` also returns the logits of the same forward pass.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a batch (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
    if method not in ("auto", "exact", "gradcam", "occlusion"):
        raise ValueError(f"unknown CAM method {method!r}; choose 'auto', 'exact', 'gradcam' or 'occlusion'")
    was_training = model.training
    # eval() / train() walk every module (~0.5 ms for a small CNN, 10% of its prediction):
    # only when something is actually in training mode
    switch = any(m.training for m in model.modules())
    if switch:
        model.eval()
    try:
        idx = _validate_classes(class_idx, x.shape[0], _num_classes(model, x))
        if method == "occlusion":
            maps, logits = occlusion_maps(model, x, idx)
            return (maps, logits) if return_logits else maps
        use_exact = method == "exact" or (method == "auto" and supports_exact_cam(model))
        if use_exact:
            try:
                logits, feats, head = _verified_features(model, x, layer)
            except NotGapLinearError as exc:
                if method == "exact":
                    raise
                logger.warning("exact CAM not applicable (%s); falling back to pytorch-grad-cam", exc)
            else:
                chosen = logits.argmax(dim=1) if idx is None else torch.as_tensor(idx)
                with torch.inference_mode():  # only the chosen class's map: sum_k w_ck A_k
                    picked = torch.einsum("bc,bchw->bhw", head.weight.to(feats.dtype)[chosen.to(feats.device)], feats)
                maps = normalize_cams(picked, tuple(x.shape[-2:]))
                return (maps, logits) if return_logits else maps
        maps, logits = _pytorch_gradcam(model, x, idx, layer)
        return (maps, logits) if return_logits else maps
    finally:
        if switch:
            model.train(was_training)


def _patch_starts(size: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - patch, 0) + 1, stride))
    if starts[-1] + patch < size:  # the last patch reaches the edge
        starts.append(size - patch)
    return starts


def occlusion_maps(
    model: nn.Module,
    x: torch.Tensor,
    class_idx: Sequence[int] | None = None,
    *,
    patch: int | None = None,
    stride: int | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, torch.Tensor]:
    """Occlusion sensitivity: ``(maps (B, H, W) in [0, 1], logits (B, K))``.

    Each ``patch`` x ``patch`` square (default a quarter of the short side, moved by half a patch)
    is set to 0 in the normalised input, i.e. the mean colour the model was normalised with; a
    pixel's value is the mean drop of the class probability over the patches that hid it (rises
    count as 0), min-max scaled. ``class_idx``: one class per image, or ``None`` for the predicted
    class. Costs one forward pass per patch position (49 for the defaults), in batches.
    """
    b, _, h, w = x.shape
    patch = int(patch or max(1, round(min(h, w) / 4)))
    stride = int(stride or max(1, patch // 2))
    if not 0 < patch <= min(h, w) or stride < 1:
        raise ValueError(f"patch must be in 1..{min(h, w)} and stride >= 1; got patch={patch}, stride={stride}")
    spots = [(y, x0) for y in _patch_starts(h, patch, stride) for x0 in _patch_starts(w, patch, stride)]
    cover = torch.zeros(len(spots), h, w)
    for i, (y, x0) in enumerate(spots):
        cover[i, y : y + patch, x0 : x0 + patch] = 1.0
    with torch.inference_mode():
        logits = model(x)
        probs = logits.float().softmax(dim=1)
        chosen = logits.argmax(dim=1).tolist() if class_idx is None else [int(c) for c in class_idx]
        maps = np.zeros((b, h, w), dtype=np.float32)
        for i in range(b):
            drops = []
            for start in range(0, len(spots), batch_size):
                part = cover[start : start + batch_size].to(x.device, x.dtype)
                hidden = x[i : i + 1] * (1.0 - part[:, None])
                drops.append(probs[i, chosen[i]] - model(hidden).float().softmax(dim=1)[:, chosen[i]])
            drop = torch.cat(drops).clamp_min(0).cpu()
            heat = (drop[:, None, None] * cover).sum(0) / cover.sum(0).clamp_min(1.0)
            maps[i] = _minmax(heat[None, None])[0, 0].numpy()
    return maps, logits


def _pytorch_gradcam(
    model: nn.Module, x: torch.Tensor, idx: list[int] | None, layer: nn.Module | None
) -> tuple[np.ndarray, torch.Tensor]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = layer if layer is not None else cam_layer(model)
    # Gradients must reach the CAM layer even when the backbone is frozen.
    inp = x.detach().clone().requires_grad_(True)
    targets = None if idx is None else [ClassifierOutputTarget(c) for c in idx]
    with torch.enable_grad(), GradCAM(model=model, target_layers=[layer]) as engine:
        maps = engine(input_tensor=inp, targets=targets)
        logits = engine.outputs.detach()
    model.zero_grad(set_to_none=True)
    if maps is None or len(maps) != x.shape[0]:  # GradCAM.__exit__ swallows IndexError
        raise RuntimeError("pytorch-grad-cam returned no maps; check the CAM layer and class index")
    return np.clip(np.asarray(maps, dtype=np.float32), 0.0, 1.0), logits


def overlay(
    image: Image.Image | np.ndarray,
    cam: np.ndarray,
    *,
    alpha: float = 0.45,
    box: tuple[float, float, float, float] | None = None,
    colormap: int = cv2.COLORMAP_JET,
) -> Image.Image:
    """Blend a ``[0,1]`` map over ``image`` as a heat map, at the image's own size (RGB out).

    ``box`` = (left, top, right, bottom) in image pixels is the region the model saw (e.g. after
    a centre crop); the map is drawn there and nothing outside. Default: the whole image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    base_arr = np.asarray(base.convert("RGB"), dtype=np.float32) / 255.0
    height, width = base_arr.shape[:2]
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32).squeeze(), nan=0.0)
    if cam.ndim != 2:
        raise ValueError(f"cam must be a 2-D map, got shape {cam.shape}")
    full = np.zeros((height, width), dtype=np.float32)
    bl, bt, br, bb = (0, 0, width, height) if box is None else (int(round(v)) for v in box)
    left, top = max(bl, 0), max(bt, 0)  # a view may run past the image's edge (a padded cell crop)
    right, bottom = min(br, width), min(bb, height)
    if right > left and bottom > top and br > bl and bb > bt:
        view = cv2.resize(cam, (br - bl, bb - bt), interpolation=cv2.INTER_LINEAR)
        full[top:bottom, left:right] = view[top - bt : bottom - bt, left - bl : right - bl]
    heat = cv2.applyColorMap(np.uint8(255 * np.clip(full, 0, 1)), colormap)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
    if box is not None:  # outside the model's view: the plain image
        mask = np.zeros((height, width, 1), dtype=np.float32)
        mask[top:bottom, left:right] = 1.0
        heat = heat * mask + base_arr * (1 - mask)
    blended = alpha * heat + (1 - alpha) * base_arr
    return Image.fromarray(np.uint8(np.clip(blended, 0, 1) * 255 + 0.5))
