"""Train the field detector's network (``cellhub.fieldnet``) on annotated BCCD fields.

    python train/train_detector.py --cv 3 --output-dir runs/fieldnet-cv        # choose, out of fold
    python train/train_detector.py --output-dir runs/fieldnet --thresholds-from runs/fieldnet-cv/cv.json
    cp runs/fieldnet/fieldnet.safetensors cellhub/assets/                     # bundle it

Fields: the tuning part of the 304 annotated BCCD fields (``bench/field_accuracy.py``'s fixed split;
the held-out third is never read here), less the fields ``train/rbc_negatives.py`` also leaves out
(a white cell that is not among the Kaggle TRAIN crops, or the same field as an unseen one), so that
no Kaggle TEST field is trained on. Each field is brought to the detector's working scale
(:func:`cellhub.detect.working_image`: red-cell radius 16 px) and its VOC boxes with it.

``--cv K`` trains K models, field k of the sorted ids in fold k mod K (``--folds interleaved``, as
the held-out third was drawn; ``--folds blocks``: contiguous id ranges, which measures a shift of
annotation convention -- the early ids are boxed more densely -- more than the detector), and scores
each on its held-out fold: white-cell recall / precision, red-cell box
recall / precision (IoU >= 0.5) and the red-cell count error (median over fields of
|found - boxed| / boxed), for a grid of heatmap thresholds. The thresholds that do best out of fold
(white cells and platelets: F1; red cells: the median count error) are written to ``cv.json``; the
final fit (no ``--cv``) takes them with ``--thresholds-from``. ``oof.json`` keeps every out-of-fold peak
(kind, box in original pixels, score) per field id. Checkpoints every epoch, ``--resume``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "train"))

from cellhub.detect import DEFAULT_PARAMS, working_image  # noqa: E402
from cellhub.fieldnet import (KINDS, STRIDE, FieldNet, FieldNetConfig, detection_loss, find_cells,  # noqa: E402
                              save_fieldnet, targets)
from cellhub.images import read_image  # noqa: E402
from field_accuracy import match, read_boxes  # noqa: E402

GRID = [round(0.05 * k, 2) for k in range(2, 19)]  # 0.10 .. 0.90


def load_fields(data: Path, ids: list[str]) -> list[dict]:
    """Each field at working scale: image (uint8), r, scale, boxes per kind (working and original px)."""
    from tqdm.auto import tqdm

    ann = data / "bccd-boxes" / "Annotations"
    jpeg = data / "blood-cells" / "dataset-master" / "dataset-master" / "JPEGImages"
    out = []
    for fid in tqdm(ids, desc="fields"):
        image = read_image(jpeg / f"{fid}.jpg")
        work, r_orig, scale, _ = working_image(image, DEFAULT_PARAMS)
        truth = read_boxes(ann / f"{fid}.xml")
        boxes = [(KINDS.index(k), tuple(v * scale for v in b)) for k in KINDS for b in truth[k]
                 if (b[2] - b[0]) >= 4 and (b[3] - b[1]) >= 4]  # a 1-pixel box is an annotation fault
        out.append({"id": fid, "work": work, "r": r_orig * scale, "scale": scale, "truth": truth, "boxes": boxes})
    return out


# ------------------------------------------------------------------------------ augmentation
def augment(f: dict, rng: random.Random) -> tuple[np.ndarray, list]:
    """A flipped / rotated / rescaled / recoloured copy of a field and its boxes (working px)."""
    import cv2

    img = f["work"].astype(np.float32)
    boxes = [(k, list(b)) for k, b in f["boxes"]]
    s = rng.uniform(0.85, 1.18)
    h, w = img.shape[:2]
    img = cv2.resize(img, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_LINEAR)
    sy, sx = img.shape[0] / h, img.shape[1] / w
    boxes = [(k, [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]) for k, b in boxes]
    h, w = img.shape[:2]
    if rng.random() < 0.5:
        img = img[:, ::-1]
        boxes = [(k, [w - b[2], b[1], w - b[0], b[3]]) for k, b in boxes]
    if rng.random() < 0.5:
        img = img[::-1]
        boxes = [(k, [b[0], h - b[3], b[2], h - b[1]]) for k, b in boxes]
    if rng.random() < 0.5:  # transpose (with the flips: all 8 symmetries of the square)
        img = img.transpose(1, 0, 2)
        boxes = [(k, [b[1], b[0], b[3], b[2]]) for k, b in boxes]
    gain = np.array([rng.uniform(0.88, 1.12) for _ in range(3)], np.float32)
    contrast = rng.uniform(0.8, 1.2)
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = (img - mean) * contrast + mean * gain + rng.uniform(-15, 15)
    return np.clip(img, 0, 255).astype(np.uint8), [(k, tuple(b)) for k, b in boxes]


def batch(fields: list[dict], cfg: FieldNetConfig, rng: random.Random, aug: bool = True):
    """Padded (B, 3, S, S) inputs and their targets."""
    from cellhub.fieldnet import to_input

    items = [augment(f, rng) if aug else (f["work"], f["boxes"]) for f in fields]
    side = max(max(im.shape[:2]) for im, _ in items)
    side += (-side) % STRIDE
    xs, hs, ss, os_, ms = [], [], [], [], []
    for (im, boxes), f in zip(items, fields):
        x = to_input(im, cfg)[0]
        xs.append(torch.nn.functional.pad(x, (0, side - x.shape[2], 0, side - x.shape[1])))
        heat, size, off, mask = targets(boxes, (side, side), cfg.work_radius)
        hs.append(heat), ss.append(size), os_.append(off), ms.append(mask)
    t = lambda a: torch.from_numpy(np.stack(a))  # noqa: E731
    return torch.stack(xs), t(hs), t(ss), t(os_), t(ms)


def fit(train: list[dict], cfg: FieldNetConfig, epochs: int, ckpt: Path | None, seed: int, batch_size: int = 8,
        lr: float = 2e-3, resume: bool = False) -> tuple[FieldNet, float]:
    """The trained network and its training seconds (over resumed runs too)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = FieldNet(cfg.width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    start, t0, before = 0, time.time(), 0.0
    if resume and ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        net.load_state_dict(state["net"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        start = int(state["epoch"])
        before = float(state.get("elapsed", 0.0))
        rng.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["rng"]))
        print(f"resumed {ckpt} at epoch {start}")
    bar = tqdm(range(start, epochs), desc="epochs", initial=start, total=epochs)
    for epoch in bar:
        net.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        total = 0.0
        for i in range(0, len(order), batch_size):
            loss = detection_loss(net, *batch([train[j] for j in order[i:i + batch_size]], cfg, rng))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        bar.set_postfix(loss=f"{total / steps_per_epoch:.3f}")
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            st = rng.getstate()
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch + 1,
                        "elapsed": before + time.time() - t0,
                        "rng": [st[0], list(st[1]), st[2]]}, ckpt)
    return net.eval(), before + time.time() - t0


