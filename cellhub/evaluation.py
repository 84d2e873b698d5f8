"""Honest metrics for any checkpoint on any data (``python -m cellhub evaluate CHECKPOINT DATA``).

CHECKPOINT is a local folder or a Hub id (anything :func:`cellhub.hub.load_pretrained` accepts,
including SVM baselines); DATA is anything :func:`cellhub.data.load_cell_dataset` accepts.
The model's own preprocessing is applied to the original images (the same path as
prediction), and the 95% interval for accuracy comes from a bootstrap over groups (source
cells / patients), so it reflects how many independent cells the number rests on.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as data_mod
from . import transforms
from .batch import iter_decoded
from .data import pixels_array
from .distributed import Processes
from .hub import load_pretrained
from .images import to_rgb
from .metrics import classification_metrics, paired_difference
from .models import resolve_device

__all__ = ["predict_dataset", "batchnorm_layers", "reestimate_batchnorm", "reestimate_batchnorm_many", "adapt_batchnorm", "evaluate_model", "evaluate", "select_split", "run_evaluate",
           "compare_models"]

logger = logging.getLogger(__name__)


def _row_reader(dataset: Any) -> tuple[Any, Any]:
    """``(read, decode)`` for :func:`cellhub.batch.iter_decoded` over a split's rows.

    ``pixels`` (a :func:`cellhub.data.cache_resized` split): read from one uint8 array. ``image``:
    the undecoded rows are sliced in the read-ahead thread and decoded by the ``datasets`` feature
    itself (so EXIF and modes are handled as ``ds[i]["image"]`` would) in the pool's threads.
    """
    if "pixels" in dataset.column_names:
        pixels = pixels_array(dataset)
        return (lambda idx: [pixels[i] for i in idx]), (lambda _i, px: px)
    if "image" not in dataset.column_names:
        raise ValueError(f"Need an 'image' or 'pixels' column; the split has {dataset.column_names}.")
    feature = dataset.features["image"]
    raw = data_mod.undecoded(dataset)

    def read(idx: list[int]) -> list[Any]:
        return raw[idx[0] : idx[-1] + 1]["image"]  # iter_decoded hands contiguous chunks

    def decode(_i: int, row: Any) -> Any:
        return to_rgb(feature.decode_example(row) if isinstance(row, dict) else row)

    return read, decode


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when the model's first 4-D weight is stored that way, else contiguous."""
    for p in model.parameters():
        if p.ndim == 4:
            channels_last = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if channels_last else torch.contiguous_format
    return torch.contiguous_format


def _eval_batches(model: nn.Module, dataset: Any, batch_size: int, num_workers: int | None) -> Iterator[torch.Tensor]:
    """A split's rows in order, through the model's own eval transform, stacked ``batch_size`` at a
    time (decoded ahead in threads by :func:`cellhub.batch.iter_decoded`)."""
    tf = transforms.eval_transform(transforms.resolve_data_config(model))
    read, to_image = _row_reader(dataset)
    for _start, _chunk, tensors in iter_decoded(range(len(dataset)), lambda i, raw: tf(to_image(i, raw)),
                                                read=read, chunk_size=batch_size, workers=num_workers):
        yield torch.stack(tensors)


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Class probabilities (n_images, n_labels) for every row of a split.

    Works for every cellhub model and for :class:`cellhub.svm.SVMClassifier` (its ``forward``
    returns log-probabilities, so the softmax of the output is its probability in both cases).
    The preprocessing is the model's own eval transform (``cellhub.transforms``); rows are decoded
    and preprocessed in ``num_workers`` threads by the batch pipeline (:func:`cellhub.batch.iter_decoded`).
    """
    device = resolve_device(device)
    was_training = model.training
    model.eval().to(device)
    # channels_last: ~1.5x faster CPU convolutions at batch 64 (bench/RESULTS.md; Predictor does the same)
    before = _memory_format(model)
    fmt = torch.channels_last if device.type == "cpu" else before
    model.to(memory_format=fmt)
    out = []
    bar = tqdm(total=len(dataset), desc="evaluating", unit="img", disable=not progress)
    for batch in _eval_batches(model, dataset, batch_size, num_workers):
        logits = model(batch.to(device).contiguous(memory_format=fmt))
        out.append(torch.softmax(logits.float(), dim=1).cpu())
        bar.update(len(batch))
    bar.close()
    model.to(memory_format=before).train(was_training)
    if not out:
        raise ValueError("The evaluation split is empty.")
    return torch.cat(out).numpy().astype(np.float64)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers (of any dimension), in module order: what AdaBN re-estimates."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _merge_small_tail(batches: Iterable[Sequence[torch.Tensor]]) -> Iterator[list[torch.Tensor]]:
    """``batches`` (each a sequence of tensors with one length) one behind, each one joined with the
    next when that one is under half its size."""
    held = None
    for batch in batches:
        batch = list(batch)
        if held is not None and 2 * len(batch[0]) < len(held[0]):
            batch, held = [torch.cat([a, b]) for a, b in zip(held, batch)], None
        if held is not None:
            yield held
        held = batch
    if held is not None:
        yield held


@contextmanager
def _cumulative_statistics(model: nn.Module, device: torch.device, keep: float, seen: list[int]) -> Iterator[None]:
    """``model``'s BatchNorm layers reset to average every batch run through it inside the block;
    on leaving, momenta restored and ``keep`` blended in, or the old statistics back when the
    caller's count of images seen, ``seen[0]``, is still 0. The model is left in eval mode."""
    bns = batchnorm_layers(model)
    momenta = [bn.momentum for bn in bns]
    model.eval().to(device)
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over every batch, not an exponential one
        bn.train()
    try:
        yield
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for bn, (mean, var, n) in zip(bns, saved):
            if not seen[0]:  # nothing was read: the model keeps the statistics it had
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(n)
            elif keep:
                bn.running_mean.mul_(1 - keep).add_(keep * mean)
                bn.running_var.mul_(1 - keep).add_(keep * var)
        model.eval()


