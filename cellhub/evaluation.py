"""``python -m cellhub evaluate CHECKPOINT DATA`` — honest metrics for any checkpoint on any data.

CHECKPOINT is a local folder or a Hub id (anything :func:`cellhub.hub.load_pretrained` accepts,
including SVM baselines); DATA is anything :func:`cellhub.data.load_cell_dataset` accepts.
The model's own preprocessing is applied to the original images (the same path as
prediction), and the 95% interval for accuracy comes from a bootstrap over groups (source
cells / patients), so it reflects how many independent cells the number rests on.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["predict_dataset", "evaluate_model", "select_split", "register_cli", "run_evaluate"]

logger = logging.getLogger(__name__)


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, ds: Any, transform: Any) -> None:
        self.ds = ds
        self.column = "pixels" if "pixels" in ds.column_names else "image"
        if self.column == "pixels":
            self.ds = ds.with_format("numpy", columns=["pixels"])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.ds[int(i)][self.column]
        if hasattr(x, "convert"):
            x = x.convert("RGB")
        else:  # datasets hands Array3D uint8 back as int64
            x = np.asarray(x, dtype=np.uint8)
        return self.transform(x)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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
    The preprocessing is the model's own eval transform (``cellhub.transforms``).
    """
    from tqdm.auto import tqdm

    from . import transforms

    device = torch.device(device) if device is not None else _default_device()
    tf = transforms.eval_transform(transforms.resolve_data_config(model))
    if num_workers is None:
        cpus = os.cpu_count() or 1
        num_workers = 0 if cpus <= 2 else min(4, cpus - 1)
    loader = torch.utils.data.DataLoader(_ImageDataset(dataset, tf), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval().to(device)
    out = []
    for x in tqdm(loader, desc="evaluating", unit="batch", disable=not progress):
        logits = model(x.to(device))
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    model.train(was_training)
    if not out:
        raise ValueError("The evaluation split is empty.")
    return torch.cat(out).numpy().astype(np.float64)


def _model_labels(model: nn.Module) -> list[str]:
    cfg = getattr(model, "cellhub_config", None) or {}
    labels = cfg.get("labels") or getattr(model, "labels", None)
    if not labels:
        raise ValueError(f"{type(model).__name__} has no labels in its cellhub_config; load it with "
                         "cellhub.load_pretrained or create it with cellhub.create_model.")
    return [str(x) for x in labels]


def evaluate_model(model: nn.Module, dataset: Any, batch_size: int = 64, *, n_boot: int = 1000, seed: int = 0,
                   progress: bool = True, device: str | torch.device | None = None) -> dict[str, Any]:
    """:func:`cellhub.metrics.classification_metrics` of ``model`` on one split.

    The split's label names must be the model's labels in the same order (both come from the
    task definition); groups come from its ``group`` column when present.
    """
    from .metrics import classification_metrics

    labels = _model_labels(model)
    data_labels = list(getattr(dataset.features["label"], "names", []) or [])
    if data_labels and data_labels != labels:
        raise ValueError(f"The data's labels {data_labels} do not match the model's labels {labels}; "
                         "evaluate a model on data of its own task.")
    probs = predict_dataset(model, dataset, batch_size=batch_size, progress=progress, device=device)
    y = np.asarray(dataset["label"], dtype=np.int64)
    groups = [str(g) for g in dataset["group"]] if "group" in dataset.column_names else None
    return classification_metrics(y, probs, labels, groups=groups, n_boot=n_boot, seed=seed)


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


def run_evaluate(checkpoint: str, data: str, split: str | None = None, *, batch_size: int = 64, n_boot: int = 1000,
                 seed: int = 0, cache_dir: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Load a checkpoint and a dataset, evaluate one split, return the metrics (plus provenance)."""
    from . import data as data_mod
    from . import hub

    model = hub.load_pretrained(checkpoint)
    task = (getattr(model, "cellhub_config", None) or {}).get("task")
    dsd, report = data_mod.load_cell_dataset(data, task=task, cache_dir=cache_dir, return_report=True,
                                             progress=progress)
    name, ds = select_split(dsd, split, source=str(data))
    if len(ds) == 0:
        raise ValueError(f"Split {name!r} of {data} has no images.")
    m = evaluate_model(model, ds, batch_size=batch_size, n_boot=n_boot, seed=seed, progress=progress)
    m.update({
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": name,
        "task": report.task,
        "model": (getattr(model, "cellhub_config", None) or {}).get("model_name"),
        "skipped_files": len(report.skipped),
    })
    return m


def _cli(args: argparse.Namespace) -> int:
    try:
        m = run_evaluate(args.checkpoint, args.data, args.split, batch_size=args.batch_size, n_boot=args.n_boot,
                         seed=args.seed, cache_dir=args.cache_dir, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .metrics import format_metrics_table

    print(format_metrics_table(m, title=f"{m['model'] or 'model'} ({args.checkpoint}) on {args.data} [{m['split']}]"))
    if m["skipped_files"]:
        print(f"\nnote: {m['skipped_files']} unreadable file(s) were skipped (see the log).")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(m, indent=2))
        print(f"\nwrote {path}")
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to ``python -m cellhub``."""
    p = subparsers.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a dataset (grouped bootstrap CI)",
        description="Evaluate CHECKPOINT (local folder or Hub id) on DATA (Kaggle folder, image folder, "
                    "saved dataset or Hub id): accuracy with a 95% CI from a bootstrap over groups "
                    "(cells / patients), macro-F1, per-class precision/recall/F1, confusion matrix, "
                    "ROC AUC (two classes) and expected calibration error.",
    )
    p.add_argument("checkpoint", help="checkpoint folder or Hugging Face Hub model id")
    p.add_argument("data", help="dataset: local folder, Hub dataset id or task name")
    p.add_argument("--split", default=None, help="split to evaluate (required when DATA has several)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the metrics as JSON to OUT")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the CI (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--cache-dir", default=None, help="cache for dataset validation / smear matching")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cli)
    return p
