"""Look at what a cross-validated recipe gets wrong: a seeded sample of its out-of-fold errors.

    python bench/cv_errors.py RUN --root DATA_DIR [--source malaria] [--label Parasitized] \
        [--n 45] [--seed 0] [--out errors.png]

RUN is a ``train/finetune.py --cv K`` output folder. Every held-out image that its fold's model
called wrongly is an error; ``--source`` keeps one source (the part before ``|`` of the group
name), ``--label`` the errors whose *given* label is this class. Printed: the errors per given
label and how sure the model was against it (its probability of the given label). Written: a
contact sheet of ``--n`` errors drawn with ``--seed`` (numbered in reading order) and, beside it,
``OUT.txt`` with each numbered file, its given and predicted labels and that probability, for a reviewer to mark
(e.g. "no parasite visible": a cell whose label, not the model, is likely wrong).

``--root``: the folder the held-out file names are relative to (the dataset folder passed to
``--dataset``; its class folders may sit up to four levels down, as in the Kaggle downloads).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cv_compare import fold_holdouts  # noqa: E402


def errors(run: Path, source: str | None = None) -> list[dict]:
    """Every out-of-fold error of ``run``: fold, file, group, given label index, predicted index,
    the probability of the given label."""
    out = []
    for i, (_, p, y, g, files) in enumerate(fold_holdouts(run, with_files=True)):
        pred = p.argmax(1)
        for j in np.flatnonzero(pred != y):
            if source is not None and str(g[j]).split("|", 1)[0] != source:
                continue
            out.append({"fold": i + 1, "file": str(files[j]), "group": str(g[j]), "label": int(y[j]),
                        "pred": int(pred[j]), "p_label": float(p[j, y[j]])})
    return out


def find_base(root: Path, rel: str, depth: int = 4) -> Path:
    """The folder under ``root`` (itself or up to ``depth`` levels down) that holds ``rel``."""
    if not root.is_dir():
        raise SystemExit(f"--root {root} is not a folder: pass the dataset folder the run was trained on.")
    level = [root]
    for _ in range(depth + 1):
        for d in level:
            if (d / rel).is_file():
                return d
        level = [c for d in level for c in sorted(d.iterdir()) if c.is_dir()]
    raise SystemExit(f"{rel} is not under {root} (nor up to {depth} folders down): pass the dataset folder "
                     "the run was trained on as --root.")


def contact_sheet(paths: list[Path], size: int = 128, cols: int = 9):
    from PIL import Image, ImageDraw

    rows = max(1, -(-len(paths) // cols))
    sheet = Image.new("RGB", (size * cols, size * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            tile = im.convert("RGB").resize((size, size))
        x, y = (i % cols) * size, (i // cols) * size
        sheet.paste(tile, (x, y))
        draw.text((x + 3, y + 2), str(i), fill="yellow")
    return sheet


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--root", type=Path, required=True, help="the dataset folder the held-out files are under")
    ap.add_argument("--source", default=None, help="keep one source of a multi-source run (e.g. malaria)")
    ap.add_argument("--label", default=None, help="keep the errors whose given label is this class")
    ap.add_argument("--n", type=int, default=45, help="errors on the sheet (default 45)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, help="tile size in pixels")
    ap.add_argument("--out", type=Path, default=Path("cv_errors.png"))
    args = ap.parse_args(argv)

    labels = json.loads((args.run / "cv.json").read_text()).get("labels") if (args.run / "cv.json").is_file() else None
    errs = errors(args.run, args.source)
    name = (lambda k: labels[k]) if labels else str
    if args.label is not None:
        known = {name(e["label"]) for e in errs}
        errs = [e for e in errs if name(e["label"]).lower() == args.label.lower()]
        if not errs:
            raise SystemExit(f"no error with given label {args.label!r}; labels among the errors: {sorted(known)}")
    summary: dict = {"errors": len(errs), "by_label": {}}
    for k in sorted({e["label"] for e in errs}):
        p = np.array([e["p_label"] for e in errs if e["label"] == k])
        summary["by_label"][name(k)] = {"n": int(len(p)), "p_label<0.1": int((p < 0.1).sum()),
                                        "0.1-0.3": int(((p >= 0.1) & (p < 0.3)).sum()), ">=0.3": int((p >= 0.3).sum())}
    print(f"{len(errs)} out-of-fold errors" + (f" of source {args.source}" if args.source else ""))
    for lab, row in summary["by_label"].items():
        print(f"  given {lab}: {row['n']}; the model's probability of that label <0.1: {row['p_label<0.1']}, "
              f"0.1-0.3: {row['0.1-0.3']}, >=0.3: {row['>=0.3']}")
    if not errs:
        return summary
    rng = np.random.default_rng(args.seed)
    pick = sorted(rng.choice(len(errs), size=min(args.n, len(errs)), replace=False).tolist())
    chosen = [errs[i] for i in pick]
    base = find_base(args.root, chosen[0]["file"])
    contact_sheet([base / e["file"] for e in chosen], args.size).save(args.out)
    listing = args.out.with_suffix(args.out.suffix + ".txt")
    listing.write_text("".join(f"{i}\t{e['file']}\tgiven {name(e['label'])}\tcalled {name(e['pred'])}\tp={e['p_label']:.2f}\t"
                               f"fold {e['fold']}\n"
                               for i, e in enumerate(chosen)))
    print(f"{len(chosen)} drawn (seed {args.seed}) -> {args.out} and {listing}")
    summary["sheet"], summary["listing"] = str(args.out), str(listing)
    return summary


if __name__ == "__main__":
    main()
