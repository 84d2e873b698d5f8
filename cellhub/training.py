"""Training: ``TrainConfig`` + ``fit()`` — Accelerate, bf16 on CUDA, resumable atomic checkpoints.

``fit(cfg)`` loads the data (``cellhub.data``), draws a *grouped* validation split when the
dataset has none (copies of one cell or one patient never straddle train and validation),
decodes every image once (``data.cache_resized``), trains with AdamW + cosine schedule with
linear warm-up, selects the epoch with the best grouped-validation score, chooses an
abstention threshold on validation, evaluates every split with grouped bootstrap CIs and
writes a self-describing checkpoint (``cellhub.hub.save_pretrained``) plus ``metrics.json``,
``history.json``, ``curves.png`` and ``confusion_matrix.png``.

One process on CPU, one GPU, or several GPUs with ``accelerate launch`` — the same code.
Resume state lives in ``output_dir/last_checkpoint/`` (safetensors tensors + JSON, never
pickle), written to a temporary folder and swapped in by rename each epoch, so a kill at any
moment leaves a readable checkpoint; a resumed run reaches the same weights as an
uninterrupted one (same seed, same hardware).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TrainConfig", "fit", "evaluate", "load_training_state", "CHECKPOINT_DIRNAME"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "last_checkpoint"
_STATE_VERSION = 1
_SELECT_METRICS = ("macro_f1", "accuracy", "loss")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint as its recipe)."""

    dataset: str
    model: str = "smallcnn"
    task: str | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    image_size: int | None = None
    pretrained: bool = True
    freeze_backbone: bool = False
    drop_rate: float | None = None
    label_smoothing: float = 0.0
    output_dir: str = "runs/cellhub"
    resume: bool = False
    seed: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    val_fraction: float = 0.2
    select_metric: str = "macro_f1"
    abstention_target: float = 0.99
    num_workers: int | None = None
    #: torch intra-op CPU threads for this run (None: torch's default, one per core)
    num_threads: int | None = None
    mixed_precision: str = "auto"
    channels_last: bool | None = None
    cache_dir: str | None = None
    n_boot: int = 1000
    train_eval_samples: int = 2000
    progress: bool = True
    save_checkpoints: bool = True
    #: extra notes recorded in the recipe (e.g. why pretrained weights were not used)
    notes: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad value and the valid range."""
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}.")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}.")
        if self.max_train_samples is not None and self.max_train_samples < 2:
            raise ValueError(f"max_train_samples must be >= 2, got {self.max_train_samples}.")
        if self.max_eval_samples is not None and self.max_eval_samples < 2:
            raise ValueError(f"max_eval_samples must be >= 2, got {self.max_eval_samples}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.select_metric not in _SELECT_METRICS:
            raise ValueError(f"select_metric {self.select_metric!r} unknown; choose one of {', '.join(_SELECT_METRICS)}.")
        if not 0.0 < self.abstention_target <= 1.0:
            raise ValueError(f"abstention_target must be in (0, 1], got {self.abstention_target}.")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision {self.mixed_precision!r} unknown; choose auto, no, bf16 or fp16.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")

    def recipe(self) -> dict[str, Any]:
        """JSON-friendly record of the run's settings (without machine-local paths)."""
        d = asdict(self)
        for k in ("output_dir", "cache_dir", "resume", "progress", "num_workers", "num_threads", "save_checkpoints"):
            d.pop(k, None)
        return d


# ----------------------------------------------------------------------------------- data
class _PixelDataset(torch.utils.data.Dataset):
    """uint8 HWC pixels (in memory or memory-mapped Arrow) + labels -> (tensor, label)."""

    def __init__(self, cached: Any, transform: Any) -> None:
        self.labels = np.asarray(cached["label"], dtype=np.int64)
        nbytes = len(cached) * int(np.prod(cached.features["pixels"].shape))
        if nbytes <= 2 * 1024**3:  # small enough: hold the decoded images in RAM
            self.pixels: Any = _pixels_array(cached)
            self._arrow = None
        else:
            self.pixels = None
            self._arrow = cached.with_format("numpy", columns=["pixels"])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.pixels is not None:
            px = self.pixels[i]
        else:
            px = np.asarray(self._arrow[int(i)]["pixels"], dtype=np.uint8)
        return self.transform(px), int(self.labels[i])


