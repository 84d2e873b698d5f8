"""The checkpoints bundled in ./checkpoints: the demo's offline default must load and be sane."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import app
from cellhub.hub import load_pretrained
from cellhub.predict import Predictor
from cellhub.synthetic import draw_blood_cell, draw_malaria_cell
from cellhub.tasks import TASKS

BUNDLED = sorted(app.bundled_checkpoints())
pytestmark = pytest.mark.skipif(not BUNDLED, reason="no bundled checkpoints in ./checkpoints")
PUBLISHED_FILES = {"model.safetensors", "config.json", "README.md", "metrics.json", "history.json",
                   "curves.png", "confusion_matrix.png"}


def test_bundle_covers_every_task_within_the_size_budget() -> None:
    tasks = {json.loads((d / "config.json").read_text())["cellhub"]["task"] for d in BUNDLED}
    assert tasks == set(TASKS)  # blood-cells, pbc and malaria
    total = sum(f.stat().st_size for d in BUNDLED for f in d.iterdir())
    assert total <= 40 * 2**20, f"bundled checkpoints are {total / 2**20:.1f} MB, over the 40 MB budget"


@pytest.mark.parametrize("folder", BUNDLED, ids=[d.name for d in BUNDLED])
def test_bundled_checkpoint_is_complete_safe_and_predicts(folder: Path) -> None:
    names = {f.name for f in folder.iterdir()}
    assert names == PUBLISHED_FILES  # no pickles, no resume state
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["split"]["name"] == "validation" and metrics["n_groups"] >= 5  # a grouped hold-out
    cv = metrics["cross_validation"]  # the recipe's figures: grouped K-fold, every group held out once
    assert cv["k"] >= 3 and len(cv["folds"]) == cv["k"] and cv["pooled"]["n_groups"] > metrics["n_groups"]
    assert "Cross-validation" in (folder / "README.md").read_text()
    model = load_pretrained(folder)
    cfg = model.cellhub_config
    task = TASKS[cfg["task"]]
    assert cfg["labels"] == list(task.labels)
    assert 0.0 < cfg["abstention_threshold"] < 1.0
    pred = Predictor(model, name=folder.name)
    if task.name in ("blood-cells", "pbc"):
        img = draw_blood_cell("lymphocyte", size=(320, 240), seed=0)
    else:
        img = draw_malaria_cell("parasitized", size=128, seed=0)[0]
    out = pred.predict([img], with_cam=True)[0]
    assert set(out.probs) == set(task.labels)
    assert np.isclose(sum(out.probs.values()), 1.0, atol=1e-5)
    assert out.cam is not None and out.cam.shape == tuple(pred.input_size)
    # loaded as stored: every tensor in the file is the model's own
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    own = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(state[k], own[k].contiguous()) for k in state if k in own)
