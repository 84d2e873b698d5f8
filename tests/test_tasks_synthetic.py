import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellhub import synthetic
from cellhub.tasks import get_task, malaria_group


def test_label_order_is_fixed():
    assert get_task("blood-cells").labels == ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
    assert get_task("malaria").labels == ("parasitized", "uninfected")
    assert get_task("blood-cells").label_from_folder("MONOCYTE") == "monocyte"
    assert get_task("malaria").label_from_folder("Parasitized") == "parasitized"
    assert get_task("malaria").label_from_folder("Thumbs.db") is None


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError, match="blood-cells, malaria"):
        get_task("platelets")


@pytest.mark.parametrize("name, group", [
    ("C100P61ThinF_IMG_20150918_144104_cell_162.png", "C100P61"),
    ("C13NThinF_IMG_20150614_131318_cell_179.png", "C13"),
    ("c7p8thinF_IMG_x_cell_1.png", "C7P8"),
    ("weird_name.png", "weird_name"),
])
def test_malaria_group(name, group):
    assert malaria_group(name) == group


def test_malaria_parasite_is_drawn_where_reported():
    img, pos = synthetic.draw_malaria_cell("parasitized", size=96, seed=5)
    clean, none = synthetic.draw_malaria_cell("uninfected", size=96, seed=5)
    assert none is None and pos is not None
    arr = np.asarray(img).astype(int)
    x, y = pos
    patch = arr[max(0, y - 12): y + 12, max(0, x - 12): x + 12]
    # the ring is dark purple: blue channel well above green, which the pink cell never shows
    assert ((patch[..., 2] - patch[..., 1]) > 60).sum() > 10
    assert ((np.asarray(clean).astype(int)[..., 2] - np.asarray(clean).astype(int)[..., 1]) > 60).sum() == 0


def test_blood_cell_classes_differ_and_bad_label_is_rejected():
    imgs = [np.asarray(synthetic.draw_blood_cell(l, size=(64, 48), seed=1)) for l in get_task("blood-cells").labels]
    assert all(im.shape == (48, 64, 3) for im in imgs)
    assert len({im.tobytes() for im in imgs}) == 4
    with pytest.raises(ValueError, match="eosinophil"):
        synthetic.draw_blood_cell("basophil")


def test_kaggle_blood_layout(tmp_path: Path):
    root = synthetic.write_kaggle_blood_cells(tmp_path, n_cells_per_class=1, copies=2, image_size=(80, 60),
                                              smear_size=(160, 120))
    crops = sorted((root / "dataset2-master/dataset2-master/images").rglob("*.jpeg"))
    assert len(crops) == 2 * 4 * 2  # splits x classes x copies
    truth = json.loads((root / "_truth.json").read_text())
    assert len(truth) == len(crops) and len(set(truth.values())) == 8
    smears = sorted((root / "dataset-master/dataset-master/JPEGImages").glob("*.jpg"))
    assert [p.stem for p in smears] == sorted(set(truth.values()))
    assert Image.open(crops[0]).size == (80, 60)


def test_kaggle_malaria_layout_has_nested_copy(tmp_path: Path):
    root = synthetic.write_kaggle_malaria(tmp_path, n_per_class=4, n_patients=2, size=32)
    top = sorted(p.name for p in (root / "cell_images").glob("*/*.png"))
    nested = sorted(p.name for p in (root / "cell_images/cell_images").glob("*/*.png"))
    assert top == nested and len(top) == 8
    groups = {malaria_group(n) for n in top}
    assert {"C100P60", "C101P61"} <= groups and "C10" in groups