def _pixels_array(cached: Any) -> np.ndarray:
    """The ``pixels`` column as one uint8 (N, H, W, 3) array, read straight from Arrow.

    (``datasets`` formats Array3D uint8 columns as int64 arrays, 8x the memory; the Arrow
    storage holds the bytes as they are.)
    """
    if getattr(cached, "_indices", None) is not None:
        cached = cached.flatten_indices()
    shape = tuple(cached.features["pixels"].shape)
    try:
        col = cached.data.column("pixels").combine_chunks()
        vals = getattr(col, "storage", col)
        for _ in range(len(shape)):
            vals = vals.flatten()
        out = vals.to_numpy(zero_copy_only=False)
        if out.dtype == np.uint8 and out.size == len(cached) * int(np.prod(shape)):
            return out.reshape((len(cached), *shape))
    except Exception as exc:  # pragma: no cover - a different Arrow layout
        logger.debug("Arrow fast path failed (%s); converting row by row.", exc)
    return np.stack([np.asarray(r["pixels"], dtype=np.uint8) for r in cached.with_format("numpy")])


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


def _subsample(ds: Any, n: int | None, seed: int) -> Any:
    if n is None or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return ds.select(idx)


def _cache_size(ds: Any, size: int) -> tuple[int, int]:
    """The (h, w) at which to decode once so that the model's eval geometry (resize the short
    side to ``size``, center-crop) applied to the cached pixels matches it applied to the original.

    When the images share one aspect ratio (blood-cell crops are all 320x240) the short side is
    scaled to ``size`` keeping the aspect; mixed sizes (malaria cells) are resized to a square.
    """
    from datasets import Image as HFImage
    from PIL import Image

    if "image" not in ds.column_names or len(ds) == 0:
        return size, size
    raw = ds.cast_column("image", HFImage(decode=False))
    idx = np.linspace(0, len(ds) - 1, num=min(len(ds), 32)).astype(int)
    shapes = set()
    for i in idx:
        x = raw[int(i)]["image"]
        try:
            if x.get("bytes"):
                import io

                w, h = Image.open(io.BytesIO(x["bytes"])).size
            else:
                w, h = Image.open(x["path"]).size
        except Exception:  # unreadable header: the loader reports corrupt files; keep a square
            return size, size
        shapes.add((w, h))
    if len(shapes) != 1:
        return size, size
    w, h = shapes.pop()
    if w == h:
        return size, size
    if w > h:
        return size, int(size * w / h)
    return int(size * h / w), size


