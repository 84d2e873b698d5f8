"""Predictor (checkpoint -> probabilities + CAM + abstention), consensus, safe input, batch CLI."""
from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellhub import hub
from cellhub.__main__ import main as cellhub_main
from cellhub.models import create_model
from cellhub.batch import predict_files
from cellhub.images import InputError, Limits, collect_images, list_zip_images, read_image
from cellhub.predict import Prediction, Predictor, consensus, load_predictors
from cellhub.synthetic import draw_blood_cell, draw_malaria_cell


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("smallcnn", "blood-cells", pretrained=False, image_size=32)
    model.cellhub_config["abstention_threshold"] = 0.3
    return hub.save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "small-blood")


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_pretrained(checkpoint)


def _cells(n: int, size: tuple[int, int] = (80, 60)) -> list[Image.Image]:
    labels = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    return [draw_blood_cell(labels[i % 4], size=size, seed=i) for i in range(n)]


# ------------------------------------------------------------------------------------ Predictor


def test_predictor_reads_everything_from_the_checkpoint(checkpoint: Path, predictor: Predictor) -> None:
    assert predictor.name == "small-blood"
    assert predictor.task == "blood-cells"
    assert predictor.labels == ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert predictor.threshold == pytest.approx(0.3)
    assert predictor.input_size == (32, 32)
    images = _cells(3)
    preds = predictor.predict(images, with_cam=True)
    assert len(preds) == 3
    # same probabilities as the model itself on the checkpoint's own preprocessing
    model = hub.load_pretrained(checkpoint)
    with torch.no_grad():
        expected = torch.softmax(model(predictor.preprocess(images)), dim=1).numpy()
    for pred, row in zip(preds, expected):
        assert list(pred.probs) == predictor.labels
        np.testing.assert_allclose(list(pred.probs.values()), row, atol=1e-5)
        assert pred.label == predictor.labels[int(row.argmax())]
        assert pred.confidence == pytest.approx(row.max(), abs=1e-5)
        assert pred.abstain == (pred.confidence < 0.3)
        assert pred.cam is not None and pred.cam.shape == (32, 32)
        assert 0.0 <= pred.cam.min() and pred.cam.max() <= 1.0
        assert pred.seconds > 0 and pred.model == "small-blood"


def test_batched_equals_one_by_one_and_is_batched(predictor: Predictor) -> None:
    images = _cells(5)
    calls: list[int] = []
    handle = predictor.model.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    try:
        batched = predictor.predict(images, with_cam=False, batch_size=4)
    finally:
        handle.remove()
    assert calls == [4, 1]  # two forward passes, not five
    for img, pred in zip(images, batched):
        single = predictor.predict(img, with_cam=True)[0]
        assert single.label == pred.label
        np.testing.assert_allclose(list(single.probs.values()), list(pred.probs.values()), atol=1e-5)


def test_abstention_threshold_and_its_absence(predictor: Predictor) -> None:
    img = _cells(1)[0]
    predictor.threshold = 0.999  # nothing from an untrained model is that confident
    try:
        pred = predictor.predict(img, with_cam=False)[0]
        assert pred.abstain and pred.threshold == 0.999
        assert consensus([pred]).uncertain
        predictor.threshold = None
        pred = predictor.predict(img, with_cam=False)[0]
        assert not pred.abstain
        cons = consensus([pred])
        assert not cons.uncertain
        assert "no abstention threshold" in cons.notes[0]
    finally:
        predictor.threshold = 0.3


def test_cam_overlay_is_at_image_size_and_covers_the_models_view(predictor: Predictor) -> None:
    img = _cells(1, size=(80, 60))[0]
    # timm eval transform: short side -> 32, centre crop 32x32 = the central 60x60 of the 80x60 image
    assert predictor.cam_box((80, 60)) == pytest.approx((10.0, 0.0, 70.0, 60.0))
    pred = predictor.predict(img, with_cam=True)[0]
    over = predictor.overlay(img, pred)
    assert over.size == img.size
    arr, orig = np.asarray(over), np.asarray(img)
    assert np.array_equal(arr[:, :10], orig[:, :10]) and np.array_equal(arr[:, 70:], orig[:, 70:])
    assert not np.array_equal(arr[:, 10:70], orig[:, 10:70])