def reestimate_batchnorm(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    keep: float = 0.0,
) -> int:
    """Replace every BatchNorm layer's running mean and variance by their average over ``batches``
    (preprocessed image tensors, in the order given): the core of :func:`adapt_batchnorm`.
    With ``keep`` k > 0 the result is k x the layer's own statistics + (1 - k) x the new ones (a
    halfway blend kept little of the gain across labs: RESULTS.md, so ``cellhub adapt`` replaces).

    The average is cumulative (each batch counts once, whatever the layer's momentum); a batch
    under half the size of the one before it (the tail of a folder) is run together with that one,
    so that a few images do not weigh as much as a full batch. No gradients, the weights are
    unchanged, the model is left in eval mode. ``progress(n)`` is
    called with each batch's size. Returns how many layers were re-estimated (0 without BatchNorm,
    and ``batches`` is then not read).
    """
    return reestimate_batchnorm_many([model], ([b] for b in batches), device=device, progress=progress,
                                     keep=keep)[0]


def reestimate_batchnorm_many(
    models: Sequence[nn.Module],
    batches: Iterable[Sequence[torch.Tensor]],
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    keep: float = 0.0,
) -> list[int]:
    """:func:`reestimate_batchnorm` for several models from one pass over the images: each item of
    ``batches`` holds one tensor per model (the same images, each in its model's preprocessing).
    Returns each model's count of re-estimated layers; raises ``ValueError`` (every model keeping
    its statistics) when no image came."""
    if not 0.0 <= keep < 1.0:
        raise ValueError(f"keep must be in [0, 1), got {keep}")
    counts = [len(batchnorm_layers(m)) for m in models]
    active = [i for i, n in enumerate(counts) if n]
    if not active:
        return counts
    device = resolve_device(device)
    seen = [0]
    with ExitStack() as stack:
        for i in active:
            stack.enter_context(_cumulative_statistics(models[i], device, keep, seen))
        with torch.no_grad():
            for batch in _merge_small_tail(batches):
                for i in active:
                    models[i](batch[i].to(device))
                seen[0] += len(batch[0])
                if progress is not None:
                    progress(len(batch[0]))
    if not seen[0]:
        raise ValueError("No images to re-estimate the BatchNorm statistics on.")
    return counts


