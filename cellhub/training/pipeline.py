"""What every training run shares, whatever it fits: the data in, the summary and the checkpoint out.

:func:`prepare_splits` loads a source, draws a grouped validation split when it has none and
subsamples for smoke runs; :func:`cache_size` says at which size to decode once;
:func:`evaluate_splits` scores every split with grouped-bootstrap intervals;
:func:`summarise` chooses the abstention threshold and lays out ``metrics.json``;
:func:`write_checkpoint` records the abstention rule and the recipe in the model's config and
saves it with its plots and card. :func:`cellhub.training.fit` and
:func:`cellhub.training.train_svm_baseline` are both built on these.
"""
from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import data, hub, metrics, models
from ..data import LoadReport
from ..svm import SVMClassifier

__all__ = ["PreparedData", "prepare_splits", "model_from_checkpoint", "subsample", "cache_size", "auto_workers", "public_dataset_name",
           "evaluate_splits", "summarise", "write_checkpoint", "EVAL_ORDER"]

logger = logging.getLogger(__name__)

#: the order in which splits are evaluated and reported
EVAL_ORDER = ("validation", "holdout", "test", "test_simple", "train")
#: the splits a run may hold (``holdout``: the scored fold of a cross-validation run)
SPLITS = ("train", "validation", "holdout", "test", "test_simple")


@dataclass
class PreparedData:
    """The splits a run trains and evaluates on, and where they came from."""

    splits: dict[str, Any]
    report: LoadReport
    labels: list[str]
    task: str
    #: True when the source had its own validation split (else it was drawn by group from train)
    had_validation: bool
    val_fraction: float
    notes: list[str] = field(default_factory=list)
    #: the sources' short names when several were combined (their examples' groups start "NAME|")
    sources: list[str] = field(default_factory=list)
    #: each source's layout (``LoadReport.source_kind``), in the order given
    source_kinds: list[str] = field(default_factory=list)


def subsample(ds: Any, n: int | None, seed: int) -> Any:
    """A seeded random subset of ``n`` rows (in their original order), or ``ds`` itself."""
    if n is None or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return ds.select(idx)


def grouping_of(report: data.LoadReport) -> dict[str, Any]:
    """How the groups were made: the ``group_by`` asked for, the one used, the method per split."""
    return {"requested": report.group_by_requested, "group_by": report.group_by,
            "method": dict(report.group_method)}


def grouping_note(report: data.LoadReport) -> str:
    """One line for the run's notes: which grouping, chosen how."""
    how = "the default for this data" if report.group_by_requested == "auto" else "asked for"
    methods = ", ".join(f"{k}: {v}" for k, v in report.group_method.items())
    return f"groups: {report.group_by or 'n/a'} ({how}; {methods})"


def source_names(datasets: Sequence[str]) -> list[str]:
    """Short, unique names for sources (a folder's name, a Hub id's last part)."""
    names: list[str] = []
    for d in datasets:
        base = Path(str(d).rstrip("/")).name or str(d)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _load_source(dataset: str, task: str | None, cache_dir: str | None, val_fraction: float, seed: int,
                 progress: bool, group_by: str, notes: list[str],
                 cv: tuple[int, int] | None = None) -> tuple[Any, data.LoadReport, bool]:
    """One source with a grouped validation split (and, for fold ``cv = (k, i)`` of a
    cross-validation, its ``holdout`` fold); notes say how it was grouped and split."""
    dsd, report = data.load_cell_dataset(dataset, task=task, cache_dir=cache_dir, return_report=True,
                                         progress=progress, group_by=group_by)
    if "train" not in dsd:
        raise ValueError(f"{dataset!r} has no 'train' split (splits: {', '.join(dsd)}); "
                         "training needs one. Evaluate it with `python -m cellhub evaluate` instead.")
    notes.append(grouping_note(report))
    notes += [n for n in report.notes if n.startswith("ignored")]
    had_validation = "validation" in dsd
    if cv is not None:
        k, i = cv
        dsd = data.cv_fold(dsd, k, i, val_fraction=val_fraction, seed=seed)
        notes.append(f"cross-validation fold {i + 1} of {k}: grouped {k}-fold over the development data (train"
                     + (" + validation" if had_validation else "") + f", seed {seed}); the other folds split "
                     f"again by group, {val_fraction:.0%} validation for the epoch and threshold choice")
        return dsd, report, False
    dsd = data.ensure_validation(dsd, val_fraction=val_fraction, seed=seed)
    if not had_validation:
        notes.append(f"validation: {val_fraction:.0%} of train drawn by group (no group on both sides), seed {seed}")
    return dsd, report, had_validation


