"""Smoke test of the benchmark harness: bench/run.py runs one benchmark in a micro mode and
prints its summary line in the documented format (the figures themselves are not checked)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402


def test_result_line_format() -> None:
    r = C.Result("demo", 1.234, "fast/slow;", {"a_ms": 12.345, "n": 3, "what": "two words"}, "python bench/x.py --quick")
    assert r.line() == "demo: ratio=1.23 fast/slow; a_ms=12.35 n=3 what='two words' cmd='python bench/x.py --quick'"
    assert C.Result("demo", None, "x").line().startswith("demo: ratio=n/a x")
    assert C.percentile([1, 2, 3, 4], 50) == 2.5 and C.percentile([5.0], 95) == 5.0
    assert C.median([3.0, 1.0, 2.0]) == 2.0


def test_run_py_runs_one_benchmark_and_prints_the_line(tmp_path: Path) -> None:
    md = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--only", "cam",
           "--bench-args", "--models smallcnn --repeats 2", "--markdown", str(md), "--note", "smoke test"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pattern = re.compile(r"^cam: ratio=\d+\.\d\d \S.* corr_min=(\S+) .*status=(PASS|FAIL) "
                         r"cmd='python bench/bench_cam.py --quick --models smallcnn --repeats 2'$", re.M)
    lines = pattern.findall(proc.stdout)
    assert len(lines) == 2, proc.stdout  # once as it runs, once in the summary
    assert float(lines[0][0]) >= 0.999  # the exact CAM matches pytorch-grad-cam's
    text = md.read_text()
    assert "`python bench/run.py --quick --only cam" in text and "smoke test" in text and "cam: ratio=" in text


def _fake_cv_run(root: Path, correct: list[list[bool]], groups: list[list[str]]) -> Path:
    """A --cv output folder whose fold I holds images with these groups, right where ``correct`` says."""
    from cellhub.training.cv import fold_dir
    from cellhub.training.state import save_holdout

    for i, (ok, g) in enumerate(zip(correct, groups)):
        y = np.array([k % 2 for k in range(len(ok))])
        p = np.eye(2)[np.where(ok, y, 1 - y)] * 0.8 + 0.1
        save_holdout(fold_dir(root, i), p, y, g)
    return root


def test_cv_compare_pairs_the_folds_and_refuses_different_splits(tmp_path: Path) -> None:
    import cv_compare

    groups = [[f"malaria|P{k // 3}" for k in range(12)] + ["other|F1"] * 2, [f"malaria|Q{k // 3}" for k in range(12)]]
    a_ok = [[True] * 6 + [False] * 6 + [True, True], [True] * 12]
    b_ok = [[True] * 9 + [False] * 3 + [False, False], [True] * 11 + [False]]
    a = _fake_cv_run(tmp_path / "a", a_ok, groups)
    b = _fake_cv_run(tmp_path / "b", b_ok, groups)
    r = cv_compare.compare(a, b, source="malaria", n_boot=500)
    assert [f["n"] for f in r["folds"]] == [12, 12]
    assert r["folds"][0]["a"] == 0.5 and r["folds"][0]["b"] == 0.75
    assert r["a"] == 18 / 24 and r["b"] == 20 / 24 and r["n_groups"] == 8
    lo, hi = r["ci95"]
    assert lo <= r["b_minus_a"] <= hi and hi > lo
    both = cv_compare.compare(a, b, n_boot=100)  # all sources: the two "other" images count too
    assert both["n_images"] == 26 and both["b"] == 20 / 26
    c = _fake_cv_run(tmp_path / "c", a_ok, [groups[0], [f"malaria|R{k}" for k in range(12)]])
    with pytest.raises(SystemExit, match="held out different images"):
        cv_compare.compare(a, c)
    with pytest.raises(SystemExit, match="not a --cv run"):
        cv_compare.compare(a, tmp_path / "missing")


def test_cv_tta_views_are_the_eight_symmetries_of_the_square() -> None:
    import torch
    from cv_tta import views

    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    vs = views(x)
    assert len(vs) == 8 and torch.equal(vs[0], x)
    assert len({tuple(v.flatten().tolist()) for v in vs}) == 8  # all distinct
    assert all(torch.equal(v.flip(-1).flip(-1), v) for v in vs)
    assert any(torch.equal(v, torch.rot90(x, 1, (-2, -1))) for v in vs)  # a rotation is among them


def test_wbc_combine_rules_add_rescues_and_veto_drops() -> None:
    """bench/wbc_combine.py: the network adds a cell the finder missed only above its threshold and
    where no finder box is; a finder box without a network peak on it is vetoed."""
    from wbc_combine import combine, score, wilson

    finder = [(0, 0, 40, 40), (100, 100, 140, 140)]
    net = [((2, 2, 42, 42), 0.9),          # on finder box 1
           ((200, 200, 240, 240), 0.55),   # a cell the finder missed
           ((101, 99, 141, 139), 0.12)]    # a weak peak on finder box 2
    assert combine(finder, net, None, None) == finder
    assert combine(finder, net, 0.5, None) == [*finder, (200, 200, 240, 240)]
    assert combine(finder, net, 0.6, None) == finder
    assert combine(finder, net, None, 0.2) == [finder[0]]
    assert combine(finder, net, None, 0.1) == finder
    truth = [(0, 0, 40, 40), (200, 200, 240, 240)]
    fields = [{"finder": finder, "net": net, "truth": truth}]
    both = score(fields, 0.5, 0.2)
    assert (both["matched"], both["found"], both["true"]) == (2, 2, 2) and both["f1"] == 1.0
    alone = score(fields, None, None)
    assert (alone["recall"], alone["precision"]) == (0.5, 0.5)
    lo, hi = wilson(97, 104)
    assert 0.86 < lo < 0.87 and 0.96 < hi < 0.97


def test_cv_ensemble_matches_images_across_folds_and_averages(tmp_path: Path) -> None:
    """bench/cv_ensemble.py: images are matched by source and file although the runs' folds differ;
    the ensemble is the mean probability; other data is refused."""
    import cv_ensemble

    from cellhub.training.cv import fold_dir
    from cellhub.training.state import save_holdout

    def run(root, folds):  # folds: [(files, p_class1)], label of f"i{k}" = k % 2
        for i, (files, p1) in enumerate(folds):
            y = np.array([int(f[1:]) % 2 for f in files])
            probs = np.stack([1 - np.asarray(p1), np.asarray(p1)], axis=1)
            save_holdout(fold_dir(root, i), probs, y, [f"src|g{int(f[1:]) // 2}" for f in files], files)
        return root

    # A: i0..i3 held out in fold 1, i4..i7 in fold 2; B: other folds, other order
    a = run(tmp_path / "a", [(["i0", "i1", "i2", "i3"], [0.4, 0.9, 0.6, 0.45]),
                             (["i4", "i5", "i6", "i7"], [0.2, 0.8, 0.3, 0.7])])
    b = run(tmp_path / "b", [(["i7", "i2", "i5", "i0"], [0.7, 0.2, 0.8, 0.1]),
                             (["i3", "i1", "i6", "i4"], [0.9, 0.4, 0.3, 0.2])])
    r = cv_ensemble.ensemble([a, b], n_boot=200)
    # A is wrong on i2 (0.6 for label 0) and i3 (0.45 for label 1); B is wrong on i1 (0.4)
    assert r["runs"] == [6 / 8, 7 / 8]
    # means: i1 0.65 right, i2 0.4 right, i3 0.675 right -> all 8 right
    assert r["ensemble"] == 1.0 and r["n_images"] == 8 and r["n_groups"] == 4
    assert r["agree"] == 5 / 8 and r["agree_accuracy"] == 1.0  # they disagree on i1, i2, i3
    assert r["ensemble_minus_a"] == pytest.approx(0.25) and r["ci95"][0] <= 0.25 <= r["ci95"][1]
    assert r["runs_auc"] == [pytest.approx(15 / 16), pytest.approx(1.0)] and r["ensemble_auc"] == pytest.approx(1.0)
    other = run(tmp_path / "c", [(["i0", "i1", "i2", "i3"], [0.1] * 4), (["i4", "i5", "i6", "i9"], [0.1] * 4)])
    with pytest.raises(SystemExit, match="never held out 1"):
        cv_ensemble.ensemble([a, other])
    with pytest.raises(SystemExit, match="no held-out image of source"):
        cv_ensemble.ensemble([a, b], source="pbc")


def test_cv_ensemble_record_writes_the_consensus_into_each_checkpoint_and_its_card(tmp_path: Path) -> None:
    """bench/cv_ensemble.py --record: the consensus's out-of-fold figures (pooled, per source) go into
    each published checkpoint's metrics.json and card; a checkpoint that is not its run's is refused
    before anything is written."""
    import json

    import cv_ensemble

    from cellhub import hub
    from cellhub.models import create_model
    from cellhub.training.cv import fold_dir
    from cellhub.training.state import save_holdout

    def run(root, folds):  # folds: [(files, p_class1)]; label of f"{src}/i{k}" = k % 2, source = src
        for i, (files, p1) in enumerate(folds):
            y = np.array([int(f.split("/i")[1]) % 2 for f in files])
            probs = np.stack([1 - np.asarray(p1), np.asarray(p1)], axis=1)
            save_holdout(fold_dir(root, i), probs, y, [f"{f.split('/')[0]}|g{f}" for f in files], files)
        return root

    files = [f"{src}/i{k}" for src in ("kaggle", "pbc") for k in range(4)]
    a = run(tmp_path / "a", [(files[:4], [0.4, 0.9, 0.6, 0.45]), (files[4:], [0.2, 0.8, 0.3, 0.7])])
    b = run(tmp_path / "b", [(files[4:], [0.1, 0.9, 0.2, 0.6]), (files[:4], [0.1, 0.4, 0.2, 0.8])])
    # A: 6/8 right (i2, i3 of kaggle wrong); B: 7/8 (kaggle i1 wrong); mean: kaggle i1 0.65, i2 0.4,
    # i3 0.625 -> all 8 right; they agree on 5 of 8
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=32)
    ckpts = []
    for name, acc in (("model-a", 0.75), ("model-b", 0.875)):
        pooled = {"accuracy": acc, "ci95": [acc - 0.1, acc], "macro_f1": acc, "n_images": 8, "n_groups": 8}
        cv = {"k": 2, "folds": [{"fold": 1, "n_images": 4, "n_groups": 4, "accuracy": acc}],
              "mean": {"accuracy": acc}, "sd": {"accuracy": 0.0}, "pooled": pooled, "n_images": 8, "n_groups": 8}
        ckpts.append(hub.save_pretrained(model, tmp_path / name, metrics={"accuracy": acc, "cross_validation": cv}))
    assert "Used together" not in (ckpts[0] / "README.md").read_text()

    before = [(c / "metrics.json").read_text() for c in ckpts]
    with pytest.raises(SystemExit, match="not .*out-of-fold accuracy"):
        cv_ensemble.record([b, a], ckpts, n_boot=50)  # the runs in the other order
    assert [(c / "metrics.json").read_text() for c in ckpts] == before

    entry = cv_ensemble.record([a, b], ckpts, n_boot=50)
    assert entry["models"] == ["model-a", "model-b"] and entry["pooled"]["accuracy"] == 1.0
    assert entry["pooled"]["n_images"] == 8 and set(entry["per_source"]) == {"kaggle", "pbc"}
    assert entry["per_source"]["kaggle"]["n_images"] == 4 and entry["agree"] == 5 / 8
    for c in ckpts:
        saved = json.loads((c / "metrics.json").read_text())
        assert saved["cross_validation"]["consensus"] == json.loads(json.dumps(entry))
        assert saved["accuracy"] in (0.75, 0.875)  # the rest is kept
        card = (c / "README.md").read_text()
        assert "take the consensus of `model-a`, `model-b`" in card
        assert "that consensus scores: accuracy 1.000" in card and "- kaggle: accuracy 1.000" in card
        assert "same label to 62.5% of the images" in card
    with pytest.raises(SystemExit, match="one checkpoint per run"):
        cv_ensemble.record([a, b], ckpts[:1])


def test_field_differential_knows_which_fold_held_out_each_field(tmp_path: Path) -> None:
    from field_differential import _held_out_by

    from cellhub.training.cv import fold_dir
    from cellhub.training.state import save_holdout

    for i, groups in enumerate([["blood-cells|f1", "blood-cells|f2"], ["blood-cells|f3", "pbc|p9"]]):
        save_holdout(fold_dir(tmp_path, i), np.full((len(groups), 2), 0.5), np.zeros(len(groups), int), groups)
    held = _held_out_by(tmp_path)
    assert held["f1"] == held["f2"] == fold_dir(tmp_path, 0) and held["f3"] == fold_dir(tmp_path, 1)
    assert held["p9"] == fold_dir(tmp_path, 1)  # other sources' groups are there too, unused
    with pytest.raises(SystemExit, match="no finished cross-validation fold"):
        _held_out_by(tmp_path / "empty")


def test_cv_tta_scores_a_folds_held_out_files_and_reproduces_its_own_accuracy(tmp_path: Path) -> None:
    """bench/cv_tta.py finds each held-out file through the data loader, predicts it with the fold's
    model, and its plain view reproduces the holdout's own accuracy."""
    import torch
    import cv_tta

    from cellhub import create_model, hub
    from cellhub.data import load_cell_dataset
    from cellhub.predict import Predictor
    from cellhub.synthetic import draw_malaria_cell
    from cellhub.training.cv import fold_dir
    from cellhub.training.state import save_holdout

    data = tmp_path / "malaria"
    for label, folder in (("parasitized", "Parasitized"), ("uninfected", "Uninfected")):
        (data / folder).mkdir(parents=True)
        for k in range(3):
            draw_malaria_cell(label, size=48, seed=k)[0].save(data / folder / f"C{k}P{k}_cell_{k}.png")
    torch.manual_seed(0)
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=32)
    fold = hub.save_pretrained(model, fold_dir(tmp_path / "run", 0))
    ds = load_cell_dataset(data, task="malaria", progress=False)["train"]
    files, y = [str(f) for f in ds["file"]], np.array(ds["label"])
    from datasets import Image as HFImage
    paths = [x["path"] for x in ds.cast_column("image", HFImage(decode=False))["image"]]
    pred = Predictor(hub.load_pretrained(fold), name="m").predict(paths)
    labels = list(model.cellhub_config["labels"])
    probs = np.array([[p.probs[lab] for lab in labels] for p in pred])
    save_holdout(fold, probs, y, [f"malaria|{g}" for g in ds["group"]], files)
    own = float((probs.argmax(1) == y).mean())
    correct = cv_tta.fold_predictions(fold, [Path(cv_tta.source_files([data], "malaria")[("malaria", f)]) for f in files], y)
    assert correct["plain"].mean() == pytest.approx(own)
    assert set(correct) == {"plain", "flips4", "dihedral8"} and len(correct["flips4"]) == len(y)
    other = tmp_path / "other" / "malaria"  # a source of the same name holding other files
    for folder in ("Parasitized", "Uninfected"):
        (other / folder).mkdir(parents=True)
        draw_malaria_cell(folder.lower(), size=48, seed=9)[0].save(other / folder / "C9P9_cell_9.png")
    with pytest.raises(SystemExit, match="in none of the --data folders"):
        cv_tta.main([str(tmp_path / "run"), "--data", str(other)])


