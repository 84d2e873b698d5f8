"""train/finetune.py end to end on a tiny synthetic Kaggle-layout dataset."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cellhub.synthetic import write_kaggle_malaria

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "finetune.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("finetune_cli", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def malaria(tmp_path_factory):
    return write_kaggle_malaria(tmp_path_factory.mktemp("mal") / "kaggle", n_per_class=16, n_patients=4, size=32)


def _args(data, out, *extra):
    return ["--dataset", str(data), "--model", "smallcnn", "--epochs", "2", "--batch-size", "8",
            "--image-size", "16", "--output-dir", str(out), "--cache-dir", str(out.parent / "cache"),
            "--threads", "1", "--n-boot", "50", "--no-progress", *extra]


def test_finetune_writes_every_output(malaria, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), *_args(malaria, out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "README.md", "metrics.json", "history.json",
                 "curves.png", "confusion_matrix.png"):
        assert (out / name).is_file(), f"{name} missing; have {sorted(p.name for p in out.iterdir())}"
    for png in ("curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "last_checkpoint" / "state.json").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"]["name"] == "validation"  # the Kaggle malaria download has no test split
    for key in ("accuracy", "macro_f1", "auc", "ci95", "n_images", "n_groups", "per_class", "confusion_matrix"):
        assert key in metrics
    assert set(metrics["splits"]) == {"train", "validation"}
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(history[0])

    config = json.loads((out / "config.json").read_text())
    ch = config["cellhub"]
    assert ch["labels"] == ["parasitized", "uninfected"]
    assert ch["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert 0 < ch["abstention_threshold"] <= 1
    assert ch["recipe"]["epochs"] == 2 and ch["recipe"]["seed"] == 0
    assert "abstention" in ch and "rule" in ch["abstention"]

    from cellhub.hub import load_pretrained

    model = load_pretrained(out)
    assert model.cellhub_config["abstention_threshold"] == pytest.approx(ch["abstention_threshold"])
    assert "accuracy" in proc.stdout and "95% CI" in proc.stdout


def test_push_to_hub_needs_a_repo_id_at_parse_time(capsys):
    cli = _load_script()
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--dataset", "malaria", "--push-to-hub"])
    assert e.value.code == 2
    assert "--hub-model-id" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--dataset", "malaria", "--push-to-hub", "--hub-model-id", "not a repo id!"])
    args = cli.parse_args(["--dataset", "malaria", "--from-scratch", "--model", "resnet18"])
    cfg = cli.config_from_args(args)
    assert cfg.pretrained is False and cfg.model == "resnet18"


def test_push_to_hub_uploads_the_output_folder(malaria, tmp_path, monkeypatch):
    import cellhub.hub

    calls = []
    monkeypatch.setattr(cellhub.hub, "push_to_hub",
                        lambda folder, repo_id, private=False, token=None: calls.append((Path(folder), repo_id,
                                                                                       private)) or f"https://huggingface.co/{repo_id}")
    out = tmp_path / "run"
    cli = _load_script()
    rc = cli.main(_args(malaria, out, "--epochs", "1", "--push-to-hub", "--hub-model-id", "someone/cellhub-test",
                        "--private"))
    assert rc == 0
    assert calls == [(out, "someone/cellhub-test", True)]


def test_bad_dataset_is_a_clear_error(tmp_path, capsys):
    cli = _load_script()
    rc = cli.main(["--dataset", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_reproduce_quick_writes_the_table(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("reproduce_cli", ROOT / "train" / "reproduce.py")
    rep = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reproduce_cli", rep)  # dataclasses look their module up
    spec.loader.exec_module(rep)
    monkeypatch.setitem(rep.QUICK, "max_train_samples", 48)
    monkeypatch.setitem(rep.QUICK, "n_boot", 50)
    monkeypatch.setitem(rep.QUICK_OVERRIDES, "smallcnn", {"epochs": 1})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = rep.main(["--quick", "--tasks", "malaria", "--only", "smallcnn", "--image-size", "16",
                   "--output-dir", str(tmp_path / "rep"), "--no-progress"])
    assert rc == 0
    text = (tmp_path / "rep" / "RESULTS.md").read_text()
    assert "synthetic images" in text and "Small CNN with BatchNorm" in text
    assert "no test split" in text and "(vs val)" in text
    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert results[0]["status"] == "ok" and results[0]["result"]["splits"]["validation"]["ci95"]


def test_init_from_and_learning_curve(malaria, tmp_path):
    """--init-from continues from a checkpoint; learning_curve.py draws accuracy against labels per class."""
    first = tmp_path / "first"
    assert _load_script().main(_args(malaria, first, "--epochs", "1")) == 0
    spec = importlib.util.spec_from_file_location("learning_curve_cli", ROOT / "train" / "learning_curve.py")
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)
    out = tmp_path / "curve"
    rc = lc.main(["--dataset", str(malaria), "--init-from", str(first), "--sizes", "1", "2", "--epochs", "1",
                  "--image-size", "16", "--batch-size", "8", "--n-boot", "20", "--output-dir", str(out),
                  "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    curve = json.loads((out / "curve.json").read_text())
    pts = curve["points"]
    assert [p["cells_per_class"] for p in pts] == [1, 2]
    assert pts[0]["train_images"] < pts[1]["train_images"]  # more labelled groups, more images
    assert pts[0]["n_images"] == pts[1]["n_images"]  # one validation split for every point
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1 |" in (out / "curve.md").read_text()
    recipe = json.loads((out / "n2" / "config.json").read_text())["cellhub"]["recipe"]
    assert recipe["init_from"] == "local folder 'first' (checkpoint)"
    assert lc.main(["--dataset", str(malaria), "--sizes", "0"]) == 2


def test_dataset_flag_repeats_for_several_sources():
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_cli", ROOT / "train" / "finetune.py")
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    one = ft.config_from_args(ft.parse_args(["--dataset", "a"]))
    two = ft.config_from_args(ft.parse_args(["--dataset", "a", "--dataset", "b", "--group-by", "file"]))
    assert one.dataset == "a" and two.dataset == ["a", "b"] and two.group_by == "file"


def test_cv_folds_run_one_at_a_time_then_resume_pools_them(malaria, tmp_path, monkeypatch, capsys):
    """--cv-fold I trains exactly the fold --cv would (into OUTPUT_DIR/cv/fold-I); --resume then pools
    the finished folds without training them again."""
    mod = _load_script()
    out = tmp_path / "cv"
    for i in (1, 2):
        assert mod.main(_args(malaria, out, "--cv", "2", "--cv-fold", str(i))) == 0
        assert (out / "cv" / f"fold-{i}" / "holdout.npz").is_file()
    assert f"fold 2 of 2 saved to {out / 'cv' / 'fold-2'}" in capsys.readouterr().out
    assert not (out / "cv.json").exists() and not (out / "model.safetensors").exists()

    from cellhub.training import cv as cv_mod

    monkeypatch.setattr(cv_mod, "fit", lambda cfg, **kw: pytest.fail(f"fold trained again: {cfg.output_dir}"))
    assert mod.main(_args(malaria, out, "--cv", "2", "--cv-only", "--resume")) == 0
    pooled = json.loads((out / "cv.json").read_text())
    assert [r["fold"] for r in pooled["folds"]] == [1, 2]
    assert pooled["n_images"] == 32  # every image (16 per class) held out once
    held = json.loads((out / "cv" / "fold-1" / "metrics.json").read_text())
    assert held["split"]["name"] == "holdout" and pooled["folds"][0]["accuracy"] == pytest.approx(held["accuracy"])


@pytest.mark.parametrize("extra, message", [
    (["--cv-fold", "1"], "--cv-fold needs --cv"),
    (["--cv", "3", "--cv-fold", "4"], "between 1 and 3"),
    (["--cv", "3", "--cv-fold", "0"], "between 1 and 3"),
    (["--cv", "3", "--cv-fold", "1", "--push-to-hub", "--hub-model-id", "a/b"], "one fold is not a model"),
])
def test_cv_fold_errors_at_parse_time(tmp_path, capsys, extra, message):
    mod = _load_script()
    with pytest.raises(SystemExit):
        mod.parse_args(["--dataset", str(tmp_path), *extra])
    assert message in capsys.readouterr().err
