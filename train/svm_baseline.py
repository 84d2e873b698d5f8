#!/usr/bin/env python
"""CNN features + one-vs-one SVM baseline (the study's "ResNet50 + SVM", 83.71% on blood cells).

    python train/svm_baseline.py --dataset blood-cells --backbone resnet50 --output-dir runs/svm-r50
    python train/svm_baseline.py --dataset ~/kaggle/blood-cells --backbone-checkpoint runs/r18   # offline
    python train/svm_baseline.py --dataset malaria --backbone smallcnn --from-scratch --image-size 64

Features are the global-average-pooled last feature map of the backbone, cached on disk; the SVM
is scikit-learn's SVC (RBF, one-vs-one, Platt probabilities). The output folder is a cellhub
checkpoint without pickle: svm.safetensors + backbone.safetensors + config.json
(model_type "cellhub-svm"), loadable with cellhub.load_pretrained / SVMClassifier.from_pretrained,
evaluated with `python -m cellhub evaluate`, and publishable with --push-to-hub.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

# idle OpenMP threads sleep rather than spin (set before torch loads; see bench/RESULTS.md, finding 1)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cellhub.cli import add_group_by_argument  # noqa: E402
from cellhub.models import MODEL_NAMES  # noqa: E402


def _gamma(value: str) -> float | str:
    if value in ("scale", "auto"):
        return value
    try:
        g = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"gamma must be 'scale', 'auto' or a positive number, got {value!r}") from None
    if g <= 0:
        raise argparse.ArgumentTypeError(f"gamma must be positive, got {value!r}")
    return g


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train/svm_baseline.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help="task name, local folder or Hub dataset id")
    p.add_argument("--task", default=None, help="blood-cells, pbc or malaria (inferred when omitted)")
    p.add_argument("--backbone", default="resnet50", choices=MODEL_NAMES, help="registered feature extractor")
    p.add_argument("--from-scratch", action="store_true",
                   help="random backbone weights (offline smoke runs; the features are then weak)")
    p.add_argument("--backbone-checkpoint", default=None, metavar="DIR",
                   help="use the backbone of a saved cellhub model (folder or Hub id) instead")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's)")
    p.add_argument("--C", type=float, default=1.0, help="SVC regularisation")
    p.add_argument("--kernel", default="rbf", choices=("rbf", "linear", "poly", "sigmoid"))
    p.add_argument("--gamma", type=_gamma, default="scale")
    p.add_argument("--output-dir", default="runs/svm")
    p.add_argument("--cache-dir", default=None, help="decoded images + features cache")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.2)
    add_group_by_argument(p)
    p.add_argument("--batch-size", type=int, default=64, help="feature extraction batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--abstention-target", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--push-to-hub", action="store_true")
    p.add_argument("--hub-model-id", default=None)
    p.add_argument("--private", action="store_true")
    p.add_argument("--hub-token", default=None)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.push_to_hub:
        if not args.hub_model_id:
            parser.error("--push-to-hub needs --hub-model-id (e.g. --hub-model-id your-name/cellhub-svm-resnet50)")
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(args.hub_model_id)
        except Exception as exc:
            parser.error(f"--hub-model-id {args.hub_model_id!r} is not a valid Hub repo id ({exc})")
    if args.backbone_checkpoint and args.from_scratch:
        parser.error("--from-scratch and --backbone-checkpoint exclude each other")
    if args.C <= 0:
        parser.error(f"--C must be positive, got {args.C}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from cellhub.data import DatasetLayoutError
    from cellhub.metrics import format_metrics_table
    from cellhub.models import PretrainedWeightsUnavailable
    from cellhub.training import train_svm_baseline

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = train_svm_baseline(
            args.dataset, backbone=args.backbone, pretrained=not args.from_scratch,
            backbone_checkpoint=args.backbone_checkpoint, task=args.task, image_size=args.image_size, C=args.C,
            kernel=args.kernel, gamma=args.gamma, output_dir=args.output_dir, cache_dir=args.cache_dir,
            max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
            val_fraction=args.val_fraction, seed=args.seed, n_boot=args.n_boot,
            abstention_target=args.abstention_target, batch_size=args.batch_size, progress=not args.no_progress,
            group_by=args.group_by,
        )
    except (ValueError, FileNotFoundError, DatasetLayoutError, PretrainedWeightsUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, m in summary["splits"].items():
        print()
        print(format_metrics_table(m, title=f"{summary['model']} - {name}"))
    print(f"\nsaved to {args.output_dir}")
    if args.push_to_hub:
        from cellhub.hub import HubError, push_to_hub

        try:
            url = push_to_hub(args.output_dir, args.hub_model_id, private=args.private, token=args.hub_token)
        except HubError as exc:
            print(f"error: the model is saved in {args.output_dir} but the upload failed: {exc}", file=sys.stderr)
            return 3
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
