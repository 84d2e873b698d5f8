"""cellhub.smears: crops are traced back to the smear they were cut from (offline, tiny images)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellhub import smears
from cellhub.smears import fallback_groups, match_crops_to_smears, smear_fields

SMEAR_SIZE = (480, 360)  # (W, H), smaller than Kaggle's 640x480 to keep the test fast
CROP_SIZE = (240, 180)


def _textured_smear(seed: int, size=SMEAR_SIZE) -> np.ndarray:
    """A pinkish field of random 'cells' and speckles: enough texture for local features."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.full((h, w, 3), (225, 215, 235), np.uint8)
    for _ in range(int(w * h / 900)):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(6, 22)), int(rng.integers(6, 22)))
        color = tuple(int(c) for c in rng.integers(60, 230, 3))
        cv2.ellipse(img, center, axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
        cv2.circle(img, center, int(rng.integers(2, 5)), tuple(int(c) for c in rng.integers(0, 120, 3)), -1)
    noise = rng.normal(0, 6, img.shape)
    return cv2.GaussianBlur(np.clip(img + noise, 0, 255).astype(np.uint8), (3, 3), 0)


def _augmented_crop(smear: np.ndarray, rng: np.random.Generator, zoom: float = 0.5) -> np.ndarray:
    """Like Kaggle: rotate + flip + shift + zoom a region of the smear, with black padding."""
    h, w = smear.shape[:2]
    cw, ch = CROP_SIZE
    angle = float(rng.uniform(-180, 180))
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    m = cv2.getRotationMatrix2D((cx, cy), angle, zoom)
    m[:, 2] += (cw / 2 - cx, ch / 2 - cy)
    crop = cv2.warpAffine(smear, m, (cw, ch), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("smears")
    smear_dir = root / "JPEGImages"
    smear_dir.mkdir()
    truth: dict[str, str | None] = {}  # crop -> expected answer
    source: dict[str, int] = {}  # crop -> the smear it really comes from
    rng = np.random.default_rng(0)
    for i in range(4):
        smear = _textured_smear(100 + i)
        sid = f"BloodImage_{i:05d}"
        if i < 3:
            cv2.imwrite(str(smear_dir / f"{sid}.jpg"), smear, [cv2.IMWRITE_JPEG_QUALITY, 95])
        folder = root / "TRAIN" / ("NEUTROPHIL" if i % 2 else "EOSINOPHIL")
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(3):
            crop = _augmented_crop(smear, rng, zoom=rng.uniform(0.45, 0.7))
            path = folder / f"_{k}_{i * 10 + k}.jpeg"
            cv2.imwrite(str(path), crop, [cv2.IMWRITE_JPEG_QUALITY, 92])
            truth[str(path)] = sid if i < 3 else None  # smear 3 is not in the smear folder
            source[str(path)] = i
    return root, smear_dir, truth, source


@pytest.mark.parametrize("workers", [1, 2])
def test_crops_are_attributed_to_their_smear(dataset, tmp_path, workers):
    root, smear_dir, truth, source = dataset
    result = match_crops_to_smears(list(truth), smear_dir, cache_dir=tmp_path, progress=False, workers=workers)
    assert set(result) == set(truth)
    assert result == truth  # right smear for every crop, None for the crop of an unknown smear


def test_mirrored_crop_is_matched(dataset, tmp_path):
    root, smear_dir, _, _ = dataset
    smear = cv2.imread(str(smear_dir / "BloodImage_00001.jpg"))
    h, w = smear.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 30.0, 0.5)
    m[:, 2] += (CROP_SIZE[0] / 2 - w / 2, CROP_SIZE[1] / 2 - h / 2)
    crop = np.ascontiguousarray(cv2.warpAffine(smear, m, CROP_SIZE)[:, ::-1])
    path = tmp_path / "mirrored.png"
    cv2.imwrite(str(path), crop)
    result = match_crops_to_smears([path], smear_dir, cache_dir=tmp_path / "c", progress=False)
    assert result == {str(path): "BloodImage_00001"}


def test_second_call_is_served_from_cache(dataset, tmp_path, monkeypatch):
    root, smear_dir, truth, source = dataset
    crops = list(truth)[:6]
    first = match_crops_to_smears(crops, smear_dir, cache_dir=tmp_path, progress=False)
    assert list(tmp_path.glob("crops-to-smears-*.json"))

    def boom(*args, **kwargs):
        raise AssertionError("the matcher ran although every crop was cached")

    monkeypatch.setattr(smears, "_match_against", boom)
    monkeypatch.setattr(smears, "_build_bank", boom)
    assert match_crops_to_smears(crops, smear_dir, cache_dir=tmp_path, progress=False) == first

    # a crop that changed on disk is not served stale from the cache
    changed = Path(crops[0])
    original = changed.read_bytes()
    try:
        changed.write_bytes(original + b"\0")
        with pytest.raises(AssertionError, match="cached"):
            match_crops_to_smears(crops, smear_dir, cache_dir=tmp_path, progress=False)
    finally:
        changed.write_bytes(original)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLHUB_CACHE", str(tmp_path))
    assert smears.default_cache_dir() == tmp_path / "smears"


def test_corrupt_and_missing_files_map_to_none(dataset, tmp_path, caplog):
    root, smear_dir, truth, source = dataset
    bad_smears = tmp_path / "smears"
    bad_smears.mkdir()
    for p in smear_dir.iterdir():
        (bad_smears / p.name).write_bytes(p.read_bytes())
    (bad_smears / "BloodImage_00099.jpg").write_bytes(b"not a jpeg")  # corrupt smear: skipped, logged
    corrupt = tmp_path / "corrupt.jpeg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    missing = tmp_path / "missing.jpeg"
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((1, 1, 3), np.uint8))
    good = next(c for c, s in truth.items() if s)
    with caplog.at_level(logging.WARNING, logger="cellhub.smears"):
        result = match_crops_to_smears(
            [corrupt, missing, tiny, good], bad_smears, cache_dir=tmp_path / "cache", progress=False
        )
    assert result == {str(corrupt): None, str(missing): None, str(tiny): None, good: truth[good]}
    text = caplog.text
    assert "corrupt.jpeg" in text and "missing.jpeg" in text and "BloodImage_00099" in text


