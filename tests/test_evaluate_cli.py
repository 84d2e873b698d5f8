"""`python -m cellhub evaluate`: metrics agree with scikit-learn; split handling; JSON layout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cellhub.synthetic import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cellhub import hub, models

    tmp = tmp_path_factory.mktemp("ev")
    data = write_imagefolder(tmp / "data", "malaria", n_per_class=8, splits=("train", "test"), size=32)
    torch.manual_seed(0)
    model = models.create_model("smallcnn", "malaria", pretrained=False, image_size=16)
    with torch.no_grad():  # a random but decisive head, so predictions vary between images
        model.head.weight.normal_(0, 2.0)
    model.eval()
    ckpt = hub.save_pretrained(model, tmp / "ckpt")
    return data, ckpt


def test_evaluate_cli_matches_sklearn(setup, tmp_path):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    from cellhub import hub, transforms
    from cellhub.data import load_cell_dataset

    data, ckpt = setup
    out = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "cellhub", "evaluate", str(ckpt), str(data), "--split", "test",
                           "--json", str(out), "--n-boot", "200", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(out.read_text())
    for key in ("accuracy", "macro_f1", "auc", "ci95", "n_images", "n_groups", "per_class", "confusion_matrix"):
        assert key in m, key

    # the same predictions computed independently here
    model = hub.load_pretrained(ckpt)
    test = load_cell_dataset(str(data), progress=False)["test"]
    tf = transforms.eval_transform(transforms.resolve_data_config(model))
    with torch.no_grad():
        p = torch.softmax(model(torch.stack([tf(im) for im in test["image"]])), 1).numpy()
    y = np.asarray(test["label"])
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=[0, 1]).tolist()
    assert m["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]), abs=1e-6)
    assert m["n_images"] == 16
    assert m["n_groups"] == len(set(test["group"])) == 2  # two patients in the synthetic test split
    assert m["ci95"][0] <= m["accuracy"] <= m["ci95"][1]
    assert m["split"] == "test"
    assert "precision" in proc.stdout and "confusion matrix" in proc.stdout


def test_several_splits_need_split(setup, capsys):
    from cellhub.__main__ import main

    data, ckpt = setup
    assert main(["evaluate", str(ckpt), str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "several splits" in err and "train" in err and "test" in err
    assert main(["evaluate", str(ckpt), str(data), "--split", "validation", "--no-progress"]) == 2
    assert "'validation' is not in" in capsys.readouterr().err


def test_single_split_source_is_evaluated_whole(setup, tmp_path):
    from cellhub.evaluation import run_evaluate

    _, ckpt = setup
    flat = write_imagefolder(tmp_path / "flat", "malaria", n_per_class=3, splits=None, size=32)
    m = run_evaluate(str(ckpt), str(flat), None, n_boot=20, progress=False)
    # issue 12: a folder without split folders is reported as "all", not as a "train" split
    assert m["n_images"] == 6 and m["split"] == "all"
    named = write_imagefolder(tmp_path / "named", "malaria", n_per_class=3, splits=("train",), size=32)
    assert run_evaluate(str(ckpt), str(named), None, n_boot=20, progress=False)["split"] == "train"
    m = run_evaluate(str(ckpt), str(flat), "train", n_boot=20, progress=False)
    assert m["split"] == "train"  # asked for by name: answered by name


def test_labels_of_another_task_are_refused(setup, tmp_path):
    from cellhub.evaluation import run_evaluate

    _, ckpt = setup
    blood = write_imagefolder(tmp_path / "blood", "blood-cells", n_per_class=2, splits=None, size=32)
    with pytest.raises(ValueError):
        run_evaluate(str(ckpt), str(blood), None, n_boot=10, progress=False)


def test_several_checkpoints_are_compared_on_the_same_images(setup, tmp_path, capsys):
    """`evaluate A B DATA`: both scored, B - A with a paired group-bootstrap interval (the check after `adapt`)."""
    from cellhub import hub, models
    from cellhub.__main__ import main

    data, ckpt = setup
    flipped = hub.load_pretrained(ckpt)
    with torch.no_grad():  # the same network with its head negated: every binary prediction flips
        flipped.head.weight.neg_()
        flipped.head.bias.neg_()
    other = hub.save_pretrained(flipped, tmp_path / "flipped")
    out = tmp_path / "cmp.json"
    assert main(["evaluate", str(ckpt), str(other), str(data), "--split", "test", "--json", str(out),
                 "--n-boot", "300", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    a, b = r["models"]
    assert a["checkpoint"] == str(ckpt) and b["checkpoint"] == str(other)
    assert a["n_images"] == b["n_images"] == 16
    assert b["accuracy"] == pytest.approx(1 - a["accuracy"])  # complementary predictions
    (c,) = r["comparisons"]
    assert c["accuracy_difference"] == pytest.approx(b["accuracy"] - a["accuracy"])
    assert c["right_only_baseline"] == round(16 * a["accuracy"]) and c["right_only_checkpoint"] == round(16 * b["accuracy"])
    lo, hi = c["ci95"]
    assert lo <= c["accuracy_difference"] <= hi and c["n_groups"] == 2
    assert f"{100 * c['accuracy_difference']:+.2f} points" in printed and printed.count("confusion matrix") == 2

    # one model against itself: no difference, a zero-width interval
    same = main(["evaluate", str(ckpt), str(ckpt), str(data), "--split", "test", "--json", str(out),
                 "--n-boot", "50", "--no-progress"])
    (c,) = json.loads(out.read_text())["comparisons"]
    assert same == 0 and c["accuracy_difference"] == 0 and c["ci95"] == [0.0, 0.0]
    assert "no difference shown" in capsys.readouterr().out

    # models of another task cannot be compared: a clear error, nothing scored
    blood = models.create_model("smallcnn", "blood-cells", pretrained=False, image_size=16)
    blood_ckpt = hub.save_pretrained(blood.eval(), tmp_path / "blood")
    assert main(["evaluate", str(ckpt), str(blood_ckpt), str(data), "--split", "test", "--no-progress"]) == 2
    assert "compare models of one task" in capsys.readouterr().err
