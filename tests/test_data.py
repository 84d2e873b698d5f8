"""cellhub.data: layouts, label order, groups, grouped split, bad files, errors, decode-once cache.

Offline and small: every dataset is drawn by cellhub.synthetic into tmp_path. The smear matcher
itself is tested in test_smears.py; here it is replaced by the ground truth where the test is
about how load_cell_dataset uses its answer, and run for real once.
"""
from __future__ import annotations

import os

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellhub import synthetic
from cellhub.data import (DatasetLayoutError, cache_resized, ensure_validation, infer_task, load_cell_dataset,
                          split_by_group)
from cellhub.tasks import malaria_group

BLOOD = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLHUB_CACHE", str(tmp_path / "cache"))


def _truth(root: Path) -> dict[str, str]:
    return {str((root / rel).resolve()): smear for rel, smear in json.loads((root / "_truth.json").read_text()).items()}


@pytest.fixture
def truth_matcher(monkeypatch):
    """Replace the smear matcher with the synthetic ground truth; record its calls."""
    from cellhub import smears

    calls = []

    def fake(crop_paths, smear_dir, *, cache_dir=None, progress=True):
        crop_paths = [str(p) for p in crop_paths]
        calls.append((crop_paths, Path(smear_dir)))
        root = Path(smear_dir).parents[2]
        truth = _truth(root)
        return {p: truth.get(str(Path(p).resolve())) for p in crop_paths}

    monkeypatch.setattr(smears, "match_crops_to_smears", fake)
    return calls


@pytest.fixture(scope="module")
def blood_root(tmp_path_factory) -> Path:
    return synthetic.write_kaggle_blood_cells(
        tmp_path_factory.mktemp("blood"), n_cells_per_class=2, copies=2, splits=("TRAIN", "TEST", "TEST_SIMPLE"),
        image_size=(64, 48), smear_size=(160, 120))


def test_kaggle_blood_layout_found_from_any_folder(blood_root, truth_matcher):
    images = blood_root / "dataset2-master" / "dataset2-master" / "images"
    for src in (blood_root, blood_root / "dataset2-master", images):
        dsd, report = load_cell_dataset(src, return_report=True, progress=False)
        assert list(dsd) == ["train", "test", "test_simple"]
        assert report.source_kind == "kaggle-blood-cells" and report.task == "blood-cells"
        assert [len(dsd[s]) for s in dsd] == [16, 16, 16]
        assert report.smear_dir.endswith("JPEGImages")
    # one split folder alone is that split
    only_test = load_cell_dataset(images / "TEST", progress=False)
    assert list(only_test) == ["test"] and len(only_test["test"]) == 16


def test_blood_label_order_groups_and_files(blood_root, truth_matcher):
    dsd, report = load_cell_dataset(blood_root, task="blood-cells", return_report=True, progress=False,
                                    group_by="smear")
    truth = _truth(blood_root)
    images = blood_root / "dataset2-master" / "dataset2-master" / "images"
    for split, folder in (("train", "TRAIN"), ("test", "TEST")):
        ds = dsd[split]
        assert ds.features["label"].names == BLOOD
        assert ds.features["group"].dtype == "string" and ds.features["file"].dtype == "string"
        for row in ds.select_columns(["label", "group", "file"]):
            cls, _name = row["file"].split("/")
            assert BLOOD[row["label"]] == cls.lower()
            assert row["group"] == truth[str((images / folder / row["file"]).resolve())]
        assert report.group_method[split] == "smear" and report.smear_attribution[split] == 1.0
    img = dsd["train"][0]["image"]
    assert isinstance(img, Image.Image) and img.size == (64, 48)


def test_real_smear_matcher_attributes_crops_to_their_own_smear(tmp_path):
    root = synthetic.write_kaggle_blood_cells(tmp_path / "b", n_cells_per_class=1, copies=2, splits=("TRAIN",))
    dsd, report = load_cell_dataset(root, return_report=True, progress=False,
                                    group_by="smear")
    truth = _truth(root)
    images = root / "dataset2-master" / "dataset2-master" / "images" / "TRAIN"
    matched = 0
    for row in dsd["train"].select_columns(["group", "file"]):
        if not row["group"].startswith("unmatched:"):
            matched += 1
            assert row["group"] == truth[str((images / row["file"]).resolve())]
    assert matched >= 1
    assert report.smear_attribution["train"] == pytest.approx(matched / len(dsd["train"]))


