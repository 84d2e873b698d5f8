"""cellhub.audit: counts per split/class, shared groups, exact and near duplicates, skipped files, CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cellhub import synthetic
from cellhub.__main__ import main
from cellhub.audit import audit_dataset, format_report

CLASSES = ("parasitized", "uninfected")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLHUB_CACHE", str(tmp_path / "cache"))


def _tree(root: Path, splits: dict[str, list[int]], copies: int = 1) -> Path:
    """root/{split}/{class}/C{g}P{g}ThinF_{k}.png: one textured picture per group, ``copies`` rotations of it."""
    for split, groups in splits.items():
        for g in groups:
            cls = CLASSES[g % 2]
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            base = synthetic.draw_blood_cell("neutrophil", size=(48, 48), seed=g)
            for k in range(copies):
                img = base.rotate(90 * k) if k < 4 else base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                img.save(root / split / cls / f"C{g}P{g}ThinF_{k}.png")
    return root


def test_audit_counts_and_leaks(tmp_path):
    root = _tree(tmp_path / "d", {"train": [1, 2, 3, 4, 5, 6], "test": [11, 12, 13, 14]})
    # leak 1: an exact copy of a train image in test, same patient -> shared group, exact and near duplicate
    shutil.copy(root / "train" / "uninfected" / "C1P1ThinF_0.png", root / "test" / "uninfected" / "C1P1ThinF_9.png")
    # leak 2: a rotated copy under another patient's name -> only the perceptual hash can see it
    Image.open(root / "train" / "parasitized" / "C2P2ThinF_0.png").rotate(270).save(
        root / "test" / "parasitized" / "C99P99ThinF_0.png")
    (root / "test" / "parasitized" / "C98P98ThinF_0.png").write_bytes(b"\x89PNG broken")
    # leak 3: a flipped copy filed under another patient inside train: a copy the grouping missed
    Image.open(root / "train" / "parasitized" / "C4P4ThinF_0.png").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(
        root / "train" / "uninfected" / "C97P97ThinF_0.png")
    r = audit_dataset(root, progress=False)
    assert r["task"] == "malaria" and r["source_kind"] == "imagefolder"
    assert r["splits"]["train"]["images"] == 7 and r["splits"]["test"]["images"] == 6
    assert r["splits"]["train"]["groups"] == 7 and r["splits"]["test"]["groups"] == 6
    assert r["splits"]["test"]["per_class"] == {"parasitized": {"images": 3, "groups": 3},
                                                "uninfected": {"images": 3, "groups": 3}}
    assert r["shared_groups"]["train|test"] == {"count": 1, "groups": ["C1P1"]}
    assert r["exact_duplicates_across_splits"]["train|test"]["count"] == 1
    near = r["near_duplicates_across_splits"]["train|test"]
    assert near["pairs"] == 2
    assert {tuple(e[:2]) for e in near["examples"]} == {
        ("uninfected/C1P1ThinF_0.png", "uninfected/C1P1ThinF_9.png"),
        ("parasitized/C2P2ThinF_0.png", "parasitized/C99P99ThinF_0.png")}
    assert [s["path"].endswith("C98P98ThinF_0.png") for s in r["skipped"]] == [True]
    # no validation split: the audit shows the one training would draw out of train
    assert r["grouped_validation_check"]["groups_on_both_sides"] == 0
    within = r["near_duplicates_within_split"]
    assert within["test"]["pairs_in_different_groups"] == 0
    assert within["train"]["pairs_in_different_groups"] == 1
    ex = within["train"]["examples_in_different_groups"][0]
    assert {ex[1], ex[3]} == {"C4P4", "C97P97"} and ex[4] == 0
    text = format_report(r)
    assert "groups in both train and test: 1" in text and "skipped 1 files" in text


def test_grouped_split_check_separates_copies(tmp_path):
    # every patient has 4 rotated copies of one picture: a random split leaks, the grouped one cannot
    root = _tree(tmp_path / "d", {"train": list(range(1, 13))}, copies=4)
    r = audit_dataset(root, progress=False)
    chk = r["grouped_validation_check"]
    assert chk["groups_on_both_sides"] == 0
    assert chk["near_duplicate_pairs_across_grouped_split"] == 0
    assert chk["validation_images_with_a_near_duplicate_in_train_random"] > 0
    assert r["exact_duplicates_within_split"]["train"]["sets"] == 0
    within = r["near_duplicates_within_split"]["train"]
    assert within["pairs"] == 12 * 6 and within["pairs_in_different_groups"] == 0  # 4 copies -> 6 pairs a group


def test_audit_cli_writes_json(tmp_path, capsys):
    root = synthetic.write_kaggle_malaria(tmp_path / "m", n_per_class=4, n_patients=2, size=32)
    out = tmp_path / "report" / "audit.json"
    assert main(["audit", str(root), "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Audit of" in printed and "[train] 8 images" in printed and "nested duplicate copy ignored: 8" in printed
    data = json.loads(out.read_text())
    assert data["splits"]["train"]["images"] == 8 and data["ignored_nested_duplicates"] == 8
    assert data["seconds"]["total"] >= 0


def test_audit_cli_errors_are_clear(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["audit", str(tmp_path / "empty")]) == 2
    assert "empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit", str(tmp_path), "--task", "dogs"])


def test_audit_names_re_imaged_fields(tmp_path, monkeypatch):
    """A field photographed in a TRAIN smear and again in a TEST smear: no smear is shared, the field is."""
    from cellhub import smears

    root = synthetic.write_kaggle_blood_cells(tmp_path / "b", n_cells_per_class=1, copies=2, splits=("TRAIN", "TEST"),
                                              image_size=(64, 48), smear_size=(160, 120))
    truth = {str((root / k).resolve()): v for k, v in json.loads((root / "_truth.json").read_text()).items()}
    monkeypatch.setattr(smears, "match_crops_to_smears",
                        lambda paths, smear_dir, **kw: {str(p): truth.get(str(Path(p).resolve())) for p in paths})
    train_smear = next(v for k, v in truth.items() if "/TRAIN/" in k)
    test_smear = next(v for k, v in truth.items() if "/TEST/" in k)
    field = min(train_smear, test_smear)
    monkeypatch.setattr(smears, "smear_fields", lambda smear_dir, progress=True: {
        s: (field if s in (train_smear, test_smear) else s) for s in set(truth.values())})
    r = audit_dataset(root, progress=False)
    assert r["group_by"] == "field" and r["group_by_requested"] == "auto"
    levels = r["shared_by_level"]
    assert levels["smear"]["train|test"]["count"] == 0
    assert levels["field"]["train|test"]["count"] == 1
    assert levels["field"]["train|test"]["fields"] == [
        {"field": f"field:{field}", "smears": {"train": [train_smear], "test": [test_smear]}, "re_imaged": True}]
    assert r["shared_groups"]["train|test"]["count"] == 1  # the default grouping (field) sees it too
    text = format_report(r)
    assert f"field:{field}: re-imaged field: train smears {train_smear}; test smears {test_smear}" in text
    by_smear = audit_dataset(root, group_by="smear", progress=False)
    assert by_smear["shared_groups"]["train|test"]["count"] == 0  # ...while smear grouping alone misses it
    assert by_smear["shared_by_level"]["field"]["train|test"]["count"] == 1  # but the report still names it
