"""Fit a checkpoint to a lab's own images without labels: re-estimate its BatchNorm statistics (AdaBN).

A BatchNorm model normalises each layer with the mean and variance it saw in training. Another
lab's stain, camera and scan differ, so those statistics are off there and every later layer sees
shifted inputs: the Kaggle-trained small CNN scores 52% on PBC's images. Re-estimating them on
a folder of the new lab's single-cell crops (no labels) brings it to 81% (RESULTS.md, "Another
lab's images without labels"); 64 images are enough. The weights are not touched. It is not free
where the model already fits the lab: the two-lab recipe adapted to PBC, one of its own labs, lost
5 points there; so the adapted model is to be checked against the original on labelled images.

``python -m cellhub adapt CHECKPOINT IMAGES... --out DIR`` writes the adapted checkpoint, a
normal checkpoint folder (predict, evaluate, the app, timm and transformers load it) whose
``config.json`` and model card record what it was adapted on.
"""
from __future__ import annotations

import datetime as _dt
import logging
import random
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batch import decode_files, distinct_configs
from .evaluation import batchnorm_layers, reestimate_batchnorm_many
from .hub import load_pretrained, save_pretrained
from .images import ImageRef, InputError, Limits, collect_images
from .predict import Predictor
from .transforms import eval_transform, resolve_data_config

__all__ = ["MIN_IMAGES", "AdaptReport", "adapt_to_images", "adapt_predictors", "run_adapt", "describe"]

logger = logging.getLogger(__name__)

#: fewest images ``run_adapt`` accepts by default. RESULTS.md: from 64 random crops of another lab
#: the adapted model is within a point of one adapted on 2,860 (81.3% mean over 5 draws, 79.5 to
#: 82.5, against 81.6%); from 8 to 32 it gains as much on average but varies by up to 8 points.
MIN_IMAGES = 64

#: files of a checkpoint folder that describe the original model, not the adapted one, and are
#: copied along: the training curves (the metrics travel in metrics.json, which the card quotes
#: as the original's)
_COPIED = ("history.json", "metrics.json", "curves.png", "confusion_matrix.png")