def test_cam_pointing_counts_peaks_on_the_centre() -> None:
    """bench/cam_pointing.py: a map peaking in the central half is a hit; its mass share is measured there."""
    from cam_pointing import pointing

    centre = np.zeros((8, 8), dtype=np.float32)
    centre[3:5, 3:5] = 1.0
    corner = np.zeros((8, 8), dtype=np.float32)
    corner[7, 7] = 1.0
    uniform = np.ones((8, 8), dtype=np.float32)
    hits, share = pointing([centre, corner, uniform])
    assert hits == 1  # the centre map only (a flat map's first maximum is the corner pixel)
    assert share == pytest.approx(0.25)  # median of 1.0 (centre), 0.0 (corner), 0.25 (uniform)
    assert pointing([]) == (0, 0.0)


def test_cell_crop_centring_tells_shift_from_pad(tmp_path: Path, capsys) -> None:
    """bench/cell_crop_centring.py on drawn crops whose white cell sits near a corner."""
    import cell_crop_centring as B

    from cellhub.synthetic import draw_smear

    for i in range(3):
        smear, (x0, y0, x1, y1) = draw_smear("monocyte", seed=i, size=(640, 480))
        left, top = int((x0 + x1) / 2 - 45), int((y0 + y1) / 2 - 45)
        (tmp_path / "monocyte").mkdir(exist_ok=True)
        smear.crop((left, top, left + 320, top + 240)).save(tmp_path / "monocyte" / f"m{i}.png")
    assert B.main(["--data", str(tmp_path), "--n", "3"]) == 0
    lines = {m.group(1): dict(kv.split("=") for kv in m.group(2).split())
             for m in re.finditer(r"^cell-crop-centring\[(\S+)\]: (.*)$", capsys.readouterr().out, re.M)}
    assert set(lines) == {"nucleus", "nucleus-pad"} and lines["nucleus"]["images"] == "3"
    assert float(lines["nucleus"]["offset_median"]) > 0.2 and float(lines["nucleus"]["over_0.15"]) == 1.0
    assert float(lines["nucleus-pad"]["offset_p90"]) < 0.05 and float(lines["nucleus-pad"]["outside_median"]) > 0.1
    assert float(lines["nucleus"]["outside_median"]) == 0.0