def test_malaria_nested_copy_counted_once_and_grouped_by_patient(tmp_path):
    root = synthetic.write_kaggle_malaria(tmp_path / "m", n_per_class=6, n_patients=2, nested_copy=True, size=32)
    for src in (root, root / "cell_images"):
        dsd, report = load_cell_dataset(src, return_report=True, progress=False)
        ds = dsd["train"]
        assert list(dsd) == ["train"] and len(ds) == 12
        assert report.source_kind == "kaggle-malaria" and report.ignored_duplicates == 12
        assert ds.features["label"].names == ["parasitized", "uninfected"]
        files = list(ds["file"])
        assert len(set(files)) == 12
        for row in ds.select_columns(["label", "group", "file"]):
            name = row["file"].split("/")[-1]
            assert row["group"] == malaria_group(name)
            assert ["parasitized", "uninfected"][row["label"]] == row["file"].split("/")[0].lower()
    assert {"C100P60", "C101P61", "C10N"} - set(ds["group"]) == {"C10N"}  # 'C10NThinF' -> 'C10'
    assert "C10" in set(ds["group"])


def test_imagefolder_splits_label_remap_and_split_aliases(tmp_path):
    root = tmp_path / "tree"
    # folder names in an order and case that imagefolder would sort differently from the task
    for split, names in (("Train", ("Uninfected", "parasitized")), ("val", ("UNINFECTED", "Parasitized"))):
        for k, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                img, _ = synthetic.draw_malaria_cell(name.lower(), size=24, seed=10 * k + i)
                img.save(root / split / name / f"C{5 + k}P{7 + k}ThinF_IMG_{split}_{i}.png")
    dsd, report = load_cell_dataset(root, return_report=True, progress=False)
    assert report.source_kind == "imagefolder" and report.task == "malaria"
    assert list(dsd) == ["train", "validation"]
    for ds in dsd.values():
        assert ds.features["label"].names == ["parasitized", "uninfected"]
        for row in ds.select_columns(["label", "file", "group"]):
            folder, name = row["file"].split("/")
            assert ["parasitized", "uninfected"][row["label"]] == folder.lower()
            assert row["group"] == malaria_group(name)


def test_imagefolder_without_split_folders_is_train(tmp_path):
    root = synthetic.write_imagefolder(tmp_path / "flat", task="blood-cells", n_per_class=2, splits=None, size=32)
    dsd = load_cell_dataset(root, progress=False)
    assert list(dsd) == ["train"] and len(dsd["train"]) == 8
    assert sorted(set(dsd["train"]["label"])) == [0, 1, 2, 3]
    assert infer_task(root).name == "blood-cells"


def test_infer_task(blood_root, tmp_path):
    assert infer_task(blood_root).name == "blood-cells"
    assert infer_task(synthetic.write_kaggle_malaria(tmp_path / "m", n_per_class=2, size=16)).name == "malaria"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        infer_task(tmp_path / "missing")


