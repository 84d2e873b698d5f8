"""cellhub — blood-smear cell classification you can train, trust, try in a browser and publish.

The public API is listed in ``__all__``; heavy submodules (torch, datasets) are imported only
when one of their names is first used, so ``import cellhub`` stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "Task": "tasks",
    "TASKS": "tasks",
    "get_task": "tasks",
    "load_cell_dataset": "data",
    "split_by_group": "data",
    "cache_resized": "data",
    "create_model": "models",
    "SmallCNN": "models",
    "MODEL_NAMES": "models",
    "save_pretrained": "hub",
    "push_to_hub": "hub",
    "load_pretrained": "hub",
    "TrainConfig": "training",
    "fit": "training",
    "evaluate": "evaluation",
    "classification_metrics": "metrics",
    "SVMClassifier": "svm",
    "Predictor": "predict",
    "gradcam": "cam",
    "detect_cells": "detect",
    "analyze_field": "fields",
    "analyze_fields": "fields",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cellhub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
