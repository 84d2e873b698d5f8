"""Benchmark `fields`: whole-field analysis (``cellhub.fields.analyze_field``), CPU, no CAM.

One 640x480 field analysed with every model (default: the bundled blood-cell model on the white
cells and the bundled malaria model on the red cells), interleaved:

* ``batched`` -- ``analyze_field(image, predictors)``: detection, then the crops of each kind
                 through each Predictor in one ``predict`` call                       (the product)
* ``loop``    -- the same detection and crops, then ``Predictor.predict([crop])`` once per cell
                 and model, and the consensus per cell                                 (the baseline)

ratio = median(loop) / median(batched) (the speed-up). Also timed, the batched way, two 4000x3000
photos: ``huge`` -- the same field photographed at 4000x3000 (the 640x480 field resized: ~20 large
cells, found on a downscaled copy), and ``mosaic`` -- a thin film of 7x7 drawn smears (~2,000 red
cells, processed in tiles; every red cell goes through the malaria model).
Targets (2 CPU cores): <= 1 s per 640x480 field, <= 10 s per 4000x3000 photo (``huge``).

    python bench/bench_fields.py [--quick] [--image FIELD.jpg] [--models DIR ...] [--repeats N]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BUNDLED = ["checkpoints/smallcnn-blood-cells", "checkpoints/smallcnn-malaria"]
TARGET_FIELD_S = 1.0
TARGET_HUGE_S = 10.0


def load(models: list[str]):
    from cellhub.predict import load_predictors

    predictors, failures = load_predictors([str(C.REPO / m) if not Path(m).is_absolute() else m for m in models])
    if failures:
        raise SystemExit(f"could not load: {failures}")
    return predictors


def loop_baseline(image, predictors) -> int:
    """Per-cell loop: one ``Predictor.predict`` call per cell and model."""
    from cellhub.detect import detect_cells
    from cellhub.fields import classified_kind, rbc_crop, wbc_crop
    from cellhub.predict import consensus

    det = detect_cells(image)
    n = 0
    for kind in ("wbc", "rbc"):
        preds = [p for p in predictors if classified_kind(p.task) == kind]
        for cell in det.of_kind(kind):
            crop = wbc_crop(image, cell.box) if kind == "wbc" else rbc_crop(image, cell.box)
            consensus([p.predict([crop], with_cam=False)[0] for p in preds])
            n += 1
    return n


def huge_photo(size=(4000, 3000)):
    from PIL import Image

    from cellhub.synthetic import draw_smear

    out = Image.new("RGB", size)
    labels = C.BLOOD_LABELS
    k = 0
    for y in range(0, size[1], 480):
        for x in range(0, size[0], 640):
            out.paste(draw_smear(labels[k % 4], seed=k)[0], (x, y))
            k += 1
    return out


def run(args) -> list[C.Result]:
    from PIL import Image

    from cellhub.fields import analyze_field
    from cellhub.images import read_image
    from cellhub.synthetic import draw_smear

    predictors = load(args.models)
    image = read_image(args.image) if args.image else draw_smear("neutrophil", seed=0)[0]
    if image.size != (640, 480):
        image = image.resize((640, 480), Image.BILINEAR)
    rounds = args.repeats or (3 if args.quick else 10)
    res = analyze_field(image, predictors)
    n_cells = sum(1 for c in res.cells if c.label is not None)
    times = C.interleaved({"batched": lambda: analyze_field(image, predictors),
                           "loop": lambda: loop_baseline(image, predictors)}, rounds=rounds, warmup=1)
    med = {k: C.median(v) for k, v in times.items()}
    huge = image.resize((4000, 3000), Image.BILINEAR)
    huge_s = [C.timed(lambda: analyze_field(huge, predictors)) for _ in range(2 if args.quick else 3)]
    mosaic = huge_photo()
    mosaic_s = C.timed(lambda: analyze_field(mosaic, predictors))
    hres, mres = analyze_field(huge, predictors), analyze_field(mosaic, predictors)
    C.detail(f"640x480 field ({args.image or 'drawn smear'}): {res.counts['wbc']} white, {res.counts['rbc']} red, "
             f"{n_cells} classified by {len(predictors)} models; batched {med['batched']:.3f} s, "
             f"per-cell loop {med['loop']:.3f} s")
    C.detail(f"4000x3000 photo of that field: {hres.counts['wbc']} white, {hres.counts['rbc']} red; {min(huge_s):.2f} s")
    C.detail(f"4000x3000 mosaic thin film: {mres.counts['wbc']} white, {mres.counts['rbc']} red; {mosaic_s:.2f} s "
             f"({1000 * mosaic_s / max(1, len(mres.cells)):.1f} ms per cell)")
    ok = med["batched"] <= TARGET_FIELD_S and min(huge_s) <= TARGET_HUGE_S
    fields = {"field_s": med["batched"], "loop_s": med["loop"], "huge_4000x3000_s": min(huge_s),
              "mosaic_4000x3000_s": mosaic_s, "cells_classified": n_cells, "huge_cells": len(hres.cells),
              "mosaic_cells": len(mres.cells), "models": len(predictors),
              "repeats": rounds, **C.env_fields(),
              "target": f"field<={TARGET_FIELD_S}s,huge<={TARGET_HUGE_S}s", "status": "PASS" if ok else "FAIL"}
    return [C.Result("fields", med["loop"] / med["batched"], "loop/batched (speed-up, 640x480, no CAM);",
                     fields, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--image", default=None, help="a real 640x480 field photo (default: a drawn smear)")
    p.add_argument("--models", nargs="+", default=BUNDLED, help="checkpoint folders (default: the bundled blood-cell and malaria models)")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