def _bad_files(folder: Path) -> dict[str, str]:
    good = io.BytesIO()
    synthetic.draw_blood_cell("neutrophil", size=(48, 48)).save(good, "JPEG")
    data = good.getvalue()
    (folder / "truncated.jpeg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    (folder / "Thumbs.db").write_bytes(b"\x00\x01")
    return {"truncated.jpeg": "truncated", "empty.png": "empty file", "text.jpg": "not an image",
            "Thumbs.db": "not an image file"}


def test_bad_files_skipped_counted_and_listed(tmp_path, truth_matcher, caplog):
    root = synthetic.write_kaggle_blood_cells(tmp_path / "b", n_cells_per_class=1, copies=2, splits=("TRAIN",),
                                              image_size=(48, 48), smear_size=(120, 90))
    expected = _bad_files(root / "dataset2-master" / "dataset2-master" / "images" / "TRAIN" / "MONOCYTE")
    with caplog.at_level(logging.WARNING, logger="cellhub.data"):
        dsd, report = load_cell_dataset(root, return_report=True, progress=False)
    assert len(dsd["train"]) == 8  # every good image, none of the bad ones
    got = {Path(p).name: reason for p, reason in report.skipped}
    assert set(got) == set(expected)
    for name, reason in expected.items():
        assert reason in got[name], (name, got[name])
    assert "Skipped 4 unreadable file(s)" in caplog.text
    # a second load reads the verdicts from the cache and reports the same files
    _, again = load_cell_dataset(root, return_report=True, progress=False)
    assert sorted(again.skipped) == sorted(report.skipped)


def test_bad_files_in_imagefolder(tmp_path):
    root = synthetic.write_imagefolder(tmp_path / "t", task="malaria", n_per_class=2, splits=("train",), size=16)
    _bad_files(root / "train" / "uninfected")
    dsd, report = load_cell_dataset(root, return_report=True, progress=False)
    assert len(dsd["train"]) == 4 and len(report.skipped) == 4


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cell_dataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cell_dataset("nowhere-at-all")


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="empty folder.*Expected class folders"):
        load_cell_dataset(tmp_path / "empty")
    (tmp_path / "no_images" / "train" / "EOSINOPHIL").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="No images in class folders"):
        load_cell_dataset(tmp_path / "no_images")


def test_unknown_class_folder_is_a_clear_error(tmp_path, truth_matcher):
    root = synthetic.write_kaggle_blood_cells(tmp_path / "b", n_cells_per_class=1, copies=1, splits=("TRAIN",),
                                              image_size=(32, 32), smear_size=(120, 90))
    extra = root / "dataset2-master" / "dataset2-master" / "images" / "TRAIN" / "BASOPHIL"
    extra.mkdir()
    synthetic.draw_blood_cell("neutrophil", size=(32, 32)).save(extra / "x.jpeg")
    # a class of the 8-class PBC task: the folder now reads as PBC; the 4-class task leaves it out and says so
    _, report = load_cell_dataset(root, return_report=True)
    assert report.task == "pbc"
    _, report = load_cell_dataset(root, task="blood-cells", return_report=True)
    assert report.task == "blood-cells" and any("BASOPHIL/ (1 images)" in n for n in report.notes)
    extra.rename(extra.with_name("ZEBRA"))
    with pytest.raises(DatasetLayoutError, match=r"Unknown class folder\(s\) 'ZEBRA'.*EOSINOPHIL"):
        load_cell_dataset(root)
    # a tree of folders that are no class of any task
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        synthetic.draw_blood_cell("neutrophil", size=(16, 16)).save(tmp_path / "pets" / name / "a.png")
    with pytest.raises(DatasetLayoutError, match=r"'cat', 'dog'.*Parasitized, Uninfected"):
        load_cell_dataset(tmp_path / "pets")
    # the wrong task for the folders
    with pytest.raises(DatasetLayoutError, match="for task 'malaria'"):
        load_cell_dataset(synthetic.write_imagefolder(tmp_path / "wbc", task="blood-cells", n_per_class=1,
                                                      splits=("train",), size=16), task="malaria")


def test_a_file_or_a_class_folder_is_not_a_dataset(tmp_path):
    root = synthetic.write_imagefolder(tmp_path / "t", task="malaria", n_per_class=1, splits=None, size=16)
    with pytest.raises(DatasetLayoutError, match="is a file"):
        load_cell_dataset(next((root / "parasitized").iterdir()))
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        load_cell_dataset(root / "parasitized")


def _toy(labels, groups):
    from datasets import ClassLabel, Dataset, Features, Value

    return Dataset.from_dict({"label": labels, "group": groups},
                             features=Features(label=ClassLabel(names=["a", "b", "c"]), group=Value("string")))


