"""Is the differential from whole fields as accurate as from the crops?  (issue #11)

    python bench/field_differential.py --cv-run RUN_DIR [--cv-run RUN_DIR2 ...] [--data ROOT]
    python bench/field_differential.py [--checkpoint checkpoints/smallcnn-blood-cells] [--data ROOT]

Only cells the model never trained on. With ``--cv-run`` (a ``finetune.py --cv`` run folder, e.g.
the one ``train/bundle.sh blood-cells`` writes): every fold's model on the Kaggle fields its fold
held out, so every field is scored once, out of fold. Several ``--cv-run``s (the same recipe with
other ``--seed``s, whose folds differ) score the ensemble: each field by the fold models, one per
run, that held it out, their probabilities averaged over the crops and their consensus on the
whole field (as the app does with several loaded models). With ``--checkpoint`` (single-source
checkpoints only): its grouped validation split, redrawn from its recipe (``val_fraction``,
``seed``; grouped by microscope field). Then for every such field whose smear holds one white cell
of one labelled type (``dataset-master/labels.csv``):

- **crops**: the checkpoint on that cell's Kaggle crops, one majority vote per cell (what
  ``evaluate`` reports as accuracy per group);
- **field**: ``cellhub.fields.analyze_field`` on the whole smear photo (find the white cell, crop it
  as the classifier expects, classify); right when white cells are found and all carry the cell's
  label (a smear labelled with one type can hold two cells of it). Fields where none is found, or
  one of another label, count as wrong and are listed.

- **field as crop**: the whole smear photo given to the crop classifier (``Predictor.predict``, as
  if a user uploaded a field where a crop is expected): right when its one label is the cell's;
  and how many of these photos ``predict``'s check (:func:`cellhub.fields.whole_field_problem`)
  would have refused as whole fields.

Both are reported with Wilson 95% intervals, and the paired crops-vs-field view (cells only one
way gets right; exact McNemar p); the fields are few, so read the intervals.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub.cache import default_cache_dir  # noqa: E402
from cellhub.data import ensure_validation, image_paths, load_cell_dataset  # noqa: E402
from cellhub.data.groups import smear_of_crops  # noqa: E402
from cellhub.evaluation import predict_dataset  # noqa: E402
from cellhub.fields import analyze_field, whole_field_problem, wilson_interval  # noqa: E402
from cellhub.hub import load_pretrained  # noqa: E402
from cellhub.images import InputError, read_image  # noqa: E402
from cellhub.predict import Predictor, consensus  # noqa: E402


def _categories(data: Path) -> dict[str, str]:
    """Smear id -> the labelled white-cell type(s) of ``dataset-master/labels.csv``."""
    category = {}
    with open(data / "dataset-master" / "dataset-master" / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["Image"].strip():
                category[f"BloodImage_{int(row['Image']):05d}"] = row["Category"].strip().lower()
    return category


def _crop_votes(models, ds, smear_dir: Path) -> tuple[dict[str, Counter], dict[str, str]]:
    """The models' label votes (their mean probability per crop) over each smear's crops in ``ds``,
    and the crops' true label."""
    paths = image_paths(ds)
    smear_of = smear_of_crops(paths, smear_dir, default_cache_dir(), False)
    probs = np.mean([predict_dataset(m, ds, progress=False) for m in models], axis=0)
    names = ds.features["label"].names
    votes: dict[str, Counter] = {}
    truth: dict[str, str] = {}
    for path, y, pr in zip(paths, ds["label"], probs):
        s = smear_of.get(path)
        if s:
            votes.setdefault(s, Counter())[names[int(pr.argmax())]] += 1
            truth[s] = names[int(y)]
    return votes, truth


def _compare(models, votes, truth, category, smear_dir: Path) -> dict:
    """Crops (one vote per cell) vs the whole smear photo, on smears of one labelled cell type."""
    predictors = [Predictor(m, name=f"model-{i + 1}") for i, m in enumerate(models)]
    crop_right = field_right = n = only_crop = only_field = as_crop_right = flagged = 0
    misses = []
    for smear in sorted(votes):
        lab = category.get(smear, "")
        if lab != truth[smear] or "," in lab:  # one cell of one labelled type
            continue
        n += 1
        crop_ok = votes[smear].most_common(1)[0][0] == lab
        crop_right += crop_ok
        photo = read_image(smear_dir / f"{smear}.jpg")
        # the whole photo given where a crop is expected: classified as one crop (the cell-centred
        # crop finds its white cell), and whether predict's check would have said "a whole field"
        as_crop_right += consensus([p.predict([photo])[0] for p in predictors]).label == lab
        flagged += whole_field_problem(photo, "blood-cells") is not None
        try:
            res = analyze_field(photo, predictors, "blood-cells", name=smear)
            wbc = [c for c in res.cells if c.kind == "wbc"]
        except InputError as exc:
            wbc, res = [], None
            misses.append((smear, str(exc)))
        field_ok = bool(wbc) and all(c.label == lab for c in wbc)  # one type per labelled smear
        field_right += field_ok
        only_crop += crop_ok and not field_ok
        only_field += field_ok and not crop_ok
        if not field_ok and res is not None:
            misses.append((smear, f"{len(wbc)} white cells found: {[c.label for c in wbc]}, truth {lab}"))
    return {"cells": n, "crops_right": crop_right, "field_right": field_right, "field_as_crop_right": as_crop_right,
            "field_flagged_as_field": flagged,
            "only_crops_right": only_crop, "only_field_right": only_field, "misses": misses}


