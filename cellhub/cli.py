"""``python -m cellhub audit|evaluate|predict|analyze|adapt|cache ...``: the command line, over the library's functions.

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

from .tasks import TASK_NAMES

__all__ = ["build_parser", "main", "add_group_by_argument"]

logger = logging.getLogger("cellhub")


def _write_json(path: str | Path, data: Any) -> Path:
    """``--json OUT``: the result as indented JSON (the folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def add_group_by_argument(parser: argparse.ArgumentParser) -> None:
    """``--group-by`` as every command (and the train/ scripts) offers it."""
    from .tasks import GROUP_BY, GROUP_BY_HELP

    parser.add_argument("--group-by", choices=GROUP_BY, default="auto", help=GROUP_BY_HELP)


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
    from .tasks import TASK_NAMES

    p = subparsers.add_parser(
        "audit", help="count images and groups per split, find leaks and duplicates",
        description=audit.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="dataset folder (e.g. the unzipped Kaggle download) or Hub dataset id")
    p.add_argument("--task", choices=list(TASK_NAMES), default=None,
                   help="task (default: inferred from the class folders)")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    p.add_argument("--smear-dir", default=None, help="folder of full smears (default: found next to the crops)")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $CELLHUB_CACHE or ~/.cache/cellhub)")
    p.add_argument("--threshold", type=int, default=20,
                   help="largest Hamming distance between 256-bit perceptual hashes counted as a "
                        "near-duplicate (default 20)")
    add_group_by_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_audit)


# ------------------------------------------------------------------------------- evaluate
def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import compare_models, run_evaluate
    from .metrics import format_comparison, format_metrics_table

    kw = dict(batch_size=args.batch_size, n_boot=args.n_boot, seed=args.seed, cache_dir=args.cache_dir,
              progress=not args.no_progress, group_by=args.group_by, smear_dir=args.smear_dir)
    try:
        if len(args.checkpoint) > 1:
            out = compare_models(args.checkpoint, args.data, args.split, **kw)
        else:
            out = m = run_evaluate(args.checkpoint[0], args.data, args.split, **kw)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if out is None:  # another process of an `accelerate launch` run: the main one reports
        return 0
    for m in out.get("models", [out]):
        if m.get("processes", 1) > 1:
            print(f"(predicted by {m['processes']} processes, one shard each)")
        print(format_metrics_table(m, title=f"{m['model'] or 'model'} ({m['checkpoint']}) on {args.data} [{m['split']}]"))
        print()
    g = m["grouping"]
    how = "the default for this data; change with --group-by" if g["requested"] == "auto" else "--group-by"
    print(f"groups: {g['method']} ({how}): {m['n_groups']} groups of {m['n_images']} images")
    for c in out.get("comparisons", []):
        print(format_comparison(c))
    if m["skipped_files"]:
        print(f"\nnote: {m['skipped_files']} unreadable file(s) were skipped (see the log).")
    if args.json:
        print(f"\nwrote {_write_json(args.json, out)}")
    return 0