def test_split_by_group_no_group_on_both_sides_and_stratified():
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for c in range(3):
        for g in range(10):
            n = int(rng.integers(2, 12))
            labels += [c] * n
            groups += [f"{c}-{g}"] * n
    ds = _toy(labels, groups)
    parts = split_by_group(ds, val_fraction=0.25, seed=1)
    tr, va = parts["train"], parts["validation"]
    assert len(tr) + len(va) == len(ds)
    assert set(tr["group"]).isdisjoint(set(va["group"]))
    for c in range(3):  # every class on both sides, near the requested share
        n_c = labels.count(c)
        n_val = list(va["label"]).count(c)
        assert 0 < n_val < n_c
        assert abs(n_val / n_c - 0.25) < 0.15
    again = split_by_group(ds, val_fraction=0.25, seed=1)
    assert list(again["validation"]["group"]) == list(va["group"])
    other = split_by_group(ds, val_fraction=0.25, seed=2)
    assert set(other["validation"]["group"]) != set(va["group"])


def test_split_by_group_with_mixed_and_single_groups(caplog):
    # group 'm' holds two classes; class c has one group only: it must stay in train
    ds = _toy([0, 0, 1, 0, 0, 1, 1, 1, 2, 2], ["m", "m", "m", "x", "y", "z", "z", "w", "only", "only"])
    with caplog.at_level(logging.WARNING, logger="cellhub.data"):
        parts = split_by_group(ds, val_fraction=0.3)
    assert set(parts["train"]["group"]).isdisjoint(set(parts["validation"]["group"]))
    assert "only" in set(parts["train"]["group"])
    assert "'c' has 1 group" in caplog.text


def test_split_by_group_bad_arguments():
    ds = _toy([0, 1], ["a", "b"])
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            split_by_group(ds, val_fraction=bad)
    with pytest.raises(ValueError, match="'group' column"):
        split_by_group(ds.remove_columns("group"))


def test_ensure_validation_keeps_other_splits(tmp_path):
    root = synthetic.write_imagefolder(tmp_path / "t", task="malaria", n_per_class=6, splits=("train", "test"), size=16)
    dsd = load_cell_dataset(root, progress=False)
    out = ensure_validation(dsd, val_fraction=0.5)
    assert list(out) == ["train", "validation", "test"]
    assert set(out["train"]["group"]).isdisjoint(set(out["validation"]["group"]))
    assert len(out["test"]) == len(dsd["test"])
    assert ensure_validation(out) is out


def test_cache_resized_decodes_once(tmp_path, monkeypatch):
    root = synthetic.write_kaggle_malaria(tmp_path / "m", n_per_class=3, nested_copy=False, size=40)
    ds = load_cell_dataset(root, progress=False)["train"]
    out = cache_resized(ds, (20, 30), cache_dir=tmp_path / "c", progress=False)
    assert "image" not in out.column_names and {"pixels", "label", "group", "file"} <= set(out.column_names)
    arr = np.asarray(out.with_format("numpy", dtype=np.uint8)[0]["pixels"])
    assert arr.shape == (20, 30, 3) and arr.dtype == np.uint8
    # another aspect ratio is scaled to cover and centre-cropped (the eval geometry), not stretched
    # (40x40 -> 30x20: the middle 40x26.7 band, scaled by 0.75)
    expect = np.asarray(ds[0]["image"].convert("RGB").resize((30, 20), Image.BILINEAR, box=(0, 20 / 3, 40, 40 - 20 / 3),
                                                              reducing_gap=3.0))
    assert np.array_equal(arr, expect)
    assert list(out["label"]) == list(ds["label"])
    # the second call memory-maps the cached file: no image is decoded or resized again
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded")))
    (arrow,) = (tmp_path / "c" / "resized").glob("*.arrow")
    os.utime(arrow, (1_000_000, 1_000_000))  # long unused, as upkeep sees it
    again = cache_resized(ds, (20, 30), cache_dir=tmp_path / "c", progress=False)
    assert arrow.stat().st_mtime > 1_000_000  # a hit marks the file used (cache --older-than keeps it)
    assert np.array_equal(np.asarray(again.with_format("numpy", dtype=np.uint8)[0]["pixels"]), arr)
    assert len(list((tmp_path / "c" / "resized").glob("*.arrow"))) == 1
    # the data set re-synced (every file's mtime new, the same bytes): still a hit, nothing decoded
    for f in root.rglob("*.png"):
        os.utime(f, (2_000_000_000, 2_000_000_000))
    resynced = cache_resized(load_cell_dataset(root, progress=False)["train"], (20, 30), cache_dir=tmp_path / "c",
                             progress=False)
    assert np.array_equal(np.asarray(resynced.with_format("numpy", dtype=np.uint8)[0]["pixels"]), arr)
    assert len(list((tmp_path / "c" / "resized").glob("*.arrow"))) == 1
    with pytest.raises(ValueError, match="size"):
        cache_resized(ds, (1, 2, 3), cache_dir=tmp_path / "c")