def _summary(what: str, r: dict) -> dict:
    n = max(r["cells"], 1)
    return {what: r["cells"], "crops_vote_accuracy": r["crops_right"] / n,
            "crops_ci95": wilson_interval(r["crops_right"], r["cells"]),
            "field_accuracy": r["field_right"] / n, "field_ci95": wilson_interval(r["field_right"], r["cells"]),
            "crops_right": r["crops_right"], "field_right": r["field_right"],
            # the paired view (McNemar): cells one way gets right and the other does not
            "only_crops_right": r["only_crops_right"], "only_field_right": r["only_field_right"],
            "mcnemar_p": _mcnemar(r["only_crops_right"], r["only_field_right"]),
            "field_as_crop_accuracy": r["field_as_crop_right"] / n, "field_flagged_as_field": r["field_flagged_as_field"]}


def _mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` vs ``c`` discordant pairs."""
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/smallcnn-blood-cells")
    p.add_argument("--cv-run", action="append", default=None, metavar="DIR",
                   help="a `finetune.py --cv` run folder: score every fold's model on its own held-out fields "
                        "(out-of-fold; every field once) instead of one checkpoint's validation split; "
                        "repeat it for the ensemble of several runs (other seeds)")
    p.add_argument("--data", default="/work/shared/data/blood-cells")
    args = p.parse_args(argv)
    data = Path(args.data)
    smear_dir = data / "dataset-master" / "dataset-master" / "JPEGImages"
    category = _categories(data)
    dsd = load_cell_dataset(data, task="blood-cells", group_by="field", progress=False)
    if args.cv_run:
        return _main_cv([Path(r) for r in args.cv_run], dsd, smear_dir, category)
    model = load_pretrained(args.checkpoint)
    recipe = model.cellhub_config.get("recipe") or {}
    if " + " in str(recipe.get("dataset", "")):
        p.error(f"{args.checkpoint} was trained on several sources; its validation split cannot be redrawn "
                "from the Kaggle crops alone. Use --cv-run with its cross-validation run folder.")
    val = ensure_validation(dsd, val_fraction=recipe.get("val_fraction", 0.2), seed=recipe.get("seed", 0))["validation"]
    votes, truth = _crop_votes([model], val, smear_dir)
    r = _compare([model], votes, truth, category, smear_dir)
    out = {"checkpoint": args.checkpoint, **_summary("validation_cells", r), "misses": r["misses"]}
    print(json.dumps(out, indent=1))
    print(f"field-differential: crops {r['crops_right']}/{r['cells']} cells right, whole fields "
          f"{r['field_right']}/{r['cells']} cmd='python bench/field_differential.py --checkpoint {args.checkpoint}'")
    return 0


def _held_out_by(run: Path) -> dict[str, Path]:
    """Field -> the fold folder of ``run`` that held it out (``holdout.npz``'s groups)."""
    folds = sorted(run.glob("cv/fold-*/holdout.npz"))
    if not folds:
        raise SystemExit(f"{run} holds no finished cross-validation fold (cv/fold-*/holdout.npz).")
    out: dict[str, Path] = {}
    for path in folds:
        with np.load(path, allow_pickle=False) as z:
            out.update({str(g).split("|", 1)[-1]: path.parent for g in z["groups"]})
    return out


def _main_cv(runs: list[Path], dsd, smear_dir: Path, category: dict[str, str]) -> int:
    """Every field scored by the fold models (one per run) that held it out."""
    from datasets import concatenate_datasets

    pool = dsd["train"]
    if "validation" in dsd:
        pool = concatenate_datasets([pool, dsd["validation"].select_columns(pool.column_names)])
    groups = [g.split("|", 1)[-1] for g in pool["group"]]  # multi-source runs prefix the source name
    held = [_held_out_by(run) for run in runs]
    combo_of = [tuple(h.get(g) for h in held) for g in groups]  # which fold of each run held it out
    combos = sorted({c for c in combo_of if None not in c})
    if not combos:
        raise SystemExit(f"no Kaggle field is held out by every one of {', '.join(map(str, runs))}")
    skipped = sum(None in c for c in combo_of)
    keys = ("cells", "crops_right", "field_right", "only_crops_right", "only_field_right", "field_as_crop_right",
            "field_flagged_as_field")
    total = {**dict.fromkeys(keys, 0),
             "misses": []}
    per_fold = []
    for combo in combos:
        rows = [i for i, c in enumerate(combo_of) if c == combo]
        models = [load_pretrained(d) for d in combo]
        votes, truth = _crop_votes(models, pool.select(rows), smear_dir)
        r = _compare(models, votes, truth, category, smear_dir)
        name = " + ".join(f"{d.parent.parent.name}/{d.name}" for d in combo)
        per_fold.append({"fold": name, **_summary("cells", r)})
        for key in keys:
            total[key] += r[key]
        total["misses"] += r["misses"]
        print(f"{name}: crops {r['crops_right']}/{r['cells']}, fields {r['field_right']}/{r['cells']}", flush=True)
    out = {"cv_runs": [str(r) for r in runs], "folds": per_fold, **_summary("cells", total),
           "crops_not_held_out_by_every_run": skipped, "misses": total["misses"]}
    print(json.dumps(out, indent=1))
    cmd = " ".join(f"--cv-run {r}" for r in runs)
    print(f"field-differential (out-of-fold): crops {total['crops_right']}/{total['cells']} cells right, whole "
          f"fields {total['field_right']}/{total['cells']} cmd='python bench/field_differential.py {cmd}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
