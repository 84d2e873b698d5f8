"""``python -m cellhub audit|evaluate|predict ...``: the command line, over the library's functions.

Each subcommand is a thin layer: parse, call one library function, print, exit 0 (done), 2 (bad
input, with a message that says what to do). Library modules register nothing here.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

logger = logging.getLogger("cellhub")


def _write_json(path: str | Path, data: Any) -> Path:
    """``--json OUT``: the result as indented JSON (the folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


# Each handler imports what it runs, so `python -m cellhub --help` and every command start without
# loading the libraries of the others (torch, timm, datasets are seconds to import).

# ---------------------------------------------------------------------------------- audit

def _audit(args: argparse.Namespace) -> int:
    from .audit import audit_dataset, format_report
    from .data import DatasetLayoutError

    try:
        result = audit_dataset(args.path, args.task, cache_dir=args.cache_dir, smear_dir=args.smear_dir,
                               near_threshold=args.threshold, group_by=args.group_by,
                               progress=not args.no_progress)
    except (DatasetLayoutError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        print(f"JSON report written to {_write_json(args.json, result)}")
    return 0


def _add_audit(subparsers: Any) -> None:
    from . import audit  # light (numpy, PIL): its docstring is the command's description

    p = subparsers.add_parser(
        "audit", help="count images and groups per split, find leaks and duplicates",
        description=audit.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="dataset folder (e.g. the unzipped Kaggle download) or Hub dataset id")
    p.add_argument("--task", choices=["blood-cells", "malaria"], default=None,
                   help="task (default: inferred from the class folders)")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    p.add_argument("--smear-dir", default=None, help="folder of full smears (default: found next to the crops)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $CELLHUB_CACHE or ~/.cache/cellhub)")
    p.add_argument("--threshold", type=int, default=20,
                   help="largest Hamming distance between 256-bit perceptual hashes counted as a "
                        "near-duplicate (default 20)")
    p.add_argument("--group-by", choices=["smear", "field"], default="smear",
                   help="blood cells: group crops by source smear, or by microscope field (smears showing "
                        "overlapping areas share a group; stricter)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_audit)


# ------------------------------------------------------------------------------- evaluate
def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import run_evaluate
    from .metrics import format_metrics_table

    try:
        m = run_evaluate(args.checkpoint, args.data, args.split, batch_size=args.batch_size, n_boot=args.n_boot,
                         seed=args.seed, cache_dir=args.cache_dir, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_metrics_table(m, title=f"{m['model'] or 'model'} ({args.checkpoint}) on {args.data} [{m['split']}]"))
    if m["skipped_files"]:
        print(f"\nnote: {m['skipped_files']} unreadable file(s) were skipped (see the log).")
    if args.json:
        print(f"\nwrote {_write_json(args.json, m)}")
    return 0


def _add_evaluate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a dataset (grouped bootstrap CI)",
        description="Evaluate CHECKPOINT (local folder or Hub id) on DATA (Kaggle folder, image folder, "
                    "saved dataset or Hub id): accuracy with a 95% CI from a bootstrap over groups "
                    "(cells / patients), macro-F1, per-class precision/recall/F1, confusion matrix, "
                    "ROC AUC (two classes) and expected calibration error.",
    )
    p.add_argument("checkpoint", help="checkpoint folder or Hugging Face Hub model id")
    p.add_argument("data", help="dataset: local folder, Hub dataset id or task name")
    p.add_argument("--split", default=None, help="split to evaluate (required when DATA has several)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the metrics as JSON to OUT")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the CI (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--cache-dir", default=None, help="cache for dataset validation / smear matching")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_evaluate)


# -------------------------------------------------------------------------------- predict
def _add_predict(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify images, folders or .zip archives with a checkpoint",
        description="Classify cell images with one checkpoint (Hub id or folder), batched, with "
        "optional Grad-CAM overlays and a CSV of the results.",
    )
    p.add_argument("checkpoint", help="Hub model id or local checkpoint folder")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or .zip archives")
    p.add_argument("--cam-dir", type=Path, default=None, help="write a Grad-CAM overlay PNG per image here")
    p.add_argument("--csv", type=Path, default=None, help="write the results table to this CSV file")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images decoded at once (default 32); each forward pass takes 8 of them on the CPU, 32 on a GPU")
    p.add_argument("--workers", type=int, default=None, help="image-decoding threads (default: CPUs + 1, max 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm.auto import tqdm

    from .batch import predict_files
    from .images import ImageRef, InputError, collect_images
    from .predict import Prediction, Predictor

    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        predictor = Predictor.from_pretrained(args.checkpoint, device=args.device)
    except Exception as exc:
        raise SystemExit(f"could not load checkpoint {args.checkpoint!r}: {exc}") from exc
    try:
        refs, skipped = collect_images(args.inputs)
    except InputError as exc:
        raise SystemExit(str(exc)) from exc
    if args.cam_dir is not None:
        args.cam_dir.mkdir(parents=True, exist_ok=True)

    used: set[str] = set()

    def save_cams(chunk_refs: list[ImageRef], images: list[Image.Image], preds: list[dict[str, Prediction]]) -> None:
        for ref, img, pred in zip(chunk_refs, images, preds):
            stem = ref.name.replace("/", "__").replace("\\", "__")
            stem = Path(stem).stem or "image"
            out, n = f"{stem}.cam.png", 2
            while out in used:
                out, n = f"{stem}-{n}.cam.png", n + 1
            used.add(out)
            predictor.overlay(img, pred[predictor.name]).save(args.cam_dir / out)

    bar = tqdm(total=len(refs), unit="img", desc="predict")

    def progress(done: int, total: int, _msg: str) -> None:
        bar.update(done - bar.n)

    result = predict_files(
        [predictor],
        refs,
        batch_size=args.batch_size,
        workers=args.workers,
        with_cam=args.cam_dir is not None,
        progress=progress,
        on_chunk=save_cams if args.cam_dir is not None else None,
    )
    bar.close()
    result.skipped = skipped + result.skipped
    for name, preds in zip(result.files, result.predictions):
        pred = preds[predictor.name]
        flag = "  UNCERTAIN (under threshold)" if pred.abstain else ""
        print(f"{name}\t{pred.label}\t{pred.confidence:.3f}{flag}")
    n = len(result.files)
    print(f"\n{n} images in {result.seconds:.2f} s with {predictor.name} ({predictor.task}):")
    for label, count, pct in result.counts():
        print(f"  {label:<14} {count:>6}  {pct:5.1f}%")
    if predictor.threshold is None:
        print("  (this checkpoint has no abstention threshold: low-confidence predictions are not flagged)")
    else:
        flagged = sum(p[predictor.name].abstain for p in result.predictions)
        print(f"  {flagged} under the abstention threshold {predictor.threshold:.3f} (refer for manual review)")
    for name, reason in result.skipped:
        logger.warning("skipped %s: %s", name, reason)
    if args.csv is not None:
        result.write_csv(args.csv)
        print(f"results written to {args.csv}")
    if args.cam_dir is not None:
        print(f"Grad-CAM overlays written to {args.cam_dir}")
    return 0 if n else 2


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cellhub`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m cellhub",
        description="Classify (predict), score (evaluate) and check for leaks (audit) blood-smear cell images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_audit, _add_evaluate, _add_predict):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)
