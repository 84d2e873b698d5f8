"""Grouping: near-duplicate groups (copies of one cell), ``group_by`` choices per source, the report."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cellhub import synthetic
from cellhub.data import load_cell_dataset, neardup
from cellhub.data.groups import group_by_choices, resolve_group_by
from cellhub.tasks import get_task


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLHUB_CACHE", str(tmp_path / "cache"))


def _cell(seed: int, size: int = 200) -> Image.Image:
    """A distinct 'field around a white cell': pale background, red-cell rings, a lobed purple nucleus."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (225, 215, 220))
    draw = ImageDraw.Draw(img)
    for _ in range(40):  # red cells, as rings
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(8, 16)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(215, 150, 160), outline=(180, 100, 120), width=3)
    for _ in range(3):  # a lobed nucleus near the centre
        x, y = rng.uniform(0.4, 0.6, 2) * size
        r = rng.uniform(0.05, 0.09) * size
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(110, 60, 170))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _copy(cell: Image.Image, rng: np.random.Generator, out: int = 96) -> Image.Image:
    """A Kaggle-like augmented copy: any-angle rotation (black fill), mirror, shift, resize."""
    img = cell.rotate(float(rng.uniform(0, 360)), resample=Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    dx, dy = rng.integers(-12, 13, 2)
    s = cell.width
    img = img.crop((30 + dx, 30 + dy, s - 30 + dx, s - 30 + dy))
    return img.resize((out, out), Image.BILINEAR)


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> tuple[list[str], list[int]]:
    """8 distinct cells x 6 copies each, in one folder, plus which cell each file is."""
    root = tmp_path_factory.mktemp("copies")
    rng = np.random.default_rng(0)
    paths, cells = [], []
    for c in range(8):
        cell = _cell(100 + c)
        for k in range(6):
            p = root / f"img_{c}_{k}.png" if k % 2 else root / f"img_{c}_{k}.jpg"
            _copy(cell, rng, out=96 if k < 3 else 140).save(p)
            paths.append(str(p))
            cells.append(c)
    return paths, cells


def test_copies_share_a_group_and_distinct_cells_do_not(copies):
    paths, cells = copies
    groups = neardup.near_duplicate_groups(paths, [Path(p).name for p in paths], progress=False)
    for c in set(cells):
        assert len({g for g, cc in zip(groups, cells) if cc == c}) == 1, f"copies of cell {c} were split"
    assert len(set(groups)) == len(set(cells)), "distinct cells were merged"
    # named after their first member, so the same data gives the same ids
    assert all(g.startswith("near:img_") for g in groups)
    assert groups == neardup.near_duplicate_groups(paths, [Path(p).name for p in paths], progress=False)


def test_a_stricter_threshold_splits_and_the_size_cap_holds(copies, tmp_path):
    paths, cells = copies
    strict = neardup.near_duplicate_groups(paths, threshold=0.999, progress=False)
    assert len(set(strict)) > len(set(cells))
    capped = neardup.near_duplicate_groups(paths, max_group=3, progress=False)
    sizes = [capped.count(g) for g in set(capped)]
    assert max(sizes) <= 3
    # ...but identical copies always share a group, however many
    same = []
    for i in range(5):
        same.append(str(tmp_path / f"same_{i}.png"))
        Image.open(paths[1]).save(same[-1])
    assert len(set(neardup.near_duplicate_groups(same + paths[6:], max_group=3, progress=False)[:5])) == 1
    with pytest.raises(ValueError, match="threshold"):
        neardup.near_duplicate_groups(paths, threshold=1.5)
    with pytest.raises(ValueError, match="max_group"):
        neardup.near_duplicate_groups(paths, max_group=1)


def test_unreadable_image_gets_its_own_group(copies, tmp_path, caplog):
    paths, _ = copies
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    with caplog.at_level(logging.WARNING, logger="cellhub.data.neardup"):
        groups = neardup.near_duplicate_groups(paths[:6] + [str(bad)], progress=False)
    assert groups[-1] == f"unreadable:{bad}" and "cannot read" in caplog.text
    assert len(set(groups[:6])) == 1


def test_group_by_choices_follow_the_data():
    blood, malaria = get_task("blood-cells"), get_task("malaria")
    assert resolve_group_by("auto", blood, True) == "field"
    assert resolve_group_by("auto", blood, False) == "near-duplicates"
    assert resolve_group_by("auto", malaria, False) == "patient"
    assert "patient" not in group_by_choices(blood, True) and "field" not in group_by_choices(malaria, False)
    with pytest.raises(ValueError, match="needs the full smears.*Choices for this data: auto, near-duplicates"):
        resolve_group_by("field", blood, False)
    with pytest.raises(ValueError, match="does not apply to task 'blood-cells'"):
        resolve_group_by("patient", blood, True)
    with pytest.raises(ValueError, match="group_by must be one of"):
        resolve_group_by("cell", blood, True)


def test_blood_folder_without_smears_is_grouped_by_near_duplicates(tmp_path, caplog):
    root = synthetic.write_kaggle_blood_cells(tmp_path / "b", n_cells_per_class=1, copies=3, splits=("TRAIN", "TEST"),
                                              image_size=(160, 120), with_smears=False)
    with caplog.at_level(logging.WARNING, logger="cellhub.data"):
        dsd, report = load_cell_dataset(root, return_report=True, progress=False)
    assert "No full smears" in caplog.text and "near-duplicates" in caplog.text
    assert report.group_by == "near-duplicates" and report.group_by_requested == "auto"
    assert report.group_method == {"train": "near-duplicates", "test": "near-duplicates"}
    # per split: they must not make train and test look like they share cells
    assert set(dsd["train"]["group"]).isdisjoint(set(dsd["test"]["group"]))
    # the groups are near_duplicate_groups' answer on the split's files, named by file, prefixed by split
    train = dsd["train"]
    images = root / "dataset2-master" / "dataset2-master" / "images" / "TRAIN"
    direct = neardup.near_duplicate_groups([str(images / f) for f in train["file"]], list(train["file"]),
                                           progress=False)
    assert list(train["group"]) == [f"train/{g}" for g in direct]
    with pytest.raises(ValueError, match="needs the full smears"):
        load_cell_dataset(root, group_by="field", progress=False)


@pytest.mark.parametrize("group_by, method", [("file", "file"), ("none", "none"), ("patient", "patient")])
def test_malaria_group_by_file_none_patient(tmp_path, group_by, method):
    root = synthetic.write_kaggle_malaria(tmp_path / "m", n_per_class=4, n_patients=2, nested_copy=False, size=32)
    dsd, report = load_cell_dataset(root, return_report=True, group_by=group_by, progress=False)
    ds = dsd["train"]
    assert report.group_by == method and report.group_method["train"] == method
    if method == "patient":
        assert len(set(ds["group"])) == 3  # 2 patients + uninfected slides (see test_data)
    else:
        assert len(set(ds["group"])) == len(ds)


def test_near_duplicate_groups_are_cached(tmp_path, monkeypatch):
    root = synthetic.write_kaggle_blood_cells(tmp_path / "b", n_cells_per_class=1, copies=2, splits=("TRAIN",),
                                              image_size=(96, 72), with_smears=False)
    first = load_cell_dataset(root, progress=False)["train"]["group"]
    monkeypatch.setattr(neardup, "signatures", lambda *a, **k: pytest.fail("not served from the cache"))
    from cellhub.data import groups

    monkeypatch.setattr(groups, "near_duplicate_groups", lambda *a, **k: pytest.fail("not served from the cache"))
    assert load_cell_dataset(root, progress=False)["train"]["group"] == first
