"""Inference: image(s) -> probabilities, Grad-CAM, abstention; several models -> a consensus.

* :class:`Predictor` wraps one checkpoint: it loads once, reads labels, preprocessing and the
  abstention threshold from the checkpoint's config, and predicts *batches* (one forward per
  batch gives the probabilities and, for GAP+linear heads, the CAMs of every class).
* :func:`consensus` combines the predictions of several models of one task.
* :func:`load_predictors` loads several checkpoints, reporting (not raising) the ones that fail.

Files, folders and archives are read by :mod:`cellhub.images`; many files at once go through
:func:`cellhub.batch.predict_files`. Nothing here imports gradio.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import cam as cam_lib
from .hub import load_pretrained
from .images import read_image
from .models import default_cam_method, fuse_conv_bn_for_inference, resolve_device
from .transforms import cell_box, eval_transform, preprocess, resolve_data_config

__all__ = ["Prediction", "Predictor", "Consensus", "consensus", "load_predictors", "CPU_FORWARD_BATCH"]

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One model's answer for one image."""

    probs: dict[str, float]
    label: str
    confidence: float
    #: Grad-CAM of the predicted class, (H, W) in [0, 1] at the model's input size; None if not
    #: asked for or not available for this model (the SVM)
    cam: np.ndarray | None
    #: True when the confidence is under the checkpoint's abstention threshold
    abstain: bool
    #: wall time of this prediction (for a batch: the batch time divided by its size)
    seconds: float
    threshold: float | None = None
    model: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (without the CAM array)."""
        return {
            "model": self.model,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "probs": {k: round(v, 6) for k, v in self.probs.items()},
            "abstain": self.abstain,
            "threshold": self.threshold,
            "seconds": round(self.seconds, 6),
        }


def _threshold(cfg: dict[str, Any]) -> float | None:
    value = cfg.get("abstention_threshold")
    if isinstance(value, dict):
        value = value.get("threshold")
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _supports_cam(model: nn.Module) -> bool:
    """Whether Grad-CAM applies: a differentiable model with a known CAM layer (not the SVM)."""
    if str(model.cellhub_config.get("model_name", "")).lower() == "svm":
        return False
    try:
        cam_lib.cam_layer(model)
    except (ValueError, AttributeError):
        return False
    return True


#: images per forward pass on the CPU (bench/RESULTS.md: 8 is the fastest per image on 2 cores)
CPU_FORWARD_BATCH = 8


class Predictor:
    """One loaded checkpoint: images -> :class:`Prediction` (probabilities, CAM, abstention).

    Labels, task, preprocessing (``pretrained_cfg``) and the abstention threshold come from
    ``model.cellhub_config``. Thread-safe: concurrent calls are serialised per model (CAM hooks
    are attached to the shared module).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str | None = None,
        device: str | torch.device | None = "cpu",
        batch_size: int | None = None,
        cam_method: cam_lib.Method = "auto",
    ) -> None:
        cfg = getattr(model, "cellhub_config", None)
        if not isinstance(cfg, dict) or not cfg.get("labels"):
            raise ValueError(
                f"{type(model).__name__} has no cellhub_config with labels; load checkpoints with "
                "cellhub.hub.load_pretrained or build models with cellhub.create_model."
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"Predictor needs a torch nn.Module; got {type(model).__name__}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        # conv+BatchNorm folded into one conv: same outputs, ~1.5x faster small-CNN forward on the
        # CPU (bench/RESULTS.md, run 3); a copy, so the caller's model can still be trained
        self.model = fuse_conv_bn_for_inference(model.to(self.device).eval())
        if self.device.type == "cpu":
            # Measured (bench/RESULTS.md, run 1): channels_last weights make CPU convolutions
            # 1.2-1.6x faster, with NCHW input too; outputs and CAMs are unchanged.
            self.model = self.model.to(memory_format=torch.channels_last)
        if batch_size is None:
            # On the CPU, forward chunks of 8 beat 32 per image (activations stay in cache).
            batch_size = CPU_FORWARD_BATCH if self.device.type == "cpu" else 32
        self.config: dict[str, Any] = dict(cfg)
        self.labels: list[str] = [str(x) for x in cfg["labels"]]
        self.task: str | None = cfg.get("task")
        self.threshold: float | None = _threshold(cfg)
        self.name = name or str(cfg.get("model_name") or type(model).__name__)
        self.batch_size = int(batch_size)
        # "auto": the registry's choice for the architecture (occlusion where its CAM does not localise)
        self.cam_method: cam_lib.Method = default_cam_method(model) if cam_method == "auto" else cam_method  # type: ignore[assignment]
        self.data_config = resolve_data_config(model)
        self.transform = eval_transform(self.data_config)
        self.supports_cam = _supports_cam(model)
        #: the checkpoint (folder or Hub id) it was loaded from, when known: a fresh, unfused copy of the
        #: model can be loaded from it (``adapt.adapt_predictors``)
        self.source: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Predictor(name={self.name!r}, task={self.task!r}, labels={self.labels}, "
            f"threshold={self.threshold}, device={self.device})"
        )

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | Path, *, name: str | None = None, **kwargs: Any) -> Predictor:
        """Load a checkpoint (Hub id or local folder) with :func:`cellhub.hub.load_pretrained`."""
        device = resolve_device(kwargs.pop("device", "cpu"))
        model = load_pretrained(str(repo_id_or_dir), device=device)
        kwargs["device"] = device
        if name is None:
            src = str(repo_id_or_dir).rstrip("/\\")
            name = Path(src).name if Path(src).exists() else src
        predictor = cls(model, name=name, **kwargs)
        predictor.source = str(repo_id_or_dir)
        return predictor

    @property
    def architecture(self) -> str:
        return str(self.config.get("model_name") or type(self.model).__name__)

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.data_config["input_size"]
        return int(size[-2]), int(size[-1])

    def preprocess(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """Resize/normalise with the checkpoint's own data config -> (B, 3, H, W) float."""
        return preprocess(images, self.data_config, transform=self.transform).to(self.device)

    def cam_box(self, image_size: tuple[int, int], image: Image.Image | None = None) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom) of an image of ``image_size`` = (W, H) that
        the model sees after its eval transform.

        timm's eval transform (``crop_mode="center"``) resizes the shorter side to
        ``floor(size / crop_pct)`` and centre-crops ``size``: a 320x240 crop fed to a square
        model is seen as its central 240x240 region, even with ``crop_pct=1``. A model with a
        cell-centred crop sees the square around the nucleus (found in ``image``).
        """
        spec = self.data_config.get("cell_crop")
        if spec and image is not None:
            x0, y0, x1, y1 = cell_box(image, spec)
            inner = self.cam_box((x1 - x0, y1 - y0))
            return (x0 + inner[0], y0 + inner[1], x0 + inner[2], y0 + inner[3])
        width, height = image_size
        if self.data_config.get("crop_mode", "center") == "squash":
            return (0.0, 0.0, float(width), float(height))
        crop_pct = float(self.data_config.get("crop_pct") or 1.0)
        in_h, in_w = self.input_size
        scale = math.floor(min(in_h, in_w) / crop_pct) / min(width, height)
        view_w, view_h = min(in_w / scale, width), min(in_h / scale, height)
        left, top = (width - view_w) / 2, (height - view_h) / 2
        return (left, top, left + view_w, top + view_h)

    def overlay(self, image: Image.Image, prediction: Prediction, alpha: float = 0.45) -> Image.Image:
        """The prediction's CAM drawn over ``image`` at the image's own size."""
        if prediction.cam is None:
            raise ValueError("this prediction has no CAM; call predict(..., with_cam=True)")
        return cam_lib.overlay(image, prediction.cam, alpha=alpha, box=self.cam_box(image.size, image))

    def _forward(self, x: torch.Tensor, with_cam: bool) -> tuple[torch.Tensor, np.ndarray | None]:
        if with_cam and self.supports_cam:
            maps, logits = cam_lib.gradcam(self.model, x, None, method=self.cam_method, return_logits=True)
            return logits, maps
        with torch.inference_mode():
            return self.model(x), None

    def predict(
        self,
        images: Sequence[Image.Image | np.ndarray | str | Path] | Image.Image,
        with_cam: bool = True,
        *,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Prediction]:
        """Predict a batch: one :class:`Prediction` per image, in order.

        Images are PIL images, uint8 HWC arrays or paths (decoded with :func:`read_image`).
        Inference runs in chunks of ``batch_size`` (default: the predictor's, 8 on the CPU);
        ``progress(done, total)`` after each.
        """
        if isinstance(images, (Image.Image, np.ndarray, str, Path)):
            images = [images]
        images = [read_image(im) if isinstance(im, (str, Path)) else im for im in images]
        return self._predict_chunks(images, None, with_cam, batch_size, progress)

    def predict_preprocessed(
        self,
        x: torch.Tensor,
        with_cam: bool = True,
        *,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Prediction]:
        """Like :meth:`predict`, for a batch already run through :attr:`transform` ((B, 3, H, W)
        float, e.g. preprocessed in decoding threads by :func:`predict_files`)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch from Predictor.transform, got shape {tuple(x.shape)}")
        return self._predict_chunks(None, x, with_cam, batch_size, progress)

    def _predict_chunks(
        self,
        images: Sequence[Image.Image | np.ndarray] | None,
        x_all: torch.Tensor | None,
        with_cam: bool,
        batch_size: int | None,
        progress: Callable[[int, int], None] | None,
    ) -> list[Prediction]:
        total = len(images) if images is not None else int(x_all.shape[0])  # type: ignore[union-attr]
        bs = batch_size or self.batch_size
        out: list[Prediction] = []
        for start in range(0, total, bs):
            t0 = time.perf_counter()
            with self._lock:
                if images is not None:
                    x = self.preprocess(images[start : start + bs])
                else:
                    x = x_all[start : start + bs].to(self.device)  # type: ignore[index]
                n = int(x.shape[0])
                logits, maps = self._forward(x, with_cam)
                probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
            per_image = (time.perf_counter() - t0) / n
            if probs.shape[1] != len(self.labels):
                raise RuntimeError(
                    f"{self.name}: the model outputs {probs.shape[1]} classes but its config lists "
                    f"{len(self.labels)} labels {self.labels}"
                )
            for i, p in enumerate(probs):
                k = int(p.argmax())
                conf = float(p[k])
                out.append(
                    Prediction(
                        probs={lab: float(v) for lab, v in zip(self.labels, p)},
                        label=self.labels[k],
                        confidence=conf,
                        cam=None if maps is None else maps[i],
                        abstain=self.threshold is not None and conf < self.threshold,
                        seconds=per_image,
                        threshold=self.threshold,
                        model=self.name,
                    )
                )
            if progress is not None:
                progress(len(out), total)
        return out


# --------------------------------------------------------------------------------------------
# Consensus
# --------------------------------------------------------------------------------------------


@dataclass
class Consensus:
    """What several models of one task say together about one image."""

    label: str | None
    agree: list[str]
    disagree: list[str]
    uncertain: bool
    reasons: list[str] = field(default_factory=list)
    #: remarks that do not raise the flag (e.g. a checkpoint without an abstention threshold)
    notes: list[str] = field(default_factory=list)
    votes: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "agree": self.agree,
            "disagree": self.disagree,
            "uncertain": self.uncertain,
            "reasons": self.reasons,
            "notes": self.notes,
        }


