"""Stain normalisation (Reinhard in CIELAB): one lab's colours mapped to fixed ones, recorded in the checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cellhub import transforms
from cellhub.synthetic import draw_smear


def _tinted(img: Image.Image, gains) -> Image.Image:
    px = np.asarray(img, dtype=np.float64) * np.asarray(gains) + np.asarray([0, 0, 12])
    return Image.fromarray(px.clip(0, 255).astype(np.uint8))


def test_lab_conversion_is_the_standard_one_and_inverts():
    lab = transforms.rgb_to_lab(np.array([[255, 255, 255], [255, 0, 0], [0, 0, 0]], dtype=np.uint8))
    np.testing.assert_allclose(lab, [[100, 0, 0], [53.24, 80.09, 67.20], [0, 0, 0]], atol=0.01)
    px = np.random.default_rng(0).integers(0, 256, (40, 40, 3)).astype(np.uint8)
    np.testing.assert_array_equal(transforms.lab_to_rgb(transforms.rgb_to_lab(px)), px)


def test_two_stains_of_one_cell_come_out_alike():
    smear, _ = draw_smear("neutrophil", seed=1)
    cell = transforms.cell_crop(smear, "nucleus").resize((64, 64))
    other = _tinted(cell, (0.85, 0.9, 1.15))  # a bluer stain, another white balance
    raw_gap = np.abs(np.asarray(cell, float) - np.asarray(other, float)).mean()
    a, b = (np.asarray(transforms.stain_normalise(x), float) for x in (cell, other))
    assert np.abs(a - b).mean() < raw_gap / 4
    spec = transforms.STAIN_NORMS["reinhard"]
    lab = transforms.rgb_to_lab(a.astype(np.uint8)).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(0), spec["mean"], atol=1.5)  # the target moments (up to gamut clipping)
    np.testing.assert_allclose(lab.std(0), spec["std"], rtol=0.15)  # clipping to the gamut narrows b a little


def test_a_cell_on_black_is_normalised_by_its_own_pixels():
    """reinhard-cell (malaria crops): the black around a cut-out cell neither moves nor weighs in."""
    from cellhub.synthetic import draw_malaria_cell

    cell = draw_malaria_cell("uninfected", size=64, seed=3)[0].convert("RGB")
    arr = np.asarray(cell).copy()
    yy, xx = np.mgrid[:64, :64]
    arr[(yy - 32) ** 2 + (xx - 32) ** 2 > 26 ** 2] = 0  # cut out on black, as the NIH crops are
    padded = np.pad(arr, ((16, 16), (16, 16), (0, 0)))  # the same cell, more black around it
    spec = transforms.stain_norm_spec("reinhard-cell")
    assert spec["black_below"] == 20 and transforms.stain_norm_spec(json.loads(json.dumps(spec))) == spec
    out = np.asarray(transforms.stain_normalise(Image.fromarray(arr), spec))
    black = arr.max(axis=2) < 20
    assert (out[black] == 0).all()
    lab = transforms.rgb_to_lab(out)[~black]
    np.testing.assert_allclose(lab.mean(0), spec["mean"], atol=1.5)
    np.testing.assert_allclose(lab.std(0), spec["std"], rtol=0.15)
    # the whole-image Reinhard counts the black, so the cell's colour depends on how much black surrounds it
    whole = [np.asarray(transforms.stain_normalise(Image.fromarray(x), "reinhard"), float) for x in (arr, padded)]
    fg = [np.asarray(transforms.stain_normalise(Image.fromarray(x), spec), float) for x in (arr, padded)]
    assert np.array_equal(fg[0], fg[1][16:-16, 16:-16])
    assert np.abs(whole[0] - whole[1][16:-16, 16:-16])[~black].mean() > 5
    blank = np.zeros((32, 32, 3), np.uint8)  # nothing but black: returned as it is
    assert (np.asarray(transforms.stain_normalise(Image.fromarray(blank), spec)) == 0).all()
    with pytest.raises(ValueError, match="black_below"):
        transforms.stain_norm_spec({**spec, "black_below": 300})


def test_specs_validate_and_read_back():
    assert transforms.stain_norm_spec("none") is None and transforms.stain_norm_spec(None) is None
    spec = transforms.stain_norm_spec("reinhard")
    assert transforms.stain_norm_spec(json.loads(json.dumps(spec))) == spec
    with pytest.raises(ValueError, match="choose none or one of reinhard"):
        transforms.stain_norm_spec("macenko")
    with pytest.raises(ValueError, match="positive standard deviations"):
        transforms.stain_norm_spec({"method": "reinhard", "mean": [1, 2, 3], "std": [1, 0, 1]})
    from cellhub.training import TrainConfig

    with pytest.raises(ValueError):
        TrainConfig(dataset="x", stain_norm="macenko").validate()


def test_a_stain_norm_model_records_it_and_every_path_applies_it(tmp_path):
    import cellhub
    from cellhub import models
    from cellhub.hub import save_pretrained
    from cellhub.predict import Predictor

    torch.manual_seed(0)
    m = models.create_model("smallcnn", list(cellhub.get_task("blood-cells").labels), pretrained=False,
                            image_size=32)
    m.cellhub_config["stain_norm"] = transforms.stain_norm_spec("reinhard")
    save_pretrained(m.eval(), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert transforms.resolve_data_config(cfg)["stain_norm"]["method"] == "reinhard"  # from config.json alone
    assert "Stain normalisation" in (tmp_path / "ck" / "README.md").read_text()
    loaded = cellhub.load_pretrained(str(tmp_path / "ck"))
    dcfg = transforms.resolve_data_config(loaded)
    smear, _ = draw_smear("lymphocyte", seed=2)
    cell = transforms.cell_crop(smear, "nucleus")
    expected = transforms.eval_transform({**dcfg, "stain_norm": None})(
        transforms.stain_normalise(cell.resize((32, 32), Image.BILINEAR), dcfg["stain_norm"]))
    np.testing.assert_allclose(transforms.eval_transform(dcfg)(cell).numpy(), expected.numpy(), atol=1e-6)
    # the prediction hardly moves when the stain changes; without normalisation it does
    m2 = models.create_model("smallcnn", list(cellhub.get_task("blood-cells").labels), pretrained=False, image_size=32)
    m2.load_state_dict(m.state_dict())
    norm = Predictor(loaded)
    other = _tinted(cell, (0.8, 0.9, 1.2))
    gap = {name: max(abs(a - b) for a, b in zip(p.predict([cell])[0].probs.values(), p.predict([other])[0].probs.values()))
           for name, p in (("plain", Predictor(m2.eval())), ("normalised", norm))}
    assert gap["normalised"] < gap["plain"] / 3


def test_fit_with_stain_norm_records_it(tmp_path):
    from cellhub.synthetic import write_imagefolder
    from cellhub.training import TrainConfig, fit

    data = write_imagefolder(tmp_path / "lab", task="blood-cells", n_per_class=4, size=48, splits=None)
    fit(TrainConfig(dataset=str(data), model="smallcnn", epochs=1, batch_size=8, image_size=32,
                    output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), n_boot=20,
                    progress=False, num_threads=1, group_by="file", stain_norm="reinhard", save_checkpoints=False))
    cc = json.loads((tmp_path / "run" / "config.json").read_text())["cellhub"]
    assert cc["stain_norm"]["method"] == "reinhard" and cc["recipe"]["stain_norm"] == "reinhard"
