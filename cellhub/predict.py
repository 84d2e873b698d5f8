"""Inference: image(s) -> probabilities, Grad-CAM, abstention; several models -> a consensus.

* :class:`Predictor` wraps one checkpoint: it loads once, reads labels, preprocessing and the
  abstention threshold from the checkpoint's config, and predicts *batches* (one forward per
  batch gives the probabilities and, for GAP+linear heads, the CAMs of every class).
* :func:`consensus` combines the predictions of several models of one task.
* :func:`read_image` / :func:`collect_images` turn user files (images, folders, ``.zip``
  archives) into images, with size limits, and report — rather than crash on — bad files.
* :func:`predict_files` runs a batch end to end (parallel decoding, batched inference) and
  ``python -m cellhub predict CHECKPOINT IMAGES_OR_FOLDER`` is its command line.

Nothing here imports gradio: ``app.py`` turns :class:`InputError` into ``gr.Error``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import threading
import time
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from cellhub import cam as cam_lib

__all__ = [
    "Prediction",
    "Predictor",
    "Consensus",
    "consensus",
    "Limits",
    "DEFAULT_LIMITS",
    "InputError",
    "ImageRef",
    "read_image",
    "collect_images",
    "list_zip_images",
    "predict_files",
    "BatchResult",
    "class_counts",
    "load_predictors",
    "register_cli",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
ARCHIVE_EXTENSIONS = (".zip",)

ProgressFn = Callable[[int, int, str], None]


# --------------------------------------------------------------------------------------------
# Input: files, limits, zip archives
# --------------------------------------------------------------------------------------------


class InputError(ValueError):
    """A user-supplied file cannot be used; the message says which one, why, and what to do."""


@dataclass(frozen=True)
class Limits:
    """Guards against oversized or malicious input (the defaults suit cell crops and smears)."""

    #: width * height of one image (a 640x480 smear is 0.3 MP; 25 MP is a large micrograph)
    max_pixels: int = 25_000_000
    #: bytes of one image file (or one zip member, uncompressed)
    max_image_bytes: int = 25 * 2**20
    #: images in one batch request
    max_images: int = 2_000
    #: entries in one zip archive (directories included)
    max_zip_members: int = 10_000
    #: total uncompressed bytes read from one zip archive
    max_zip_bytes: int = 512 * 2**20
    #: uncompressed/compressed size above which a (large) member is treated as a zip bomb
    max_compression_ratio: float = 100.0


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ImageRef:
    """Where one image comes from: a file, or a member of a zip archive."""

    name: str
    path: Path
    member: str | None = None

    def read_bytes(self, limits: Limits = DEFAULT_LIMITS, archive: zipfile.ZipFile | None = None) -> bytes:
        """The file's bytes, never more than ``limits.max_image_bytes`` (+1 to detect overflow)."""
        cap = limits.max_image_bytes + 1
        if self.member is None:
            with open(self.path, "rb") as fh:
                return fh.read(cap)
        zf = archive or zipfile.ZipFile(self.path)
        try:
            with zf.open(self.member) as fh:  # stream: the header's size may lie
                return fh.read(cap)
        finally:
            if archive is None:
                zf.close()


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float microscopy images
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = np.nanmin(arr), np.nanmax(arr)
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def read_image(
    source: str | Path | bytes | ImageRef, *, name: str | None = None, limits: Limits = DEFAULT_LIMITS
) -> Image.Image:
    """Decode one image file (path, bytes or :class:`ImageRef`) into an RGB ``PIL.Image``.

    Applies EXIF orientation, flattens transparency onto white, keeps the first frame of a
    multi-frame file. Raises :class:`InputError` naming the file for an empty, oversized,
    unreadable, truncated or too-many-pixel image.
    """
    if isinstance(source, ImageRef):
        name = name or source.name
        try:
            data = source.read_bytes(limits)
        except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
            raise InputError(f"{name}: cannot be read ({exc}).") from exc
    elif isinstance(source, (bytes, bytearray)):
        name = name or "image"
        data = bytes(source[: limits.max_image_bytes + 1])
    else:
        path = Path(source)
        name = name or path.name
        if not path.is_file():
            raise InputError(f"{name}: no such file ({path}).")
        size = path.stat().st_size
        if size > limits.max_image_bytes:
            raise InputError(
                f"{name}: the file is {_mb(size)}, over the {_mb(limits.max_image_bytes)} limit "
                "for one image; downscale it or crop the cell."
            )
        data = path.read_bytes()
    if not data:
        raise InputError(f"{name}: the file is empty; use a PNG, JPEG, TIFF, BMP or WebP image.")
    if len(data) > limits.max_image_bytes:
        raise InputError(
            f"{name}: the file is over the {_mb(limits.max_image_bytes)} limit for one image; "
            "downscale it or crop the cell."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > limits.max_pixels:
                raise InputError(
                    f"{name}: {width}x{height} pixels ({width * height / 1e6:.1f} MP) is over the "
                    f"{limits.max_pixels / 1e6:g} MP limit; downscale it or crop the cell."
                )
            if width == 0 or height == 0:
                raise InputError(f"{name}: the image has no pixels ({width}x{height}).")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(
            f"{name}: too many pixels ({exc}); the limit is {limits.max_pixels / 1e6:g} MP."
        ) from exc
    except UnidentifiedImageError as exc:
        raise InputError(
            f"{name}: not an image file that can be read; use a PNG, JPEG, TIFF, BMP or WebP "
            "cell image."
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated / corrupt data
        raise InputError(f"{name}: the image is corrupt or truncated ({exc}).") from exc


def _safe_member_name(name: str) -> str | None:
    """The member's path if it is a plain relative path, else ``None`` (absolute / ``..``)."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return None
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if any(p == ".." for p in parts):
        return None
    return "/".join(p for p in parts if p not in ("", "."))


def list_zip_images(
    path: str | Path, *, limits: Limits = DEFAULT_LIMITS, label: str | None = None
) -> tuple[list[ImageRef], list[tuple[str, str]]]:
    """The image members of a zip archive, and the skipped members with the reason.

    Nothing is extracted to disk; members are streamed with size caps later. Skipped: unsafe
    paths (absolute, ``..``), macOS metadata, non-image names, nested archives, encrypted
    members, members over the size limit or with a zip-bomb compression ratio, and whatever is
    past the archive's total-size limit. Raises :class:`InputError` for a file that is not a
    valid zip or has too many members.
    """
    path = Path(path)
    label = label or path.name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{label}: not a valid zip archive ({exc}).") from exc
    refs: list[ImageRef] = []
    skipped: list[tuple[str, str]] = []
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_zip_members:
            raise InputError(
                f"{label}: the archive has {len(infos)} entries; the limit is {limits.max_zip_members}. "
                "Split it into smaller archives."
            )
        total = 0
        for info in infos:
            if info.is_dir():
                continue
            shown = f"{label}/{info.filename}"
            clean = _safe_member_name(info.filename)
            base = PurePosixPath(clean or info.filename).name
            suffix = PurePosixPath(base).suffix.lower()
            if clean is None:
                reason = "unsafe path (absolute or '..'); not read"
            elif clean.startswith("__MACOSX/") or base.startswith("._") or base in (".DS_Store", "Thumbs.db"):
                reason = "operating-system metadata, not an image"
            elif suffix in ARCHIVE_EXTENSIONS:
                reason = "nested archive; only images directly inside the zip are read"
            elif suffix not in IMAGE_EXTENSIONS:
                reason = f"not an image file ({suffix or 'no extension'})"
            elif info.flag_bits & 0x1:
                reason = "encrypted member"
            elif info.file_size > limits.max_image_bytes:
                reason = f"{_mb(info.file_size)} uncompressed, over the {_mb(limits.max_image_bytes)} limit"
            elif info.file_size > 2**20 and info.file_size > limits.max_compression_ratio * max(info.compress_size, 1):
                reason = f"suspicious compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 (zip bomb?)"
            elif total + info.file_size > limits.max_zip_bytes:
                reason = f"archive total over {_mb(limits.max_zip_bytes)}; the rest was not read"
            else:
                total += info.file_size
                refs.append(ImageRef(name=f"{label}/{clean}", path=path, member=info.filename))
                continue
            skipped.append((shown, reason))
    return refs, skipped


def collect_images(
    inputs: Iterable[str | Path], *, limits: Limits = DEFAULT_LIMITS, names: Sequence[str] | None = None
) -> tuple[list[ImageRef], list[tuple[str, str]]]:
    """Expand files, folders (recursively) and ``.zip`` archives into image references.

    ``names`` optionally gives the display name of each input (e.g. the original upload name).
    Returns ``(refs, skipped)``; non-image files are skipped with a reason. Raises
    :class:`InputError` when nothing was given or the total exceeds ``limits.max_images``.
    """
    inputs = [Path(p) for p in inputs if p not in (None, "")]
    if not inputs:
        raise InputError("No files were given; upload one or more cell images or a .zip of them.")
    refs: list[ImageRef] = []
    skipped: list[tuple[str, str]] = []
    for i, path in enumerate(inputs):
        label = names[i] if names is not None and i < len(names) else path.name
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    rel = child.relative_to(path).as_posix()
                    if child.suffix.lower() in IMAGE_EXTENSIONS:
                        refs.append(ImageRef(name=f"{label}/{rel}", path=child))
                    elif not child.name.startswith("."):
                        skipped.append((f"{label}/{rel}", f"not an image file ({child.suffix or 'no extension'})"))
        elif not path.exists():
            skipped.append((label, "no such file"))
        elif path.suffix.lower() in ARCHIVE_EXTENSIONS or (
            path.suffix.lower() not in IMAGE_EXTENSIONS and zipfile.is_zipfile(path)
        ):
            try:
                more, bad = list_zip_images(path, limits=limits, label=label)
            except InputError as exc:
                skipped.append((label, str(exc).removeprefix(f"{label}: ")))
                continue
            refs += more
            skipped += bad
        else:  # decoding decides; a bad file is reported then
            refs.append(ImageRef(name=label, path=path))
        if len(refs) > limits.max_images:
            raise InputError(
                f"{len(refs)}+ images in one request; the limit is {limits.max_images}. "
                "Split the batch into smaller ones."
            )
    return refs, skipped


def _decode_many(
    refs: Sequence[ImageRef],
    limits: Limits,
    pool: ThreadPoolExecutor,
    transforms: Sequence[Callable[[Image.Image], torch.Tensor]] = (),
) -> list[tuple[Image.Image, list[torch.Tensor]] | InputError]:
    """Read sequentially (zip members share a file handle); decode, and apply each of
    ``transforms`` (the models' eval preprocessing), in ``pool``'s threads.

    Returns, per ref, ``(image, [transform(image) for each transform])`` or the
    :class:`InputError` that says why it was skipped.
    """
    blobs: list[bytes | InputError] = []
    archives: dict[Path, zipfile.ZipFile] = {}
    try:
        for ref in refs:
            try:
                zf = None
                if ref.member is not None:
                    zf = archives.get(ref.path) or archives.setdefault(ref.path, zipfile.ZipFile(ref.path))
                blobs.append(ref.read_bytes(limits, archive=zf))
            except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError, KeyError) as exc:
                blobs.append(InputError(f"{ref.name}: cannot be read ({exc})."))
    finally:
        for zf in archives.values():
            zf.close()

    def decode(item: tuple[ImageRef, bytes | InputError]) -> tuple[Image.Image, list[torch.Tensor]] | InputError:
        ref, blob = item
        if isinstance(blob, InputError):
            return blob
        try:
            img = read_image(blob, name=ref.name, limits=limits)
        except InputError as exc:
            return exc
        return img, [t(img) for t in transforms]

    return list(pool.map(decode, zip(refs, blobs)))


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------


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
        cam_lib._cam_layer(model)
    except (ValueError, ImportError, AttributeError):
        return False
    return True


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
        from cellhub.transforms import eval_transform, resolve_data_config

        from cellhub.models import fuse_conv_bn_for_inference

        self.device = _resolve_device(device)
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
        self.cam_method = cam_method
        self.data_config = resolve_data_config(model)
        self.transform = eval_transform(self.data_config)
        self.supports_cam = _supports_cam(model)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Predictor(name={self.name!r}, task={self.task!r}, labels={self.labels}, "
            f"threshold={self.threshold}, device={self.device})"
        )

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | Path, *, name: str | None = None, **kwargs: Any) -> Predictor:
        """Load a checkpoint (Hub id or local folder) with :func:`cellhub.hub.load_pretrained`."""
        from cellhub.hub import load_pretrained

        device = _resolve_device(kwargs.pop("device", "cpu"))
        model = load_pretrained(str(repo_id_or_dir), device=device)
        kwargs["device"] = device
        if name is None:
            src = str(repo_id_or_dir).rstrip("/\\")
            name = Path(src).name if Path(src).exists() else src
        return cls(model, name=name, **kwargs)

    @property
    def architecture(self) -> str:
        return str(self.config.get("model_name") or type(self.model).__name__)

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.data_config["input_size"]
        return int(size[-2]), int(size[-1])

    def preprocess(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """Resize/normalise with the checkpoint's own data config -> (B, 3, H, W) float."""
        batch = []
        for img in images:
            if isinstance(img, np.ndarray):
                img = Image.fromarray(img)
            batch.append(self.transform(_to_rgb(img)))
        return torch.stack(batch).to(self.device)

    def cam_box(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom) of an image of ``image_size`` = (W, H) that
        the model sees after its eval transform.

        timm's eval transform (``crop_mode="center"``) resizes the shorter side to
        ``floor(size / crop_pct)`` and centre-crops ``size``: a 320x240 crop fed to a square
        model is seen as its central 240x240 region, even with ``crop_pct=1``.
        """
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
        return cam_lib.overlay(image, prediction.cam, alpha=alpha, box=self.cam_box(image.size))

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
# Consensus and batch summaries
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


def class_counts(labels: Iterable[str | None], label_order: Sequence[str]) -> list[tuple[str, int, float]]:
    """``(label, count, percent)`` for every label in ``label_order`` (percent of labelled items)."""
    counts = Counter(lab for lab in labels if lab is not None)
    total = sum(counts.values())
    return [(lab, counts.get(lab, 0), 100.0 * counts.get(lab, 0) / total if total else 0.0) for lab in label_order]


@dataclass
class BatchResult:
    """Predictions for a batch of files from several models of one task."""

    models: list[str]
    labels: list[str]
    files: list[str] = field(default_factory=list)
    predictions: list[dict[str, Prediction]] = field(default_factory=list)
    consensus: list[Consensus] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def header(self) -> list[str]:
        cols = ["file"]
        for m in self.models:
            cols += [f"{m} label", f"{m} confidence"]
        return cols + ["consensus", "agreement", "uncertain", "reasons"]

    def rows(self) -> list[list[Any]]:
        out = []
        for name, preds, cons in zip(self.files, self.predictions, self.consensus):
            row: list[Any] = [name]
            for m in self.models:
                row += [preds[m].label, round(preds[m].confidence, 4)]
            row += [cons.label, f"{len(cons.agree)}/{len(preds)}", cons.uncertain, "; ".join(cons.reasons)]
            out.append(row)
        return out

    def counts(self) -> list[tuple[str, int, float]]:
        """Per-class counts of the consensus labels (all images, flagged ones included)."""
        return class_counts((c.label for c in self.consensus), self.labels)

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(self.header())
            writer.writerows(self.rows())
        return path


def _task_labels(predictors: Sequence[Predictor]) -> list[str]:
    labels: list[str] = []
    for p in predictors:
        labels += [lab for lab in p.labels if lab not in labels]
    return labels


def predict_files(
    predictors: Sequence[Predictor],
    refs: Sequence[ImageRef],
    *,
    limits: Limits = DEFAULT_LIMITS,
    batch_size: int = 32,
    workers: int | None = None,
    with_cam: bool = False,
    progress: ProgressFn | None = None,
    on_chunk: Callable[[list[ImageRef], list[Image.Image], list[dict[str, Prediction]]], None] | None = None,
    forward_batch_size: int | None = None,
) -> BatchResult:
    """Predict every image with every model: ``batch_size`` images decoded at once, run through
    each model ``forward_batch_size`` at a time (default: each predictor's own, 8 on the CPU).

    Chunks are decoded and preprocessed in parallel threads (``workers``; default CPUs + 1, at
    most 8), the next chunk while the models run on this one; memory stays bounded for large
    batches. Undecodable files are skipped and listed in
    ``result.skipped``. ``progress(done, total, message)`` is called after each chunk;
    ``on_chunk(refs, images, predictions)`` lets a caller use the decoded images (e.g. to save
    CAM overlays) before they are dropped.
    """
    if not predictors:
        raise ValueError("no models to predict with")
    names = [p.name for p in predictors]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    result = BatchResult(models=names, labels=_task_labels(predictors))
    t0 = time.perf_counter()
    total = len(refs)
    if progress:
        progress(0, total, "decoding images")
    # one preprocessing per distinct data config (models sharing one share the tensors)
    keys = [json.dumps(p.data_config, sort_keys=True, default=str) for p in predictors]
    distinct = list(dict.fromkeys(keys))
    transforms = [predictors[keys.index(k)].transform for k in distinct]
    which = [distinct.index(k) for k in keys]
    starts = list(range(0, total, batch_size))
    n_workers = max(1, workers or min(8, _cpu_count() + 1))
    with ThreadPoolExecutor(max_workers=n_workers) as pool, ThreadPoolExecutor(max_workers=1) as ahead:
        # the next chunk decodes (in the pool's threads) while the models run on this one
        chunks = [list(refs[start : start + batch_size]) for start in starts]
        pending = ahead.submit(_decode_many, chunks[0], limits, pool, transforms) if chunks else None
        for n_chunk, (start, chunk) in enumerate(zip(starts, chunks)):
            decoded = pending.result()  # type: ignore[union-attr]
            if n_chunk + 1 < len(chunks):
                pending = ahead.submit(_decode_many, chunks[n_chunk + 1], limits, pool, transforms)
            good_refs, images, tensors = [], [], []
            for ref, item in zip(chunk, decoded):
                if isinstance(item, InputError):
                    result.skipped.append((ref.name, str(item).removeprefix(f"{ref.name}: ")))
                else:
                    good_refs.append(ref)
                    images.append(item[0])
                    tensors.append(item[1])
            if images:
                # each model runs the chunk in its own forward batches (8 on the CPU: faster per image)
                per_model = {
                    p.name: p.predict_preprocessed(
                        torch.stack([t[which[j]] for t in tensors]), with_cam=with_cam, batch_size=forward_batch_size
                    )
                    for j, p in enumerate(predictors)
                }
                chunk_preds = [{m: per_model[m][i] for m in names} for i in range(len(images))]
                for ref, preds in zip(good_refs, chunk_preds):
                    result.files.append(ref.name)
                    result.predictions.append(preds)
                    result.consensus.append(consensus(list(preds.values())))
                if on_chunk is not None:
                    on_chunk(good_refs, images, chunk_preds)
            if progress:
                done = min(start + batch_size, total)
                progress(done, total, f"{done}/{total} images")
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------
# Loading several checkpoints
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# python -m cellhub predict
# --------------------------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``python -m cellhub predict CHECKPOINT IMAGES_OR_FOLDER...``."""
    p = subparsers.add_parser(
        "predict",
        help="classify images, folders or .zip archives with a checkpoint",
        description="Classify cell images with one checkpoint (Hub id or folder), batched, with "
        "optional Grad-CAM overlays and a CSV of the results.",
    )
    p.add_argument("checkpoint", help="Hub model id or local checkpoint folder")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or .zip archives")
    p.add_argument("--cam-dir", type=Path, default=None, help="write a Grad-CAM overlay PNG per image here")
    p.add_argument("--csv", type=Path, default=None, help="write the results table to this CSV file")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images decoded at once (default 32); each forward pass takes 8 of them on the CPU, 32 on a GPU")
    p.add_argument("--workers", type=int, default=None, help="image-decoding threads (default: CPUs + 1, max 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.set_defaults(func=_cli_predict)


def _cli_predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        predictor = Predictor.from_pretrained(args.checkpoint, device=args.device)
    except Exception as exc:
        raise SystemExit(f"could not load checkpoint {args.checkpoint!r}: {exc}") from exc
    try:
        refs, skipped = collect_images(args.inputs)
    except InputError as exc:
        raise SystemExit(str(exc)) from exc
    if args.cam_dir is not None:
        args.cam_dir.mkdir(parents=True, exist_ok=True)

    used: set[str] = set()

    def save_cams(chunk_refs: list[ImageRef], images: list[Image.Image], preds: list[dict[str, Prediction]]) -> None:
        for ref, img, pred in zip(chunk_refs, images, preds):
            stem = ref.name.replace("/", "__").replace("\\", "__")
            stem = Path(stem).stem or "image"
            out, n = f"{stem}.cam.png", 2
            while out in used:
                out, n = f"{stem}-{n}.cam.png", n + 1
            used.add(out)
            predictor.overlay(img, pred[predictor.name]).save(args.cam_dir / out)

    bar = tqdm(total=len(refs), unit="img", desc="predict")

    def progress(done: int, total: int, _msg: str) -> None:
        bar.update(done - bar.n)

    result = predict_files(
        [predictor],
        refs,
        batch_size=args.batch_size,
        workers=args.workers,
        with_cam=args.cam_dir is not None,
        progress=progress,
        on_chunk=save_cams if args.cam_dir is not None else None,
    )
    bar.close()
    result.skipped = skipped + result.skipped
    for name, preds in zip(result.files, result.predictions):
        pred = preds[predictor.name]
        flag = "  UNCERTAIN (under threshold)" if pred.abstain else ""
        print(f"{name}\t{pred.label}\t{pred.confidence:.3f}{flag}")
    n = len(result.files)
    print(f"\n{n} images in {result.seconds:.2f} s with {predictor.name} ({predictor.task}):")
    for label, count, pct in result.counts():
        print(f"  {label:<14} {count:>6}  {pct:5.1f}%")
    if predictor.threshold is None:
        print("  (this checkpoint has no abstention threshold: low-confidence predictions are not flagged)")
    else:
        flagged = sum(p[predictor.name].abstain for p in result.predictions)
        print(f"  {flagged} under the abstention threshold {predictor.threshold:.3f} (refer for manual review)")
    for name, reason in result.skipped:
        logger.warning("skipped %s: %s", name, reason)
    if args.csv is not None:
        result.write_csv(args.csv)
        print(f"results written to {args.csv}")
    if args.cam_dir is not None:
        print(f"Grad-CAM overlays written to {args.cam_dir}")
    return 0 if n else 2
