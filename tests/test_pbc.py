"""The 8-class PBC task: its folders are recognised, other tasks take the classes they know."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellhub.data import DatasetLayoutError, infer_task, load_cell_dataset
from cellhub.tasks import get_task

PBC_FOLDERS = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLHUB_CACHE", str(tmp_path / "cache"))


def _folder(root: Path, names, n: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{name}_{i}.jpg")
    return root


def test_pbc_download_is_the_pbc_task_and_its_hidden_file_is_reported(tmp_path):
    root = _folder(tmp_path / "pbc", PBC_FOLDERS)
    (root / "neutrophil" / ".DS_169665.jpg").write_bytes(b"Bud1 not an image")  # as in the real download
    dsd, report = load_cell_dataset(root, return_report=True, group_by="file", progress=False)
    assert report.task == "pbc" and infer_task(root).name == "pbc"
    names = dsd["train"].features["label"].names
    assert names == list(get_task("pbc").labels) and "immature granulocyte" in names
    assert len(dsd["train"]) == 16
    assert [(Path(p).name, r.split(" (")[0]) for p, r in report.skipped] == [(".DS_169665.jpg", "hidden file")]


def test_four_class_task_takes_what_it_knows_from_pbc_and_says_what_it_ignored(tmp_path):
    root = _folder(tmp_path / "pbc", PBC_FOLDERS)
    dsd, report = load_cell_dataset(root, task="blood-cells", return_report=True, group_by="file", progress=False)
    assert dsd["train"].features["label"].names == list(get_task("blood-cells").labels)
    assert len(dsd["train"]) == 8
    ignored = sorted(n.split()[1] for n in report.notes if n.startswith("ignored"))
    assert ignored == ["basophil/", "erythroblast/", "ig/", "platelet/"]
    assert all("(2 images)" in n for n in report.notes if n.startswith("ignored"))


def test_kaggle_four_folders_stay_blood_cells_and_a_typo_is_still_an_error(tmp_path):
    kaggle = _folder(tmp_path / "k", ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"))
    assert infer_task(kaggle).name == "blood-cells"  # the smaller task that knows all four
    typo = _folder(tmp_path / "t", ("eosinophil", "neutrophils"))
    with pytest.raises(DatasetLayoutError, match="neutrophils"):
        load_cell_dataset(typo, task="blood-cells", progress=False)
    with pytest.raises(DatasetLayoutError, match="'basophil', 'platelet'.*blood-cells"):
        load_cell_dataset(_folder(tmp_path / "p", ("basophil", "platelet")), task="blood-cells", progress=False)


def test_pbc_under_the_blood_cell_task_is_not_warned_about_missing_smears(tmp_path, caplog):
    # one cell per image, no smears it was cut from: near-duplicate groups, and no warning that
    # tells the user to find smears that do not exist (the Kaggle layout still gets it: test_groups)
    import logging

    root = _folder(tmp_path / "pbc", PBC_FOLDERS)
    with caplog.at_level(logging.INFO, logger="cellhub.data"):
        dsd, report = load_cell_dataset(root, task="blood-cells", return_report=True, progress=False)
    assert report.group_by == "near-duplicates" and len(dsd["train"]) == 8
    assert "No full smears" not in caplog.text
    assert "grouped with its near-duplicates" in caplog.text