def _combine(parts: list[tuple[str, Any]]) -> dict[str, Any]:
    """Each split of several sources concatenated, with a ``source`` column and groups made ``SOURCE|group``."""
    from datasets import concatenate_datasets

    out: dict[str, Any] = {}
    for split in SPLITS:
        pieces = []
        for name, dsd in parts:
            if split in dsd:
                ds = dsd[split].select_columns(["image", "label", "group", "file"])
                named = [f"{name}|{g}" for g in ds["group"]]
                ds = ds.remove_columns("group").add_column("group", named)
                pieces.append(ds.add_column("source", [name] * len(ds)))
        if pieces:
            out[split] = concatenate_datasets(pieces)
    return out


def prepare_splits(dataset: str | Sequence[str], *, task: str | None = None, cache_dir: str | None = None,
                   val_fraction: float = 0.2, seed: int = 0, max_train_samples: int | None = None,
                   max_eval_samples: int | None = None, progress: bool = True,
                   notes: Sequence[str] = (), group_by: str = "auto",
                   cv: tuple[int, int] | None = None) -> PreparedData:
    """Load ``dataset`` (or several: one task, the classes it knows from each), make sure every source
    has a grouped validation split, subsample; say what was done in ``notes``. ``cv = (k, i)``:
    fold ``i`` of grouped ``k``-fold cross-validation, drawn per source (:func:`cellhub.data.cv_fold`)."""
    datasets = [dataset] if isinstance(dataset, str) else list(dataset)
    if not datasets:
        raise ValueError("No dataset given: pass --dataset at least once.")
    notes = list(notes)
    names = source_names(datasets) if len(datasets) > 1 else []
    parts, reports, had = [], [], []
    for k, src in enumerate(datasets):
        before = len(notes)
        dsd, report, had_validation = _load_source(src, task, cache_dir, val_fraction, seed, progress, group_by, notes,
                                                   cv=cv)
        task = task or report.task  # the first source decides the task; the others give what it knows
        if names:
            notes[before:] = [f"{names[k]}: {n}" for n in notes[before:]]
            notes.append(f"{names[k]}: " + ", ".join(f"{s} {len(d)}" for s, d in dsd.items()))
        parts.append((names[k] if names else src, dsd))
        reports.append(report)
        had.append(had_validation)
    report, had_validation = reports[0], all(had)
    dsd = _combine(parts) if names else parts[0][1]
    labels = list(dsd["train"].features["label"].names)
    splits = {name: dsd[name] for name in SPLITS if name in dsd}
    if len(splits["validation"]) == 0:
        raise ValueError("The validation split is empty: the dataset has too few groups per class to hold "
                         "any out. Add data or pass a dataset with a validation split.")
    splits["train"] = subsample(splits["train"], max_train_samples, seed)
    for name in ("validation", "holdout", "test", "test_simple"):
        if name in splits:
            splits[name] = subsample(splits[name], max_eval_samples, seed + 1)
    if max_train_samples or max_eval_samples:
        notes.append(f"subsampled: max_train_samples={max_train_samples}, max_eval_samples={max_eval_samples}")
    return PreparedData(splits=splits, report=report, labels=labels, task=report.task,
                        had_validation=had_validation, val_fraction=val_fraction, notes=notes, sources=names,
                        source_kinds=[r.source_kind for r in reports])


def _classifier_prefix(model: Any) -> str:
    head = model.get_classifier()
    for name, module in model.named_modules():
        if module is head:
            return name
    raise ValueError(f"{type(model).__name__} has no classifier module to replace")  # pragma: no cover


