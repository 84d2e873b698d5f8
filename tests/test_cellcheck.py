"""Not a blood cell: photos, text scans and empty fields are said to be so, not classified."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cellhub import hub
from cellhub.__main__ import main as cellhub_main
from cellhub.batch import predict_files
from cellhub.cellcheck import check_cell_image
from cellhub.images import collect_images
from cellhub.models import create_model
from cellhub.predict import Predictor
from cellhub.synthetic import draw_blood_cell, draw_malaria_cell


def _text_page(paper=(250, 250, 250), text="The quick brown fox jumps over", ink=(15, 15, 15)) -> Image.Image:
    page = Image.new("RGB", (240, 160), paper)
    draw = ImageDraw.Draw(page)
    for line in range(8):
        draw.text((8, 8 + 18 * line), text, fill=ink)
    return page


def _tinted_text_page() -> Image.Image:
    """Text on cream paper: tinted enough to pass the stain-colour floor, but a white page."""
    return _text_page((248, 244, 236), "Lorem ipsum dolor sit amet", (25, 25, 25))


def _photo() -> Image.Image:
    """A colourful outdoor-like picture: green below, blue above, an orange disc."""
    yy, xx = np.mgrid[:120, :160]
    img = np.zeros((120, 160, 3), np.float32)
    img[yy >= 60] = (60, 150, 50)
    img[yy < 60] = (110, 160, 230)
    disc = (xx - 110) ** 2 + (yy - 40) ** 2 < 400
    img[disc] = (240, 150, 30)
    img += np.random.default_rng(0).normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _empty_field() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(np.clip(np.full((90, 120, 3), (226, 214, 218)) + rng.normal(0, 2, (90, 120, 3)), 0,
                                   255).astype(np.uint8))


@pytest.mark.parametrize("image", [draw_blood_cell(lab, size=(96, 72), seed=s) for lab in
                                   ("eosinophil", "lymphocyte", "monocyte", "neutrophil") for s in range(3)]
                         + [draw_malaria_cell(lab, size=64, seed=s)[0] for lab in ("parasitized", "uninfected")
                            for s in range(3)])
def test_stained_cells_pass(image):
    verdict = check_cell_image(image)
    assert verdict.ok and verdict.reason is None, verdict


@pytest.mark.parametrize("make, reason", [(_text_page, "no stain colour"), (_photo, "not those of a stained blood smear"),
                                          (_empty_field, "nearly uniform"), (_tinted_text_page, "blank white page"),
                                          (lambda: Image.new("RGB", (50, 50)), "all black")])
def test_non_cells_are_flagged_with_the_reason(make, reason):
    verdict = check_cell_image(make())
    assert not verdict.ok and reason in verdict.reason


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return hub.save_pretrained(create_model("smallcnn", "blood-cells", pretrained=False, image_size=32),
                               tmp_path_factory.mktemp("ck") / "m")


def test_batch_does_not_classify_what_is_not_a_cell(checkpoint, tmp_path, capsys):
    draw_blood_cell("monocyte", size=(96, 72), seed=1).save(tmp_path / "cell.png")
    _text_page().save(tmp_path / "letter.png")
    _photo().save(tmp_path / "holiday.jpg")
    refs, _ = collect_images([tmp_path])
    predictor = Predictor.from_pretrained(checkpoint)
    result = predict_files([predictor], refs)
    assert [Path(f).name for f in result.files] == ["cell.png"]
    reasons = {Path(k).name: v for k, v in result.skipped}
    assert set(reasons) == {"letter.png", "holiday.jpg"}
    assert all(r.startswith("not a blood-cell image") and r.endswith("not classified.") for r in reasons.values())
    assert predict_files([predictor], refs, check_cells=False).n_predicted == 3  # the user's choice
    out = tmp_path / "o.csv"
    assert cellhub_main(["predict", str(checkpoint), str(tmp_path), "--csv", str(out), "--quiet"]) == 0
    assert [Path(r["file"]).name for r in csv.DictReader(out.open())] == ["cell.png"]
    assert cellhub_main(["predict", str(checkpoint), str(tmp_path), "--csv", str(out), "--quiet",
                         "--no-cell-check"]) == 0
    assert len(list(csv.DictReader(out.open()))) == 3


def test_predict_with_several_checkpoints_gives_each_label_and_the_consensus(checkpoint, tmp_path, capsys):
    """`predict CKPT_A CKPT_B images/`: both models side by side, their consensus, disagreements flagged;
    a checkpoint among the images is not read as images (its PNG plots and JSON files), nor is one given
    twice or of another task used; nothing is written then."""
    torch.manual_seed(1)
    other = hub.save_pretrained(create_model("smallcnn", "blood-cells", pretrained=False, image_size=32),
                                tmp_path / "ck" / "other")
    images = tmp_path / "images"
    images.mkdir()
    for i, kind in enumerate(("monocyte", "neutrophil", "lymphocyte", "eosinophil")):
        draw_blood_cell(kind, size=(96, 72), seed=i).save(images / f"{kind}.png")
    out = tmp_path / "o.csv"
    assert cellhub_main(["predict", str(checkpoint), str(other), str(images), "--csv", str(out),
                         "--cam-dir", str(tmp_path / "cams")]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and "m label" in rows[0] and "other label" in rows[0]
    for r in rows:
        agree = r["m label"] == r["other label"]
        assert r["agreement"] == ("2/2" if agree else "1/2")
        assert r["consensus"] in (r["m label"], r["other label"])
        if not agree:
            assert r["uncertain"] == "True" and "models disagree" in r["reasons"]
    assert "m + other (their consensus)" in printed and "flagged uncertain" in printed
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == sorted(
        f"{Path(r['file'].replace('/', '__')).stem}.{m}.cam.png" for r in rows for m in ("m", "other"))
    out.unlink()
    with pytest.raises(SystemExit, match="is a checkpoint folder, not images: give every checkpoint first"):
        cellhub_main(["predict", str(checkpoint), str(images), str(other), "--csv", str(out)])
    with pytest.raises(SystemExit, match="hf-hub:org/name is a Hub model id, not images: give every checkpoint first"):
        cellhub_main(["predict", str(checkpoint), str(images), "hf-hub:org/name", "--csv", str(out)])
    with pytest.raises(SystemExit, match="give distinct checkpoints of one task"):
        cellhub_main(["predict", str(checkpoint), str(checkpoint), str(images), "--csv", str(out)])
    malaria = hub.save_pretrained(create_model("smallcnn", "malaria", pretrained=False, image_size=32),
                                  tmp_path / "ck" / "mal")
    with pytest.raises(SystemExit, match="give distinct checkpoints of one task"):
        cellhub_main(["predict", str(checkpoint), str(malaria), str(images), "--csv", str(out)])
    assert not out.exists()


def test_app_says_not_a_blood_cell_and_classifies_nothing(checkpoint, tmp_path):
    app = pytest.importorskip("app")
    state = app.make_state([Predictor.from_pretrained(checkpoint)], out_dir=tmp_path / "out")
    _text_page().save(tmp_path / "letter.png")
    md, summary, *slots = app.predict_single(state, str(tmp_path / "letter.png"), "blood-cells")
    assert md.startswith("### Not a blood-cell image") and "no stain colour" in md
    assert summary["not_a_blood_cell"] is True and summary["models"] == [] and summary["consensus"] is None
    assert all(s is None for s in slots)


def test_a_pale_smear_background_is_not_a_white_page():
    """A real cell crop whose background is pale (PBC's brightest reach a third of white pixels) passes."""
    cell = np.asarray(draw_blood_cell("lymphocyte", size=(96, 72), seed=0)).copy()
    cell[:, :30] = (236, 232, 230)  # a bright, nearly neutral strip of background: ~30% of the image
    verdict = check_cell_image(Image.fromarray(cell))
    assert verdict.ok, verdict
    assert 0.2 < verdict.white < 0.5
