"""Red cells of malaria-free blood films as ``uninfected`` examples for the malaria task.

    python train/rbc_negatives.py --output-dir ~/data/bccd-rbc-negatives            # then:
    python train/finetune.py --dataset ../shared/data/malaria --dataset ~/data/bccd-rbc-negatives ...

The NIH malaria crops come from one lab's Giemsa-stained thin films. On another lab's films (the
BCCD fields, which hold no malaria) a model trained on them alone calls a few percent of the red
cells "parasitized": mostly platelets lying on a red cell, which look like ring forms
(``bench/field_accuracy.py --malaria``). Every red cell of a film without malaria is a true
``uninfected`` example from another lab, so this script cuts them out of such fields exactly as
whole-field analysis does (``cellhub.detect`` finds them, :func:`cellhub.fields.cell_crops` crops
them) and writes them as a saved dataset (``image``, ``label``, ``group`` = the field) that
``finetune.py --dataset`` reads as one more source, grouped by field.

Which fields (the BCCD rules of ``../shared/data/README.md``): only those with a box file and in
the tuning part of ``bench/field_accuracy.py`` (the held-out part and the fields without a box
file stay unseen), only fields whose white cell is among the Kaggle TRAIN crops (by the smear
matching), and no field that shows the same microscope field as an unseen one.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from cellhub.cache import default_cache_dir  # noqa: E402
from cellhub.data.groups import field_of_smears, smear_of_crops  # noqa: E402
from cellhub.detect import detect_cells, with_params  # noqa: E402
from cellhub.fields import cell_crops  # noqa: E402
from cellhub.images import is_image_file, read_image  # noqa: E402


def eligible_fields(data: Path) -> tuple[list[str], dict[str, int]]:
    """The BCCD field ids this script may train on, and how many were left out for each reason."""
    from field_accuracy import split_ids

    ann = data / "bccd-boxes" / "Annotations"
    smear_dir = data / "blood-cells" / "dataset-master" / "dataset-master" / "JPEGImages"
    crops = sorted(str(p) for p in (data / "blood-cells" / "dataset2-master" / "dataset2-master" / "images" /
                                    "TRAIN").rglob("*") if is_image_file(p))
    cache = default_cache_dir()
    train_smears = {s for s in smear_of_crops(crops, smear_dir, cache, True).values() if s}
    field_of = field_of_smears(smear_dir, cache, True)
    parts = split_ids(ann)
    tune = set(parts["tune"])
    unseen_fields = {field_of.get(s, s) for s in field_of if s not in tune}  # held out, or no box file
    out, why = [], {"held out or no box file": 0, "white cell not in TRAIN": 0, "same field as an unseen one": 0}
    for smear in sorted(field_of):
        if smear not in tune:
            why["held out or no box file"] += 1
        elif smear not in train_smears:
            why["white cell not in TRAIN"] += 1
        elif field_of.get(smear, smear) in unseen_fields:
            why["same field as an unseen one"] += 1
        else:
            out.append(smear)
    return out, why


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="the folder of ../shared/data")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--per-field", type=int, default=0,
                   help="at most this many red cells per field (a seeded sample; default 0: all of them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--red-cells", choices=["net", "hough"], default="net",
                   help="the detector's red-cell finder (cellhub.detect.DetectParams.red_cells): net (default; the "
                        "bundled malaria checkpoint was trained on the 1,497 cells it finds) or hough (the previous "
                        "finder: 1,397 cells)")
    args = p.parse_args(argv)
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image as HFImage, Value

    from cellhub.tasks import get_task

    ids, why = eligible_fields(args.data)
    smear_dir = args.data / "blood-cells" / "dataset-master" / "dataset-master" / "JPEGImages"
    rng = random.Random(args.seed)
    images, groups, files = [], [], []
    from tqdm.auto import tqdm
    for fid in tqdm(ids, desc="fields"):
        image = read_image(smear_dir / f"{fid}.jpg")
        det = detect_cells(image, with_params(red_cells=args.red_cells))
        rbc = det.of_kind("rbc")
        n = len(rbc) if args.per_field <= 0 else min(args.per_field, len(rbc))
        pick = sorted(rng.sample(range(len(rbc)), n))
        crops = cell_crops(image, [rbc[i].box for i in pick], "rbc", [c.box for c in det.of_kind("wbc")])
        for i, crop in zip(pick, crops):
            images.append(crop)
            groups.append(f"bccd-field:{fid}")
            files.append(f"{fid}_rbc{i:02d}.png")
    labels = list(get_task("malaria").labels)
    feats = Features({"image": HFImage(), "label": ClassLabel(names=labels), "group": Value("string"),
                      "file": Value("string")})
    ds = Dataset.from_dict({"image": images, "label": [labels.index("uninfected")] * len(images),
                            "group": groups, "file": files}, features=feats)
    DatasetDict(train=ds).save_to_disk(str(args.output_dir))
    print(f"wrote {len(ds)} uninfected red cells from {len(ids)} fields to {args.output_dir}; "
          f"fields left out: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