def adapt_batchnorm(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance on ``dataset``'s images (AdaBN).

    The statistics a BatchNorm model learned describe its training lab's images; on another lab's
    stain and camera they are off, and every layer after them sees shifted inputs. This replaces
    them with the average over ``dataset`` (its labels are not read), in shuffled order (a split
    sorted by class would otherwise tilt the estimate of the later layers), the model's own eval
    preprocessing, no gradients (:func:`reestimate_batchnorm`). The weights are unchanged; the
    model is left in eval mode. Returns how many layers were re-estimated: 0 for a model without
    BatchNorm (a GroupNorm small CNN normalises each image by its own statistics and has nothing
    to adapt). For a folder of a lab's own images, see :func:`cellhub.adapt.adapt_to_images`.
    """
    if not batchnorm_layers(model):
        return 0
    if len(dataset) == 0:
        raise ValueError("No images to re-estimate the BatchNorm statistics on.")
    shuffled = dataset.shuffle(seed=seed)
    bar = tqdm(total=len(shuffled), desc="re-estimating BatchNorm", unit="img", disable=not progress)
    try:
        return reestimate_batchnorm(model, _eval_batches(model, shuffled, batch_size, num_workers), device=device,
                                    progress=bar.update)
    finally:
        bar.close()


def _model_labels(model: nn.Module) -> list[str]:
    cfg = getattr(model, "cellhub_config", None) or {}
    labels = cfg.get("labels") or getattr(model, "labels", None)
    if not labels:
        raise ValueError(f"{type(model).__name__} has no labels in its cellhub_config; load it with "
                         "cellhub.load_pretrained or create it with cellhub.create_model.")
    return [str(x) for x in labels]


def _check_labels(model: nn.Module, dataset: Any) -> list[str]:
    labels = _model_labels(model)
    data_labels = list(getattr(dataset.features["label"], "names", []) or [])
    if data_labels and data_labels != labels:
        raise ValueError(f"The data's labels {data_labels} do not match the model's labels {labels}; "
                         "evaluate a model on data of its own task.")
    return labels


def _metrics(dataset: Any, probs: np.ndarray, labels: list[str], n_boot: int, seed: int) -> dict[str, Any]:
    y = np.asarray(dataset["label"], dtype=np.int64)
    groups = [str(g) for g in dataset["group"]] if "group" in dataset.column_names else None
    return classification_metrics(y, probs, labels, groups=groups, n_boot=n_boot, seed=seed)


def evaluate_model(model: nn.Module, dataset: Any, batch_size: int = 64, *, n_boot: int = 1000, seed: int = 0,
                   progress: bool = True, device: str | torch.device | None = None) -> dict[str, Any]:
    """:func:`cellhub.metrics.classification_metrics` of ``model`` on one split.

    The split's label names must be the model's labels in the same order (both come from the
    task definition); groups come from its ``group`` column when present.
    """
    labels = _check_labels(model, dataset)
    probs = predict_dataset(model, dataset, batch_size=batch_size, progress=progress, device=device)
    return _metrics(dataset, probs, labels, n_boot, seed)


def _evaluate_sharded(model: nn.Module, ds: Any, procs: Processes, *, batch_size: int, n_boot: int, seed: int,
                      progress: bool) -> dict[str, Any] | None:
    """Each process predicts its shard of ``ds``; the main one gathers the probabilities and scores them all."""
    labels = _check_labels(model, ds)
    mine = procs.shard(len(ds))
    part = predict_dataset(model, ds.select(mine), batch_size=batch_size, device=procs.device,
                           progress=progress and procs.is_main) if len(mine) else None
    parts = [p for p in procs.gather(part) if p is not None]
    if not procs.is_main:
        return None
    m = _metrics(ds, np.concatenate(parts), labels, n_boot, seed)
    m["processes"] = procs.world
    return m


#: ``cellhub.evaluate``: metrics of a model on one split (the same function)
evaluate = evaluate_model


def select_split(dsd: Any, split: str | None, source: str = "the data") -> tuple[str, Any]:
    """Pick the split to evaluate: ``split`` if given; the only one if there is one; else an error."""
    names = list(dsd)
    if split is not None:
        if split not in dsd:
            raise ValueError(f"Split {split!r} is not in {source}; its splits are: {', '.join(names)}.")
        return split, dsd[split]
    if len(names) == 1:
        return names[0], dsd[names[0]]
    raise ValueError(f"{source} has several splits ({', '.join(names)}); choose one with --split, "
                     f"e.g. --split {'test' if 'test' in names else names[-1]}.")


def _load_split(model: nn.Module, data: str, split: str | None, *, cache_dir: str | None, progress: bool,
                group_by: str, smear_dir: str | None) -> tuple[Any, str, str, Any]:
    """``(split dataset, its reported name, its key, load report)`` of ``data`` for ``model``'s task."""
    task = (getattr(model, "cellhub_config", None) or {}).get("task")
    dsd, report = data_mod.load_cell_dataset(data, task=task, cache_dir=cache_dir, return_report=True,
                                             progress=progress, group_by=group_by, smear_dir=smear_dir)
    key, ds = select_split(dsd, split, source=str(data))
    if len(ds) == 0:
        raise ValueError(f"Split {key!r} of {data} has no images.")
    # a folder without split folders is scored whole: not a "train" split
    name = "all" if not report.named_splits and split is None else key
    return ds, name, key, report


def _provenance(checkpoint: str, model: nn.Module, data: str, name: str, key: str, report: Any) -> dict[str, Any]:
    return {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": name,
        "task": report.task,
        "model": (getattr(model, "cellhub_config", None) or {}).get("model_name"),
        "skipped_files": len(report.skipped),
        "grouping": {"requested": report.group_by_requested, "group_by": report.group_by,
                     "method": report.group_method.get(key, report.group_by)},
    }


def run_evaluate(checkpoint: str, data: str, split: str | None = None, *, batch_size: int = 64, n_boot: int = 1000,
                 seed: int = 0, cache_dir: str | None = None, progress: bool = True, group_by: str = "auto",
                 smear_dir: str | None = None) -> dict[str, Any] | None:
    """Load a checkpoint and a dataset, evaluate one split, return the metrics (plus provenance).

    ``group_by`` is the unit the interval resamples and the per-group vote counts
    (:data:`cellhub.data.groups.GROUP_BY`); the one used is returned under ``grouping``. Under
    ``accelerate launch`` with several processes each predicts a shard and the main process returns
    the metrics of the whole split; the others return ``None``.
    """
    procs = Processes()
    with procs.main_first():  # the main process fills the caches (validation, groups), then the others read them
        model = load_pretrained(checkpoint)
        ds, name, key, report = _load_split(model, data, split, cache_dir=cache_dir, progress=progress and procs.is_main,
                                            group_by=group_by, smear_dir=smear_dir)
    if procs.world > 1:
        m = _evaluate_sharded(model, ds, procs, batch_size=batch_size, n_boot=n_boot, seed=seed, progress=progress)
        procs.close()
        if m is None:
            return None
    else:
        m = evaluate_model(model, ds, batch_size=batch_size, n_boot=n_boot, seed=seed, progress=progress)
    m.update(_provenance(checkpoint, model, data, name, key, report))
    return m


def compare_models(checkpoints: list[str], data: str, split: str | None = None, *, batch_size: int = 64,
                   n_boot: int = 1000, seed: int = 0, cache_dir: str | None = None, progress: bool = True,
                   group_by: str = "auto", smear_dir: str | None = None) -> dict[str, Any]:
    """Evaluate several checkpoints of one task on the same labelled images, each against the first.

    Returns ``{"models": [metrics of each, as run_evaluate], "comparisons": [...]}``: for each
    checkpoint after the first, its accuracy minus the first one's with a 95% interval from a
    *paired* bootstrap over groups (both scored on the same draw of cells / fields / patients, so
    what they share cancels out), and how many images only one of the two gets right. This is the
    check to run before using a changed model (``cellhub adapt``, ``--init-from``) instead of the
    original: on labelled images of the lab it is meant for.
    """
    if len(checkpoints) < 2:
        raise ValueError("compare_models needs at least two checkpoints (the first is the baseline).")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("Comparing checkpoints runs in one process; run it without `accelerate launch`.")
    models = [load_pretrained(c) for c in checkpoints]
    labels = [_model_labels(m) for m in models]
    tasks = [(getattr(m, "cellhub_config", None) or {}).get("task") for m in models]
    for c, t, lab in zip(checkpoints[1:], tasks[1:], labels[1:]):
        if (t, lab) != (tasks[0], labels[0]):
            raise ValueError(f"{c} is a {t or 'untagged'} model with labels {lab}, but {checkpoints[0]} is a "
                             f"{tasks[0] or 'untagged'} model with labels {labels[0]}; compare models of one task.")
    ds, name, key, report = _load_split(models[0], data, split, cache_dir=cache_dir, progress=progress,
                                        group_by=group_by, smear_dir=smear_dir)
    _check_labels(models[0], ds)
    y = np.asarray(ds["label"], dtype=np.int64)
    groups = [str(g) for g in ds["group"]] if "group" in ds.column_names else None
    results, correct = [], []
    for c, model in zip(checkpoints, models):
        probs = predict_dataset(model, ds, batch_size=batch_size, progress=progress)
        m = _metrics(ds, probs, labels[0], n_boot, seed)
        m.update(_provenance(c, model, data, name, key, report))
        results.append(m)
        correct.append(probs.argmax(1) == y)
    comparisons = []
    for c, ok in zip(checkpoints[1:], correct[1:]):
        diff, ci = paired_difference(correct[0], ok, groups, n_boot=max(n_boot, 1), seed=seed)
        comparisons.append({"baseline": str(checkpoints[0]), "checkpoint": str(c), "accuracy_difference": diff,
                            "ci95": ci, "right_only_baseline": int((correct[0] & ~ok).sum()),
                            "right_only_checkpoint": int((ok & ~correct[0]).sum()), "n_images": int(len(y)),
                            "n_groups": len(set(groups)) if groups is not None else int(len(y))})
    return {"models": results, "comparisons": comparisons}