def test_cache_matches_what_evaluation_sees_for_mixed_sizes(tmp_path):
    """A wide image cached square keeps its centre, as the eval transform's centre crop does."""
    from cellhub import create_model, transforms

    root = tmp_path / "mix"
    for name, size in (("Parasitized", (90, 30)), ("Uninfected", (40, 40))):
        (root / name).mkdir(parents=True)
        img = np.zeros((size[1], size[0], 3), np.uint8)
        third = size[0] // 3
        img[:, :third] = (200, 40, 40)
        img[:, third:2 * third] = (40, 200, 40)  # the centre third is green
        img[:, 2 * third:] = (40, 40, 200)
        for k in range(2):
            Image.fromarray(img).save(root / name / f"C{k}P{k}_{name}.png")
    ds = load_cell_dataset(root, progress=False)["train"]
    cached = cache_resized(ds, (24, 24), cache_dir=tmp_path / "c", progress=False).with_format("numpy", dtype=np.uint8)
    wide = next(i for i, f in enumerate(ds["file"]) if f.startswith("Parasitized"))
    px = np.asarray(cached[wide]["pixels"])
    assert (px[:, 4:20, 1] > 150).all()  # green across the middle: centre-cropped, not the three bands squeezed
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=24)
    tf = transforms.eval_transform(transforms.resolve_data_config(model))
    x_eval = tf(ds[wide]["image"])
    x_cache = tf(Image.fromarray(px))
    assert float((x_eval - x_cache).abs().mean()) < 0.1  # the same picture, up to interpolation


def test_hub_dataset_labels_mapped_and_groups(monkeypatch, tmp_path):
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    paths = []
    for i, lab in enumerate(["uninfected", "parasitized", "uninfected"]):
        img, _ = synthetic.draw_malaria_cell(lab, size=16, seed=i)
        p = tmp_path / f"C{i}P{i}ThinF_cell_{i}.png"
        img.save(p)
        paths.append(str(p))
    # the Hub copy names its classes differently and in the other order
    feats = Features(img=ImageFeature(), labels=ClassLabel(names=["Uninfected", "Parasitized"]))
    hub = DatasetDict(train=Dataset.from_dict({"img": paths, "labels": [0, 1, 0]}, features=feats),
                      valid=Dataset.from_dict({"img": paths[:1], "labels": [0]}, features=feats))
    seen = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: seen.append(repo) or hub)
    dsd, report = load_cell_dataset("someone/malaria-cells", return_report=True)
    assert seen == ["someone/malaria-cells"] and report.source_kind == "hub" and report.task == "malaria"
    assert list(dsd) == ["train", "validation"]
    assert dsd["train"].features["label"].names == ["parasitized", "uninfected"]
    assert list(dsd["train"]["label"]) == [1, 0, 1]
    assert list(dsd["train"]["group"]) == ["C0P0", "C1P1", "C2P2"]
    # a task name means that task's default Hub dataset; a group column is kept
    hub2 = DatasetDict(train=Dataset.from_dict(
        {"image": paths, "label": ["uninfected", "parasitized", "uninfected"], "group": ["g1", "g2", "g1"]},
        features=Features(image=ImageFeature(), label=Value("string"), group=Value("string"))))
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: seen.append(repo) or hub2)
    dsd2, report2 = load_cell_dataset("malaria", return_report=True)
    assert seen[-1] == "cellhub/malaria" and report2.group_method["train"] == "column"
    assert list(dsd2["train"]["group"]) == ["g1", "g2", "g1"] and list(dsd2["train"]["label"]) == [1, 0, 1]
    bad = DatasetDict(train=Dataset.from_dict({"image": paths[:1], "label": ["basophil"]},
                                              features=Features(image=ImageFeature(), label=Value("string"))))
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: bad)
    with pytest.raises(DatasetLayoutError, match="basophil"):
        load_cell_dataset("someone/other", task="blood-cells")