def test_cv_errors_draws_the_out_of_fold_errors_of_one_label(tmp_path: Path) -> None:
    """bench/cv_errors.py: the errors are the held-out images whose fold's model was wrong, filtered
    by source and given label; the sheet has one tile per drawn error and the listing names them."""
    import cv_errors
    from PIL import Image

    from cellhub.training.cv import fold_dir
    from cellhub.training.state import save_holdout

    data = tmp_path / "data" / "cell_images"  # the class folders one level down, as in the Kaggle zip
    files = []
    for k in range(6):
        lab = ("Parasitized", "Uninfected")[k % 2]
        (data / lab).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (200, 30 * k, 90)).save(data / lab / f"c{k}.png")
        files.append(f"{lab}/c{k}.png")
    run = tmp_path / "run"
    y = np.array([0, 1, 0, 1, 0, 1])
    # fold 1 holds images 0-2, fold 2 images 3-5; wrong: 0 (p=0.2 of its label), 3, 4 (another source)
    p_label = np.array([0.2, 0.9, 0.8, 0.05, 0.3, 0.7])
    p = np.where(y[:, None] == np.arange(2), p_label[:, None], 1 - p_label[:, None])
    groups = ["malaria|P1", "malaria|P1", "malaria|P2", "malaria|P3", "other|F1", "malaria|P3"]
    save_holdout(fold_dir(run, 0), p[:3], y[:3], groups[:3], files[:3])
    save_holdout(fold_dir(run, 1), p[3:], y[3:], groups[3:], files[3:])
    errs = cv_errors.errors(run, "malaria")
    assert [(e["fold"], e["file"]) for e in errs] == [(1, "Parasitized/c0.png"), (2, "Uninfected/c3.png")]
    assert len(cv_errors.errors(run)) == 3
    out = tmp_path / "sheet.png"
    s = cv_errors.main([str(run), "--root", str(tmp_path / "data"), "--source", "malaria", "--label", "0",
                        "--n", "5", "--size", "32", "--out", str(out)])
    assert s["errors"] == 1 and s["by_label"] == {"0": {"n": 1, "p_label<0.1": 0, "0.1-0.3": 1, ">=0.3": 0}}
    assert Image.open(out).size == (32 * 9, 32)
    assert (tmp_path / "sheet.png.txt").read_text().startswith("0\tParasitized/c0.png\tgiven 0\tcalled 1\tp=0.20\tfold 1")
    with pytest.raises(SystemExit, match="not a folder"):
        cv_errors.main([str(run), "--root", str(tmp_path / "nowhere"), "--out", str(out)])
    (tmp_path / "other").mkdir()
    with pytest.raises(SystemExit, match="not under"):
        cv_errors.main([str(run), "--root", str(tmp_path / "other"), "--out", str(out)])


