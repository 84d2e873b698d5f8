"""``fit(cfg)``: train a registered model — Accelerate, bf16 on CUDA, resumable atomic checkpoints.

``fit`` prepares the data (:mod:`cellhub.training.pipeline`: grouped validation, decode once),
trains with AdamW and transformers' cosine schedule with linear warm-up, selects the epoch with
the best grouped-validation score, evaluates every split with grouped bootstrap CIs and writes a
self-describing checkpoint plus ``metrics.json``, ``history.json``, ``curves.png`` and
``confusion_matrix.png``.

One process on CPU, one GPU, or several GPUs with ``accelerate launch`` — the same code. Resume
state lives in ``output_dir/last_checkpoint/`` (:mod:`cellhub.training.state`); a resumed run
reaches the same weights as an uninterrupted one (same seed, same hardware).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import data, metrics, models, transforms
from .config import TrainConfig
from .pipeline import (EVAL_ORDER, PreparedData, auto_workers, cache_size, model_from_checkpoint, evaluate_splits, prepare_splits, public_dataset_name,
                       summarise, write_checkpoint)
from .state import (CHECKPOINT_DIRNAME, save_holdout, load_training_state, restore_rng_state, save_training_state, state_dict_cpu,
                    unflatten_optimizer)

__all__ = ["fit"]

logger = logging.getLogger(__name__)


class _EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffles with its own generator seeded by (seed, epoch): the order never depends on
    how many epochs ran in this process, which is what makes resume exact."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class _Run:
    """What one ``fit`` call holds while it trains."""

    cfg: TrainConfig
    accelerator: Any
    is_main: bool
    channels_last: bool
    mixed_precision: str
    prepared: PreparedData
    model: nn.Module  # prepared by accelerate
    raw_model: nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loaders: dict[str, Any]
    groups: dict[str, list[str]]
    image_size: int
    n_workers: int
    #: the registry name of what trains (the checkpoint's with --init-from, else cfg.model)
    model_name: str
    #: with ``cfg.ema``: the moving average of the weights (``torch.optim.swa_utils.AveragedModel``)
    ema: Any = None

    @property
    def scored(self) -> nn.Module:
        """The weights each epoch is scored, selected and saved with: the average with ``--ema``."""
        return self.ema.module if self.ema is not None else self.raw_model


def _score(m: dict[str, float], metric: str) -> float:
    return -m["loss"] if metric == "loss" else m[metric]


@torch.no_grad()
def _predict_loader(run: _Run, loader: Any, *, ema: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """(probabilities, labels, mean loss) over a prepared loader, gathered across processes
    (``ema``: with the moving average's weights when the run keeps one)."""
    model = run.ema.module if ema and run.ema is not None else run.model
    model.eval()
    probs, labels, losses = [], [], []
    for x, y in loader:
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with run.accelerator.autocast():
            logits = model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, reduction="none")
        logits, y, loss = run.accelerator.gather_for_metrics((logits, y, loss))
        probs.append(torch.softmax(logits, 1).cpu())
        labels.append(y.cpu())
        losses.append(loss.cpu())
    p = torch.cat(probs).numpy().astype(np.float64)
    y = torch.cat(labels).numpy()
    return p, y, float(torch.cat(losses).mean()) if losses else float("nan")


def _quick_scores(p: np.ndarray, y: np.ndarray, loss: float) -> dict[str, float]:
    pred = p.argmax(1)
    return {
        "loss": loss,
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "macro_f1": metrics.macro_f1(y, pred),
    }


