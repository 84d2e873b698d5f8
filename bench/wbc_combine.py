"""White cells from two finders: the image-processing finder (``cellhub.detect``) and the red-cell
network's white-cell head (``cellhub.fieldnet``). Is a combination of the two better than either?

    python train/train_detector.py --cv 3 --epochs 80 --output-dir runs/fieldnet-cv   # writes oof.json
    python bench/wbc_combine.py choose runs/fieldnet-cv --out runs/wbc-rule.json          # tuning fields
    python bench/wbc_combine.py heldout runs/wbc-rule.json                                # once, at the end

Rules (one small family, fixed before looking at any figure):
- ``add@t``: the finder's white cells, plus every network white cell of score >= t that overlaps no
  finder box (IoU < 0.3, centre outside it): the network rescues cells the finder missed
  (``cellhub.fieldnet.net_extra_white_cells``; since 2026-12-04 the detector's default,
  ``DetectParams.wbc_net_add = 0.3``, the rule this chose; the finder alone: ``wbc_net_add=None``);
- ``veto@s``: a finder box is kept only when a network white cell of score >= s overlaps it (IoU >=
  0.3): the network vetoes the finder's false alarms;
- both, and neither (the finder alone).

``choose`` scores every rule on the eligible tuning fields with the network's *out-of-fold* peaks
(``oof.json`` of a ``train_detector.py --cv`` run; each field scored by a network that never saw it)
and picks the best F1 (ties: the simpler rule). The finder's settings were tuned on these fields, so
its half of the evidence is in sample (recall 0.986 here, 0.933 held out): the choice leans towards
trusting the finder. ``heldout`` applies the chosen rule, with the bundled network (trained on all
the eligible tuning fields), to the 101 held-out fields of ``bench/field_accuracy.py``: one figure.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub.detect import DEFAULT_PARAMS, box_iou, detect_cells, with_params, working_image  # noqa: E402
from cellhub.fieldnet import net_extra_white_cells  # noqa: E402
from cellhub.images import read_image  # noqa: E402
from field_accuracy import ANN, JPEG, match, read_boxes, split_ids  # noqa: E402

ADD = [None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
VETO = [None, 0.1, 0.15, 0.2, 0.25, 0.3]
OVERLAP = 0.3


def combine(finder: list, net: list, add: float | None, veto: float | None) -> list:
    """The white-cell boxes a rule keeps; ``net`` is [(box, score)]."""
    def best(b):
        return max((s for nb, s in net if box_iou(b, nb) >= OVERLAP), default=0.0)

    kept = [b for b in finder if veto is None or best(b) >= veto]
    if add is not None:  # the detector's own rule (DetectParams.wbc_net_add)
        kept += net_extra_white_cells([("wbc", nb, s) for nb, s in net], finder, add, OVERLAP)
    return kept


def score(fields: list[dict], add, veto) -> dict:
    tp = nf = nt = 0
    for f in fields:
        found = combine(f["finder"], f["net"], add, veto)
        tp += match(found, f["truth"])
        nf, nt = nf + len(found), nt + len(f["truth"])
    rec, prec = tp / max(nt, 1), tp / max(nf, 1)
    return {"add": add, "veto": veto, "recall": rec, "precision": prec, "f1": 2 * rec * prec / max(rec + prec, 1e-9),
            "matched": tp, "found": nf, "true": nt}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def finder_boxes(fid: str) -> list:
    finder = with_params(wbc_net_add=None)  # the image-processing finder alone (the rule adds the network)
    return [c.box for c in detect_cells(read_image(JPEG / f"{fid}.jpg"), finder).of_kind("wbc")]


def net_boxes(fid: str, net, cfg) -> list:
    """The bundled network's white-cell peaks down to 0.1, boxes in original pixels (as oof.json)."""
    import dataclasses

    from cellhub.fieldnet import KINDS, find_cells

    work, r_orig, scale, _ = working_image(read_image(JPEG / f"{fid}.jpg"), DEFAULT_PARAMS)
    low = dataclasses.replace(cfg, thresholds={k: 0.1 for k in KINDS})
    return [(tuple(v / scale for v in b), s) for k, b, s in find_cells(net, low, work, r_orig * scale) if k == "wbc"]


def main(argv: list[str] | None = None) -> int:
    from tqdm.auto import tqdm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("choose", help="score every rule on the tuning fields (network out of fold)")
    c.add_argument("cv_run", type=Path, help="a train_detector.py --cv output folder (holds oof.json)")
    c.add_argument("--out", type=Path, default=None, help="write the chosen rule here (JSON)")
    h = sub.add_parser("heldout", help="the chosen rule on the held-out fields, with the bundled network")
    h.add_argument("rule", type=Path, help="the JSON `choose --out` wrote")
    args = ap.parse_args(argv)

    if args.cmd == "choose":
        oof_path = args.cv_run / "oof.json"
        if not oof_path.is_file():
            raise SystemExit(f"{oof_path} not found: run train/train_detector.py --cv K --output-dir {args.cv_run} first")
        oof = json.loads(oof_path.read_text())["fields"]
        tune = set(split_ids()["tune"])
        if not set(oof) <= tune:
            raise SystemExit(f"{oof_path} holds fields outside the tuning part: {sorted(set(oof) - tune)[:5]}")
        fields = [{"id": fid, "truth": read_boxes(ANN / f"{fid}.xml")["wbc"], "finder": finder_boxes(fid),
                   "net": [(tuple(b), s) for k, b, s in oof[fid] if k == "wbc"]} for fid in tqdm(sorted(oof), desc="fields")]
        rows = sorted((score(fields, a, v) for a in ADD for v in VETO),
                      key=lambda r: (-round(r["f1"], 6), (r["add"] is not None) + (r["veto"] is not None)))
        print(f"{len(fields)} tuning fields, {rows[0]['true']} white cells; network out of fold, finder in sample")
        for r in [x for x in rows if x["add"] is None and x["veto"] is None] + rows[:10]:
            print(f"  add {r['add']!s:>4}  veto {r['veto']!s:>4}: recall {r['recall']:.4f} precision {r['precision']:.4f} "
                  f"F1 {r['f1']:.4f} ({r['matched']} of {r['true']}, {r['found']} found)")
        chosen = rows[0]
        print(f"chosen: add {chosen['add']} veto {chosen['veto']}")
        if args.out:
            args.out.write_text(json.dumps({"add": chosen["add"], "veto": chosen["veto"], "tuning": chosen,
                                            "cv_run": str(args.cv_run)}, indent=2))
        return 0

    from cellhub.fieldnet import load_fieldnet

    rule = json.loads(args.rule.read_text())
    net, cfg = load_fieldnet(None)
    fields = [{"id": fid, "truth": read_boxes(ANN / f"{fid}.xml")["wbc"], "finder": finder_boxes(fid),
               "net": net_boxes(fid, net, cfg)} for fid in tqdm(split_ids()["heldout"], desc="held-out fields")]
    for add, veto, name in ((None, None, "finder alone"), (rule["add"], rule["veto"], "chosen rule")):
        r = score(fields, add, veto)
        lo, hi = wilson(r["matched"], r["true"])
        print(f"{name} (add {add}, veto {veto}) on {len(fields)} held-out fields: recall {r['recall']:.4f} "
              f"(Wilson {lo:.3f}-{hi:.3f}; {r['matched']} of {r['true']}), precision {r['precision']:.4f} ({r['found']} found)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
