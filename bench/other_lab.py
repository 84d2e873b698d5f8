"""Two checkpoints on a lab neither was trained on, paired (issue #10: models that hold up on other labs).

    python bench/other_lab.py RUN_A RUN_B --data ../shared/data/pbc [--json OUT] [--adapt-bn]

Leave one lab out: train A and B on one lab's images only (the same data, seed and split; they
differ in one setting), then score both on every image of the other lab, which neither saw. For
each: accuracy with its group-bootstrap interval, macro-F1 and per-class recall, and the same for
their consensus (probabilities averaged, as the app combines models); then B minus A with a paired
bootstrap over the data's groups (Kaggle crops: fields; PBC: near-duplicates), the
same resampling as ``bench/cv_compare.py``. Only the classes of the checkpoints' task are scored
(PBC's four others are left out for the 4-class blood-cell task, as in training).

``--adapt-bn`` first re-estimates each checkpoint's BatchNorm statistics on the other lab's images
(``cellhub.evaluation.adapt_batchnorm``, labels unused): how much of a BatchNorm model's loss on
another lab is its batch statistics. A model without BatchNorm is scored as it is.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cv_compare import paired_difference  # noqa: E402

from cellhub import data as data_mod  # noqa: E402
from cellhub.evaluation import adapt_batchnorm, predict_dataset, select_split  # noqa: E402
from cellhub.hub import load_pretrained  # noqa: E402
from cellhub.metrics import classification_metrics, format_ci  # noqa: E402


def _summary(m: dict, names: list[str]) -> dict:
    """The figures reported for one set of predictions: accuracy, its interval, macro-F1, recall per class."""
    return {"accuracy": m["accuracy"], "ci95": m["ci95"], "macro_f1": m["macro_f1"],
            "recall": {lab: m["per_class"][lab]["recall"] for lab in names}}


def score(checkpoints: list[str], data: str, *, cache_dir: str | None = None, n_boot: int = 2000,
          progress: bool = True, adapt_bn: bool = False) -> dict:
    """Every checkpoint's metrics on all of ``data`` and, for two, the paired difference B - A."""
    models = [load_pretrained(c) for c in checkpoints]
    tasks = {(getattr(m, "cellhub_config", None) or {}).get("task") for m in models}
    labels = {tuple(m.cellhub_config["labels"]) for m in models}
    if len(tasks) != 1 or len(labels) != 1:
        raise SystemExit(f"The checkpoints are of different tasks or labels ({sorted(map(str, tasks))}); "
                         "compare checkpoints of one task.")
    task = tasks.pop()
    dsd = data_mod.load_cell_dataset(data, task=task, cache_dir=cache_dir, progress=progress)
    name, ds = select_split(dsd, None if len(dsd) == 1 else "train", source=data)
    y = np.asarray(ds["label"], dtype=np.int64)
    groups = np.asarray([str(g) for g in ds["group"]]) if "group" in ds.column_names else np.arange(len(y)).astype(str)
    names = list(labels.pop())
    out: dict = {"data": data, "split": name, "task": task, "n_images": int(len(y)),
                 "n_groups": int(len(np.unique(groups))), "adapt_bn": adapt_bn, "checkpoints": {}}
    correct, all_probs = [], []
    for ckpt, model in zip(checkpoints, models):
        n_bn = adapt_batchnorm(model, ds, progress=progress) if adapt_bn else 0
        probs = predict_dataset(model, ds, progress=progress)
        m = classification_metrics(y, probs, names, groups=list(groups), n_boot=n_boot, seed=0)
        out["checkpoints"][ckpt] = {**_summary(m, names), "confusion": m["confusion_matrix"],
                                    "batchnorm_layers_adapted": n_bn}
        correct.append((probs.argmax(1) == y).astype(np.float64))
        all_probs.append(probs)
    if len(checkpoints) > 1:  # the app's consensus: the models' probabilities averaged
        m = classification_metrics(y, np.mean(all_probs, axis=0), names, groups=list(groups), n_boot=n_boot, seed=0)
        out["consensus"] = _summary(m, names)
    if len(checkpoints) == 2:
        diff, ci = paired_difference(correct[0], correct[1], groups, n_boot)
        out["b_minus_a"] = {"points": 100 * diff, "ci95": [100 * ci[0], 100 * ci[1]]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders (or Hub ids); two for a paired difference")
    p.add_argument("--data", required=True, help="the other lab's images (any folder cellhub reads)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--adapt-bn", action="store_true",
                   help="re-estimate each checkpoint's BatchNorm statistics on the other lab's images first")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = score(args.checkpoints, args.data, cache_dir=args.cache_dir, n_boot=args.n_boot,
                progress=not args.no_progress, adapt_bn=args.adapt_bn)
    print(f"{out['data']} ({out['split']}): {out['n_images']} images / {out['n_groups']} groups, task {out['task']}")
    for ckpt, m in out["checkpoints"].items():
        rec = ", ".join(f"{k} {v:.3f}" for k, v in m["recall"].items())
        adapted = f" (BatchNorm re-estimated here: {m['batchnorm_layers_adapted']} layers)" if args.adapt_bn else ""
        print(f"  {ckpt}{adapted}: accuracy {m['accuracy']:.4f} {format_ci(m['ci95'])}, "
              f"macro-F1 {m['macro_f1']:.4f}; recall {rec}")
    if "consensus" in out:
        m = out["consensus"]
        rec = ", ".join(f"{k} {v:.3f}" for k, v in m["recall"].items())
        print(f"  consensus (probabilities averaged): accuracy {m['accuracy']:.4f} {format_ci(m['ci95'])}, "
              f"macro-F1 {m['macro_f1']:.4f}; recall {rec}")
    if "b_minus_a" in out:
        d = out["b_minus_a"]
        print(f"  B - A: {d['points']:+.2f} points [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] "
              "(paired bootstrap over groups)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