def fit(cfg: TrainConfig, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, select on grouped validation, evaluate, save. Returns the final metrics dict.

    The returned dict (also ``metrics.json``) holds, at top level, the
    :func:`cellhub.metrics.classification_metrics` of the headline split (``test`` when the
    data has one, else the grouped ``validation``) with ``split`` naming it; ``splits`` maps
    every evaluated split (``validation``, ``test``, ``test_simple``, ``train``) to its metrics;
    plus ``best_epoch``, ``select_metric``, ``abstention`` and ``train_test_gap`` (train
    accuracy minus headline accuracy). ``cfg.num_threads`` applies to this call only (the
    previous torch thread count is restored). ``extra``: more fields for ``metrics.json`` and the
    card (the cross-validation results of :func:`cellhub.training.cross_validate`).

    With ``cfg.cv_fold`` set, the run is that fold of a ``cfg.cv``-fold cross-validation: it
    scores the fold's ``holdout`` groups and writes their probabilities to ``holdout.npz``.
    """
    cfg.validate()
    if cfg.num_threads is None:
        return _fit(cfg, extra)
    before = torch.get_num_threads()
    torch.set_num_threads(int(cfg.num_threads))
    try:
        return _fit(cfg, extra)
    finally:
        torch.set_num_threads(before)


def _fit(cfg: TrainConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    t_start = time.time()
    run = _setup(cfg)
    history, best = _resume(run)
    if run.is_main:
        _log_start(run)
    for epoch in range(len(history), cfg.epochs):
        rec, best = _train_epoch(run, epoch, best)
        history.append(rec)
        if run.is_main and cfg.save_checkpoints:
            save_training_state(
                cfg.output_dir, model_state=state_dict_cpu(run.raw_model), best_state=best["state"],
                optimizer=run.optimizer, scheduler=run.scheduler, ema_state=state_dict_cpu(run.ema) if run.ema is not None else None,
                info={"epoch": epoch + 1, "history": history, "best_score": best["score"],
                      "best_epoch": best["epoch"], "recipe": cfg.recipe()},
            )
        run.accelerator.wait_for_everyone()
    if best["state"] is not None:
        run.raw_model.load_state_dict(best["state"], strict=True)
    elif run.ema is not None:  # no epoch was selectable: the average's last weights, as scored
        run.raw_model.load_state_dict(state_dict_cpu(run.scored), strict=True)
    summary = _evaluate_and_save(run, history, best["epoch"], t_start, extra or {})
    run.accelerator.wait_for_everyone()
    return summary


def _setup(cfg: TrainConfig) -> _Run:
    """Accelerator, data (grouped validation, decoded once), model, loaders, optimiser, schedule."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    on_cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mp, cpu=not on_cuda)
    is_main = accelerator.is_main_process
    # channels_last: faster convolutions on CUDA and, measured here, ~25% faster on CPU too
    channels_last = True if cfg.channels_last is None else bool(cfg.channels_last)
    set_seed(cfg.seed)
    prepared = prepare_splits(cfg.dataset, task=cfg.task, cache_dir=cfg.cache_dir, val_fraction=cfg.val_fraction,
                              seed=cfg.seed, max_train_samples=cfg.max_train_samples,
                              max_eval_samples=cfg.max_eval_samples, progress=cfg.progress and is_main,
                              notes=cfg.notes, group_by=cfg.group_by,
                              cv=(int(cfg.cv), int(cfg.cv_fold)) if cfg.cv_fold is not None else None)
    if cfg.init_from:
        model = model_from_checkpoint(cfg.init_from, prepared.labels, image_size=cfg.image_size,
                                      freeze_backbone=cfg.freeze_backbone, drop_rate=cfg.drop_rate,
                                      notes=prepared.notes)
    else:
        model = models.create_model(cfg.model, prepared.labels, pretrained=cfg.pretrained, image_size=cfg.image_size,
                                    freeze_backbone=cfg.freeze_backbone, drop_rate=cfg.drop_rate,
                                    pretrained_weights=cfg.pretrained_weights, norm=cfg.norm,
                                    depths=cfg.depths)
    model.cellhub_config["task"] = model.cellhub_config.get("task") or prepared.task
    # training sees the decode-once cache, resampled bilinearly: predict must resize new images so too
    models.set_interpolation(model, data.CACHE_INTERPOLATION)
    if cfg.cell_crop != "none":
        model.cellhub_config["cell_crop"] = transforms.cell_crop_spec(cfg.cell_crop)
    if cfg.stain_norm != "none":
        model.cellhub_config["stain_norm"] = transforms.stain_norm_spec(cfg.stain_norm)
    dcfg = transforms.resolve_data_config(model)
    size = int(dcfg["input_size"][-1])
    crop = dcfg["cell_crop"]
    hw = (size, size) if crop else cache_size(prepared.splits["train"], size)
    with accelerator.main_process_first():  # decoded once, cell-cropped when the model asks for it
        cached = {name: data.cache_resized(ds, hw, cfg.cache_dir, progress=cfg.progress and is_main, cell_crop=crop)
                  for name, ds in prepared.splits.items()}
    groups = {name: [str(g) for g in ds["group"]] for name, ds in prepared.splits.items()}
    train_set = data.ImageRowDataset(cached["train"], transforms.train_transform(
        dcfg, jitter=cfg.stain_jitter, scale_jitter=cfg.scale_jitter, cell_crop=False))
    n_workers = auto_workers(on_cuda) if cfg.num_workers is None else int(cfg.num_workers)
    loader_kw = dict(num_workers=n_workers, pin_memory=on_cuda, persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size,
                                               sampler=_EpochSampler(len(train_set), cfg.seed),
                                               drop_last=len(train_set) > cfg.batch_size, **loader_kw)
    eval_tf = transforms.eval_transform(dcfg, cell_crop=False)
    eval_sets: dict[str, Any] = {name: data.ImageRowDataset(c, eval_tf) for name, c in cached.items()}
    if len(eval_sets["train"]) > cfg.train_eval_samples:  # the train score only measures the gap
        idx = np.sort(np.random.default_rng(cfg.seed + 2).choice(len(eval_sets["train"]), cfg.train_eval_samples,
                                                                  replace=False))
        eval_sets["train"] = torch.utils.data.Subset(eval_sets["train"], idx.tolist())
        groups["train"] = [groups["train"][i] for i in idx]
    eval_loaders = {name: torch.utils.data.DataLoader(s, batch_size=max(cfg.batch_size, 64), shuffle=False,
                                                      **loader_kw) for name, s in eval_sets.items()}

    steps_per_epoch = len(train_loader)  # single-process count; AcceleratedScheduler scales for N processes
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(0, total_steps - 1))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"Model {cfg.model!r} has no trainable parameters.")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                                num_training_steps=total_steps)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {k: accelerator.prepare_data_loader(v) for k, v in eval_loaders.items()}
    raw = accelerator.unwrap_model(model)
    return _Run(cfg=cfg, accelerator=accelerator, is_main=is_main, channels_last=channels_last, mixed_precision=mp,
                prepared=prepared, model=model, raw_model=raw, optimizer=optimizer,
                scheduler=scheduler, train_loader=train_loader, eval_loaders=eval_loaders, groups=groups,
                image_size=size, n_workers=n_workers, model_name=str(raw.cellhub_config["model_name"]),
                ema=ema_model(raw, cfg.ema) if cfg.ema else None)


