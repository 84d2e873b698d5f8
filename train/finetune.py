#!/usr/bin/env python
"""Train (fine-tune or from scratch) a cellhub classifier; evaluate it honestly; optionally publish.

    python train/finetune.py --dataset blood-cells --model resnet18 --epochs 10 --output-dir runs/r18
    python train/finetune.py --dataset ~/kaggle/malaria --model smallcnn --image-size 64 --epochs 8
    python train/finetune.py --dataset ~/kaggle/malaria --cv 5 --output-dir runs/malaria-cv   # grouped 5-fold CV
    python train/finetune.py ... --cv 5 --cv-fold 2 --output-dir runs/malaria-cv   # one fold (run them side by side),
    python train/finetune.py ... --cv 5 --resume --output-dir runs/malaria-cv      # then pool them (+ final model)
    accelerate launch train/finetune.py --dataset blood-cells --model resnet50 ...   # several GPUs

A thin command line over :func:`cellhub.training.fit`: grouped validation when the data has none
(no source cell / patient on both sides), decode-once image cache, AdamW + cosine schedule with
warm-up, bf16 autocast and channels_last on CUDA, a checkpoint every epoch (``--resume``
continues exactly), and an output folder that is a ready-to-publish checkpoint: safetensors
weights + config.json (labels, preprocessing, recipe, abstention threshold), README.md model
card, metrics.json, history.json, curves.png, confusion_matrix.png.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# idle OpenMP threads sleep rather than spin (set before torch loads; see bench/RESULTS.md, finding 1)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cellhub.training import TrainConfig, add_config_arguments, config_from_namespace  # noqa: E402

logger = logging.getLogger("finetune")


def build_parser() -> argparse.ArgumentParser:
    """The training options (one per :class:`cellhub.training.TrainConfig` field) plus publishing."""
    p = argparse.ArgumentParser(
        prog="train/finetune.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups = add_config_arguments(p)
    groups["data"].add_argument(
        "--cv-fold", dest="cv_fold_number", type=int, default=None, metavar="I",
        help="with --cv K: train fold I only (1..K) into OUTPUT_DIR/cv/fold-I and score its held-out groups. "
             "Run the folds side by side (processes, or machines sharing OUTPUT_DIR), then the same command "
             "with --resume instead of --cv-fold pools them (cv.json) and trains the final model (not with --cv-only)")
    h = p.add_argument_group("publishing")
    h.add_argument("--push-to-hub", action="store_true", help="upload the checkpoint when training ends")
    h.add_argument("--hub-model-id", default=None, help="repo id for --push-to-hub, e.g. your-name/cellhub-resnet18")
    h.add_argument("--private", action="store_true", help="create the Hub repo as private")
    h.add_argument("--hub-token", default=None, help="token (default: HF_TOKEN or `hf auth login`)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # fail before any training: a push needs a repo id, and it must be a valid one
    if args.push_to_hub:
        if not args.hub_model_id:
            parser.error("--push-to-hub needs --hub-model-id (e.g. --hub-model-id your-name/cellhub-smallcnn)")
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(args.hub_model_id)
        except Exception as exc:  # HFValidationError
            parser.error(f"--hub-model-id {args.hub_model_id!r} is not a valid Hub repo id ({exc}); "
                         "use 'your-name/model-name'")
    if args.cv_fold_number is not None:
        if not args.cv:
            parser.error("--cv-fold needs --cv K (the number of folds)")
        if not 1 <= args.cv_fold_number <= args.cv:
            parser.error(f"--cv-fold must be between 1 and {args.cv} (--cv), got {args.cv_fold_number}")
        if args.push_to_hub:
            parser.error("--push-to-hub with --cv-fold: one fold is not a model to publish; pool the folds with "
                         "--resume and push the final model")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config; with ``--cv-fold I``, that fold's (0-based ``cv_fold``, ``OUTPUT_DIR/cv/fold-I``),
    exactly as ``--cv`` trains it."""
    cfg = config_from_namespace(args)
    number = getattr(args, "cv_fold_number", None)
    if number is None:
        return cfg
    from cellhub.training import fold_config

    return fold_config(cfg, number - 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cellhub import training
    from cellhub.data import DatasetLayoutError
    from cellhub.metrics import format_metrics_table
    from cellhub.models import PretrainedWeightsUnavailable

    cfg = config_from_args(args)
    try:
        cfg.validate()
        summary = training.cross_validate(cfg) if cfg.cv and cfg.cv_fold is None else training.fit(cfg)
    except (ValueError, FileNotFoundError, DatasetLayoutError, PretrainedWeightsUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:  # `accelerate launch` with several processes: report once
        return 0
    out = Path(args.output_dir)
    cv = summary if cfg.cv_only else summary.get("cross_validation")
    if cv:
        print()
        print(training.format_cv_table(cv))
    if cfg.cv_only:
        print(f"\ncross-validation written to {out / 'cv.json'} (no final model: --cv-only)")
        return 0
    for name, m in summary["splits"].items():
        print()
        print(format_metrics_table(m, title=f"{args.model} - {name}"))
    gap = summary["train_test_gap"]
    print(f"\ntrain - {gap['reference_split']} accuracy gap: {gap['accuracy']:+.4f}   "
          f"abstention threshold: {summary['abstention']['threshold']:.3f} "
          f"(keeps {summary['abstention']['coverage']:.0%} of validation at "
          f"{summary['abstention']['selective_accuracy']:.1%} accuracy)")
    if cfg.cv_fold is not None:
        print(f"fold {cfg.cv_fold + 1} of {cfg.cv} saved to {Path(cfg.output_dir)}; when every fold is done, the same "
              "command with --resume instead of --cv-fold pools them")
        return 0
    print(f"saved to {out}")
    if args.push_to_hub:
        from cellhub.hub import HubError, push_to_hub

        try:
            url = push_to_hub(out, args.hub_model_id, private=args.private, token=args.hub_token)
        except HubError as exc:
            print(f"error: the model is saved in {out} but the upload failed: {exc}", file=sys.stderr)
            return 3
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