def _add_evaluate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="metrics of a checkpoint on a dataset (grouped bootstrap CI); several: compared",
        description="Evaluate CHECKPOINT (local folder or Hub id) on DATA (Kaggle folder, image folder, "
                    "saved dataset or Hub id): accuracy with a 95% CI from a bootstrap over groups "
                    "(cells / patients), macro-F1, per-class precision/recall/F1, confusion matrix, "
                    "ROC AUC (two classes) and expected calibration error. With several checkpoints of "
                    "one task (e.g. a model and its `cellhub adapt` copy), each is also compared with the "
                    "first on the same images: accuracy difference with a 95% paired group-bootstrap "
                    "interval.",
    )
    p.add_argument("checkpoint", nargs="+", metavar="CHECKPOINT",
                   help="checkpoint folder or Hugging Face Hub model id; several to compare them with the first")
    p.add_argument("data", help="dataset: local folder, Hub dataset id or task name")
    p.add_argument("--split", default=None, help="split to evaluate (required when DATA has several)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the metrics as JSON to OUT")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the CI (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--cache-dir", default=None, help="cache for dataset validation / smear matching")
    add_group_by_argument(p)
    p.add_argument("--smear-dir", default=None, help="blood cells: folder of full smears (default: found next to "
                                                      "the crops)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_evaluate)


# -------------------------------------------------------------------------------- predict
def _add_predict(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify images, folders or .zip archives with a checkpoint",
        description="Classify cell images with a checkpoint (Hub id or folder), batched, with "
        "optional Grad-CAM overlays and a CSV of the results. More checkpoints of one task (folders, or Hub "
        "ids written hf-hub:org/name) right after the first (e.g. the bundled blood-cell pair) classify side by side: each model's label and their "
        "consensus, flagged uncertain where they disagree. Any number of images: rows are written "
        "to the CSV as they are predicted, and --resume continues an interrupted run.",
    )
    p.add_argument("checkpoint", help="Hub model id or local checkpoint folder (more may follow it: folders or "
                                          "hf-hub:org/name)")
    p.add_argument("inputs", nargs="+",
                   help="image files, folders (searched recursively), .zip archives, or .txt files listing "
                        "one of those per line (relative paths from the .txt's folder)")
    p.add_argument("--cam-dir", type=Path, default=None, help="write a Grad-CAM overlay PNG per image here")
    p.add_argument("--csv", type=Path, default=None, help="write the results table to this CSV file, row by row")
    p.add_argument("--resume", action="store_true",
                   help="with --csv: skip the images already in the CSV and append the others")
    p.add_argument("--quiet", action="store_true", help="no line per image on the terminal (the CSV has them)")
    p.add_argument("--no-cell-check", dest="cell_check", action="store_false",
                   help="classify every image, also those that do not look like a stained blood-cell image "
                        "or that look like a whole microscope field (by default they are listed as skipped, "
                        "with the reason)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images decoded at once (default 32); each forward pass takes 8 of them on the CPU, 32 on a GPU")
    p.add_argument("--workers", type=int, default=None, help="image-decoding threads (default: CPUs + 1, max 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.set_defaults(func=_predict)


def _is_checkpoint_dir(path: Path) -> bool:
    """A local checkpoint folder (what ``hub.save_pretrained`` writes: config.json beside the weights)."""
    return path.is_dir() and (path / "config.json").is_file()


def _expand_inputs(inputs: list[str]) -> list[str]:
    """The inputs with every ``.txt`` file replaced by the paths it lists (blank and ``#`` lines skipped)."""
    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.suffix.lower() == ".txt" and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    listed = Path(line).expanduser()
                    out.append(str(listed if listed.is_absolute() else path.parent / listed))
        else:
            out.append(item)
    return out


def _cam_saver(predictors: list[Any], cam_dir: Path) -> Any:
    """``save(refs, images, preds)``: one overlay PNG per image (per image and model with several), uniquely named."""
    cam_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()

    def save(chunk_refs: list[Any], images: list[Any], preds: list[dict[str, Any]]) -> None:
        for ref, img, pred in zip(chunk_refs, images, preds):
            stem = Path(ref.name.replace("/", "__").replace("\\", "__")).stem or "image"
            out, n = f"{stem}.cam.png", 2
            while out in used:
                out, n = f"{stem}-{n}.cam.png", n + 1
            used.add(out)
            for p in predictors:
                name = out if len(predictors) == 1 else out.replace(".cam.png", f".{p.name}.cam.png")
                p.overlay(img, pred[p.name]).save(cam_dir / name)

    return save


def _predictors_and_inputs(args: argparse.Namespace, device: Any) -> tuple[list[Any], list[str]]:
    """``predict``'s models (the checkpoint, and checkpoint folders right after it) and its image inputs."""
    from .predict import Predictor

    def is_model(item: str) -> bool:  # a Hub model only with its prefix: `org/name` may be a folder of images
        return item.startswith("hf-hub:") or _is_checkpoint_dir(Path(item))

    checkpoints, inputs = [args.checkpoint], list(args.inputs)
    while inputs and is_model(inputs[0]):  # `predict CKPT_A CKPT_B images/`: models side by side
        checkpoints.append(inputs.pop(0))
    for item in inputs:  # a checkpoint among the images would have its plots and JSON read as images
        if is_model(item):
            what = "a Hub model id" if item.startswith("hf-hub:") else "a checkpoint folder"
            raise SystemExit(f"{item} is {what}, not images: give every checkpoint first, then the "
                             "images (predict CKPT [CKPT ...] IMAGES...)")
    if not inputs:
        raise SystemExit("no images given after the checkpoint(s)")
    predictors = []
    for ckpt in checkpoints:
        try:
            predictors.append(Predictor.from_pretrained(ckpt, device=device))
        except Exception as exc:
            raise SystemExit(f"could not load checkpoint {ckpt!r}: {exc}") from exc
        first, p = predictors[0], predictors[-1]
        if list(p.labels) != list(first.labels) or [q.name for q in predictors].count(p.name) > 1:
            raise SystemExit(f"{ckpt}: its labels {list(p.labels)} are not {checkpoints[0]}'s {list(first.labels)}, "
                             f"or it is named {p.name!r} like another: give distinct checkpoints of one task")
    return predictors, inputs


def _predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .batch import BatchResult, CsvStream, csv_parts, done_rows, merge_csv_parts, predict_files
    from .distributed import Processes
    from .images import InputError, Limits, collect_images

    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.resume and args.csv is None:
        raise SystemExit("--resume needs --csv: the CSV is where the finished images are read from")
    procs = Processes()
    predictors, inputs = _predictors_and_inputs(args, args.device or procs.device)
    predictor = predictors[0]  # the first model: its task, labels (and, alone, its threshold) for the summary
    try:  # a command-line run has no request limit: the rows stream to the CSV
        refs, skipped = collect_images(_expand_inputs(inputs), limits=Limits(max_images=sys.maxsize))
    except InputError as exc:
        raise SystemExit(str(exc)) from exc
    layout = BatchResult(models=[p.name for p in predictors], labels=list(predictor.labels))
    try:
        done = done_rows(args.csv, layout.header()) if args.resume else set()
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    before = len(refs)
    refs = [r for r in refs if r.name not in done]
    if done and procs.is_main:
        print(f"--resume: {before - len(refs)} image(s) already in {args.csv}; {len(refs)} to go")
    if args.csv is not None and procs.is_main and not args.resume:
        for stale in csv_parts(args.csv):  # left by an earlier, interrupted run: not this run's rows
            stale.unlink()
    procs.barrier()  # every process has read what is done (and stale parts are gone) before any writes
    refs = [refs[i] for i in procs.shard(len(refs))]
    out_csv = args.csv
    if args.csv is not None and procs.world > 1:
        out_csv = args.csv.with_name(f"{args.csv.name}.part{procs.rank}")
    stream = CsvStream(out_csv, layout.header(), append=args.resume)
    save_cams = _cam_saver(predictors, args.cam_dir) if args.cam_dir is not None else None
    bar = tqdm(total=len(refs), unit="img", desc="predict" if procs.world == 1 else f"predict [{procs.rank}]",
               smoothing=0.1, position=procs.rank)

    def on_chunk(chunk_refs: list[Any], images: list[Any], preds: list[dict[str, Any]]) -> None:
        from .predict import consensus

        cons = [consensus(list(p.values())) for p in preds]
        stream.write([layout.row(r.name, p, c) for r, p, c in zip(chunk_refs, preds, cons)])
        if save_cams is not None:
            save_cams(chunk_refs, images, preds)
        for ref, p, c in ([] if args.quiet else zip(chunk_refs, preds, cons)):
            if len(predictors) == 1:
                pred = p[predictor.name]
                flag = "  UNCERTAIN (under threshold)" if pred.abstain else ""
                bar.write(f"{ref.name}\t{pred.label}\t{pred.confidence:.3f}{flag}")
            else:
                each = "  ".join(f"{n}: {q.label} {q.confidence:.3f}" for n, q in p.items())
                bar.write(f"{ref.name}\t{c.label}\t({each})" + (f"  UNCERTAIN ({'; '.join(c.reasons)})"
                                                                 if c.uncertain else ""))

    try:
        result = predict_files(predictors, refs, batch_size=args.batch_size, workers=args.workers,
                               check_cells=args.cell_check,
                               with_cam=save_cams is not None, on_chunk=on_chunk, keep_results=False,
                               progress=lambda done, total, _m: bar.update(done - bar.n))
    finally:
        bar.close()
        stream.close()
    if procs.world > 1:
        result = result.gathered(procs)
        if args.csv is not None and procs.is_main:
            merge_csv_parts(args.csv, layout.header(), resume=args.resume)
        procs.close()
        if not procs.is_main:
            return 0
    result.skipped = skipped + result.skipped
    _print_summary(result, predictors, args)
    return 0 if result.n_predicted or done else 2


def _print_summary(result: Any, predictors: list[Any], args: argparse.Namespace) -> None:
    n, predictor = result.n_predicted, predictors[0]
    rate = n / result.seconds if result.seconds > 0 else float("nan")
    names = " + ".join(p.name for p in predictors) + (" (their consensus)" if len(predictors) > 1 else "")
    print(f"\n{n} images in {result.seconds:.2f} s ({rate:.1f} img/s) with {names} ({predictor.task}):")
    rows = result.counts()
    width = max([14, *(len(str(label)) for label, _, _ in rows)])  # "immature granulocyte" is 20
    for label, count, pct in rows:
        print(f"  {label:<{width}} {count:>6}  {pct:5.1f}%")
    if len(predictors) > 1:
        print(f"  {result.n_uncertain} flagged uncertain: the models disagree, or one is under its abstention "
              "threshold (refer for manual review)")
    elif predictor.threshold is None:
        print("  (this checkpoint has no abstention threshold: low-confidence predictions are not flagged)")
    else:
        print(f"  {result.n_uncertain} under the abstention threshold {predictor.threshold:.3f} "
              "(refer for manual review)")
    for name, reason in result.skipped:
        logger.warning("skipped %s: %s", name, reason)
    if args.csv is not None:
        print(f"results written to {args.csv}")
    if args.cam_dir is not None:
        print(f"Grad-CAM overlays written to {args.cam_dir}")


# -------------------------------------------------------------------------------- analyze
def _add_analyze(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="find and classify every cell of whole microscope-field photos; differential / parasitemia",
        description="Analyse photos of whole microscope fields (one smear: files, folders, .zip): find every "
        "white cell, red cell and platelet, classify the white cells (blood-cell models) and/or the red cells "
        "(malaria models) with every CHECKPOINT, and pool the differential or the parasitemia over the fields "
        "with 95% Wilson intervals. Arguments that are checkpoint folders (holding config.json) or Hub ids "
        "come first; the rest are inputs.",
    )
    p.add_argument("items", nargs="+", metavar="CHECKPOINT... INPUT...",
                   help="checkpoint folders (with config.json) or hf-hub:org/name ids, then field photos, "
                        "folders or .zip archives")
    p.add_argument("--task", choices=TASK_NAMES, default=None,
                   help="use only this task's models (default: every task of the checkpoints)")
    p.add_argument("--no-cell-check", dest="cell_check", action="store_false",
                   help="analyse every photo, also those whose colours are not those of a stained blood smear "
                        "(by default they are listed as skipped, with the reason)")
    p.add_argument("--json", metavar="OUT", default=None, help="write the results as JSON to OUT")
    p.add_argument("--csv", metavar="OUT", type=Path, default=None, help="write one row per cell to OUT")
    p.add_argument("--annotated-dir", type=Path, default=None,
                   help="write each field with its cells boxed (colour = class; yellow = uncertain) here")
    p.add_argument("--half-width", type=float, default=None,
                   help="target half-width of the 95%% interval for 'more cells needed' (default 0.05 for a "
                        "differential, 0.005 for parasitemia)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.set_defaults(func=_analyze)


def _split_checkpoints(items: list[str]) -> tuple[list[str], list[str]]:
    """Leading items that are checkpoints (a folder with config.json, or a Hub id) / the inputs."""
    n = 0
    for item in items:
        path = Path(item)
        hub_id = item.startswith("hf-hub:") or (not path.exists() and item.count("/") == 1 and not Path(item).suffix)
        if _is_checkpoint_dir(path) or hub_id:
            n += 1
        else:
            break
    return items[:n], items[n:]


def _analyze(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .fields import analyze_fields, annotate
    from .images import InputError, Limits
    from .predict import load_predictors

    checkpoints, inputs = _split_checkpoints(args.items)
    if not checkpoints:
        print("error: no checkpoint given first (a folder holding config.json, e.g. checkpoints/smallcnn-blood-cells, "
              "or hf-hub:org/name)", file=sys.stderr)
        return 2
    if not inputs:
        print("error: no field photos given after the checkpoints", file=sys.stderr)
        return 2
    predictors, failures = load_predictors(checkpoints, device=args.device)
    for src, why in failures:
        print(f"error: could not load checkpoint {src}: {why}", file=sys.stderr)
    if failures or not predictors:
        return 2
    saver = None
    if args.annotated_dir is not None:
        args.annotated_dir.mkdir(parents=True, exist_ok=True)

        def saver(res: Any, img: Any) -> None:
            stem = Path(res.file.replace("/", "__")).stem or "field"
            annotate(img, res).save(args.annotated_dir / f"{stem}.annotated.png")

    bar = tqdm(total=None, unit="field", desc="analyse", smoothing=0.1)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = analyze_fields(inputs, predictors, args.task, half_width=args.half_width,
                                limits=Limits(max_images=sys.maxsize), on_field=saver, check_cells=args.cell_check,
                                progress=progress)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    _print_fields(result)
    if args.json:
        print(f"JSON written to {_write_json(args.json, result.as_dict())}")
    if args.csv is not None:
        print(f"cells written to {result.write_csv(args.csv)}")
    if args.annotated_dir is not None:
        print(f"annotated fields written to {args.annotated_dir}")
    return 0 if result.images else 2


def _print_fields(result: Any) -> None:
    for im in result.images:
        c = im.counts
        print(f"{im.file}\t{c['wbc']} white, {c['rbc']} red, {c['platelet']} platelets\t"
              + ", ".join(f"{k} {v}" for k, v in c["by_label"].items()) + f"\t{c['uncertain']} uncertain")
    for name, reason in result.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    s = result.summary
    print(f"\n{s['fields']} field(s) analysed, {s['skipped']} skipped")
    if not s["fields"]:
        print("nothing to count: none of the inputs could be analysed (each one's reason is listed above)",
              file=sys.stderr)
        return
    if "differential" in s and not s["n_wbc"]:
        print("no white cell was found in these fields: no differential")
    elif "differential" in s:
        print(f"differential of {s['n_wbc']} white cells (95% Wilson interval):")
        for lab, d in s["differential"].items():
            print(f"  {lab:<22} {d['count']:>5}  {100 * d['fraction']:5.1f}%  [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]")
        if s["differential_more_cells_needed"] is not None:
            print(f"  {s['differential_more_cells_needed']} more white cells for a half-width of "
                  f"{100 * s['differential_half_width']:g} points")
    if "parasitemia" in s and not s["n_rbc"]:
        print("no red cell was found in these fields: no parasitemia")
    elif "parasitemia" in s:
        lo, hi = s["ci95"]
        print(f"parasitemia {100 * s['parasitemia']:.2f}% ({s['n_parasitized']} of {s['n_rbc']} red cells), "
              f"95% Wilson interval [{100 * lo:.2f}, {100 * hi:.2f}]%")
        if s["malaria_more_cells_needed"] is not None:
            print(f"  {s['malaria_more_cells_needed']} more red cells for a half-width of "
                  f"{100 * s['malaria_half_width']:g} points")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cellhub`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="python -m cellhub",
        description="Classify (predict), score (evaluate) and check for leaks (audit) blood-smear cell images; "
                    "analyse whole microscope fields (analyze); fit a checkpoint to your lab's images (adapt); "
                    "list or free cellhub's disk cache (cache).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .cli_upkeep import add_adapt, add_cache

    for add in (_add_audit, _add_evaluate, _add_predict, _add_analyze, add_adapt, add_cache):
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