def model_from_checkpoint(source: str, labels: Sequence[str], *, image_size: int | None = None,
                          freeze_backbone: bool = False, drop_rate: float | None = None,
                          notes: list[str] | None = None) -> Any:
    """A registered model for ``labels`` that starts from the weights of a saved cellhub CNN.

    The architecture and preprocessing are the checkpoint's (``image_size`` changes the input
    size: the CNNs pool globally); every weight is taken over, except the classifier when the
    labels differ (a new head for the new labels). Raises ``ValueError`` for an SVM checkpoint or
    an architecture the registry does not know.
    """
    old = hub.load_pretrained(source)
    if isinstance(old, SVMClassifier):
        raise ValueError(f"--init-from {source}: that is an SVM checkpoint; start from a CNN checkpoint "
                         "(a folder written by train/finetune.py).")
    cc = old.cellhub_config
    name = cc.get("model_name")
    if name not in models.MODEL_REGISTRY:
        raise ValueError(f"--init-from {source}: model {name!r} is not one of {', '.join(models.available_models())}.")
    size = int(image_size or cc["pretrained_cfg"]["input_size"][-1])
    drop = drop_rate if drop_rate is not None else cc.get("drop_rate")
    model = models.create_model(name, list(labels), pretrained=False, image_size=size, drop_rate=drop,
                                norm=cc.get("norm"), depths=cc.get("depths"))
    same = [str(x) for x in cc["labels"]] == [str(x) for x in labels]
    head = _classifier_prefix(model) + "."
    state = {k: v for k, v in old.state_dict().items() if same or not k.startswith(head)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(head) for k in missing):
        raise ValueError(f"--init-from {source}: its weights do not fit a {name} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
    if freeze_backbone:
        models.freeze_backbone_layers(model)
    for key in ("cell_crop", "stain_norm"):  # the checkpoint's preprocessing travels with its weights
        if cc.get(key):
            model.cellhub_config[key] = cc[key]
    model.cellhub_config.update(pretrained=bool(cc.get("pretrained")), base_model=cc.get("base_model"),
                                freeze_backbone=bool(freeze_backbone),
                                init_from=public_dataset_name(source, "checkpoint"))
    if notes is not None:
        notes.append(f"initialised from {public_dataset_name(source, 'checkpoint')} ({name}, "
                     + ("same labels: every weight kept)" if same else
                        f"labels {list(cc['labels'])} -> {list(labels)}: new classifier head)"))
    return model


def cache_size(ds: Any, size: int) -> tuple[int, int]:
    """The (h, w) at which to decode once so that the model's eval geometry (resize the short
    side to ``size``, center-crop) applied to the cached pixels matches it applied to the original.

    When the images share one aspect ratio (blood-cell crops are all 320x240) the short side is
    scaled to ``size`` keeping the aspect; mixed sizes (malaria cells, several sources) are cached
    square, each image centre-cropped as the eval transform does (:func:`cellhub.data.cache_resized`).
    """
    from PIL import Image

    if "image" not in ds.column_names or len(ds) == 0:
        return size, size
    raw = data.undecoded(ds)
    idx = np.linspace(0, len(ds) - 1, num=min(len(ds), 32)).astype(int)
    shapes = set()
    for i in idx:
        x = raw[int(i)]["image"]
        try:
            with Image.open(io.BytesIO(x["bytes"]) if x.get("bytes") else x["path"]) as im:
                shapes.add(im.size)
        except Exception:  # unreadable header: the loader reports corrupt files; keep a square
            return size, size
    if len(shapes) != 1:
        return size, size
    w, h = shapes.pop()
    if w == h:
        return size, size
    if w > h:
        return size, int(size * w / h)
    return int(size * h / w), size


def auto_workers(on_cuda: bool) -> int:
    """DataLoader workers for training on this machine."""
    n = os.cpu_count() or 1
    if on_cuda:
        return min(8, max(1, n - 1))
    # On a CPU-only box the model uses every core; decoding was done once, so the
    # per-image augmentation is cheap enough to run in the main process.
    return 0 if n <= 4 else min(4, n // 4)


def public_dataset_name(dataset: str | Sequence[str], source_kind: str | Sequence[str]) -> str:
    """How the data is named in a published config: Hub ids and task names as given; a local
    folder by its name and layout only (no machine-local path in a model card). Several: joined by
    " + ", each with its own layout when ``source_kind`` is a list (one per dataset)."""
    if not isinstance(dataset, str):
        kinds = [source_kind] * len(dataset) if isinstance(source_kind, str) else list(source_kind)
        if len(kinds) != len(dataset):
            raise ValueError(f"{len(dataset)} datasets but {len(kinds)} source kinds")
        return " + ".join(public_dataset_name(d, k) for d, k in zip(dataset, kinds))
    if not isinstance(source_kind, str):
        source_kind = ", ".join(source_kind)
    p = Path(dataset).expanduser()
    if p.exists():
        return f"local folder '{p.name}' ({source_kind})"
    return dataset


def evaluate_splits(probs: Mapping[str, tuple[np.ndarray, np.ndarray]], groups: Mapping[str, Sequence[str]],
                    labels: Sequence[str], *, n_boot: int, seed: int,
                    sources: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """:func:`cellhub.metrics.classification_metrics` of every split, in :data:`EVAL_ORDER`; with
    several ``sources`` (groups named ``SOURCE|group``) also of each source's part, under ``per_source``."""
    out = {}
    for name in (n for n in EVAL_ORDER if n in probs):
        p, y = probs[name]
        m = metrics.classification_metrics(y, p, list(labels), groups=groups[name], n_boot=n_boot, seed=seed)
        if len(sources) > 1:
            of = np.asarray([str(g).split("|", 1)[0] for g in groups[name]])
            m["per_source"] = {
                src: metrics.classification_metrics(y[of == src], p[of == src], list(labels),
                                                    groups=[g for g, o in zip(groups[name], of) if o == src],
                                                    n_boot=n_boot, seed=seed)
                for src in sources if (of == src).any()}
        out[name] = m
    return out


def _split_description(ref: str, prepared: PreparedData) -> str:
    if ref == "test":
        return "test: the dataset's own test split"
    if ref == "holdout":
        return "holdout: this cross-validation fold's held-out groups (used for no choice)"
    drawn = "" if prepared.had_validation else f", {prepared.val_fraction:.0%} of train by group"
    return "validation: grouped hold-out (no source cell / patient also in train)" + drawn


def summarise(results: Mapping[str, dict[str, Any]], val_probs: tuple[np.ndarray, np.ndarray],
              prepared: PreparedData, *, abstention_target: float, t_start: float,
              **fields: Any) -> dict[str, Any]:
    """``metrics.json``: the headline split's metrics at top level (``test`` if the data has one,
    else the grouped ``validation``), every split under ``splits``, the abstention rule chosen on
    validation, the train-test gap, ``fields`` (model, best epoch, ...) and the run's notes."""
    abst = metrics.choose_abstention_threshold(val_probs[1], val_probs[0], target_accuracy=abstention_target)
    ref = next(n for n in ("test", "holdout", "validation") if n in results)
    train = prepared.splits["train"]
    summary: dict[str, Any] = dict(results[ref])
    summary.update({"split": {"name": ref, "description": _split_description(ref, prepared)},
                    "splits": dict(results), "task": prepared.task})
    summary.update(fields)
    summary.update({
        "abstention": abst,
        "train_test_gap": {"reference_split": ref,
                           "accuracy": results["train"]["accuracy"] - results[ref]["accuracy"],
                           "train_images_evaluated": results["train"]["n_images"]},
        "n_train_images": len(train),
        "n_train_groups": len(set(map(str, train["group"]))),
        "sources": list(prepared.sources),
        "grouping": grouping_of(prepared.report),
        "seconds": round(time.time() - t_start, 1),
        "notes": list(prepared.notes),
    })
    return summary


def write_checkpoint(model: Any, out_dir: str | Path, summary: dict[str, Any], recipe: dict[str, Any], *,
                     title: str, history: list[dict[str, Any]] | None = None) -> Path:
    """Record the abstention rule and ``recipe`` in ``model.cellhub_config``, draw the plots, save
    the checkpoint (weights, config, ``metrics.json``, ``history.json``, model card) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    abst = summary["abstention"]
    cc = model.cellhub_config
    cc["abstention_threshold"] = abst["threshold"]
    cc["abstention"] = {k: abst[k] for k in ("threshold", "target_accuracy", "coverage", "selective_accuracy",
                                             "met_target", "rule")}
    cc["recipe"] = recipe
    ref = summary["split"]["name"]
    # plots first: the model card written by save_pretrained embeds them when present
    if history is not None:
        metrics.plot_history(history, out / "curves.png")
    labels = list(summary["labels"])
    metrics.plot_confusion(summary["confusion_matrix"], labels, out / "confusion_matrix.png",
                           title=f"{title} - {ref} (accuracy {summary['accuracy']:.3f})")
    hub.save_pretrained(model, out, metrics=summary, history=history)
    logger.info("%s accuracy %.4f (95%% CI %s), macro-F1 %.4f; abstain below confidence %.3f. Saved to %s",
                ref, summary["accuracy"], summary["ci95"], summary["macro_f1"], abst["threshold"], out)
    return out