@dataclass
class AdaptReport:
    """What :func:`adapt_to_images` used: images, layers re-estimated, and the files it skipped (name, why)."""

    n_images: int = 0
    n_layers: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def adapt_to_images(
    model: nn.Module | Sequence[nn.Module],
    refs: Sequence[ImageRef],
    *,
    limits: Limits | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    check_cells: bool = True,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> AdaptReport:
    """Re-estimate ``model``'s BatchNorm statistics on the images of ``refs`` (labels are never read).

    ``model`` may be several models of one task: the images are then read, checked and decoded
    once, each going through every model's preprocessing. The images go through the model's own
    eval preprocessing (the nucleus crop included) in a
    seeded shuffled order (a folder sorted by class would otherwise tilt the later layers'
    estimates). Files that cannot be read, and (with ``check_cells``) images that are not
    stained blood-cell crops, are left out and listed in the report: they would pull the
    statistics away from the cells the model is to classify. Raises ``ValueError`` when a
    model has no BatchNorm or no image could be used; every model keeps its statistics then.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    for m in models:
        if not batchnorm_layers(m):
            raise ValueError(f"{type(m).__name__} has no BatchNorm layer: there are no statistics to adapt "
                             "(a GroupNorm model normalises each image by itself); use the checkpoint as it is.")
    order = list(refs)
    random.Random(seed).shuffle(order)
    first, which = distinct_configs([resolve_data_config(m) for m in models])
    tfs = [eval_transform(resolve_data_config(models[i])) for i in first]
    task = (getattr(models[0], "cellhub_config", None) or {}).get("task")
    report = AdaptReport()

    def batches() -> Iterator[list[torch.Tensor]]:
        for chunk in decode_files(order, tfs, limits=limits or Limits(max_images=sys.maxsize),
                                  check_cells=check_cells, task=task, batch_size=batch_size, workers=workers):
            report.skipped += chunk.skipped
            if chunk.tensors:
                report.n_images += len(chunk.tensors)
                stacked = [torch.stack([t[k] for t in chunk.tensors]) for k in range(len(tfs))]
                yield [stacked[k] for k in which]
            if progress is not None:
                progress(len(chunk.tensors) + len(chunk.skipped))

    try:
        report.n_layers = sum(reestimate_batchnorm_many(models, batches(), device="cpu"))
    except ValueError as exc:
        why = f" ({len(report.skipped)} skipped; first: {report.skipped[0][0]}: {report.skipped[0][1]})" \
            if report.skipped else ""
        raise ValueError(f"No usable cell images to adapt to{why}.") from exc
    return report


def adapt_predictors(
    predictors: Sequence[Predictor],
    refs: Sequence[ImageRef],
    *,
    min_images: int = MIN_IMAGES,
    limits: Limits | None = None,
    check_cells: bool = True,
    seed: int = 0,
) -> tuple[list[Predictor], AdaptReport, list[str]]:
    """Each predictor adapted to the images of ``refs`` (the app's "adapt to this batch"):
    ``(predictors, report, notes)``.

    A predictor with BatchNorm is reloaded from its checkpoint (``Predictor.source``: the
    predictor's own model is fused for inference), re-estimated on the images and wrapped again,
    named ``"<name> (adapted)"``; one without (GroupNorm, an SVM baseline) is kept as it is, with
    a note. Raises ``ValueError`` when fewer than ``min_images`` images are usable; nothing is
    changed then. The images are read once for all the models of a task.
    """
    out: list[Predictor | None] = []
    notes: list[str] = []
    report = AdaptReport()
    todo: dict[Any, list[tuple[int, Predictor, nn.Module]]] = {}
    for p in predictors:
        model = load_pretrained(p.source, device="cpu") if p.source else None
        if model is None or type(model).__name__ == "SVMClassifier" or not batchnorm_layers(model):
            why = "its checkpoint is not known" if model is None else "it has no BatchNorm statistics to adapt"
            notes.append(f"{p.name}: used as it is ({why})")
            out.append(p)
            continue
        task = (getattr(model, "cellhub_config", None) or {}).get("task")
        todo.setdefault(task, []).append((len(out), p, model))
        out.append(None)
    for group in todo.values():
        report = adapt_to_images([m for _, _, m in group], refs, limits=limits, check_cells=check_cells, seed=seed)
        if report.n_images < min_images:
            raise ValueError(f"Only {report.n_images} of the {len(refs)} images are usable cell crops "
                             f"({len(report.skipped)} skipped); adapting needs at least {min_images} from one lab. "
                             "Nothing was adapted.")
        for i, p, model in group:
            out[i] = _adapted(p, model, report.n_images, seed)
    return [p for p in out if p is not None], report, notes


def _adapted(p: Predictor, model: nn.Module, n_images: int, seed: int) -> Predictor:
    cfg = dict(model.cellhub_config)
    cfg["adaptation"] = {"method": "BatchNorm statistics re-estimated on unlabelled images (AdaBN)",
                         "from": p.source, "images": n_images, "seed": seed}
    model.cellhub_config = cfg
    adapted = Predictor(model, name=f"{p.name} (adapted)", device=p.device, batch_size=p.batch_size,
                        cam_method=p.cam_method)
    adapted.source = p.source
    return adapted


def _check_out(out: Path, checkpoint: str, overwrite: bool) -> None:
    src = Path(checkpoint)
    if src.exists() and src.resolve() == out.resolve():
        raise ValueError(f"--out {out} is the checkpoint itself; write the adapted one to a new folder.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; choose a new folder, or pass --overwrite to replace it.")


def run_adapt(
    checkpoint: str,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    min_images: int = MIN_IMAGES,
    check_cells: bool = True,
    overwrite: bool = False,
    batch_size: int = 64,
    workers: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[Path, AdaptReport]:
    """Load ``checkpoint``, adapt it to the images in ``inputs`` (files, folders, zips), save it to ``out``.

    Nothing is written unless at least ``min_images`` images were usable. The saved
    ``config.json`` gets ``cellhub.adaptation`` (method, source checkpoint, images used and
    skipped, seed, date) and the model card says the figures it quotes are the original's.
    """
    out = Path(out)
    _check_out(out, checkpoint, overwrite)
    for item in map(Path, inputs):  # `adapt CKPT_A CKPT_B images/` would read a checkpoint's files as images
        if item.is_dir() and (item / "config.json").is_file():
            raise ValueError(f"{item} is a checkpoint folder, not images: adapt one checkpoint (the first argument) "
                             "per command, to your lab's cell images.")
    if min_images < 1:
        raise ValueError(f"min_images must be >= 1, got {min_images}")
    try:
        model = load_pretrained(checkpoint)
    except Exception as exc:  # a missing folder, an id not in the cache offline, a refused pickle: say which
        raise ValueError(f"could not load checkpoint {checkpoint!r}: {exc}") from exc
    if type(model).__name__ == "SVMClassifier":
        raise ValueError("An SVM baseline is fitted on its backbone's features; re-estimating the backbone's "
                         "statistics would change the features under the SVM. Adapt a CNN checkpoint instead.")
    if not batchnorm_layers(model):
        raise ValueError(f"{checkpoint} has no BatchNorm layer: there are no statistics to adapt; use it as it is.")
    try:
        refs, skipped = collect_images([str(p) for p in inputs], limits=Limits(max_images=sys.maxsize))
    except InputError as exc:
        raise ValueError(str(exc)) from exc
    if len(refs) < min_images:
        why = f" ({skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise ValueError(f"{len(refs)} image file(s) found in {', '.join(map(str, inputs))}{why}; adapting needs at "
                         f"least {min_images} single-cell crops from your lab (more give a steadier estimate).")
    report = adapt_to_images(model, refs, batch_size=batch_size, workers=workers, check_cells=check_cells,
                             seed=seed, progress=progress)
    report.skipped = skipped + report.skipped
    if report.n_images < min_images:
        raise ValueError(f"Only {report.n_images} of the {len(refs)} images could be used ({len(report.skipped)} "
                         f"skipped, e.g. {report.skipped[0][0]}: {report.skipped[0][1]}); adapting needs at least "
                         f"{min_images}. Nothing was written.")
    cfg = dict(getattr(model, "cellhub_config", None) or {})
    cfg["adaptation"] = {
        "method": "BatchNorm statistics re-estimated on unlabelled images (AdaBN)",
        "from": str(checkpoint),
        "images": report.n_images,
        "skipped": len(report.skipped),
        "batchnorm_layers": report.n_layers,
        "seed": seed,
        "date": _dt.date.today().isoformat(),
    }
    model.cellhub_config = cfg
    if out.is_dir() and overwrite:
        shutil.rmtree(out)
    src = Path(checkpoint)
    copied = [src / f for f in _COPIED if src.is_dir() and (src / f).is_file()]
    out.mkdir(parents=True, exist_ok=True)
    for f in copied:
        shutil.copy2(f, out / f.name)
    save_pretrained(model, out)
    logger.info("adapted %s on %d images -> %s", checkpoint, report.n_images, out)
    return out, report


def describe(report: AdaptReport, out: Path, original: str = "ORIGINAL") -> str:
    """The lines the command line prints after a run."""
    lines = [f"re-estimated {report.n_layers} BatchNorm layers on {report.n_images} image(s); wrote {out}",
             f"use it like any checkpoint (python -m cellhub predict {out} IMAGES, python app.py --models {out}).",
             "Before relying on it, compare it with the original on labelled images of your lab (python -m cellhub "
             f"evaluate {original} {out} LABELLED_DATA: both scored, and the difference with its interval): it "
             "helps most where the original does badly, and can cost accuracy where the original already fits "
             "(see README, 'Adapt a model to your lab's images')."]
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} file(s):")
        lines += [f"  {name}: {why}" for name, why in report.skipped[:10]]
        if len(report.skipped) > 10:
            lines.append(f"  ... and {len(report.skipped) - 10} more")
    return "\n".join(lines)

