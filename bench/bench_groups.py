"""Benchmark `groups`: grouping copies of one cell in a folder without smears, near-duplicates vs crop matching.

Two ways to give every crop a group when a folder has no smears, no patient ids, no group column:

* ``near``     -- :func:`cellhub.data.neardup.near_duplicate_groups` (ring signatures, nearest-neighbour
                  candidates, Fourier-domain verification; what ``load_cell_dataset`` now uses)
* ``matching`` -- :func:`cellhub.smears.fallback_groups` (SIFT + RANSAC of every crop against the
                  exemplars found so far, per class folder; what it used before) -- the baseline

Both run on the same ``--baseline-n`` images, interleaved; ratio = images/s near / images/s matching.
Then ``near`` alone runs on every image of ``--data`` (wall time, images/s, peak RSS of this process).
With ``--smears DIR`` (the Kaggle ``dataset-master/dataset-master/JPEGImages``), both groupings are
scored against the crops' source smears (:func:`cellhub.smears.match_crops_to_smears`, cached):
``leak`` = images outside their cell's largest group (a grouped split could leak them), ``merged`` =
images in a group whose majority is another cell.

    python bench/bench_groups.py [--quick] [--data DIR] [--smears DIR] [--baseline-n 300]

Without ``--data`` the images are synthetic Kaggle-like crops (``cellhub.synthetic``, copies of a
few cells) and scored against the cell each copy was cut from.
"""
from __future__ import annotations

import resource
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def _score(groups: list[str], truth: list[str]) -> dict[str, int]:
    """leak: images outside their true group's largest predicted group; merged: images in a group led by another."""
    by_truth: dict[str, Counter] = {}
    by_group: dict[str, Counter] = {}
    for g, t in zip(groups, truth):
        by_truth.setdefault(t, Counter())[g] += 1
        by_group.setdefault(g, Counter())[t] += 1
    leak = sum(sum(c.values()) - max(c.values()) for c in by_truth.values())
    merged = sum(sum(c.values()) - max(c.values()) for c in by_group.values())
    return {"groups": len(by_group), "true_groups": len(by_truth), "leak": leak, "merged": merged}


def _images(args, tmp: Path) -> tuple[list[str], list[str] | None, str]:
    """(paths, truth or None, description)."""
    if args.data:
        exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
        paths = sorted(str(p) for p in Path(args.data).rglob("*") if p.suffix.lower() in exts and p.is_file())
        if not paths:
            raise SystemExit(f"--data {args.data}: no image files found there")
        truth = None
        if args.smears:
            from cellhub import smears

            found = smears.match_crops_to_smears(paths, args.smears, progress=False)
            truth = [found.get(p) or f"unmatched:{p}" for p in paths]
        return paths, truth, f"real images from {args.data}"
    import json

    from cellhub import synthetic

    cells = 4 if args.quick else 12
    root = synthetic.write_kaggle_blood_cells(tmp / "b", n_cells_per_class=cells // 4 or 1, copies=8,
                                              splits=("TRAIN",), with_smears=False)
    truth_map = json.loads((root / "_truth.json").read_text())
    paths = [str(root / k) for k in truth_map]
    return paths, list(truth_map.values()), "synthetic 320x240 Kaggle-like copies"


def run(args) -> list[C.Result]:
    import numpy as np

    from cellhub import smears
    from cellhub.data.neardup import near_duplicate_groups

    with C.tempdir(args.tmp, "cellhub-bench-groups-") as tmp:
        paths, truth, source = _images(args, Path(tmp))
        n_base = min(len(paths), args.baseline_n or (60 if args.quick else 300))
        idx = np.linspace(0, len(paths) - 1, n_base).round().astype(int) if n_base < len(paths) else np.arange(n_base)
        sub = [paths[i] for i in idx]
        out: dict[str, list[str]] = {}

        def near() -> None:
            out["near"] = near_duplicate_groups(sub, progress=False)

        def matching() -> None:
            found = smears.fallback_groups(sub, progress=False)
            out["matching"] = [found[p] for p in sub]

        times = C.interleaved({"near": near, "matching": matching}, rounds=args.repeats or 1, warmup=0)
        ips = {k: n_base / C.median(v) for k, v in times.items()}
        ratio = ips["near"] / ips["matching"]
        fields: dict = {"near_img_s": round(ips["near"], 1), "matching_img_s": round(ips["matching"], 2),
                        "baseline_n": n_base}
        if truth is not None:
            sub_truth = [truth[i] for i in idx]
            for k in ("near", "matching"):
                s = _score(out[k], sub_truth)
                C.detail(f"{k} on {n_base} images: {s}")
                fields[f"{k}_leak"] = f"{s['leak']}/{n_base}"
        t0 = time.perf_counter()
        groups = near_duplicate_groups(paths, progress=not args.quick)
        wall = time.perf_counter() - t0
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fields.update(n=len(paths), near_all_s=round(wall, 2), near_all_img_s=round(len(paths) / wall, 1),
                      peak_rss_mb=round(rss_mb))
        if truth is not None:
            s = _score(groups, truth)
            C.detail(f"near on all {len(paths)} images: {s}")
            fields.update(groups=s["groups"], true_groups=s["true_groups"], leak=s["leak"], merged=s["merged"])
        fields["images"] = source
        fields.update(C.env_fields())
    return [C.Result("groups", ratio, "img/s near-duplicate grouping / img/s crop-to-crop matching (before);",
                     fields, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--data", default=None, help="real images (any folder tree) instead of synthetic ones")
    p.add_argument("--smears", default=None, help="full smears of --data, to score the groupings against")
    p.add_argument("--baseline-n", type=int, default=None, help="images both arms group (default 300; --quick 60)")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
