"""Is the differential from whole fields as accurate as from the crops?  (issue #11)

    python bench/field_differential.py [--checkpoint checkpoints/smallcnn-blood-cells] [--data ROOT]

Only cells the checkpoint never trained on: its own grouped validation split is redrawn from its
recipe (``val_fraction``, ``seed``; grouped by microscope field), and for every validation field
whose smear holds one white cell of one labelled type (``dataset-master/labels.csv``):

- **crops**: the checkpoint on that cell's Kaggle crops, one majority vote per cell (what
  ``evaluate`` reports as accuracy per group);
- **field**: ``cellhub.fields.analyze_field`` on the whole smear photo (find the white cell, crop it
  as the classifier expects, classify); right when white cells are found and all carry the cell's
  label (a smear labelled with one type can hold two cells of it). Fields where none is found, or
  one of another label, count as wrong and are listed.

Both are reported with Wilson 95% intervals; the fields are few, so read the intervals.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub.data import ensure_validation, load_cell_dataset  # noqa: E402
from cellhub.data.groups import field_of_smears, smear_of_crops  # noqa: E402
from cellhub.evaluation import predict_dataset  # noqa: E402
from cellhub.fields import analyze_field, wilson_interval  # noqa: E402
from cellhub.hub import load_pretrained  # noqa: E402
from cellhub.images import InputError  # noqa: E402
from cellhub.predict import Predictor  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/smallcnn-blood-cells")
    p.add_argument("--data", default="/work/shared/data/blood-cells")
    args = p.parse_args(argv)
    model = load_pretrained(args.checkpoint)
    recipe = model.cellhub_config.get("recipe") or {}
    dsd = load_cell_dataset(args.data, task="blood-cells", group_by="field", progress=False)
    val = ensure_validation(dsd, val_fraction=recipe.get("val_fraction", 0.2), seed=recipe.get("seed", 0))["validation"]
    smear_dir = Path(args.data) / "dataset-master" / "dataset-master" / "JPEGImages"
    labels_csv = Path(args.data) / "dataset-master" / "dataset-master" / "labels.csv"
    category = {}
    with open(labels_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["Image"].strip():
                category[f"BloodImage_{int(row['Image']):05d}"] = row["Category"].strip().lower()
    from datasets import Image as HFImage

    paths = [x["path"] for x in val.cast_column("image", HFImage(decode=False))["image"]]
    smear_of = smear_of_crops(paths, smear_dir, None, False)
    probs = predict_dataset(model, val, progress=False)
    names = val.features["label"].names
    votes: dict[str, Counter] = {}
    truth: dict[str, str] = {}
    for path, y, pr in zip(paths, val["label"], probs):
        s = smear_of.get(path)
        if s:
            votes.setdefault(s, Counter())[names[int(pr.argmax())]] += 1
            truth[s] = names[int(y)]
    predictor = Predictor(model, name="model")
    crop_right = field_right = n = 0
    misses = []
    for smear in sorted(votes):
        lab = category.get(smear, "")
        if lab != truth[smear] or "," in lab:  # one cell of one labelled type
            continue
        n += 1
        crop_right += votes[smear].most_common(1)[0][0] == lab
        try:
            res = analyze_field(smear_dir / f"{smear}.jpg", [predictor], "blood-cells")
            wbc = [c for c in res.cells if c.kind == "wbc"]
        except InputError as exc:
            wbc, res = [], None
            misses.append((smear, str(exc)))
        if wbc and all(c.label == lab for c in wbc):  # the smear's cell(s): one type per labelled smear
            field_right += 1
        elif res is not None:
            misses.append((smear, f"{len(wbc)} white cells found: {[c.label for c in wbc]}, truth {lab}"))
    out = {"checkpoint": args.checkpoint, "validation_cells": n,
           "crops_vote_accuracy": crop_right / n, "crops_ci95": wilson_interval(crop_right, n),
           "field_accuracy": field_right / n, "field_ci95": wilson_interval(field_right, n),
           "crops_right": crop_right, "field_right": field_right, "misses": misses}
    print(json.dumps(out, indent=1))
    print(f"field-differential: crops {crop_right}/{n} cells right, whole fields {field_right}/{n} "
          f"cmd='python bench/field_differential.py --checkpoint {args.checkpoint}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
