"""cellhub.metrics against scikit-learn on known cases; the bootstrap must resample groups."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from cellhub.metrics import (
    choose_abstention_threshold,
    classification_metrics,
    expected_calibration_error,
    format_metrics_table,
    grouped_bootstrap,
    plot_confusion,
    plot_history,
)

LABELS4 = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def _random_case(n=200, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0  # better than chance, not perfect
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_hand_computed_case():
    # 6 images, 2 classes: truth 0 0 0 1 1 1, predictions 0 0 1 1 1 0
    y = [0, 0, 0, 1, 1, 1]
    p1 = np.array([0.1, 0.2, 0.7, 0.8, 0.9, 0.4])
    p = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, p, ["parasitized", "uninfected"], n_boot=0)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    assert m["per_class"]["parasitized"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3), "support": 3}
    # AUC: positives {0.8, 0.9, 0.4} vs negatives {0.1, 0.2, 0.7}: 8 of 9 pairs ranked right (only 0.4 < 0.7)
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["n_images"] == 6 and m["n_groups"] == 6


def test_matches_sklearn_multiclass():
    y, p = _random_case()
    groups = [f"cell{i // 5}" for i in range(len(y))]
    m = classification_metrics(y, p, LABELS4, groups=groups, n_boot=200)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(4)).tolist()
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    for i, name in enumerate(LABELS4):
        assert m["per_class"][name]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][name]["recall"] == pytest.approx(rec[i])
        assert m["per_class"][name]["f1"] == pytest.approx(f1[i])
        assert m["per_class"][name]["support"] == sup[i]
    assert "auc" not in m  # AUC only for two classes
    assert m["n_groups"] == 40 and m["n_images"] == 200
    lo, hi = m["ci95"]
    assert lo < m["accuracy"] < hi
    json.dumps(m)  # serialisable
    table = format_metrics_table(m, "test")
    assert "monocyte" in table and "95% CI" in table


def test_macro_f1_skips_absent_classes_like_sklearn():
    y = np.array([0, 0, 1, 1])
    p = np.eye(4)[[0, 1, 1, 1]] * 0.9 + 0.025
    m = classification_metrics(y, p, LABELS4, n_boot=0)
    assert m["macro_f1"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))


def test_binary_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300) * 0.5 + 0.4 * y, 1)  # many ties
    p = np.stack([1 - s, s], 1)
    m = classification_metrics(y, p, ["parasitized", "uninfected"], n_boot=0)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s))
    one_class = classification_metrics(np.zeros(5, int), p[:5], ["a", "b"], n_boot=0)
    assert one_class["auc"] is None


def test_ece_known_values():
    # perfectly calibrated: 80% confident, 80% right
    y = np.array([0] * 8 + [1] * 2)
    p = np.tile([0.8, 0.2], (10, 1))
    assert expected_calibration_error(y, p) == pytest.approx(0.0)
    # always 100% confident, half right -> ECE 0.5
    p2 = np.tile([1.0, 0.0], (10, 1))
    y2 = np.array([0, 1] * 5)
    assert expected_calibration_error(y2, p2) == pytest.approx(0.5)


def test_bootstrap_resamples_groups_not_images():
    # 10 groups of 50 identical-outcome images: 5 groups all right, 5 all wrong.
    n_groups, per = 10, 50
    correct = np.repeat([1, 0] * 5, per).astype(bool)
    y = np.zeros(n_groups * per, int)
    pred = np.where(correct, 0, 1)
    groups = np.repeat(np.arange(n_groups), per)
    g = grouped_bootstrap(y, pred, groups, 2, n_boot=2000, seed=1)["accuracy"]
    i = grouped_bootstrap(y, pred, None, 2, n_boot=2000, seed=1)["accuracy"]
    # every grouped replicate is k/10 for an integer k: the unit of evidence is a group
    assert np.allclose(g * 10, np.round(g * 10))
    # grouped spread ~ sqrt(.25/10)=0.16; image-level ~ sqrt(.25/500)=0.022
    assert g.std() > 0.12
    assert i.std() < 0.03
    p = np.stack([1 - pred, pred], 1).astype(float)
    m = classification_metrics(y, p, ["a", "b"], groups=groups, n_boot=2000)
    assert m["n_groups"] == 10
    assert m["ci95"][1] - m["ci95"][0] > 0.4


def test_bootstrap_is_seeded():
    y, p = _random_case(seed=2)
    groups = [i % 17 for i in range(len(y))]
    a = classification_metrics(y, p, LABELS4, groups=groups, n_boot=300, seed=5)
    b = classification_metrics(y, p, LABELS4, groups=groups, n_boot=300, seed=5)
    assert a["ci95"] == b["ci95"]


def test_bad_input_messages():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], np.ones((2, 3)) / 3, ["a", "b"])
    with pytest.raises(ValueError, match="0..1"):
        classification_metrics([0, 2], np.ones((2, 2)) / 2, ["a", "b"])
    with pytest.raises(ValueError, match="groups"):
        classification_metrics([0, 1], np.ones((2, 2)) / 2, ["a", "b"], groups=["g"])


def test_abstention_threshold_reaches_target():
    y, p = _random_case(n=400, seed=4)
    r = choose_abstention_threshold(y, p, target_accuracy=0.9)
    conf = p.max(1)
    kept = conf >= r["threshold"]
    assert r["met_target"]
    assert (p.argmax(1)[kept] == y[kept]).mean() >= 0.9
    assert r["coverage"] == pytest.approx(kept.mean())
    # lowest such threshold: keeping the next less-confident image would break the target
    below = np.sort(conf[~kept])
    if len(below):
        kept2 = conf >= below[-1]
        assert (p.argmax(1)[kept2] == y[kept2]).mean() < 0.9
    # an already-accurate model flags nothing
    perfect = np.eye(4)[y] * 0.7 + 0.075
    assert choose_abstention_threshold(y, perfect)["coverage"] == 1.0


def test_plots_write_png(tmp_path):
    hist = [
        {"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.4, "val_loss": 1.1, "val_accuracy": 0.5},
        {"epoch": 2, "train_loss": 0.8, "train_accuracy": 0.7, "val_loss": 0.9, "val_accuracy": 0.6, "best": True},
    ]
    a = plot_history(hist, tmp_path / "curves.png")
    b = plot_confusion([[3, 1], [0, 4]], ["parasitized", "uninfected"], tmp_path / "cm.png")
    for f in (a, b):
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_vote_accuracy_counts_cells_not_images():
    from cellhub.metrics import classification_metrics, format_metrics_table, group_vote_accuracy

    # cell A: 3 images, 2 right -> the cell is right; cell B: 1 image right; cell C: 4 images, 1 right -> wrong
    y = [0, 0, 0, 1, 1, 1, 1, 1]
    pred = [0, 0, 1, 1, 0, 0, 0, 1]
    p = np.eye(2)[pred] * 0.8 + 0.1
    groups = ["A", "A", "A", "B", "C", "C", "C", "C"]
    g = group_vote_accuracy(y, p, groups)
    assert g == {"group_accuracy": 2 / 3, "n_groups_correct": 2, "n_groups": 3}
    m = classification_metrics(y, p, ["a", "b"], groups=groups, n_boot=10)
    assert m["accuracy"] == pytest.approx(4 / 8) and m["n_groups_correct"] == 2
    assert "2/3 groups right" in format_metrics_table(m)
    # a tie of votes goes to the label with more probability mass
    tie = group_vote_accuracy([1, 1], np.array([[0.55, 0.45], [0.1, 0.9]]), ["x", "x"])
    assert tie["n_groups_correct"] == 1
    assert "group_accuracy" not in classification_metrics(y, p, ["a", "b"], n_boot=0)
