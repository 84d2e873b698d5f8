"""Training: one config, one pipeline, two learners (``fit`` for CNNs, ``train_svm_baseline``).

Inside the package, bottom to top: ``config`` (:class:`TrainConfig`, declared once, and the
command-line options built from it), ``state`` (resumable checkpoints), ``pipeline`` (data in,
summary and checkpoint out, shared), ``trainer`` (``fit``), ``cv`` (``cross_validate``: grouped K-fold,
then the final model) and ``svm_baseline``.
"""
from __future__ import annotations

from .config import TrainConfig, add_config_arguments, config_from_namespace
from .trainer import fit
from .cv import cross_validate, fold_config, format_cv_table
from .state import CHECKPOINT_DIRNAME, load_training_state
from .svm_baseline import train_svm_baseline

__all__ = ["TrainConfig", "fit", "load_training_state", "CHECKPOINT_DIRNAME", "train_svm_baseline",
           "add_config_arguments", "config_from_namespace", "cross_validate", "fold_config", "format_cv_table"]

