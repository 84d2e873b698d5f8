#!/usr/bin/env python
"""Train (fine-tune or from scratch) a cellhub classifier; evaluate it honestly; optionally publish.

    python train/finetune.py --dataset blood-cells --model resnet18 --epochs 10 --output-dir runs/r18
    python train/finetune.py --dataset ~/kaggle/malaria --model smallcnn --image-size 64 --epochs 8
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

try:
    import cellhub  # noqa: F401
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub.models import MODEL_NAMES  # noqa: E402
from cellhub.training import TrainConfig  # noqa: E402

logger = logging.getLogger("finetune")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train/finetune.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True,
                   help="task name (blood-cells, malaria: its Hub dataset), local folder (Kaggle download, "
                        "image folder, saved dataset) or Hub dataset id")
    d.add_argument("--task", default=None, help="blood-cells or malaria (inferred from the data when omitted)")
    d.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of train held out, by group, when the data has no validation split")
    d.add_argument("--max-train-samples", type=int, default=None, help="use a random subset of train (smoke runs)")
    d.add_argument("--max-eval-samples", type=int, default=None, help="evaluate on a random subset (smoke runs)")
    d.add_argument("--cache-dir", default=None, help="where decoded images and dataset checks are cached")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="smallcnn", choices=MODEL_NAMES)
    m.add_argument("--image-size", type=int, default=None, help="input size in pixels (default: the model's)")
    m.add_argument("--from-scratch", action="store_true", help="random initialisation instead of ImageNet weights")
    m.add_argument("--freeze-backbone", action="store_true", help="train only the classifier head")
    m.add_argument("--drop-rate", type=float, default=None, help="dropout before the classifier")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--batch-size", type=int, default=32, help="per device")
    o.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay")
    o.add_argument("--label-smoothing", type=float, default=0.0)
    o.add_argument("--select-metric", default="macro_f1", choices=("macro_f1", "accuracy", "loss"),
                   help="grouped-validation score that picks the saved epoch")
    o.add_argument("--abstention-target", type=float, default=0.99,
                   help="the abstention threshold keeps validation predictions at least this accurate")
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run")
    r.add_argument("--output-dir", default="runs/cellhub", help="checkpoint folder (created)")
    r.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint")
    r.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: by machine)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: one per core)")
    r.add_argument("--mixed-precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                   help="auto: bf16 on CUDA, full precision on CPU")
    r.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for the 95%% CIs")
    r.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")

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
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset, model=args.model, task=args.task, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, image_size=args.image_size,
        pretrained=not args.from_scratch, freeze_backbone=args.freeze_backbone, drop_rate=args.drop_rate,
        label_smoothing=args.label_smoothing, output_dir=args.output_dir, resume=args.resume, seed=args.seed,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        val_fraction=args.val_fraction, select_metric=args.select_metric, abstention_target=args.abstention_target,
        num_workers=args.num_workers, num_threads=args.threads, mixed_precision=args.mixed_precision,
        cache_dir=args.cache_dir, n_boot=args.n_boot, progress=not args.no_progress,
    )


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
        summary = training.fit(cfg)
    except (ValueError, FileNotFoundError, DatasetLayoutError, PretrainedWeightsUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:  # `accelerate launch` with several processes: report once
        return 0
    out = Path(args.output_dir)
    for name, m in summary["splits"].items():
        print()
        print(format_metrics_table(m, title=f"{args.model} - {name}"))
    gap = summary["train_test_gap"]
    print(f"\ntrain - {gap['reference_split']} accuracy gap: {gap['accuracy']:+.4f}   "
          f"abstention threshold: {summary['abstention']['threshold']:.3f} "
          f"(keeps {summary['abstention']['coverage']:.0%} of validation at "
          f"{summary['abstention']['selective_accuracy']:.1%} accuracy)")
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
