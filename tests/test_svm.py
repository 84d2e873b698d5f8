"""SVM baseline: the pickle-free predictor reproduces scikit-learn; save/load round trip; CLI."""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cellhub.svm import SVMClassifier, extract_features

ROOT = Path(__file__).resolve().parents[1]


def _blobs(k, n=90, d=12, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d))
    X[np.arange(n), y] += 2.0
    return X, y


@pytest.mark.parametrize("k,kernel", [(2, "rbf"), (3, "rbf"), (4, "rbf"), (4, "linear")])
def test_numpy_predictor_matches_sklearn(k, kernel):
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    X, y = _blobs(k, seed=k)
    Xt = np.random.default_rng(99).normal(size=(200, X.shape[1])) * 1.5
    ours = SVMClassifier([f"c{i}" for i in range(k)], kernel=kernel).fit(X, y)
    sc = StandardScaler().fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = SVC(kernel=kernel, probability=True, decision_function_shape="ovo", random_state=0).fit(sc.transform(X), y)
        ref_proba = ref.predict_proba(sc.transform(Xt))
    np.testing.assert_allclose(ours.decision_function(Xt), ref.decision_function(sc.transform(Xt)), atol=1e-9)
    np.testing.assert_array_equal(ours.predict_features(Xt), ref.predict(sc.transform(Xt)))
    np.testing.assert_allclose(ours.predict_proba_features(Xt), ref_proba, atol=1e-9)


def test_unfitted_and_bad_input_errors():
    clf = SVMClassifier(["a", "b"])
    with pytest.raises(RuntimeError, match="not fitted"):
        clf.predict_proba_features(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least two"):
        clf.fit(np.zeros((4, 3)), [0, 0, 0, 0])
    with pytest.raises(ValueError, match="kernel"):
        SVMClassifier(["a", "b"], kernel="laplace").fit(*_blobs(2))


@pytest.fixture(scope="module")
def tiny_split():
    from datasets import ClassLabel, Dataset, Features, Image, Value

    from cellhub.synthetic import draw_blood_cell
    from cellhub.tasks import get_task

    labels = list(get_task("blood-cells").labels)
    rows = {"image": [], "label": [], "group": [], "file": []}
    for li, lab in enumerate(labels):
        for c in range(6):
            rows["image"].append(draw_blood_cell(lab, size=(32, 32), seed=li * 50 + c))
            rows["label"].append(li)
            rows["group"].append(f"{lab}{c}")
            rows["file"].append(f"{lab}{c}.png")
    feats = Features({"image": Image(), "label": ClassLabel(names=labels), "group": Value("string"),
                      "file": Value("string")})
    return Dataset.from_dict(rows, features=feats)


def test_round_trip_gives_identical_decisions_and_probabilities(tiny_split, tmp_path, monkeypatch):
    from cellhub import hub, models, svm, transforms

    torch.manual_seed(0)
    backbone = models.create_model("smallcnn", "blood-cells", pretrained=False, image_size=16)
    feats = extract_features(backbone, tiny_split, cache_dir=tmp_path / "feats", progress=False)
    assert feats.shape == (len(tiny_split), backbone.num_features)
    # the second call reads the cache instead of running the backbone
    monkeypatch.setattr(svm, "pool_features", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    np.testing.assert_array_equal(extract_features(backbone, tiny_split, cache_dir=tmp_path / "feats",
                                                   progress=False), feats)
    monkeypatch.undo()

    y = np.asarray(tiny_split["label"])
    clf = SVMClassifier(backbone.cellhub_config["labels"], backbone=backbone, task="blood-cells").fit(feats, y)
    clf.save_pretrained(tmp_path / "svm")
    files = sorted(p.name for p in (tmp_path / "svm").iterdir())
    assert files == ["backbone.safetensors", "config.json", "svm.safetensors"]
    cfg = json.loads((tmp_path / "svm" / "config.json").read_text())
    assert cfg["model_type"] == "cellhub-svm" and cfg["backbone"] == "smallcnn"
    assert cfg["labels"] == backbone.cellhub_config["labels"]
    assert cfg["pretrained_cfg"]["input_size"] == [3, 16, 16]

    for loaded in (SVMClassifier.from_pretrained(tmp_path / "svm"), hub.load_pretrained(tmp_path / "svm")):
        assert isinstance(loaded, SVMClassifier)
        np.testing.assert_array_equal(loaded.predict_proba_features(feats), clf.predict_proba_features(feats))
        np.testing.assert_array_equal(loaded.decision_function(feats), clf.decision_function(feats))
        # from images through the reloaded backbone: same probabilities as from the cached features
        tf = transforms.eval_transform(transforms.resolve_data_config(loaded))
        x = torch.stack([tf(im) for im in tiny_split["image"]])
        np.testing.assert_allclose(loaded.predict_proba(x), clf.predict_proba_features(feats), atol=1e-5)
        np.testing.assert_array_equal(loaded.predict(x), clf.predict_features(feats))


def _load_cli():
    spec = importlib.util.spec_from_file_location("svm_cli", ROOT / "train" / "svm_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_svm_baseline_cli_end_to_end(tmp_path, capsys):
    from cellhub.evaluation import run_evaluate
    from cellhub.synthetic import write_kaggle_malaria

    data = write_kaggle_malaria(tmp_path / "kaggle", n_per_class=16, n_patients=4, size=32)
    out = tmp_path / "svm"
    cli = _load_cli()
    rc = cli.main(["--dataset", str(data), "--backbone", "smallcnn", "--from-scratch", "--image-size", "16",
                   "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--n-boot", "50",
                   "--threads", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    for name in ("svm.safetensors", "backbone.safetensors", "config.json", "metrics.json", "README.md",
                 "confusion_matrix.png"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "auc", "ci95", "n_images", "n_groups", "per_class", "confusion_matrix"):
        assert key in m
    cfg = json.loads((out / "config.json").read_text())
    assert 0 < cfg["cellhub"]["abstention_threshold"] <= 1
    assert m["split"]["name"] == "validation"  # no validation in the download: grouped hold-out
    with pytest.raises(SystemExit):
        cli.parse_args(["--dataset", "x", "--push-to-hub"])
    # `cellhub evaluate` loads the SVM checkpoint like any other; the download is a single split
    ev = run_evaluate(str(out), str(data), None, n_boot=50, progress=False)
    assert ev["n_images"] == m["splits"]["train"]["n_images"] + m["n_images"]
    assert ev["model"] == "svm" and 0.0 <= ev["accuracy"] <= 1.0


def test_from_pretrained_hub_download_never_fetches_pickles(tmp_path, monkeypatch):
    """A Hub id goes through snapshot_download with safe patterns only (the repo's pickles stay remote)."""
    import fnmatch

    import huggingface_hub

    folder = tmp_path / "saved"
    SVMClassifier(["a", "b"]).fit(*_blobs(2)).save_pretrained(folder)
    seen = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        seen["repo_id"], seen["allow_patterns"] = repo_id, allow_patterns
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    clf = SVMClassifier.from_pretrained("someone/svm-baseline")
    assert seen["repo_id"] == "someone/svm-baseline" and clf.is_fitted
    patterns = seen["allow_patterns"]
    assert patterns, "a Hub download must name what it may fetch"
    for name in ("pytorch_model.bin", "model.pkl", "svm.joblib", "weights.pt"):
        assert not any(fnmatch.fnmatch(name, p) for p in patterns), name
    for name in ("svm.safetensors", "config.json"):
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