def test_hub_failure_names_the_source(monkeypatch):
    import datasets

    def offline(repo, **kw):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="'someone/missing' is not a local folder.*offline"):
        load_cell_dataset("someone/missing")


def test_group_by_field_merges_smears_of_one_field(blood_root, truth_matcher, monkeypatch):
    from cellhub import smears

    calls = []

    def fields(smear_dir, progress=True):
        calls.append(smear_dir)
        ids = sorted({v for v in json.loads((blood_root / "_truth.json").read_text()).values()})
        return {i: (ids[0] if i == ids[1] else i) for i in ids}  # the first two smears: one field

    monkeypatch.setattr(smears, "smear_fields", fields)
    dsd, report = load_cell_dataset(blood_root, return_report=True, group_by="field", progress=False)
    by_smear = load_cell_dataset(blood_root, group_by="smear", progress=False)
    assert report.group_method["train"] == "field"
    pairs = set(zip(by_smear["train"]["group"], dsd["train"]["group"]))
    assert ("BloodImage_00001", "field:BloodImage_00000") in pairs and ("BloodImage_00000", "field:BloodImage_00000") in pairs
    assert all(f == f"field:{s}" for s, f in pairs if s not in ("BloodImage_00000", "BloodImage_00001"))
    default = load_cell_dataset(blood_root, progress=False)  # field grouping is the default
    assert default["train"]["group"] == dsd["train"]["group"]
    assert len(calls) == 1  # computed once, then cached
    with pytest.raises(ValueError, match="group_by"):
        load_cell_dataset(blood_root, group_by="cell")


def test_image_refs_paths_and_local_files_follow_row_order(tmp_path):
    """The undecoded readers give each row's own file, after shuffle/select, and tell files from bytes."""
    from datasets import Dataset, Features, Image as HFImage, Value

    from cellhub.data import file_backed_paths, image_paths, image_refs, local_files, undecoded

    files = []
    for i in range(5):
        p = tmp_path / f"cell_{i}.png"
        Image.new("RGB", (8 + i, 8), (10 * i, 0, 0)).save(p)
        files.append(str(p))
    ds = Dataset.from_dict({"image": files, "n": list(range(5))},
                           features=Features(image=HFImage(), n=Value("int64")))
    order = ds.shuffle(seed=3).select([4, 0, 2])
    expect = [files[n] for n in order["n"]]
    assert image_paths(order) == expect
    assert local_files(order) == expect
    assert [r["path"] for r in image_refs(order)] == expect
    assert undecoded(order)[0]["image"] == {"path": expect[0], "bytes": None}
    assert image_paths(ds.select([])) == [] and local_files(ds.select([])) is None

    # bytes embedded (a saved / Parquet dataset): no local files, the bytes are handed out
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    embedded = Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": None}]}, features=Features(image=HFImage()))
    assert local_files(embedded) is None and image_paths(embedded) == [None]
    assert image_refs(embedded)[0]["bytes"] == buf.getvalue()
    assert file_backed_paths(order) == expect and file_backed_paths(embedded) == []
    # a row that keeps its bytes (its path names no file here, e.g. a Hub dataset's) is already embedded
    mixed = Dataset.from_dict({"image": [{"bytes": buf.getvalue(), "path": "hub/cell_9.png"}, {"path": files[1]}]},
                              features=Features(image=HFImage()))
    assert image_paths(mixed) == ["hub/cell_9.png", files[1]] and file_backed_paths(mixed) == [files[1]]

    with pytest.raises(ValueError, match="no 'picture' column"):
        image_paths(ds, "picture")
    with pytest.raises(ValueError, match="not images"):
        image_paths(ds, "n")