def test_bad_arguments_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        match_crops_to_smears([], tmp_path / "nowhere", cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="no smear images"):
        match_crops_to_smears([], tmp_path, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="workers"):
        match_crops_to_smears([], tmp_path, workers=0, progress=False)


def test_fallback_groups_put_copies_together_and_warn(dataset, caplog):
    root, smear_dir, truth, source = dataset
    with caplog.at_level(logging.WARNING, logger="cellhub.smears"):
        groups = fallback_groups(list(truth), progress=False)
    assert "weaker" in caplog.text
    assert set(groups) == set(truth)
    # copies of one cell share a group, and different cells never do
    by_source: dict[int, set[str]] = {}
    for crop, group in groups.items():
        by_source.setdefault(source[crop], set()).add(group)
    assert all(len(g) == 1 for g in by_source.values()), by_source
    assert len({next(iter(g)) for g in by_source.values()}) == len(by_source)


def test_smear_fields_merge_overlapping_frames(tmp_path, monkeypatch):
    big = _textured_smear(7, size=(720, 360))
    cv2.imwrite(str(tmp_path / "BloodImage_00001.jpg"), big[:, :480])
    cv2.imwrite(str(tmp_path / "BloodImage_00002.jpg"), big[:, 240:])  # half of it overlaps 00001
    cv2.imwrite(str(tmp_path / "BloodImage_00003.jpg"), _textured_smear(8))
    fields = smear_fields(tmp_path, cache_dir=tmp_path / "cache", progress=False)
    monkeypatch.setattr(smears, "_smear_fields", lambda *a, **k: pytest.fail("not served from the cache"))
    assert fields == smear_fields(tmp_path, cache_dir=tmp_path / "cache", progress=False)
    assert fields == {
        "BloodImage_00001": "BloodImage_00001",
        "BloodImage_00002": "BloodImage_00001",
        "BloodImage_00003": "BloodImage_00003",
    }


def test_on_cellhub_synthetic_kaggle_download(tmp_path):
    synthetic = pytest.importorskip("cellhub.synthetic")
    root = synthetic.write_kaggle_blood_cells(tmp_path / "kaggle", n_cells_per_class=1, copies=4, splits=("TRAIN",))
    truth = json.loads((root / "_truth.json").read_text())
    crops = [str(root / rel) for rel in truth]
    smear_dir = root / "dataset-master" / "dataset-master" / "JPEGImages"
    result = match_crops_to_smears(crops, smear_dir, cache_dir=tmp_path / "cache", progress=False)
    expected = {str(root / rel): sid for rel, sid in truth.items()}
    wrong = {c: s for c, s in result.items() if s is not None and s != expected[c]}
    assert not wrong  # never the wrong smear
    # the drawn lymphocytes are nearly textureless, so allow one crop without a verified match
    assert sum(s is not None for s in result.values()) >= len(crops) - 1


def test_cache_writes_merge_with_other_processes(dataset, tmp_path):
    root, smear_dir, truth, _ = dataset
    crops = list(truth)[:2]
    match_crops_to_smears(crops, smear_dir, cache_dir=tmp_path, progress=False)
    (cache_file,) = tmp_path.glob("crops-to-smears-*.json")
    other = {"/elsewhere/x.jpeg": {"size": 1, "mtime_ns": 1, "smear": "BloodImage_00042", "inliers": 50}}
    smears._save_cache(cache_file, other, {})  # as another process holding only its own entries would
    entries = json.loads(cache_file.read_text())["entries"]
    assert set(entries) == {str(Path(c).resolve()) for c in crops} | set(other)


def test_corrupt_cache_is_ignored(dataset, tmp_path, caplog):
    root, smear_dir, truth, _ = dataset
    crop = next(c for c, s in truth.items() if s)
    match_crops_to_smears([crop], smear_dir, cache_dir=tmp_path, progress=False)
    (cache_file,) = tmp_path.glob("crops-to-smears-*.json")
    cache_file.write_text("[1, 2")  # truncated JSON
    with caplog.at_level(logging.WARNING, logger="cellhub.smears"):
        assert match_crops_to_smears([crop], smear_dir, cache_dir=tmp_path, progress=False) == {crop: truth[crop]}
    assert "cache" in caplog.text
    assert json.loads(cache_file.read_text())["entries"]  # rewritten