def test_other_lab_scores_both_checkpoints_on_every_image_and_pairs_them(tmp_path: Path) -> None:
    """bench/other_lab.py: a model that always says "parasitized" against one that always says
    "uninfected", on a folder of 6 parasitized and 3 uninfected cells (4 patients)."""
    import torch

    import other_lab
    from cellhub import create_model
    from cellhub.hub import load_pretrained, save_pretrained
    from cellhub.synthetic import write_imagefolder

    data = write_imagefolder(tmp_path / "lab", task="malaria", n_per_class=6, size=32, splits=None)
    for f in sorted((data / "uninfected").iterdir())[:3]:
        f.unlink()
    runs = []
    for k in (0, 1):  # k: the class the model always predicts
        m = create_model("smallcnn", "malaria", pretrained=False, image_size=32)
        with torch.no_grad():
            m.head.bias.copy_(torch.tensor([50.0, -50.0]) * (1 if k == 0 else -1))
        runs.append(str(save_pretrained(m, tmp_path / f"always-{k}")))
    out = other_lab.score(runs, str(data), cache_dir=str(tmp_path / "cache"), n_boot=200, progress=False)
    assert out["n_images"] == 9 and out["task"] == "malaria"
    a, b = (out["checkpoints"][r] for r in runs)
    assert a["accuracy"] == pytest.approx(6 / 9) and b["accuracy"] == pytest.approx(3 / 9)
    assert a["recall"] == {"parasitized": 1.0, "uninfected": 0.0}
    assert out["b_minus_a"]["points"] == pytest.approx(-100 / 3)
    third = create_model("smallcnn", "malaria", pretrained=False, image_size=32)
    third.load_state_dict(load_pretrained(runs[1]).state_dict())  # a second "always uninfected"
    trio = other_lab.score(runs + [str(save_pretrained(third, tmp_path / "always-1b"))], str(data),
                           cache_dir=str(tmp_path / "cache"), n_boot=200, progress=False)
    assert "b_minus_a" not in trio  # paired only for two
    assert trio["consensus"]["accuracy"] == pytest.approx(3 / 9)  # two of three say uninfected
    assert trio["consensus"]["recall"] == {"parasitized": 0.0, "uninfected": 1.0}
    lo, hi = out["b_minus_a"]["ci95"]
    assert lo <= -100 / 3 <= hi
    adapted = other_lab.score(runs, str(data), cache_dir=str(tmp_path / "cache"), n_boot=200, progress=False,
                              adapt_bn=True)
    assert adapted["adapt_bn"] and all(m["batchnorm_layers_adapted"] > 0 for m in adapted["checkpoints"].values())
    assert adapted["checkpoints"][runs[0]]["accuracy"] == pytest.approx(6 / 9)  # a ±50 bias outweighs any statistics
    blood = save_pretrained(create_model("smallcnn", "blood-cells", pretrained=False, image_size=32), tmp_path / "b")
    with pytest.raises(SystemExit, match="different tasks"):
        other_lab.score([runs[0], str(blood)], str(data), progress=False)
