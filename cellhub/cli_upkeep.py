"""``python -m cellhub adapt|cache``: the commands that change what you have on disk.

``adapt`` writes a checkpoint fitted to your lab's images; ``cache`` lists and frees cellhub's disk
cache. Registered by :func:`cellhub.cli.build_parser`; same conventions (exit 0 done, 2 bad input).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["add_adapt", "add_cache"]


# ---------------------------------------------------------------------------------- adapt
def _adapt(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .adapt import describe, run_adapt

    with tqdm(unit="img", desc="re-estimating BatchNorm", disable=args.no_progress) as bar:
        try:
            out, report = run_adapt(args.checkpoint, args.inputs, args.out, min_images=args.min_images,
                                    check_cells=args.cell_check, overwrite=args.overwrite, seed=args.seed,
                                    progress=bar.update)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(describe(report, out, args.checkpoint))
    return 0


def add_adapt(subparsers: Any) -> None:
    from .adapt import MIN_IMAGES

    p = subparsers.add_parser(
        "adapt", help="fit a checkpoint to your lab's images without labels (re-estimate its BatchNorm statistics)",
        description="Re-estimate CHECKPOINT's BatchNorm statistics on your lab's own single-cell crops (AdaBN: no "
                    "labels, the weights are unchanged) and write the adapted checkpoint to --out. Give crops of the "
                    "kind you will classify, as they come (not one class only); images that are not blood-cell "
                    "crops are skipped. See README, 'Adapt a model to your lab's images'.")
    p.add_argument("checkpoint", help="checkpoint folder or Hugging Face Hub model id (a BatchNorm model)")
    p.add_argument("inputs", nargs="+", help="your lab's cell images: files, folders (searched recursively) or .zip")
    p.add_argument("--out", type=Path, required=True, help="folder to write the adapted checkpoint to")
    p.add_argument("--min-images", type=int, default=MIN_IMAGES,
                   help=f"refuse with fewer usable images than this (default {MIN_IMAGES})")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty")
    p.add_argument("--no-cell-check", dest="cell_check", action="store_false",
                   help="use every image, also those that do not look like a stained blood-cell crop")
    p.add_argument("--seed", type=int, default=0, help="seed of the order the images are read in")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_adapt)


# ---------------------------------------------------------------------------------- cache
def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _age(t: float, now: float) -> str:
    days = (now - t) / 86400
    return f"{days:.0f} days ago" if days >= 1 else "today"


def _cache(args: argparse.Namespace) -> int:
    from .cache import CACHE_KINDS, cache_entries, default_cache_dir, prune_cache

    root = args.cache_dir or default_cache_dir()
    now = time.time()
    removing = args.clear or args.older_than is not None or args.max_size is not None
    if removing:
        try:
            removed, failed = prune_cache(root, kinds=args.kind or None, older_than_days=args.older_than,
                                          max_bytes=None if args.max_size is None else int(args.max_size * 1024 ** 3),
                                          clear=args.clear, dry_run=args.dry_run)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {len(removed)} item(s), {_size(sum(e.size for e in removed))}, from {root}")
        for e, why in failed:
            print(f"  kept {e.path}: {why}", file=sys.stderr)
    entries = cache_entries(root)
    print(f"cellhub cache: {root}  ({_size(sum(e.size for e in entries))} in {len(entries)} item(s))")
    for kind, what in CACHE_KINDS.items():
        mine = [e for e in entries if e.kind == kind]
        if mine:
            print(f"  {kind:12s} {len(mine):5d} item(s) {_size(sum(e.size for e in mine)):>9s}  last used "
                  f"{_age(max(e.last_used for e in mine), now):>13s}  {what}")
    if entries and not removing:
        print("Free space with --older-than DAYS, --max-size GB or --clear (add --kind K to limit it); every item "
              "is rebuilt by the next run that needs it.")
    return 0


def add_cache(subparsers: Any) -> None:
    from .cache import CACHE_KINDS

    p = subparsers.add_parser(
        "cache", help="list or free cellhub's disk cache (decoded images, data set checks, ...)",
        description="Without options: what cellhub's cache ($CELLHUB_CACHE or ~/.cache/cellhub) holds, by kind. With "
                    "--older-than / --max-size / --clear: remove items, least recently used first. Only cellhub's "
                    "own folders are touched; a removed item is rebuilt by the next run that needs it.")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="remove items no run has used for DAYS days")
    p.add_argument("--max-size", type=float, metavar="GB", help="remove the oldest items until the rest fits in GB")
    p.add_argument("--clear", action="store_true", help="remove every item (of --kind, if given)")
    p.add_argument("--kind", action="append", choices=sorted(CACHE_KINDS), help="only this kind (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $CELLHUB_CACHE or ~/.cache/cellhub)")
    p.set_defaults(func=_cache)
