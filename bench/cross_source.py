"""A checkpoint on each source's grouped validation part of a multi-source split (issue #10).

    python bench/cross_source.py --checkpoint checkpoints/smallcnn-blood-cells \
        --dataset ../shared/data/blood-cells --dataset ../shared/data/pbc --task blood-cells

The split is the one ``train/finetune.py`` draws for the same ``--dataset``s, ``--seed`` and
``--val-fraction`` (``cellhub.training.pipeline.prepare_splits``), so a model trained on those
sources and any other checkpoint are scored on the same held-out cells. A checkpoint trained on
other splits of the same data (e.g. the bundled ones, on all of the Kaggle TRAIN crops) has seen
part of it: read only the sources it never saw.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub.evaluation import evaluate_model  # noqa: E402
from cellhub.hub import load_pretrained  # noqa: E402
from cellhub.metrics import format_ci  # noqa: E402
from cellhub.training.pipeline import prepare_splits  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, action="append", help="repeat for several")
    p.add_argument("--dataset", required=True, action="append")
    p.add_argument("--task", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    prepared = prepare_splits(args.dataset, task=args.task, seed=args.seed, val_fraction=args.val_fraction,
                              progress=False)
    val = prepared.splits["validation"]
    sources = prepared.sources or ["all"]
    out = {}
    for ckpt in args.checkpoint:
        model = load_pretrained(ckpt)
        out[ckpt] = {}
        for src in sources:
            part = val if src == "all" else val.filter(lambda s: s == src, input_columns="source")
            m = evaluate_model(model, part, progress=False)
            out[ckpt][src] = {k: m[k] for k in ("accuracy", "ci95", "macro_f1", "n_images", "n_groups",
                                                "group_accuracy", "n_groups_correct")}
            print(f"{ckpt} on {src} validation: accuracy {m['accuracy']:.3f} {format_ci(m['ci95'])}, macro-F1 "
                  f"{m['macro_f1']:.3f}, {m['n_images']} images of {m['n_groups']} groups")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
