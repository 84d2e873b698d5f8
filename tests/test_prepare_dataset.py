"""train/prepare_dataset.py: local download -> dataset repository (Parquet + card) -> Hub (mocked)."""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest

from cellhub import synthetic
from cellhub.data import load_cell_dataset

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_dataset", ROOT / "train" / "prepare_dataset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_dataset"] = module
    spec.loader.exec_module(module)
    return module


prep = _load_script()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLHUB_CACHE", str(tmp_path / "cache"))


def test_push_to_hub_needs_a_repo_id_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        prep.parse_args(["data", "--push-to-hub"])
    with pytest.raises(SystemExit):
        prep.parse_args(["data", "--push-to-hub", "no-owner"])
    assert "OWNER/NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prep.parse_args(["data"])  # nothing to do
    args = prep.parse_args(["data", "--push-to-hub", "me/cells"])
    assert args.push_to_hub == "me/cells" and args.output_dir is None


def test_output_dir_round_trip_with_splits_groups_and_embedded_images(tmp_path):
    src = synthetic.write_imagefolder(tmp_path / "src", task="malaria", n_per_class=3, splits=("train", "test"), size=16)
    (src / "test" / "uninfected" / "broken.png").write_bytes(b"")
    before = load_cell_dataset(src, progress=False)
    out = tmp_path / "repo"
    assert prep.main([str(src), "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    card = (out / "README.md").read_text()
    assert "- split: test" in card and "0 = parasitized, 1 = uninfected" in card and "slide/patient" in card
    assert "1 unreadable files" in card
    shutil.rmtree(src)  # the images must be inside the Parquet files, not referenced
    after, report = load_cell_dataset(out, return_report=True)
    assert report.source_kind == "parquet-folder" and report.task == "malaria"
    assert list(after) == ["train", "test"]
    for split in after:
        assert after[split].features["label"].names == ["parasitized", "uninfected"]
        for col in ("label", "group", "file"):
            assert list(after[split][col]) == list(before[split][col])
        assert report.group_method[split] == "column"
    assert after["test"][0]["image"].size == (16, 16)
    with pytest.raises(FileExistsError):
        prep.write_repo_folder(after, report, out)


def test_push_to_hub_uploads_the_folder_in_one_commit(tmp_path):
    src = synthetic.write_kaggle_malaria(tmp_path / "src", n_per_class=2, n_patients=1, size=16)
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            uploaded["create"] = (repo_id, repo_type, private, exist_ok)
            return f"https://huggingface.co/datasets/{repo_id}"

        def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
            # what would be uploaded must be a dataset load_cell_dataset reads
            ds = load_cell_dataset(folder_path)
            uploaded["upload"] = (repo_id, repo_type, sorted(p.name for p in Path(folder_path, "data").iterdir()),
                                  len(ds["train"]), Path(folder_path, "README.md").read_text())

    with mock.patch("huggingface_hub.HfApi", FakeApi):
        assert prep.main([str(src), "--push-to-hub", "me/malaria", "--private", "--token", "t0k"]) == 0
    assert uploaded["token"] == "t0k"
    assert uploaded["create"] == ("me/malaria", "dataset", True, True)
    repo, kind, files, n, card = uploaded["upload"]
    assert (repo, kind, files, n) == ("me/malaria", "dataset", ["train-00000-of-00001.parquet"], 4)
    assert "load_cell_dataset('me/malaria')" in card


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    assert prep.main([str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
