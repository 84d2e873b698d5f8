"""Accuracy of the field detector (``cellhub.detect``) and of whole-field analysis on real fields.

    python bench/field_accuracy.py --part tune                 # what the defaults were tuned on
    python bench/field_accuracy.py --part heldout --pbc 300 --malaria checkpoints/smallcnn-malaria [MORE ...]

Data (see /work/shared/data/README.md): the 304 BCCD fields that have full VOC boxes
(``bccd-boxes/Annotations``; the images are ``blood-cells/.../JPEGImages``). Fields without an
annotation file are never read. Split, fixed before any tuning: the annotated ids sorted, every
third one (index % 3 == 2) held out, the other two thirds for tuning (203 tune / 101 held out).

Figures:
- WBC recall / precision: a found white cell matches an annotated one at IoU >= 0.5 (greedy, best
  IoU first, one-to-one).
- RBC count: median over fields of |found - annotated| / annotated. The annotators skip most red
  cells cut by the border and some in clumps; the red-cell network (``cellhub.fieldnet``) learned
  their habit from the boxes of the tuning fields (the Hough finder, ``--set red_cells=hough``,
  counts a border-cut cell only when its visible area is large: ``DetectParams.rbc_border_min_area``).
  The error is also given for fields numbered below 170 and from 170 on (``_ids_lt170`` /
  ``_ids_ge170``): on the tuning fields the detector undercounts the crowded early fields (clumps of
  overlapping cells) and overcounts later ones, where annotators boxed fewer of the visible cells
  (both ranges have a median of 11-12 boxes per field).
- parasitemia: the malaria model run on the red cells of these (malaria-free) fields: every
  "parasitized" call is a false positive.
- PBC (another lab, one centred white cell per 128x128 image): the fraction of a seeded sample of
  images where exactly one white cell is found (the platelet class is left out: it has no white cell).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub.detect import DEFAULT_PARAMS, box_iou, detect_cells, with_params  # noqa: E402
from cellhub.images import read_image  # noqa: E402

DATA = Path("/work/shared/data")
ANN = DATA / "bccd-boxes" / "Annotations"
JPEG = DATA / "blood-cells" / "dataset-master" / "dataset-master" / "JPEGImages"
KINDS = {"WBC": "wbc", "RBC": "rbc", "Platelets": "platelet"}


def split_ids(ann_dir: Path = ANN) -> dict[str, list[str]]:
    """The fixed tune / held-out split of the annotated field ids."""
    ids = sorted(p.stem for p in ann_dir.glob("BloodImage_*.xml"))
    return {"tune": [i for k, i in enumerate(ids) if k % 3 != 2], "heldout": [i for k, i in enumerate(ids) if k % 3 == 2]}


def read_boxes(path: Path) -> dict[str, list[tuple[int, int, int, int]]]:
    out: dict[str, list[tuple[int, int, int, int]]] = {"wbc": [], "rbc": [], "platelet": []}
    for obj in ET.parse(path).findall("object"):
        kind = KINDS.get(obj.findtext("name", "").strip())
        bb = obj.find("bndbox")
        if kind is None or bb is None:
            continue
        out[kind].append(tuple(int(float(bb.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")))  # type: ignore[misc]
    return out


def match(found: list, truth: list, thr: float = 0.5) -> int:
    """One-to-one matches at IoU >= thr (greedy, best first)."""
    pairs = sorted(((box_iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True)
    used_f, used_t, n = set(), set(), 0
    for iou, i, j in pairs:
        if iou < thr:
            break
        if i not in used_f and j not in used_t:
            used_f.add(i), used_t.add(j)
            n += 1
    return n


def bccd(ids: list[str], params, predictors=None, verbose: bool = False) -> dict:
    tp = n_found = n_true = 0
    rbc_m = rbc_t = rbc_f = infected_sure = rbcs_sure = 0
    rel, ratio, secs, infected, rbcs, misses, early, late = [], [], [], 0, 0, [], [], []
    for fid in ids:
        image = read_image(JPEG / f"{fid}.jpg")
        truth = read_boxes(ANN / f"{fid}.xml")
        t0 = time.perf_counter()
        det = detect_cells(image, params)
        secs.append(time.perf_counter() - t0)
        wbc = [c.box for c in det.of_kind("wbc")]
        m = match(wbc, truth["wbc"])
        tp, n_found, n_true = tp + m, n_found + len(wbc), n_true + len(truth["wbc"])
        if m < len(wbc) or m < len(truth["wbc"]):
            misses.append(f"{fid}: found {len(wbc)} matched {m} of {len(truth['wbc'])}")
        n_rbc = len(det.of_kind("rbc"))
        rbc_m += match([c.box for c in det.of_kind("rbc")], truth["rbc"])
        rbc_t += len(truth["rbc"])
        rbc_f += n_rbc
        if truth["rbc"]:
            rel.append(abs(n_rbc - len(truth["rbc"])) / len(truth["rbc"]))
            ratio.append(n_rbc / len(truth["rbc"]))
            (early if int(fid.split("_")[1]) < 170 else late).append(rel[-1])
        if predictors:
            from cellhub.fields import analyze_field

            res = analyze_field(image, predictors, task="malaria", detection=det)
            infected += res.counts["by_label"].get("parasitized", 0)
            sure = [c for c in res.cells if c.kind == "rbc" and c.label and not c.uncertain]
            infected_sure += sum(c.label == "parasitized" for c in sure)
            rbcs_sure += len(sure)
            rbcs += res.counts["rbc"]
    if verbose:
        print("\n".join("    " + m for m in misses))
    out = {
        "fields": len(ids), "wbc_recall": tp / max(n_true, 1), "wbc_precision": tp / max(n_found, 1),
        "wbc_true": n_true, "wbc_found": n_found, "rbc_median_rel_err": statistics.median(rel),
        "rbc_mean_rel_err": statistics.fmean(rel), "rbc_median_ratio": statistics.median(ratio),
        "rbc_median_rel_err_ids_lt170": statistics.median(early) if early else None,
        "rbc_median_rel_err_ids_ge170": statistics.median(late) if late else None,
        "rbc_box_recall": rbc_m / max(rbc_t, 1), "rbc_box_precision": rbc_m / max(rbc_f, 1), "detect_s_median": statistics.median(secs),
    }
    if predictors:
        out.update(parasitemia=infected / max(rbcs, 1), rbc_classified=rbcs, parasitized=infected,
                   parasitemia_confident=infected_sure / max(rbcs_sure, 1), rbc_confident=rbcs_sure)
    return out


def pbc(n: int, params, seed: int = 0) -> dict:
    files = sorted(p for p in (DATA / "pbc").glob("*/*.jpg") if p.parent.name != "platelet" and not p.name.startswith(".DS"))
    sample = random.Random(seed).sample(files, min(n, len(files)))
    hist: dict[int, int] = {}
    wrong: dict[str, int] = {}
    for f in sample:
        k = len(detect_cells(read_image(f), params).of_kind("wbc"))
        hist[k] = hist.get(k, 0) + 1
        if k != 1:
            wrong[f.parent.name] = wrong.get(f.parent.name, 0) + 1
    return {"pbc_images": len(sample), "pbc_exactly_one": hist.get(1, 0) / len(sample), "pbc_hist": hist, "pbc_wrong_by_class": wrong}


def _value(text: str) -> float | str | None:
    if text.lower() == "none":
        return None  # wbc_net_add=none: the finder's white cells only
    try:
        return float(text)
    except ValueError:
        return text  # red_cells=hough, fieldnet=PATH


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["tune", "heldout"], default="tune")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="DetectParams overrides (tuning)")
    ap.add_argument("--pbc", type=int, default=0, help="also run on this many PBC images (seeded sample)")
    ap.add_argument("--malaria", nargs="+", default=None, metavar="CHECKPOINT",
                    help="malaria checkpoint(s): parasitemia on the fields (several: their consensus, as the app)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N fields of the part")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    params = with_params(**{k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}) if args.set else DEFAULT_PARAMS
    ids = split_ids()[args.part][: args.limit]
    predictors = None
    if args.malaria:
        from cellhub.predict import Predictor

        predictors = [Predictor.from_pretrained(c) for c in args.malaria]
    res = bccd(ids, params, predictors, args.verbose)
    if args.pbc:
        res.update(pbc(args.pbc, params))
    cmd = " ".join(["python", "bench/field_accuracy.py", *sys.argv[1:]])
    print(f"field-accuracy[{args.part}]: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    print(f"cmd='{cmd}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