def _resume(run: _Run) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(history, best)`` from ``output_dir/last_checkpoint`` with ``--resume``, else a fresh start."""
    cfg = run.cfg
    fresh: dict[str, Any] = {"score": -math.inf, "epoch": 0, "state": None}
    if not cfg.resume:
        return [], fresh
    out_dir = Path(cfg.output_dir)
    state = load_training_state(out_dir)
    if state is None:
        logger.warning("--resume: no readable checkpoint in %s; starting from scratch.", out_dir)
        return [], fresh
    saved = state["recipe"]
    # a setting the checkpoint predates (added to TrainConfig since) was at its default then
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(TrainConfig)}
    mismatched = {k: (saved.get(k, defaults.get(k)), v) for k, v in cfg.recipe().items()
                  if k not in ("epochs", "notes") and saved.get(k, defaults.get(k)) != v}
    if mismatched:
        raise ValueError(
            f"--resume: the checkpoint in {out_dir} was made with different settings: "
            + "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
            + ". Use the same settings, or a new --output-dir."
        )
    if saved.get("epochs") != cfg.epochs:
        logger.warning("--resume with epochs=%d (checkpoint had %d): the learning-rate schedule changes.",
                       cfg.epochs, saved.get("epochs"))
    t = state["tensors"]
    run.raw_model.load_state_dict(t["model.safetensors"], strict=True)
    run.optimizer.load_state_dict(unflatten_optimizer(t["optimizer.safetensors"], state["optimizer"]))
    run.scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(t["rng.safetensors"], state["rng"])
    if run.ema is not None:
        if "ema.safetensors" not in t:
            raise ValueError(f"--resume: the checkpoint in {out_dir} holds no moving average; it was not made with --ema.")
        run.ema.load_state_dict(t["ema.safetensors"], strict=True)
    history = state["history"][: int(state["epoch"])]
    logger.info("Resumed from %s at epoch %d/%d.", out_dir / CHECKPOINT_DIRNAME, int(state["epoch"]), cfg.epochs)
    return history, {"score": state["best_score"], "epoch": state["best_epoch"],
                     "state": t.get("best_model.safetensors")}


def ema_model(model: nn.Module, decay: float) -> nn.Module:
    """A moving average of ``model``'s weights and buffers (``torch.optim.swa_utils.AveragedModel``;
    call ``update_parameters(model)`` after each step). Its first update copies the model; the
    decay then ramps up as ``min(decay, (1 + t) / (10 + t))`` after t updates (TensorFlow's
    ``num_updates`` rule), so that the average does not hold on to the first steps' weights: with a
    fixed decay of 0.998 (136 steps an epoch) about a fifth of the average's weight was still on the
    first epoch at epoch 7 of 10, and it scored 77% on validation where the raw weights scored 93%.
    Integer buffers (BatchNorm's batch count) follow the model."""
    from torch.optim.swa_utils import AveragedModel

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        t = float(n_averaged)
        d = min(float(decay), (1.0 + t) / (10.0 + t))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, 1.0 - d)
            else:
                a.copy_(c)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def _log_start(run: _Run) -> None:
    cfg, acc = run.cfg, run.accelerator
    logger.info("Training %s on %s (%s): %d train / %d validation images, %d epochs, batch %d per device, "
                "%s, %d worker(s), %d thread(s), %s, channels_last=%s",
                run.model_name, run.prepared.task, cfg.dataset, len(run.prepared.splits["train"]),
                len(run.prepared.splits["validation"]), cfg.epochs, cfg.batch_size,
                f"{acc.num_processes} x {acc.device}", run.n_workers, torch.get_num_threads(),
                f"mixed precision {run.mixed_precision}", run.channels_last)


