"""Benchmark: attribute the Kaggle blood-cell TRAIN crops to their source smears.

Prints the share of crops attributed, distinct smears per class, how often a crop's class folder
agrees with the smear's label in labels.csv, and the wall time, with the command that made them.

    python bench/smear_matching.py --root ../shared/data/blood-cells [--limit 300] [--workers 1]

``--limit N`` matches a random subsample (seeded) for quick development runs. A fresh temporary cache
is used unless ``--cache-dir`` is given, so the time is the real matching time.
"""
from __future__ import annotations

import argparse
import csv
import logging
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cellhub.smears import fallback_groups, match_crops_to_smears, smear_fields  # noqa: E402


def read_smear_labels(path: Path) -> dict[str, str]:
    labels = {}
    if not path.is_file():
        return labels
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("Image", "").strip().isdigit() and row.get("Category"):
                labels[f"BloodImage_{int(row['Image']):05d}"] = row["Category"].strip().upper()
    return labels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="../shared/data/blood-cells", help="Kaggle blood-cells download root")
    ap.add_argument("--split", default="TRAIN")
    ap.add_argument("--limit", type=int, default=None, help="random subsample of crops (dev runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--cache-dir", default=None, help="reuse a cache (default: fresh temporary one)")
    ap.add_argument("--fields", action="store_true", help="also count distinct fields (smear_fields)")
    ap.add_argument("--fallback", action="store_true",
                    help="also run fallback_groups (no smears) and score it against the smear attribution")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    root = Path(args.root)
    crops_dir = root / "dataset2-master" / "dataset2-master" / "images" / args.split
    smear_dir = root / "dataset-master" / "dataset-master" / "JPEGImages"
    crops = sorted(str(p) for p in crops_dir.glob("*/*.jpeg"))
    if args.limit:
        crops = sorted(random.Random(args.seed).sample(crops, min(args.limit, len(crops))))
    smear_labels = read_smear_labels(root / "dataset-master" / "dataset-master" / "labels.csv")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = match_crops_to_smears(crops, smear_dir, cache_dir=args.cache_dir or tmp, workers=args.workers)
        wall = time.perf_counter() - t0

    attributed = {c: s for c, s in result.items() if s is not None}
    per_class: dict[str, set[str]] = defaultdict(set)
    agree = Counter()
    for crop, smear in attributed.items():
        cls = Path(crop).parent.name
        per_class[cls].add(smear)
        lab = smear_labels.get(smear)
        agree["labelled" if lab else "unlabelled"] += 1
        if lab and cls in lab:
            agree["agree"] += 1
    classes = sorted({Path(c).parent.name for c in crops})
    n_all = len(set(attributed.values()))
    print(f"command: python bench/smear_matching.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"crops: {len(crops)}  attributed: {len(attributed)} ({100 * len(attributed) / max(len(crops), 1):.2f}%)")
    print(f"distinct smears: {n_all}  (sum over classes: {sum(len(v) for v in per_class.values())})")
    for cls in classes:
        n_cls = sum(Path(c).parent.name == cls for c in crops)
        n_att = sum(Path(c).parent.name == cls for c in attributed)
        print(f"  {cls:<11} crops {n_cls:5d}  attributed {n_att:5d}  distinct smears {len(per_class[cls]):4d}")
    if agree["labelled"]:
        print(f"class folder agrees with labels.csv for {agree['agree']}/{agree['labelled']} attributed crops "
              f"({agree['unlabelled']} on smears without a label)")
    print(f"wall time: {wall:.1f}s ({1000 * wall / max(len(crops), 1):.1f} ms/crop)")
    if args.fields:
        fields = smear_fields(smear_dir, cache_dir=args.cache_dir or None)
        n_fields = len({fields.get(s, s) for s in attributed.values()})
        print(f"distinct fields (overlapping smears merged): {n_fields}")
    if args.fallback:
        t0 = time.perf_counter()
        groups = fallback_groups(list(attributed), progress=True)
        wall = time.perf_counter() - t0
        score_fallback(groups, attributed)
        print(f"fallback wall time: {wall:.1f}s ({1000 * wall / max(len(attributed), 1):.1f} ms/crop)")
    return 0


def score_fallback(groups: dict[str, str], smear_of: dict[str, str]) -> None:
    """How well crop-only groups recover the smear attribution (taken as the truth here)."""
    by_group: dict[str, Counter] = defaultdict(Counter)
    by_smear: dict[str, Counter] = defaultdict(Counter)
    for crop, group in groups.items():
        by_group[group][smear_of[crop]] += 1
        by_smear[smear_of[crop]][group] += 1
    n = len(groups)
    pure = sum(c.most_common(1)[0][1] for c in by_group.values())
    main = sum(c.most_common(1)[0][1] for c in by_smear.values())
    print(f"fallback groups: {len(by_group)} for {len(by_smear)} smears")
    print(f"  purity (crops whose group's majority smear is theirs): {100 * pure / n:.2f}%")
    print(f"  crops outside their smear's largest group (could leak across a split): {100 * (n - main) / n:.2f}%")
    print(f"  smears split over >1 group: {sum(len(c) > 1 for c in by_smear.values())}")


if __name__ == "__main__":
    raise SystemExit(main())