def test_svm_checkpoint_predicts_without_cam() -> None:
    from cellhub.svm import SVMClassifier, pool_features

    torch.manual_seed(0)
    backbone = create_model("smallcnn", "malaria", pretrained=False, image_size=32).eval()
    svm = SVMClassifier(["parasitized", "uninfected"], backbone=backbone, task="malaria")
    with torch.no_grad():
        svm.fit(pool_features(backbone, torch.rand(12, 3, 32, 32)).numpy(), [0, 1] * 6)
    pred = Predictor(svm, name="svm")
    assert not pred.supports_cam and pred.task == "malaria"
    out = pred.predict([draw_malaria_cell("parasitized", size=40, seed=0)[0]], with_cam=True)[0]
    assert out.cam is None and set(out.probs) == {"parasitized", "uninfected"}
    assert sum(out.probs.values()) == pytest.approx(1.0, abs=1e-5)


def test_predictor_needs_a_cellhub_config() -> None:
    with pytest.raises(ValueError, match="no cellhub_config"):
        Predictor(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------ consensus


def _pred(model: str, label: str, conf: float, threshold: float | None = 0.5) -> Prediction:
    other = "b" if label == "a" else "a"
    return Prediction({label: conf, other: 1 - conf}, label, conf, None, threshold is not None and conf < threshold, 0.01, threshold, model)


def test_consensus_majority_disagreement_and_abstention() -> None:
    cons = consensus([_pred("m1", "a", 0.9), _pred("m2", "a", 0.8), _pred("m3", "b", 0.7)])
    assert cons.label == "a" and cons.agree == ["m1", "m2"] and cons.disagree == ["m3"]
    assert cons.uncertain and "models disagree" in cons.reasons[0]

    cons = consensus([_pred("m1", "a", 0.9), _pred("m2", "a", 0.95)])
    assert cons.label == "a" and not cons.uncertain and cons.reasons == []

    cons = consensus([_pred("m1", "a", 0.9), _pred("m2", "a", 0.4)])  # agree, but m2 under threshold
    assert cons.uncertain and "m2 confidence 0.40 is under its abstention threshold 0.50" in cons.reasons[0]

    tie = consensus([_pred("m1", "a", 0.55), _pred("m2", "b", 0.95)])  # 1:1 -> higher mean probability
    assert tie.label == "b" and tie.uncertain

    assert consensus([]).uncertain and consensus([]).label is None


# ------------------------------------------------------------------------------------ input


def test_read_image_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InputError, match=r"notes\.txt: not an image file"):
        read_image(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.png: the file is empty"):
        read_image(empty)
    big = _png(Image.new("RGB", (20, 20)))
    with pytest.raises(InputError, match=r"x\.png: 20x20 pixels .* over the 0.0001 MP limit"):
        read_image(big, name="x.png", limits=Limits(max_pixels=100))
    with pytest.raises(InputError, match="over the 0.0 MB limit"):
        read_image(big, name="x.png", limits=Limits(max_image_bytes=10))
    noisy = _png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(InputError, match=r"cut\.png: the image is corrupt or truncated"):
        read_image(noisy[: len(noisy) // 2], name="cut.png")
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "missing.png")


def test_read_image_normalises_modes() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent -> white background
    assert read_image(_png(rgba)).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.fromarray(np.arange(16, dtype=np.uint16).reshape(4, 4) * 1000)
    out = read_image(_png(deep))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((3, 3)) == (255, 255, 255)


def test_zip_skips_junk_and_is_safe(tmp_path: Path) -> None:
    path = tmp_path / "cells.zip"
    cell = _png(draw_malaria_cell("parasitized", size=24, seed=0)[0])
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cells/a.png", cell)
        zf.writestr("cells/sub/b.png", cell)
        zf.writestr("readme.txt", "hello")
        zf.writestr("../escape.png", cell)
        zf.writestr("/abs.png", cell)
        zf.writestr("__MACOSX/cells/._a.png", b"meta")
        zf.writestr("inner.zip", b"PK")
        zf.writestr("bomb.png", b"\0" * (3 * 2**20))  # 3 MB of zeros: ratio ~1000:1
        zf.writestr("fake.png", b"not really a png")
    refs, skipped = list_zip_images(path)
    assert [r.name for r in refs] == ["cells.zip/cells/a.png", "cells.zip/cells/sub/b.png", "cells.zip/fake.png"]
    reasons = dict(skipped)
    assert "not an image file (.txt)" in reasons["cells.zip/readme.txt"]
    assert "unsafe path" in reasons["cells.zip/../escape.png"] and "unsafe path" in reasons["cells.zip//abs.png"]
    assert "metadata" in reasons["cells.zip/__MACOSX/cells/._a.png"]
    assert "nested archive" in reasons["cells.zip/inner.zip"]
    assert "zip bomb" in reasons["cells.zip/bomb.png"]
    assert not (tmp_path / "escape.png").exists()  # nothing is ever extracted

    with pytest.raises(InputError, match="4 entries; the limit is 3"):
        small = tmp_path / "small.zip"
        with zipfile.ZipFile(small, "w") as zf:
            for i in range(4):
                zf.writestr(f"{i}.png", cell)
        list_zip_images(small, limits=Limits(max_zip_members=3))
    not_zip = tmp_path / "broken.zip"
    not_zip.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(InputError, match="broken.zip: not a valid zip"):
        list_zip_images(not_zip)
    refs, skipped = collect_images([not_zip])  # in a batch: reported, not raised
    assert refs == [] and "not a valid zip" in skipped[0][1]


def test_predict_files_reports_bad_files_and_keeps_going(tmp_path: Path, predictor: Predictor) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(_cells(5)):
        img.save(folder / f"cell_{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "notes.txt").write_text("x")
    refs, skipped = collect_images([folder])
    assert len(refs) == 6 and skipped == [("imgs/notes.txt", "not an image file (.txt)")]
    ticks: list[tuple[int, int]] = []
    result = predict_files([predictor], refs, batch_size=4, workers=2, progress=lambda d, t, _m: ticks.append((d, t)))
    assert result.files == [f"imgs/cell_{i}.png" for i in range(5)]
    assert [n for n, _ in result.skipped] == ["imgs/broken.png"]
    assert ticks[0] == (0, 6) and ticks[-1] == (6, 6)
    assert sum(c for _, c, _ in result.counts()) == 5
    assert result.header()[:3] == ["file", "small-blood label", "small-blood confidence"]
    with pytest.raises(InputError, match="limit is 3"):
        collect_images([folder], limits=Limits(max_images=3))


def test_predict_files_with_models_of_different_preprocessing_equals_per_image(tmp_path: Path, predictor: Predictor) -> None:
    """Decoding threads preprocess once per distinct data config, the next chunk decodes while the
    models run: the result must be what each model says about each image on its own."""
    torch.manual_seed(1)
    other = create_model("smallcnn", "blood-cells", pretrained=False, image_size=48)
    other.cellhub_config["pretrained_cfg"]["mean"] = [0.5, 0.5, 0.5]
    second = Predictor(other, name="small-48")
    assert second.input_size == (48, 48) and second.batch_size == 8  # CPU default forward batch
    conv_weights = [w for w in second.model.parameters() if w.ndim == 4]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = _cells(11, size=(70, 50))
    for i, img in enumerate(images):
        img.save(folder / f"c{i:02d}.png")
    refs, _ = collect_images([folder])
    sizes: list[int] = []
    handle = second.model.register_forward_hook(lambda _m, inp, _o: sizes.append(inp[0].shape[0]))
    try:
        result = predict_files([predictor, second], refs, batch_size=5, workers=3)
    finally:
        handle.remove()
    assert sizes == [5, 5, 1]  # chunks of 5 decoded; each one forward of <= 8 on the CPU
    assert result.files == [f"imgs/c{i:02d}.png" for i in range(11)]
    for img, preds in zip(images, result.predictions):
        for p in (predictor, second):
            alone = p.predict([img], with_cam=False)[0]
            assert preds[p.name].label == alone.label
            np.testing.assert_allclose(list(preds[p.name].probs.values()), list(alone.probs.values()), atol=1e-5)


def test_predict_preprocessed_checks_its_input(predictor: Predictor) -> None:
    x = predictor.preprocess(_cells(2))
    assert [p.label for p in predictor.predict_preprocessed(x, with_cam=False)] == [
        p.label for p in predictor.predict(_cells(2), with_cam=False)]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        predictor.predict_preprocessed(x[0], with_cam=False)


def test_load_predictors_skips_failures_and_dedupes_names(checkpoint: Path, tmp_path: Path) -> None:
    preds, failures = load_predictors([checkpoint, tmp_path / "nope", checkpoint])
    assert [p.name for p in preds] == ["small-blood", "small-blood-2"]
    assert failures and failures[0][0] == str(tmp_path / "nope")


# ------------------------------------------------------------------------------------ CLI


def test_cli_predicts_a_folder_with_csv_and_cams(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, img in enumerate(_cells(3, size=(50, 40))):
        img.save(folder / f"c{i}.jpg")
    (folder / "junk.png").write_text("not an image")
    out_csv, cam_dir = tmp_path / "out.csv", tmp_path / "cams"
    rc = cellhub_main(["predict", str(checkpoint), str(folder), "--csv", str(out_csv), "--cam-dir", str(cam_dir), "--batch-size", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "3 images" in printed and "abstention threshold 0.300" in printed
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["file"] for r in rows] == ["in/c0.jpg", "in/c1.jpg", "in/c2.jpg"]
    assert all(r["small-blood label"] in ("eosinophil", "lymphocyte", "monocyte", "neutrophil") for r in rows)
    cams = sorted(cam_dir.glob("*.png"))
    assert [p.name for p in cams] == ["in__c0.cam.png", "in__c1.cam.png", "in__c2.cam.png"]
    assert Image.open(cams[0]).size == (50, 40)


def test_cli_streams_any_number_of_images_and_resumes(checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    base = _cells(1, size=(24, 18))[0]
    for i in range(2_010):  # more than one app request may hold (Limits.max_images = 2,000)
        base.save(folder / f"c{i:04d}.png")
    out_csv = tmp_path / "rows.csv"
    rc = cellhub_main(["predict", str(checkpoint), str(folder), "--csv", str(out_csv), "--quiet", "--batch-size", "64"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "2010 images in" in printed and "img/s" in printed and "many/c0000.png\t" not in printed  # --quiet
    rows = list(csv.reader(out_csv.open()))
    assert len(rows) == 1 + 2_010
    # an interrupted run: the CSV lost its last 500 rows; --resume predicts only those and appends them
    with out_csv.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows[:-500])
    rc = cellhub_main(["predict", str(checkpoint), str(folder), "--csv", str(out_csv), "--resume", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1510 image(s) already in" in printed and "500 images in" in printed
    again = list(csv.reader(out_csv.open()))
    assert again[0] == rows[0] and sorted(r[0] for r in again[1:]) == sorted(r[0] for r in rows[1:])
    assert len({r[0] for r in again[1:]}) == 2_010  # each image once


def test_cli_reads_a_text_file_of_paths(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, img in enumerate(_cells(2, size=(40, 30))):
        img.save(tmp_path / f"x{i}.png")
    listing = tmp_path / "list.txt"
    listing.write_text("# cells to classify\nx0.png\n\n" + str(tmp_path / "x1.png") + "\nmissing.png\n")
    out_csv = tmp_path / "o.csv"
    assert cellhub_main(["predict", str(checkpoint), str(listing), "--csv", str(out_csv)]) == 0
    names = [r["file"] for r in csv.DictReader(out_csv.open())]
    assert names == ["x0.png", "x1.png"]
    with pytest.raises(SystemExit, match="--resume needs --csv"):
        cellhub_main(["predict", str(checkpoint), str(listing), "--resume"])
