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
from pathlib import Path
from typing import Any

from .cache import read_json
from .models import SMALLCNN_ARCHITECTURE
from .svm import is_svm_config
from .tasks import TASKS

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


def _fmt_ci(ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        return f"[{ci[0]:.3f}, {ci[1]:.3f}]"
    return "n/a"


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


_SPLIT_WHY = {
    "blood-cells": (
        "The Kaggle TRAIN crops are ~35 augmented copies (rotations, flips, shifts) of only ~276 "
        "distinct white cells, so a random image-level split puts copies of the same cell on both "
        "sides and reports near-100% accuracy that means nothing. Validation is therefore grouped by "
        "**source cell**: each crop is matched to the smear it was cut from, and smears showing the "
        "same microscope field are one group (one cell can appear in two consecutive frames), so no "
        "cell contributes to both sides."
    ),
    "malaria": (
        "Cells from one patient/slide are highly correlated (same stain, same parasite strain), so "
        "the data are split by **patient/slide** (file-name prefix `C<slide>P<patient>`): no "
        "patient contributes to both training and evaluation."
    ),
}


def build_model_card(directory: str | Path, repo_id: str | None = None) -> Any:
    """Build the ``README.md`` model card for a saved checkpoint folder.

    Reads ``config.json`` and, when present, ``metrics.json``, ``history.json`` and the plots
    (``curves.png``, ``confusion_matrix.png``) that training wrote into the folder.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    d = Path(directory)
    config = read_json(d / "config.json")
    if config is None:
        raise FileNotFoundError(f"No config.json in {d}; save the model first.")
    section = config.get("cellhub") or {}
    kind = _card_kind(config)
    labels = list(section.get("labels") or config.get("label_names") or config.get("labels") or [])
    task_name = section.get("task")
    task = TASKS.get(task_name) if task_name else None
    metrics = read_json(d / "metrics.json") or section.get("metrics") or {}
    history = read_json(d / "history.json")
    recipe = section.get("recipe") or {}
    model_name = section.get("model_name") or config.get("architecture") or kind
    backbone = section.get("backbone")
    pcfg = section.get("pretrained_cfg") or config.get("pretrained_cfg") or {}
    repo = repo_id or section.get("repo_id") or _PLACEHOLDER_REPO
    title = repo.split("/")[-1] if repo_id else f"cellhub {model_name}" + (f" — {task_name}" if task_name else "")
    base_model = section.get("base_model") if section.get("pretrained") else None

    dataset_id = recipe.get("dataset") if isinstance(recipe.get("dataset"), str) else None
    hub_dataset = task.hub_dataset if task else None
    if dataset_id and "/" in dataset_id and not Path(dataset_id).exists() and dataset_id.count("/") == 1:
        hub_dataset = dataset_id
    split_name, split_desc = _split_info(metrics)

    eval_results = []
    if metrics:
        ds_type = hub_dataset or (task_name or "custom")
        ds_name = (task.description.split(" (")[0] if task else None) or ds_type
        for key, mtype, mname, mcfg in (("accuracy", "accuracy", "Accuracy", None),
                                        ("macro_f1", "f1", "Macro F1", "macro"),
                                        ("auc", "roc_auc", "ROC AUC", None)):
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                eval_results.append(EvalResult(
                    task_type="image-classification", task_name="Image Classification",
                    dataset_type=ds_type, dataset_name=ds_name, dataset_split=split_name,
                    metric_type=mtype, metric_name=mname, metric_value=round(float(value), 4),
                    metric_config=mcfg,
                ))

    tags = ["image-classification", "cellhub", "microscopy", "blood-smear", "medical-imaging"]
    if task_name:
        tags.append(task_name)
    tags.append(model_name if kind != "svm" else "svm")
    if kind == "timm":
        tags.append("timm")
    card_data = ModelCardData(
        license=section.get("license") or DEFAULT_LICENSE,
        library_name="timm" if kind == "timm" else "cellhub",
        pipeline_tag="image-classification",
        tags=tags,
        datasets=[hub_dataset] if hub_dataset else None,
        base_model=base_model,
        model_name=repo.split("/")[-1] if repo_id else f"cellhub-{model_name}-{task_name or 'custom'}",
        eval_results=eval_results or None,
    )

    lines: list[str] = [f"# {title}", ""]
    what = {
        "timm": f"a timm **{model_name}**" + (f" fine-tuned from `{base_model}` (ImageNet)" if base_model
                                               else " trained from scratch"),
        "smallcnn": "the cellhub **small CNN** (conv-BatchNorm-ReLU stages, global average pooling, "
                    "one linear layer) trained from scratch",
        "svm": f"an **SVM** (RBF kernel, Platt-scaled probabilities) on features of a cellhub "
               f"`{backbone}` backbone",
    }[kind]
    task_part = (f" for the `{task.name}` task: {task.description.rstrip('.')}" if task else "")
    lines += [
        f"This is {what}{task_part}.", "",
        f"It classifies one single-cell crop into {len(labels)} classes: "
        + ", ".join(f"`{x}`" for x in labels) + ".",
        "",
        "Made with **cellhub**, open-source blood-smear cell classification (MIT licence).",
        "",
        "## Intended use",
        "",
        "- **For** research and education: exploring how CNNs classify blood-smear cells, teaching, "
        "benchmarking, and as a starting point for models trained on your own lab's images.",
        "- **Not for** diagnosis or any clinical decision. This is **not a medical device**; it has not "
        "been validated on patients, other stains, microscopes or scanners. Predictions on images unlike "
        "the training data (other magnification, whole smears instead of single-cell crops, other cell "
        "types) are meaningless, and the model cannot tell you so reliably.",
        "",
        "## Inputs and labels",
        "",
        f"- Input: one RGB single-cell crop, resized (short side) and center-cropped to "
        f"{'x'.join(str(v) for v in pcfg.get('input_size', [])[1:]) or 'n/a'} px "
        f"({pcfg.get('interpolation', 'bilinear')}), normalised with mean "
        f"{pcfg.get('mean', 'n/a')} and std {pcfg.get('std', 'n/a')}. All of this is stored in "
        "`config.json` and applied by timm, transformers and cellhub automatically.",
        "- Labels (index order): " + ", ".join(f"{i}: `{x}`" for i, x in enumerate(labels)),
        "",
    ]

    thr = section.get("abstention") or section.get("abstention_threshold")
    if isinstance(thr, Mapping):
        thr_value = thr.get("threshold")
    else:
        thr_value = thr
    if thr_value is not None:
        lines += ["## Abstention", "",
                  f"Predictions whose top probability is below **{_fmt(float(thr_value))}** should be "
                  "treated as *uncertain - refer for manual review*. cellhub's `Predictor` flags them "
                  "(`abstain=True`)."]
        if isinstance(thr, Mapping):
            if thr.get("rule"):
                lines.append(f"Rule: {thr['rule']}.")
            if thr.get("coverage") is not None:
                lines.append(f"On validation data it kept {_fmt(100 * thr['coverage'], 1)}% of the "
                             f"images, at {_fmt(100 * thr.get('selective_accuracy', 0), 1)}% accuracy.")
        lines.append("")

    lines += ["## Training data and split", ""]
    if task is not None:
        lines.append(f"Task `{task.name}`: {task.description}" + (f" Hub dataset: `{hub_dataset}`." if hub_dataset else ""))
        lines.append("")
        if task.name in _SPLIT_WHY:
            lines += [_SPLIT_WHY[task.name], ""]
    elif dataset_id:
        lines += [f"Dataset: `{dataset_id}`.", ""]
    lines.append(f"Evaluation split: {split_desc}.")
    if metrics.get("n_images") is not None:
        unit = task.group_unit if task else "group"
        lines.append(f"It holds {metrics['n_images']} images from {metrics.get('n_groups', 'n/a')} "
                     f"independent groups ({unit}); the confidence intervals resample groups, not images.")
    lines.append("")

    if recipe:
        shown = dict(recipe)
        # what the model really is (a CLI default such as pretrained=True means nothing for smallcnn)
        if "pretrained" in shown and kind != "svm":
            shown["pretrained"] = bool(section.get("pretrained"))
        notes = shown.pop("notes", None)
        lines += ["## Training recipe", "", "| setting | value |", "|---|---|"]
        for k, v in shown.items():
            if v is None or v == [] or v == {}:
                continue
            if isinstance(v, str) and (Path(v).is_absolute() or v.startswith(("~", "./", "../"))):
                v = f"local folder {Path(v).name}"  # no machine-local paths in a public card
            lines.append(f"| {k} | `{json.dumps(v) if not isinstance(v, str) else v}` |")
        lines.append("")
        if notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in (notes if isinstance(notes, list) else [notes])] + [""]

    lines += ["## Evaluation", ""]
    if metrics:
        lines += [f"Measured on the **{split_name}** split ({metrics.get('n_images', '?')} images, "
                  f"{metrics.get('n_groups', '?')} groups). 95% CI: {metrics.get('ci_method', 'grouped bootstrap')}.",
                  "", "| metric | value | 95% CI |", "|---|---|---|",
                  f"| accuracy | {_fmt(metrics.get('accuracy'))} | {_fmt_ci(metrics.get('ci95'))} |",
                  f"| macro F1 | {_fmt(metrics.get('macro_f1'))} | {_fmt_ci(metrics.get('macro_f1_ci95'))} |"]
        if "balanced_accuracy" in metrics:
            lines.append(f"| balanced accuracy | {_fmt(metrics['balanced_accuracy'])} | |")
        if "auc" in metrics:
            lines.append(f"| ROC AUC | {_fmt(metrics['auc'])} | |")
        if "ece" in metrics:
            lines.append(f"| calibration error (ECE) | {_fmt(metrics['ece'])} | |")
        lines.append("")
        splits = metrics.get("splits")
        if isinstance(splits, Mapping) and len(splits) > 1:
            lines += ["All splits (the train row shows how much the model memorised):", "",
                      "| split | images | groups | accuracy | 95% CI | macro F1 | 95% CI |",
                      "|---|---|---|---|---|---|---|"]
            for sname, sm in splits.items():
                if isinstance(sm, Mapping):
                    lines.append(f"| {sname} | {sm.get('n_images', '')} | {sm.get('n_groups', '')} | "
                                 f"{_fmt(sm.get('accuracy'))} | {_fmt_ci(sm.get('ci95'))} | "
                                 f"{_fmt(sm.get('macro_f1'))} | {_fmt_ci(sm.get('macro_f1_ci95'))} |")
            lines.append("")
        per_class = metrics.get("per_class") or {}
        if per_class:
            lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
            for name, pc in per_class.items():
                lines.append(f"| {name} | {_fmt(pc.get('precision'))} | {_fmt(pc.get('recall'))} | "
                             f"{_fmt(pc.get('f1'))} | {pc.get('support', '')} |")
            lines.append("")
        cm = metrics.get("confusion_matrix")
        cm_labels = metrics.get("labels") or labels
        if cm and len(cm) == len(cm_labels):
            lines += ["Confusion matrix (rows = true, columns = predicted):", "",
                      "| true \\ predicted | " + " | ".join(cm_labels) + " |",
                      "|---" * (len(cm_labels) + 1) + "|"]
            for name, row in zip(cm_labels, cm):
                lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
            lines.append("")
    else:
        lines += ["No evaluation results were saved with this checkpoint.", ""]
    if (d / "curves.png").is_file():
        lines += ["![Training curves](curves.png)", ""]
    elif history:
        lines += [f"Training history ({len(history)} epochs) is in `history.json`.", ""]
    if (d / "confusion_matrix.png").is_file():
        lines += ["![Confusion matrix](confusion_matrix.png)", ""]
    for png in sorted(d.glob("*.png")):
        if png.name not in ("curves.png", "confusion_matrix.png"):
            lines += [f"![{png.stem.replace('_', ' ')}]({png.name})", ""]

    lines += ["## How to use", ""]
    if kind == "timm":
        lines += [
            "With **timm**:", "", "```python", "import timm, torch", "from PIL import Image", "",
            f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
            "cfg = timm.data.resolve_data_config(model=model)",
            "transform = timm.data.create_transform(**cfg)",
            'x = transform(Image.open("cell.png").convert("RGB")).unsqueeze(0)',
            "probs = model(x).softmax(-1)[0]",
            'print({name: float(p) for name, p in zip(model.pretrained_cfg["label_names"], probs)})',
            "```", "",
            "With **transformers**:", "", "```python", "from transformers import pipeline", "",
            f'classifier = pipeline("image-classification", model="{repo}")',
            'print(classifier("cell.png"))',
            "```", "",
        ]
    elif kind == "smallcnn":
        lines += [
            "With the **Hub mixin** (plain PyTorch):", "", "```python",
            "from cellhub import SmallCNN", "",
            f'model = SmallCNN.from_pretrained("{repo}")  # strict, safetensors only',
            "```", "",
            "With **timm** or **transformers**: importing cellhub registers the architecture "
            "(`cellhub_smallcnn`) in timm, after which the usual calls work:", "", "```python",
            "import cellhub, timm",
            "from transformers import pipeline", "",
            f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
            f'classifier = pipeline("image-classification", model="{repo}")',
            "```", "",
        ]
    lines += [
        "With **cellhub** (preprocessing, Grad-CAM and abstention included):", "", "```python",
        "import cellhub", "",
        f'model = cellhub.load_pretrained("{repo}")',
        "predictor = cellhub.Predictor(model)",
        'result = predictor.predict(["cell.png"])[0]',
        "print(result.label, result.confidence, result.abstain)",
        "```", "",
        f'or from the shell: `python -m cellhub predict {repo} cell.png`', "",
        "## Limitations", "",
        "- Trained on a single public dataset; accuracy on other labs' stains and optics is unknown and "
        "likely lower. Validate on your own data before relying on it.",
        "- The evaluation set is small in independent units (groups); read the confidence intervals, not "
        "the point estimate.",
        "- Class balance in the training data may not match your population; calibration may drift.",
        "",
    ]
    body = "\n".join(lines)
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")
