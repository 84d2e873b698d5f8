"""Data-parallel evaluate/predict: ``accelerate launch`` with two CPU processes gives one report / one CSV."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cellhub.distributed import Processes
from cellhub.synthetic import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")


def test_one_process_is_the_whole_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs = Processes()
    assert (procs.rank, procs.world, procs.is_main, procs.device) == (0, 1, True, None)
    assert procs.shard(7) == range(7) and procs.gather({"a": 1}) == [{"a": 1}]
    procs.barrier()
    with procs.main_first():
        pass
    procs.close()


@pytest.mark.parametrize("n, world", [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_shards_cover_the_inputs_in_order(monkeypatch, n, world):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    blocks = []
    for rank in range(world):
        procs = Processes()
        procs.rank, procs.world = rank, world
        blocks.append(list(procs.shard(n)))
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cellhub import hub, models

    tmp = tmp_path_factory.mktemp("dist")
    data = write_imagefolder(tmp / "data", "malaria", n_per_class=9, splits=("test",), size=32)
    torch.manual_seed(0)
    model = models.create_model("smallcnn", "malaria", pretrained=False, image_size=16)
    with torch.no_grad():
        model.head.weight.normal_(0, 2.0)
    ckpt = hub.save_pretrained(model.eval(), tmp / "ckpt")
    return data, ckpt


def _run(args: list[str], processes: int, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CELLHUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    if processes > 1:
        if ACCELERATE is None:
            pytest.skip("accelerate's launcher is not installed")
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cellhub", *args]
    else:
        cmd = [sys.executable, "-m", "cellhub", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_evaluate_two_processes_match_one(setup, tmp_path):
    data, ckpt = setup
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    common = ["evaluate", str(ckpt), str(data), "--n-boot", "200", "--no-progress"]
    _run([*common, "--json", str(one)], 1, tmp_path / "c1")
    proc = _run([*common, "--json", str(two)], 2, tmp_path / "c2")
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["processes"] == 2 and "processes" not in a
    for key in ("accuracy", "ci95", "macro_f1", "confusion_matrix", "n_images", "n_groups", "auc"):
        assert a[key] == b[key], key
    assert proc.stdout.count("confusion matrix") == 1  # one report, from the main process


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_predict_two_processes_write_one_csv_and_resume(setup, tmp_path):
    data, ckpt = setup
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    _run(["predict", str(ckpt), str(data), "--csv", str(one), "--quiet"], 1, tmp_path / "c1")
    proc = _run(["predict", str(ckpt), str(data), "--csv", str(two), "--quiet"], 2, tmp_path / "c2")
    assert _rows(one) == _rows(two)  # same rows, same (input) order
    assert not list(tmp_path.glob("two.csv.part*"))
    assert proc.stdout.count("images in") == 1 and "18 images in" in proc.stdout
    # an interrupted two-process run: the main CSV has 5 rows, process 1's part file 3 more
    rows = _rows(one)
    with open(two, "w", newline="") as fh:
        csv.writer(fh).writerows(rows[:6])
    with open(tmp_path / "two.csv.part1", "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0], *rows[10:13]])
    proc = _run(["predict", str(ckpt), str(data), "--csv", str(two), "--quiet", "--resume"], 2, tmp_path / "c2")
    assert "8 image(s) already in" in proc.stdout
    resumed = _rows(two)
    assert resumed[0] == rows[0] and sorted(resumed[1:]) == sorted(rows[1:])  # every file once
    assert not list(tmp_path.glob("two.csv.part*"))
