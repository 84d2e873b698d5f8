"""train/rbc_negatives.py: malaria-free red cells of BCCD-style fields as `uninfected` examples."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from cellhub.data import load_cell_dataset
from cellhub.synthetic import write_kaggle_blood_cells

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("rbc_negatives", ROOT / "train" / "rbc_negatives.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A ../shared/data-like tree: Kaggle TRAIN + TEST crops cut from 16 smears; box files for all but two."""
    root = tmp_path_factory.mktemp("shared")
    write_kaggle_blood_cells(root / "blood-cells", n_cells_per_class=2, copies=2, splits=("TRAIN", "TEST"))
    ann = root / "bccd-boxes" / "Annotations"
    ann.mkdir(parents=True)
    for xml in sorted((root / "blood-cells" / "dataset-master" / "dataset-master" / "Annotations").glob("*.xml"))[:-2]:
        shutil.copy(xml, ann / xml.name)
    return root


def test_only_tuning_fields_of_train_cells_are_used(data, tmp_path, monkeypatch):
    mod = _script()
    monkeypatch.setenv("CELLHUB_CACHE", str(tmp_path / "cache"))
    ids, why = mod.eligible_fields(data)
    from field_accuracy import split_ids  # bench/ is on the path once the script is loaded

    parts = split_ids(data / "bccd-boxes" / "Annotations")
    # smears 0-7 hold the TRAIN cells, 8-15 the TEST cells; every third annotated id is held out
    assert ids and set(ids) <= set(parts["tune"]) and all(int(i.split("_")[1]) < 8 for i in ids)
    assert why["white cell not in TRAIN"] > 0 and why["held out or no box file"] >= len(parts["heldout"]) + 2
    out = tmp_path / "neg"
    assert mod.main(["--data", str(data), "--output-dir", str(out)]) == 0
    dsd = load_cell_dataset(out, task="malaria", progress=False)
    train = dsd["train"]
    assert len(train) > len(ids)  # several red cells per field
    assert set(train["label"]) == {train.features["label"].names.index("uninfected")}
    assert {g.removeprefix("bccd-field:") for g in train["group"]} == set(ids)  # grouped by field
    img = train[0]["image"]
    assert img.size == (128, 128) and img.getpixel((0, 0)) == (0, 0, 0)  # like the NIH crops: the cell on black