# -------------------------------------------------------------------------------- scoring
def raw_predictions(net: FieldNet, cfg: FieldNetConfig, fields: list[dict]) -> list[list]:
    """Per field, every peak at the lowest threshold of the grid: (kind, box in original px, score)."""
    low = dataclasses.replace(cfg, thresholds={k: min(GRID) for k in KINDS})
    out = []
    for f in fields:
        cells = find_cells(net, low, f["work"], f["r"])
        out.append([(k, tuple(v / f["scale"] for v in b), s) for k, b, s in cells])
    return out


def score(fields: list[dict], preds: list[list], thresholds: dict[str, float]) -> dict:
    res: dict[str, float] = {}
    for kind in KINDS:
        tp = nf = nt = 0
        rel = []
        for f, p in zip(fields, preds):
            found = [b for k, b, s in p if k == kind and s >= thresholds[kind]]
            truth = f["truth"][kind]
            tp += match(found, truth)
            nf, nt = nf + len(found), nt + len(truth)
            if truth:
                rel.append(abs(len(found) - len(truth)) / len(truth))
        rec, prec = tp / max(nt, 1), tp / max(nf, 1)
        res.update({f"{kind}_recall": rec, f"{kind}_precision": prec, f"{kind}_f1": 2 * rec * prec / max(rec + prec, 1e-9),
                    f"{kind}_count_median_rel_err": statistics.median(rel) if rel else float("nan"),
                    f"{kind}_true": nt, f"{kind}_found": nf})
    return res


