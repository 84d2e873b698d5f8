"""Cell-centred crops: found on the nucleus, sized in red-cell radii, recorded in the checkpoint, applied everywhere."""
from __future__ import annotations

import json
from pathlib import Path

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
    # a file edited in place gets its box again, and its old box leaves the store (one entry per file)
    from cellhub.cache import read_json

    store_file = next((tmp_path / "c").rglob("cellboxes-*.json"))
    assert len(read_json(store_file, {})) == len(ds)
    edited = Path(ds[0]["image"].filename)
    Image.open(edited).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(edited)
    again = load_cell_dataset(str(data), cache_dir=str(tmp_path / "c"), progress=False, group_by="file")["train"]
    before = len(calls)  # (checking the edited file on loading it may crop it too)
    cache_resized(again, 32, tmp_path / "c", cell_crop="nucleus", progress=False)
    assert len(calls) == before + 1  # only the edited file is cropped again
    store = read_json(store_file, {})
    assert len(store) == len(ds) and sum(k.startswith(f"{edited}|") for k in store) == 1


def test_decode_once_resizes_crops_of_any_side():
    """A square crop of side 122, 154, 211, ... once overshot its own box by a rounding hair (a crash)."""
    from cellhub.data.resized import _cover

    for side in (122, 154, 211, 244, 245, 308, 319, 320):
        assert _cover(Image.new("RGB", (side, side)), 80, 80).size == (80, 80)
        assert _cover(Image.new("RGB", (side + 37, side)), 80, 80).size == (80, 80)


def _cell_near_corner(seed: int = 0) -> tuple[Image.Image, tuple[float, float]]:
    """A 320x240 crop of a drawn smear with its white cell about 45 px from the top-left corner
    (as in the Kaggle crops, which are shifted copies of one cell)."""
    smear, (x0, y0, x1, y1) = draw_smear("lymphocyte", seed=seed, size=(640, 480))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(cx - 45), int(cy - 45)
    return smear.crop((left, top, left + 320, top + 240)), (cx - left, cy - top)


def test_pad_keeps_a_cell_near_the_edge_centred_and_shift_does_not():
    img, (cx, cy) = _cell_near_corner()
    shifted = transforms.cell_box(img, "nucleus")
    side = shifted[2] - shifted[0]
    assert shifted[0] >= 0 and shifted[1] >= 0  # moved inside the image ...
    assert max(abs((shifted[0] + shifted[2]) / 2 - cx), abs((shifted[1] + shifted[3]) / 2 - cy)) > 0.2 * side
    left, top, right, bottom = transforms.cell_box(img, "nucleus-pad")
    assert right - left == side == bottom - top  # same scale
    assert abs((left + right) / 2 - cx) < 15 and abs((top + bottom) / 2 - cy) < 15  # ... or kept on the cell
    assert left < 0 and top < 0
    crop = np.asarray(transforms.cell_crop(img, "nucleus-pad"))
    assert crop.shape == (side, side, 3)
    median = np.median(np.asarray(img)[::2, ::2].reshape(-1, 3), axis=0).astype(int)
    assert (np.abs(crop[: -top - 1, : -left - 1].astype(int) - median) <= 1).all()  # outside: the median colour
    assert np.array_equal(crop[-top:, -left:], np.asarray(img)[: bottom, : right])  # inside: the image itself


def test_crop_specs_read_back_unchanged_and_bad_borders_fail():
    assert transforms.cell_crop_spec({"method": "nucleus", "side_rbc_radii": 10}) == \
        {"method": "nucleus", "side_rbc_radii": 10.0}  # a checkpoint saved before borders existed
    assert transforms.cell_crop_spec("nucleus-pad") == {"method": "nucleus", "side_rbc_radii": 10.0, "border": "pad"}
    assert transforms.cell_crop_spec(transforms.cell_crop_spec("nucleus-pad"))["border"] == "pad"
    with pytest.raises(ValueError, match="border must be one of shift, pad"):
        transforms.cell_crop_spec({"method": "nucleus", "border": "wrap"})
    with pytest.raises(ValueError, match="must name a method"):
        transforms.cell_crop_spec({"method": "nucleus-pad"})


def test_decode_once_pads_like_cell_crop(tmp_path):
    """Training's decoded cache takes the same padded crop that prediction does, in its own cache file."""
    from cellhub.data import cache_resized, image_paths, load_cell_dataset
    from cellhub.synthetic import write_imagefolder

    data = write_imagefolder(tmp_path / "lab", task="blood-cells", n_per_class=2, size=64, splits=None)
    first = sorted(data.rglob("*.png"))[0]
    img, _ = _cell_near_corner(seed=4)
    img.save(first)
    ds = load_cell_dataset(str(data), cache_dir=str(tmp_path / "c"), progress=False, group_by="file")["train"]
    i = [str(Path(p).resolve()) for p in image_paths(ds)].index(str(first.resolve()))
    padded = cache_resized(ds, 48, tmp_path / "c", cell_crop="nucleus-pad", progress=False)
    shifted = cache_resized(ds, 48, tmp_path / "c", cell_crop="nucleus", progress=False)
    names = sorted(p.name for p in (tmp_path / "c" / "resized").glob("*.arrow"))
    assert any("nucleus10-pad" in n for n in names) and any(n.endswith("nucleus10.arrow") for n in names)
    rows = [i, (i + 1) % len(ds)]
    expected = [np.asarray(transforms.cell_crop(ds[k]["image"].convert("RGB"), "nucleus-pad")
                           .resize((48, 48), Image.BILINEAR, reducing_gap=3.0)) for k in rows]
    got = [np.asarray(padded.with_format("numpy")["pixels"][k], dtype=np.uint8) for k in rows]
    assert all(np.abs(g.astype(int) - e.astype(int)).mean() < 2 for g, e in zip(got, expected))
    k = rows[0]
    assert np.abs(np.asarray(shifted.with_format("numpy")["pixels"][k], dtype=int)
                  - np.asarray(padded.with_format("numpy")["pixels"][k], dtype=int)).mean() > 5


def test_a_heat_map_over_a_view_past_the_edge_stays_aligned():
    """A padded crop's view runs past the image: the map is drawn at its place, clipped to the image."""
    from cellhub.cam import overlay

    base = Image.new("RGB", (100, 100), (128, 128, 128))
    cam = np.zeros((11, 11), dtype=np.float32)
    cam[5, 5] = 1.0  # hot at the view's centre, which is the image's top-left corner
    out = np.asarray(overlay(base, cam, alpha=1.0, box=(-50, -50, 50, 50))).astype(int)
    changed = np.abs(out - 128).sum(axis=2)
    assert changed[:10, :10].mean() > changed[30:, 30:].mean() + 50
    assert (changed[50:, :] == 0).all() and (changed[:, 50:] == 0).all()  # outside the view: the plain image
