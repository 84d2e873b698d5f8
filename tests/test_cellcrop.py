"""Cell-centred crops: found on the nucleus, sized in red-cell radii, recorded in the checkpoint, applied everywhere."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cellhub import transforms
from cellhub.detect import white_cell_centre
from cellhub.synthetic import draw_smear


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_crop_is_centred_on_the_white_cell(seed):
    smear, (x0, y0, x1, y1) = draw_smear("lymphocyte", seed=seed, size=(640, 480))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    found = white_cell_centre(smear)
    assert found is not None and abs(found[0] - cx) < 15 and abs(found[1] - cy) < 15
    left, top, right, bottom = transforms.cell_box(smear, "nucleus")
    side = right - left
    assert side == bottom - top and 0.7 * 480 <= side <= 480  # a square, at most the short side
    assert 0 <= left and right <= 640 and 0 <= top and bottom <= 480  # inside the image: nothing invented
    # the white cell sits in the middle of the crop (it is not near the border in draw_smear)
    assert abs((left + right) / 2 - cx) < 0.1 * side and abs((top + bottom) / 2 - cy) < 0.1 * side
    crop = transforms.cell_crop(smear, "nucleus")
    assert crop.size == (side, side)


def test_an_image_without_a_nucleus_falls_back_to_the_centre():
    grey = Image.new("RGB", (200, 100), (230, 220, 225))
    assert white_cell_centre(grey) is None
    assert transforms.cell_box(grey, "nucleus") == (50, 0, 150, 100)


def test_unknown_crop_names_fail_clearly():
    with pytest.raises(ValueError, match="choose none or nucleus"):
        transforms.cell_crop_spec("middle")
    assert transforms.cell_crop_spec("none") is None
    from cellhub.training import TrainConfig

    with pytest.raises(ValueError, match="choose none or nucleus"):
        TrainConfig(dataset="x", cell_crop="middle").validate()


def test_a_cell_crop_model_records_it_and_predict_applies_it(tmp_path):
    """The crop travels in config.json; a loaded model's transform crops; the CAM box is the crop."""
    import cellhub
    from cellhub import models
    from cellhub.hub import save_pretrained
    from cellhub.predict import Predictor

    m = models.create_model("smallcnn", list(cellhub.get_task("blood-cells").labels), pretrained=False,
                            image_size=32)
    m.cellhub_config["cell_crop"] = transforms.cell_crop_spec("nucleus")
    save_pretrained(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["cellhub"]["cell_crop"]["method"] == "nucleus"
    loaded = cellhub.load_pretrained(str(tmp_path / "ck"))
    dcfg = transforms.resolve_data_config(loaded)
    assert dcfg["cell_crop"] == {"method": "nucleus", "side_rbc_radii": 10.0}
    assert transforms.resolve_data_config(cfg)["cell_crop"] == dcfg["cell_crop"]  # from config.json alone
    smear, _ = draw_smear("neutrophil", seed=3)
    tf = transforms.eval_transform(dcfg)
    expected = transforms.eval_transform(dcfg, cell_crop=False)(transforms.cell_crop(smear, dcfg["cell_crop"]))
    assert np.allclose(tf(smear).numpy(), expected.numpy())
    p = Predictor(loaded)
    assert p.cam_box(smear.size, smear) == pytest.approx(tuple(float(v) for v in transforms.cell_box(smear, "nucleus")))
    assert "Cell-centred crop first" in (tmp_path / "ck" / "README.md").read_text()


def test_fit_with_a_cell_crop_trains_on_cropped_pixels(tmp_path):
    from cellhub.synthetic import write_imagefolder
    from cellhub.training import TrainConfig, fit

    data = write_imagefolder(tmp_path / "lab", task="blood-cells", n_per_class=4, size=64, splits=None)
    m = fit(TrainConfig(dataset=str(data), model="smallcnn", epochs=1, batch_size=8, image_size=32,
                        output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), n_boot=20,
                        progress=False, num_threads=1, group_by="file", cell_crop="nucleus", stain_jitter=0.3,
                        scale_jitter=0.15, save_checkpoints=False))
    cc = json.loads((tmp_path / "run" / "config.json").read_text())["cellhub"]
    assert cc["cell_crop"]["method"] == "nucleus"
    assert cc["recipe"]["cell_crop"]["method"] == "nucleus" and "zoom up to 1.15x" in cc["recipe"]["augmentation"]
    assert any("nucleus" in p.name for p in (tmp_path / "cache" / "resized").glob("*.arrow"))
    assert m["splits"]["validation"]["n_images"] > 0


def test_cell_boxes_are_found_once_per_file_across_subsets(tmp_path, monkeypatch):
    """Cross-validation folds are subsets with their own decode cache: the crop boxes are not found again."""
    from cellhub.data import cache_resized, load_cell_dataset
    from cellhub.synthetic import write_imagefolder

    data = write_imagefolder(tmp_path / "lab", task="blood-cells", n_per_class=3, size=64, splits=None)
    ds = load_cell_dataset(str(data), cache_dir=str(tmp_path / "c"), progress=False, group_by="file")["train"]
    calls = []
    real = transforms.cell_box
    monkeypatch.setattr(transforms, "cell_box", lambda im, spec: calls.append(1) or real(im, spec))
    full = cache_resized(ds, 32, tmp_path / "c", cell_crop="nucleus", progress=False)
    assert len(calls) == len(ds)
    part = cache_resized(ds.select([0, 2, 5]), 32, tmp_path / "c", cell_crop="nucleus", progress=False)
    assert len(calls) == len(ds)  # every box came from the cache
    px = np.asarray(full.with_format("numpy")["pixels"][[0, 2, 5]], dtype=np.uint8)
    assert np.array_equal(np.asarray(part.with_format("numpy")["pixels"], dtype=np.uint8), px)
    # and the pixels are those of the crop, not of the whole image
    img = ds[2]["image"].convert("RGB")
    expected = np.asarray(transforms.cell_crop(img, "nucleus").resize((32, 32), Image.BILINEAR, reducing_gap=3.0))
    assert np.abs(px[1].astype(int) - expected.astype(int)).mean() < 2


def test_decode_once_resizes_crops_of_any_side():
    """A square crop of side 122, 154, 211, ... once overshot its own box by a rounding hair (a crash)."""
    from cellhub.data.resized import _cover

    for side in (122, 154, 211, 244, 245, 308, 319, 320):
        assert _cover(Image.new("RGB", (side, side)), 80, 80).size == (80, 80)
        assert _cover(Image.new("RGB", (side + 37, side)), 80, 80).size == (80, 80)