def mixup_batch(x: torch.Tensor, alpha: float, seed: int, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup: ``(lam * x + (1 - lam) * x[perm], perm, lam)``, ``lam ~ Beta(alpha, alpha)`` and the
    partner permutation drawn from ``(seed, epoch, step)`` alone, so a resumed run draws the same."""
    rng = np.random.default_rng([seed, epoch, step])
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    return x.mul(lam).add_(x[perm], alpha=1.0 - lam), perm, lam


def batch_loss(logits: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0,
               drop: float = 0.0, y2: torch.Tensor | None = None, lam: float = 1.0) -> torch.Tensor:
    """The training loss of one batch: mean cross-entropy, the ``drop`` fraction (rounded, at most
    all but one) of the examples with the largest loss left out (loss truncation against label
    noise: a mislabeled cell the model already reads right costs the most). With mixup, each
    example's loss is ``lam * CE(y) + (1 - lam) * CE(y2)``."""
    per = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing, reduction="none")
    if y2 is not None and lam < 1.0:
        per = lam * per + (1.0 - lam) * F.cross_entropy(logits.float(), y2, label_smoothing=label_smoothing,
                                                        reduction="none")
    n_drop = min(int(round(drop * len(per))), len(per) - 1)
    if n_drop <= 0:
        return per.mean()
    return per.topk(len(per) - n_drop, largest=False).values.mean()