def choose_thresholds(fields: list[dict], preds: list[list]) -> dict[str, float]:
    best = {}
    for kind in KINDS:
        def key(t):
            s = score(fields, preds, {**{k: 1.1 for k in KINDS}, kind: t})
            return -s[f"{kind}_count_median_rel_err"] if kind == "rbc" else s[f"{kind}_f1"]
        best[kind] = max(GRID, key=key)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="the folder of ../shared/data")
    ap.add_argument("--output-dir", type=Path, required=True)
    ap.add_argument("--cv", type=int, default=0, help="K-fold cross-validation over contiguous blocks of fields")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thresholds-from", type=Path, default=None, help="a cv.json whose chosen thresholds the final model takes")
    ap.add_argument("--fields-json", type=Path, default=None, help="the eligible field ids (skips the smear matching)")
    ap.add_argument("--folds", choices=["interleaved", "blocks"], default="interleaved",
                    help="interleaved: field k goes to fold k mod K, as the held-out third was drawn (every third id); "
                         "blocks: contiguous id ranges (the annotators boxed early ids more densely: a convention shift)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fields_json:
        ids = json.loads(args.fields_json.read_text())
    else:
        from rbc_negatives import eligible_fields

        ids, why = eligible_fields(args.data)
        print(f"{len(ids)} fields; left out: {why}")
    ids = sorted(ids)
    fields = load_fields(args.data, ids)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    cfg = FieldNetConfig(width=args.width, work_radius=DEFAULT_PARAMS.work_radius)
    t0 = time.time()
    recipe = {"folds": args.folds if args.cv else None, "epochs": args.epochs, "width": args.width, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    if args.cv:
        if args.folds == "blocks":
            blocks = np.array_split(np.arange(len(fields)), args.cv)
        else:
            blocks = [np.arange(k, len(fields), args.cv) for k in range(args.cv)]
        oof: list[list] = [None] * len(fields)  # type: ignore[list-item]
        folds = []
        for k, idx in enumerate(blocks):
            held = set(idx.tolist())
            train = [f for i, f in enumerate(fields) if i not in held]
            net, _ = fit(train, cfg, args.epochs, out / f"fold{k}.ckpt", args.seed + k, args.batch_size, args.lr, args.resume)
            preds = raw_predictions(net, cfg, [fields[i] for i in idx])
            for i, p in zip(idx, preds):
                oof[i] = p
            folds.append({"fold": k, "fields": len(idx), "first": fields[idx[0]]["id"], "last": fields[idx[-1]]["id"],
                          "at_0.5": score([fields[i] for i in idx], preds, {kk: 0.5 for kk in KINDS})})
            print(f"fold {k}: {folds[-1]['at_0.5']}")
        thr = choose_thresholds(fields, oof)
        pooled = score(fields, oof, thr)
        per_fold = [score([fields[i] for i in idx], [oof[i] for i in idx], thr) for idx in blocks]
        report = {"fields": len(fields), "folds": folds, "thresholds": thr, "oof": pooled, "per_fold_at_chosen": per_fold,
                  "recipe": recipe, "wall_s": round(time.time() - t0, 1)}
        (out / "cv.json").write_text(json.dumps(report, indent=2))
        # every out-of-fold peak (down to the grid's lowest threshold), for choosing what to combine it with
        (out / "oof.json").write_text(json.dumps({
            "grid_min": min(GRID), "boxes": "original px",
            "fields": {f["id"]: [[k, [round(v, 1) for v in b], round(float(s), 4)] for k, b, s in p]
                       for f, p in zip(fields, oof)}}))
        print(json.dumps({"thresholds": thr, "oof": pooled}, indent=2))
        return 0
    if args.thresholds_from:
        cfg.thresholds = json.loads(args.thresholds_from.read_text())["thresholds"]
    net, train_s = fit(fields, cfg, args.epochs, out / "final.ckpt", args.seed, args.batch_size, args.lr, args.resume)
    cfg.trained = {**recipe, "fields": len(fields), "train_s": round(train_s, 1),
                   "data": "BCCD tuning fields (bench/field_accuracy.py split) whose white cell is a Kaggle TRAIN cell"}
    if args.thresholds_from:
        cv = json.loads(args.thresholds_from.read_text())
        cfg.trained["cv"] = {"folds": len(cv["folds"]), "oof": {k: round(v, 4) for k, v in cv["oof"].items()}}
    path = save_fieldnet(net, cfg, out / "fieldnet.safetensors")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
