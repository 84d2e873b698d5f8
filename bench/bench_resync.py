"""Benchmark `resync`: a training's data preparation after the data set was re-synced or copied.

A data folder restored from a backup, re-synced, copied back or checked out again keeps its bytes and
gets new modification times. Since 2026-12-08 cellhub keys its caches (image checks, groups, the
Kaggle crops' smear matching, decoded images) by path, size and a digest of the bytes, remembered
per file stamp (``cellhub.cache.content_digest``), instead of path, size and mtime. In one process,
with a fresh cache, on a temporary copy of the data:

- baseline: load it as training does (``load_cell_dataset``: image checks, groups, smear matching)
  and decode it once (``cache_resized`` at ``--size`` px) — the first run, nothing cached;
- measured: a new mtime on every file of the copy, then the same again.

ratio = measured / baseline (before the change a re-synced folder missed every cache: ratio ~1);
target <= 0.2. The groups of both passes must be equal.

    python bench/bench_resync.py [--quick] [--data ../shared/data/blood-cells] [--size 80]

Without ``--data`` a drawn Kaggle-style blood-cell download (crops and their smears) is used.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.2


def _prepare(root: Path, size: int, cache: Path) -> tuple[float, list]:
    from cellhub.data import cache_resized, load_cell_dataset

    t0 = time.perf_counter()
    ds = load_cell_dataset(root, cache_dir=cache, progress=False)["train"]
    cache_resized(ds, size, cache_dir=cache, progress=False)
    return time.perf_counter() - t0, list(ds["group"])


def run(args) -> list[C.Result]:
    from cellhub import synthetic

    with C.tempdir(args.tmp, "cellhub-resync-") as tmp:
        root = Path(tmp) / "data"
        if args.data:
            shutil.copytree(args.data, root)
            what = args.data
        else:
            n = 2 if args.quick else 6
            synthetic.write_kaggle_blood_cells(root, n_cells_per_class=n, copies=4)
            what = f"drawn Kaggle-style download, {n} cells per class"
        cache = Path(tmp) / "cache"
        os.environ["CELLHUB_CACHE"] = str(cache)  # the digest memo too: nothing known before the first pass
        cold, groups = _prepare(root, args.size, cache)
        stamp, n_files = time.time() + 3600, 0
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                os.utime(os.path.join(dirpath, f), (stamp, stamp))
                n_files += 1
        warm, groups2 = _prepare(root, args.size, cache)
    ratio = warm / cold
    C.detail(f"{what}: {n_files} files; first run {cold:.1f} s, after a new mtime on every file {warm:.1f} s")
    return [C.Result("resync", ratio, "resynced/first-run", {
        "first_run_s": cold, "resynced_s": warm, "files": n_files, "same_groups": groups == groups2,
        "status": "PASS" if ratio <= TARGET and groups == groups2 else "FAIL", **C.env_fields()}, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--data", default=None, help="a data folder cellhub loads (copied; the original is not touched)")
    p.add_argument("--size", type=int, default=80, help="decoded size in px (default 80)")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
