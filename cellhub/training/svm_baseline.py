"""The "CNN features + SVM" baseline, trained and evaluated through the same pipeline as ``fit``.

The backbone is a registered model (ImageNet weights unless ``pretrained=False``) or any saved
cellhub CNN; its pooled features are cached on disk; the classifier is a one-vs-one SVC
(:class:`cellhub.svm.SVMClassifier`, saved without pickle).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import data, hub, models
from ..models import resolve_device
from ..svm import SVMClassifier, extract_features
from .pipeline import cache_size, evaluate_splits, prepare_splits, public_dataset_name, summarise, write_checkpoint

__all__ = ["train_svm_baseline"]

logger = logging.getLogger(__name__)


def _backbone(backbone: str, backbone_checkpoint: str | None, labels: list[str], *, pretrained: bool,
              image_size: int | None, notes: list[str]) -> tuple[Any, str]:
    """The feature extractor and its registry name: a saved CNN checkpoint, or a registered model."""
    if not backbone_checkpoint:
        return models.create_model(backbone, labels, pretrained=pretrained, image_size=image_size), backbone
    net = hub.load_pretrained(backbone_checkpoint)
    if isinstance(net, SVMClassifier) or not hasattr(net, "forward_features"):
        raise ValueError(f"{backbone_checkpoint} is not a CNN checkpoint with forward_features; "
                         "pass a folder written by train/finetune.py.")
    notes.append(f"backbone weights from {backbone_checkpoint}")
    return net, net.cellhub_config.get("model_name") or backbone


def train_svm_baseline(
    dataset: str,
    *,
    backbone: str = "resnet50",
    pretrained: bool = True,
    backbone_checkpoint: str | None = None,
    task: str | None = None,
    image_size: int | None = None,
    C: float = 1.0,
    kernel: str = "rbf",
    gamma: float | str = "scale",
    output_dir: str | Path = "runs/svm",
    cache_dir: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    n_boot: int = 1000,
    abstention_target: float = 0.99,
    batch_size: int = 64,
    train_eval_samples: int = 2000,
    progress: bool = True,
    group_by: str = "auto",
) -> dict[str, Any]:
    """Features from a backbone + one-vs-one SVM, evaluated like every other cellhub model.

    The backbone is a registered model (ImageNet weights unless ``pretrained=False``) or, with
    ``backbone_checkpoint``, any saved cellhub model (a folder or Hub id). Validation is grouped
    (``data.split_by_group``) when the data has none, exactly as in training. Writes the SVM
    checkpoint (``cellhub.hub.save_pretrained``), ``metrics.json`` and ``confusion_matrix.png`` to
    ``output_dir`` and returns the metrics (same layout as :func:`cellhub.training.fit`).
    """
    t0 = time.time()
    prepared = prepare_splits(dataset, task=task, cache_dir=cache_dir, val_fraction=val_fraction, seed=seed,
                              max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
                              progress=progress, group_by=group_by)
    labels = prepared.labels
    net, backbone_name = _backbone(backbone, backbone_checkpoint, labels, pretrained=pretrained,
                                   image_size=image_size, notes=prepared.notes)
    net.eval()
    device = resolve_device()
    net.to(device)
    size = int(net.cellhub_config["pretrained_cfg"]["input_size"][-1])
    hw = cache_size(prepared.splits["train"], size)
    feat_dir = Path(cache_dir) / "features" if cache_dir else None
    feats, ys, groups = {}, {}, {}
    for name, ds in prepared.splits.items():
        cached = data.cache_resized(ds, hw, cache_dir, progress=progress)
        feats[name] = extract_features(net, cached, cache_dir=feat_dir, batch_size=batch_size, device=device,
                                       progress=progress)
        ys[name] = np.asarray(cached["label"], dtype=np.int64)
        groups[name] = [str(g) for g in cached["group"]]

    clf = SVMClassifier(labels, backbone=net.cpu(), backbone_name=backbone_name, C=C, kernel=kernel, gamma=gamma,
                        task=prepared.task, seed=seed)
    logger.info("Fitting SVC (%s, C=%g, one-vs-one) on %d x %d features", kernel, C, *feats["train"].shape)
    clf.fit(feats["train"], ys["train"])

    if len(ys["train"]) > train_eval_samples:  # the train score only measures the gap
        idx = np.sort(np.random.default_rng(seed + 2).choice(len(ys["train"]), train_eval_samples, replace=False))
        feats["train"], ys["train"] = feats["train"][idx], ys["train"][idx]
        groups["train"] = [groups["train"][i] for i in idx]
    probs = {name: (clf.predict_proba_features(feats[name]), ys[name]) for name in feats}
    results = evaluate_splits(probs, groups, labels, n_boot=n_boot, seed=seed, sources=prepared.sources)
    summary = summarise(results, probs["validation"], prepared, abstention_target=abstention_target, t_start=t0,
                        model=f"svm[{backbone_name}]", pretrained=bool(net.cellhub_config.get("pretrained")),
                        n_support_vectors=clf.n_support_vectors)
    recipe = {
        "dataset": public_dataset_name(dataset, prepared.source_kinds), "backbone": backbone_name,
        "backbone_pretrained": bool(net.cellhub_config.get("pretrained")),
        "backbone_checkpoint": backbone_checkpoint, "features": "global-average-pooled last feature map",
        "scaler": "standardize (train mean/std)",
        "svm": {"C": C, "kernel": kernel, "gamma": gamma, "decision_function_shape": "ovo"},
        "image_size": size, "seed": seed, "max_train_samples": max_train_samples,
        "max_eval_samples": max_eval_samples, "validation": "grouped (no source cell / patient on both sides)",
        "notes": prepared.notes,
    }
    write_checkpoint(clf, output_dir, summary, recipe, title=f"SVM on {backbone_name} features")
    return summary