def consensus(predictions: Sequence[Prediction]) -> Consensus:
    """Majority label over models; ``uncertain`` when models disagree or any abstains.

    Ties between labels with equal votes go to the label with the highest mean probability.
    A model whose checkpoint has no abstention threshold is noted, not flagged.
    """
    if not predictions:
        return Consensus(None, [], [], True, ["no model made a prediction"])
    votes: dict[str, list[str]] = {}
    for p in predictions:
        votes.setdefault(p.label, []).append(p.model)

    def mean_prob(label: str) -> float:
        return float(np.mean([p.probs.get(label, 0.0) for p in predictions]))

    label = max(votes, key=lambda lab: (len(votes[lab]), mean_prob(lab)))
    agree = list(votes[label])
    disagree = [p.model for p in predictions if p.label != label]
    reasons: list[str] = []
    if len(votes) > 1:
        reasons.append("models disagree (" + ", ".join(f"{p.model}: {p.label}" for p in predictions) + ")")
    for p in predictions:
        if p.abstain:
            reasons.append(f"{p.model} confidence {p.confidence:.2f} is under its abstention threshold {p.threshold:.2f}")
    notes = [
        f"{p.model} has no abstention threshold in its checkpoint config; its confidence is not checked"
        for p in predictions
        if p.threshold is None
    ]
    return Consensus(label, agree, disagree, bool(reasons), reasons, notes, votes)



def load_predictors(
    sources: Iterable[str | Path], *, device: str | None = "cpu", **kwargs: Any
) -> tuple[list[Predictor], list[tuple[str, str]]]:
    """Load each checkpoint (Hub id or folder) once; failures are logged and returned, not raised.

    Returns ``(predictors, failures)`` with ``failures`` as ``(source, error message)``. Names are
    made unique (``name``, ``name-2``) so results can be keyed by model.
    """
    predictors: list[Predictor] = []
    failures: list[tuple[str, str]] = []
    seen: set[str] = set()
    for src in sources:
        src = str(src)
        try:
            pred = Predictor.from_pretrained(src, device=device, **kwargs)
        except Exception as exc:  # a bad checkpoint must not take the others down
            logger.warning("could not load model %s: %s", src, exc)
            failures.append((src, f"{type(exc).__name__}: {exc}"))
            continue
        base, n = pred.name, 2
        while pred.name in seen:
            pred.name = f"{base}-{n}"
            n += 1
        seen.add(pred.name)
        logger.info("loaded %s (task %s, labels %s, threshold %s)", pred.name, pred.task, pred.labels, pred.threshold)
        predictors.append(pred)
    return predictors, failures