def _train_epoch(run: _Run, epoch: int, best: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One epoch of training and its grouped-validation scores; ``best`` updated when it improves."""
    cfg, acc = run.cfg, run.accelerator
    run.train_loader.set_epoch(epoch)  # accelerate's loader forwards it to our sampler
    run.model.train()
    t0 = time.time()
    totals = torch.zeros(3, device=acc.device)  # summed loss, correct, seen
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
               disable=not (cfg.progress and run.is_main), leave=False)
    for step, (x, y) in enumerate(bar):
        y2, lam = None, 1.0
        if cfg.mixup > 0:  # train accuracy is then counted against each blend's first image
            x, perm, lam = mixup_batch(x, cfg.mixup, cfg.seed, epoch, step * acc.num_processes + acc.process_index)
            y2 = y[perm]
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with acc.autocast():
            logits = run.model(x)
            loss = batch_loss(logits, y, label_smoothing=cfg.label_smoothing,
                              drop=cfg.loss_drop if epoch >= 1 else 0.0, y2=y2, lam=lam)
        acc.backward(loss)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update_parameters(run.raw_model)
        with torch.no_grad():
            totals += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum().float(),
                                   torch.tensor(float(len(y)), device=acc.device)])
        bar.set_postfix(loss=f"{(totals[0] / totals[2]).item():.3f}", acc=f"{(totals[1] / totals[2]).item():.3f}",
                        lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    tot = acc.reduce(totals, reduction="sum")
    seconds = time.time() - t0
    p, yv, vloss = _predict_loader(run, run.eval_loaders["validation"], ema=True)
    val = _quick_scores(p, yv, vloss)
    rec = {"epoch": epoch + 1, "train_loss": float(tot[0] / tot[2]), "train_accuracy": float(tot[1] / tot[2]),
           "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
           "lr": float(run.scheduler.get_last_lr()[0]), "seconds": round(seconds, 2),
           "images_per_second": round(float(tot[2]) / max(seconds, 1e-9), 1)}
    score = _score(val, cfg.select_metric)
    if epoch + 1 >= cfg.select_from_epoch and score > best["score"]:
        best = {"score": score, "epoch": epoch + 1, "state": state_dict_cpu(run.scored)}
    rec["best"] = best["epoch"] == epoch + 1
    if run.is_main:
        logger.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | %.0f img/s%s",
                    epoch + 1, cfg.epochs, rec["train_loss"], rec["train_accuracy"], rec["val_loss"],
                    rec["val_accuracy"], rec["val_macro_f1"], rec["images_per_second"],
                    "  *best*" if rec["best"] else "")
    return rec, best


def _evaluate_and_save(run: _Run, history: list[dict[str, Any]], best_epoch: int, t_start: float,
                       extra: dict[str, Any]) -> dict[str, Any]:
    """Score every split with the selected weights; on the main process write the checkpoint."""
    cfg = run.cfg
    probs = {}
    for name in (n for n in EVAL_ORDER if n in run.eval_loaders):
        p, y, _ = _predict_loader(run, run.eval_loaders[name])
        probs[name] = (p, y)
    results = evaluate_splits(probs, run.groups, run.prepared.labels, n_boot=cfg.n_boot, seed=cfg.seed,
                              sources=run.prepared.sources)
    cc = run.raw_model.cellhub_config
    summary = summarise(results, probs["validation"], run.prepared, abstention_target=cfg.abstention_target,
                        t_start=t_start, model=run.model_name, pretrained=bool(cc.get("pretrained")),
                        best_epoch=best_epoch, select_metric=cfg.select_metric, **extra)
    if run.is_main:
        if "holdout" in probs:  # one fold of a cross-validation: its out-of-fold predictions
            held = run.prepared.splits["holdout"]
            save_holdout(cfg.output_dir, *probs["holdout"], run.groups["holdout"],
                         files=held["file"] if "file" in held.column_names else None)
        recipe = dict(cfg.recipe(), model=run.model_name,
                      init_from=public_dataset_name(cfg.init_from, "checkpoint") if cfg.init_from else None,
                      dataset=public_dataset_name(cfg.dataset, run.prepared.source_kinds),
                      task=run.prepared.task, pretrained=bool(cc.get("pretrained")), drop_rate=cc.get("drop_rate"),
                      image_size=run.image_size, channels_last=run.channels_last,
                      optimizer="AdamW", schedule="cosine with linear warm-up",
                      augmentation=f"flips, 90-degree rotations, colour jitter {cfg.stain_jitter:g}"
                                   + (f", zoom up to {1 + cfg.scale_jitter:g}x" if cfg.scale_jitter else ""),
                      cell_crop=cc.get("cell_crop"),
                      validation="grouped (no source cell / patient on both sides)",
                      best_epoch=best_epoch, notes=run.prepared.notes, mixed_precision=run.mixed_precision,
                      n_train_images=len(run.prepared.splits["train"]), devices=run.accelerator.num_processes)
        model = run.raw_model.to(memory_format=torch.contiguous_format) if run.channels_last else run.raw_model
        write_checkpoint(model, cfg.output_dir, summary, recipe, title=f"{run.model_name} on {run.prepared.task}",
                         history=history)
        logger.info("Best epoch %d.", best_epoch)
    return summary