# ----------------------------------------------------------------------------------- state
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        m = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                m[k] = v
        meta[str(pid)] = m
    return tensors, {"param_groups": sd["param_groups"], "state_meta": meta}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(m) for pid, m in info["state_meta"].items()}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": info["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    return tensors, {
        "numpy": [np_state[0], np.asarray(np_state[1]).tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = info["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = info["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_training_state(
    output_dir: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    best_state: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    info: dict[str, Any],
) -> Path:
    """Write ``output_dir/last_checkpoint/`` atomically (temp folder, fsync, rename swap).

    At every instant either the previous complete checkpoint or the new complete one is in
    place (as ``last_checkpoint`` or, for the instant between two renames, ``last_checkpoint.prev``).
    ``state.json`` is written last and lists the SHA-256 of every tensor file.
    """
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / CHECKPOINT_DIRNAME
    prev = out / f"{CHECKPOINT_DIRNAME}.prev"
    tmp = out / f".{CHECKPOINT_DIRNAME}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    opt_tensors, opt_info = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_info = _rng_state()
    files = {"model.safetensors": model_state, "optimizer.safetensors": opt_tensors, "rng.safetensors": rng_tensors}
    if best_state is not None:
        files["best_model.safetensors"] = best_state
    digests = {}
    for name, tensors in files.items():
        path = tmp / name
        save_file(tensors, str(path))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        digests[name] = _sha256(path)
    sched = dict(scheduler.state_dict())
    # our schedule is a plain function (rebuilt from the config), so nothing of it needs saving
    sched["lr_lambdas"] = [None] * len(sched.get("lr_lambdas", []))
    state = dict(info, version=_STATE_VERSION, files=digests, optimizer=opt_info, rng=rng_info, scheduler=sched)
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(final, prev)
    os.replace(tmp, final)
    _fsync_dir(out)
    if prev.exists():
        shutil.rmtree(prev, ignore_errors=True)
    return final


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    """Load a checkpoint folder, or ``None`` if it is incomplete or corrupt."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        if state.get("version") != _STATE_VERSION:
            logger.warning("Checkpoint %s has state version %s (expected %s); ignoring it.", path,
                           state.get("version"), _STATE_VERSION)
            return None
        tensors = {}
        for name, digest in state["files"].items():
            fp = path / name
            if _sha256(fp) != digest:
                logger.warning("Checkpoint file %s is damaged (checksum mismatch).", fp)
                return None
            tensors[name] = load_file(str(fp))
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("Checkpoint %s is unreadable (%s).", path, exc)
        return None
    state["tensors"] = tensors
    return state


def load_training_state(output_dir: str | Path) -> dict[str, Any] | None:
    """The newest complete checkpoint in ``output_dir`` (``last_checkpoint`` or its ``.prev``), or None."""
    out = Path(output_dir)
    for cand in (out / CHECKPOINT_DIRNAME, out / f"{CHECKPOINT_DIRNAME}.prev"):
        if cand.is_dir():
            state = _read_checkpoint(cand)
            if state is not None:
                return state
    return None


# ----------------------------------------------------------------------------------- helpers
def _cosine_with_warmup(warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return f


def _auto_workers(on_cuda: bool) -> int:
    n = os.cpu_count() or 1
    if on_cuda:
        return min(8, max(1, n - 1))
    # On a CPU-only box the model uses every core; decoding was done once, so the
    # per-image augmentation is cheap enough to run in the main process.
    return 0 if n <= 4 else min(4, n // 4)


def _score(m: dict[str, float], metric: str) -> float:
    return -m["loss"] if metric == "loss" else m[metric]


@torch.no_grad()
def _predict_loader(model: nn.Module, loader: Any, accelerator: Any, channels_last: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(probabilities, labels, mean loss) over a prepared loader, gathered across processes."""
    model.eval()
    probs, labels, losses = [], [], []
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y, reduction="none")
        logits, y, loss = accelerator.gather_for_metrics((logits, y, loss))
        probs.append(torch.softmax(logits, 1).cpu())
        labels.append(y.cpu())
        losses.append(loss.cpu())
    p = torch.cat(probs).numpy().astype(np.float64)
    y = torch.cat(labels).numpy()
    return p, y, float(torch.cat(losses).mean()) if losses else float("nan")


def _quick_scores(p: np.ndarray, y: np.ndarray, loss: float) -> dict[str, float]:
    from .metrics import _macro_f1_from_counts  # noqa: PLC2701 - same package

    pred = p.argmax(1)
    k = p.shape[1]
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(float)
    return {
        "loss": loss,
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "macro_f1": float(_macro_f1_from_counts(np.diag(cm), cm.sum(0), cm.sum(1))),
    }


# ----------------------------------------------------------------------------------- fit
def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train, select on grouped validation, evaluate, save. Returns the final metrics dict.

    See :func:`_fit` for what is returned and written. ``cfg.num_threads`` applies to this
    call only (the previous torch thread count is restored).
    """
    cfg.validate()
    if cfg.num_threads is None:
        return _fit(cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(int(cfg.num_threads))
    try:
        return _fit(cfg)
    finally:
        torch.set_num_threads(before)


def _fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train, select on grouped validation, evaluate, save. Returns the final metrics dict.

    The returned dict (also ``metrics.json``) holds, at top level, the
    :func:`cellhub.metrics.classification_metrics` of the headline split (``test`` when the
    data has one, else the grouped ``validation``) with ``split`` naming it; ``splits`` maps
    every evaluated split (``validation``, ``test``, ``test_simple``, ``train``) to its metrics;
    plus ``best_epoch``, ``select_metric``, ``abstention`` and ``train_test_gap`` (train
    accuracy minus headline accuracy).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from . import data, hub, metrics, models, transforms

    cfg.validate()
    out_dir = Path(cfg.output_dir)
    on_cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=mp, cpu=not on_cuda)
    is_main = accelerator.is_main_process
    # channels_last: faster convolutions on CUDA and, measured here, ~25% faster on CPU too
    channels_last = True if cfg.channels_last is None else bool(cfg.channels_last)
    set_seed(cfg.seed)
    t_start = time.time()

    # ---- data: grouped validation, subsampling, decode once
    dsd, report = data.load_cell_dataset(cfg.dataset, task=cfg.task, cache_dir=cfg.cache_dir,
                                         return_report=True, progress=cfg.progress and is_main)
    task_name = report.task
    if "train" not in dsd:
        raise ValueError(f"{cfg.dataset!r} has no 'train' split (splits: {', '.join(dsd)}); "
                         "training needs one. Evaluate it with `python -m cellhub evaluate` instead.")
    labels = list(dsd["train"].features["label"].names)
    dsd_orig_splits = list(dsd)
    notes = list(cfg.notes)
    if "validation" not in dsd:
        parts = data.split_by_group(dsd["train"], val_fraction=cfg.val_fraction, seed=cfg.seed)
        dsd = dict(dsd)
        dsd["train"], dsd["validation"] = parts["train"], parts["validation"]
        notes.append(f"validation: {cfg.val_fraction:.0%} of train drawn by group (no group on both "
                     f"sides), seed {cfg.seed}")
    splits = {name: dsd[name] for name in ("train", "validation", "test", "test_simple") if name in dsd}
    if len(splits["validation"]) == 0:
        raise ValueError("The validation split is empty: the dataset has too few groups per class to hold "
                         "any out. Add data or pass a dataset with a validation split.")
    splits["train"] = _subsample(splits["train"], cfg.max_train_samples, cfg.seed)
    for name in ("validation", "test", "test_simple"):
        if name in splits:
            splits[name] = _subsample(splits[name], cfg.max_eval_samples, cfg.seed + 1)
    if cfg.max_train_samples or cfg.max_eval_samples:
        notes.append(f"subsampled: max_train_samples={cfg.max_train_samples}, max_eval_samples={cfg.max_eval_samples}")

    model = models.create_model(cfg.model, labels, pretrained=cfg.pretrained, image_size=cfg.image_size,
                                freeze_backbone=cfg.freeze_backbone, drop_rate=cfg.drop_rate)
    model.cellhub_config["task"] = model.cellhub_config.get("task") or task_name
    dcfg = transforms.resolve_data_config(model)
    size = int(dcfg["input_size"][-1])
    cache_hw = _cache_size(splits["train"], size)
    with accelerator.main_process_first():
        cached = {name: data.cache_resized(ds, cache_hw, cfg.cache_dir, progress=cfg.progress and is_main)
                  for name, ds in splits.items()}
    groups = {name: [str(g) for g in ds["group"]] for name, ds in splits.items()}
    train_tf, eval_tf = transforms.train_transform(dcfg), transforms.eval_transform(dcfg)
    train_set = _PixelDataset(cached["train"], train_tf)
    n_workers = _auto_workers(on_cuda) if cfg.num_workers is None else int(cfg.num_workers)
    sampler = _EpochSampler(len(train_set), cfg.seed)
    loader_kw = dict(num_workers=n_workers, pin_memory=on_cuda, persistent_workers=False)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                               drop_last=len(train_set) > cfg.batch_size, **loader_kw)
    eval_sets = {name: _PixelDataset(c, eval_tf) for name, c in cached.items()}
    if len(eval_sets["train"]) > cfg.train_eval_samples:  # the train score only measures the gap
        idx = np.sort(np.random.default_rng(cfg.seed + 2).choice(len(eval_sets["train"]), cfg.train_eval_samples,
                                                                  replace=False))
        eval_sets["train"] = torch.utils.data.Subset(eval_sets["train"], idx.tolist())
        groups["train"] = [groups["train"][i] for i in idx]
    eval_bs = max(cfg.batch_size, 64)
    eval_loaders = {name: torch.utils.data.DataLoader(s, batch_size=eval_bs, shuffle=False, **loader_kw)
                    for name, s in eval_sets.items()}

    # ---- optimisation
    steps_per_epoch = len(train_loader)  # single-process count; AcceleratedScheduler scales for N processes
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = min(int(round(cfg.warmup_epochs * steps_per_epoch)), max(0, total_steps - 1))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"Model {cfg.model!r} has no trainable parameters.")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(warmup_steps, total_steps))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    eval_loaders = {k: accelerator.prepare_data_loader(v) for k, v in eval_loaders.items()}
    raw_model = accelerator.unwrap_model(model)

    history: list[dict[str, Any]] = []
    best_score, best_epoch, best_state = -math.inf, 0, None
    start_epoch = 0
    if cfg.resume:
        state = load_training_state(out_dir)
        if state is None:
            logger.warning("--resume: no readable checkpoint in %s; starting from scratch.", out_dir)
        else:
            saved = state["recipe"]
            mismatched = {k: (saved.get(k), v) for k, v in cfg.recipe().items()
                          if k not in ("epochs", "notes") and saved.get(k) != v}
            if mismatched:
                raise ValueError(
                    "--resume: the checkpoint in "
                    f"{out_dir} was made with different settings: "
                    + "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
                    + ". Use the same settings, or a new --output-dir."
                )
            if saved.get("epochs") != cfg.epochs:
                logger.warning("--resume with epochs=%d (checkpoint had %d): the learning-rate schedule changes.",
                               cfg.epochs, saved.get("epochs"))
            t = state["tensors"]
            raw_model.load_state_dict(t["model.safetensors"], strict=True)
            optimizer.load_state_dict(_unflatten_optimizer(t["optimizer.safetensors"], state["optimizer"]))
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(t["rng.safetensors"], state["rng"])
            history = state["history"]
            best_score, best_epoch = state["best_score"], state["best_epoch"]
            best_state = t.get("best_model.safetensors")
            start_epoch = int(state["epoch"])
            logger.info("Resumed from %s at epoch %d/%d.", out_dir / CHECKPOINT_DIRNAME, start_epoch, cfg.epochs)

    if is_main:
        logger.info("Training %s on %s (%s): %d train / %d validation images, %d epochs, batch %d per device, "
                    "%s, %d worker(s), %d thread(s), %s, channels_last=%s",
                    cfg.model, task_name, cfg.dataset, len(train_set), len(eval_sets["validation"]), cfg.epochs,
                    cfg.batch_size, f"{accelerator.num_processes} x {accelerator.device}", n_workers,
                    torch.get_num_threads(), f"mixed precision {mp}", channels_last)

    # ---- epochs
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)  # accelerate's loader forwards it to our sampler
        model.train()
        t0 = time.time()
        sum_loss = torch.zeros((), device=accelerator.device)
        n_correct = torch.zeros((), device=accelerator.device)
        n_seen = torch.zeros((), device=accelerator.device)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not (cfg.progress and is_main), leave=False)
        for x, y in bar:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with accelerator.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                sum_loss += loss.detach() * len(y)
                n_correct += (logits.argmax(1) == y).sum()
                n_seen += len(y)
            bar.set_postfix(loss=f"{(sum_loss / n_seen).item():.3f}", acc=f"{(n_correct / n_seen).item():.3f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        tot = accelerator.reduce(torch.stack([sum_loss, n_correct, n_seen]), reduction="sum")
        train_seconds = time.time() - t0
        p, yv, vloss = _predict_loader(model, eval_loaders["validation"], accelerator, channels_last)
        val = _quick_scores(p, yv, vloss)
        rec = {
            "epoch": epoch + 1,
            "train_loss": float(tot[0] / tot[2]),
            "train_accuracy": float(tot[1] / tot[2]),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "lr": float(scheduler.get_last_lr()[0]),
            "seconds": round(train_seconds, 2),
            "images_per_second": round(float(tot[2]) / max(train_seconds, 1e-9), 1),
        }
        score = _score(val, cfg.select_metric)
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            best_state = _state_dict_cpu(raw_model)
        rec["best"] = best_epoch == epoch + 1
        history.append(rec)
        if is_main:
            logger.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f macro-F1 %.4f | %.0f img/s%s",
                        epoch + 1, cfg.epochs, rec["train_loss"], rec["train_accuracy"], rec["val_loss"],
                        rec["val_accuracy"], rec["val_macro_f1"], rec["images_per_second"],
                        "  *best*" if rec["best"] else "")
            if cfg.save_checkpoints:
                save_training_state(
                    out_dir, model_state=_state_dict_cpu(raw_model), best_state=best_state,
                    optimizer=optimizer, scheduler=scheduler,
                    info={"epoch": epoch + 1, "history": history, "best_score": best_score,
                          "best_epoch": best_epoch, "recipe": cfg.recipe()},
                )
        accelerator.wait_for_everyone()

    # ---- final evaluation with the selected weights
    if best_state is not None:
        raw_model.load_state_dict(best_state, strict=True)
    results: dict[str, Any] = {}
    probs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    order = [n for n in ("validation", "test", "test_simple", "train") if n in eval_loaders]
    for name, loader in ((n, eval_loaders[n]) for n in order):
        p, y, _ = _predict_loader(model, loader, accelerator, channels_last)
        probs[name] = (p, y)
        results[name] = metrics.classification_metrics(y, p, labels, groups=groups[name], n_boot=cfg.n_boot,
                                                        seed=cfg.seed)
    p_val, y_val = probs["validation"]
    abst = metrics.choose_abstention_threshold(y_val, p_val, target_accuracy=cfg.abstention_target)
    ref = "test" if "test" in results else "validation"
    split_desc = {
        "validation": "validation: grouped hold-out (no source cell / patient also in train)"
                      + ("" if "validation" in dsd_orig_splits else f", {cfg.val_fraction:.0%} of train by group"),
        "test": "test: the dataset's own test split",
    }[ref]
    # metrics.json: the headline split's metrics at top level (what model cards and
    # `python -m cellhub evaluate --json` show), every split under "splits"
    summary: dict[str, Any] = dict(results[ref])
    summary.update({
        "split": {"name": ref, "description": split_desc},
        "splits": results,
        "task": task_name,
        "model": cfg.model,
        "pretrained": bool(raw_model.cellhub_config.get("pretrained")),
        "best_epoch": best_epoch,
        "select_metric": cfg.select_metric,
        "abstention": abst,
        "train_test_gap": {"reference_split": ref,
                           "accuracy": results["train"]["accuracy"] - results[ref]["accuracy"],
                           "train_images_evaluated": results["train"]["n_images"]},
        "n_train_images": len(train_set),
        "n_train_groups": len(set(map(str, splits["train"]["group"]))),
        "seconds": round(time.time() - t_start, 1),
        "notes": notes,
    })

    if is_main:
        cc = raw_model.cellhub_config
        cc["abstention_threshold"] = abst["threshold"]
        cc["abstention"] = {k: abst[k] for k in ("threshold", "target_accuracy", "coverage", "selective_accuracy",
                                                 "met_target", "rule")}
        cc["recipe"] = dict(cfg.recipe(), dataset=_public_dataset_name(cfg.dataset, report.source_kind),
                            task=task_name, pretrained=bool(cc.get("pretrained")), drop_rate=cc.get("drop_rate"),
                            image_size=size, channels_last=channels_last,
                            optimizer="AdamW", schedule="cosine with linear warm-up",
                            augmentation="flips, 90-degree rotations, mild colour jitter",
                            validation="grouped (no source cell / patient on both sides)",
                            best_epoch=best_epoch, notes=notes, mixed_precision=mp,
                            n_train_images=len(train_set), devices=accelerator.num_processes)
        # plots first: the model card written by save_pretrained embeds them when present
        metrics.plot_history(history, out_dir / "curves.png")
        metrics.plot_confusion(results[ref]["confusion_matrix"], labels, out_dir / "confusion_matrix.png",
                               title=f"{cfg.model} on {task_name} - {ref} (accuracy {results[ref]['accuracy']:.3f})")
        to_save = raw_model.to(memory_format=torch.contiguous_format) if channels_last else raw_model
        hub.save_pretrained(to_save, out_dir, metrics=summary, history=history)
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
        logger.info("Best epoch %d. %s accuracy %.4f (95%% CI %s), macro-F1 %.4f; abstain below confidence %.3f. "
                    "Saved to %s", best_epoch, ref, results[ref]["accuracy"], results[ref]["ci95"],
                    results[ref]["macro_f1"], abst["threshold"], out_dir)
    accelerator.wait_for_everyone()
    return summary


def _public_dataset_name(dataset: str, source_kind: str) -> str:
    """How the data is named in a published config: Hub ids and task names as given; a local
    folder by its name and layout only (no machine-local path in a model card)."""
    p = Path(dataset).expanduser()
    if p.exists():
        return f"local folder '{p.name}' ({source_kind})"
    return dataset


# ----------------------------------------------------------------------------------- evaluate
def evaluate(model: nn.Module, dataset: Any, batch_size: int = 64, *, n_boot: int = 1000, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Metrics of ``model`` on one split (``image`` or ``pixels`` column, ``label``, ``group``).

    Uses the model's own preprocessing; see :func:`cellhub.evaluation.predict_dataset`.
    """
    from .evaluation import evaluate_model

    return evaluate_model(model, dataset, batch_size=batch_size, n_boot=n_boot, seed=seed, progress=progress)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a dict, rejecting unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"Unknown training option(s) {unknown}; valid: {sorted(names)}.")
    return TrainConfig(**d)
