"""Benchmark `adapt`: the app's "adapt the models to this batch" with every image read once.

The app's Batch tab can re-estimate the BatchNorm statistics of every model of the task on the
uploaded crops before classifying them (``cellhub.adapt.adapt_predictors``). Until 2026-12-08 it
adapted one model after the other, and each read, checked (is it a stained blood cell?),
cropped and decoded every image again. Now the images are read and checked once, and each goes
through every model's own preprocessing in the same pass. The baseline arm is the old loop
(``adapt_to_images`` once per model), in the same process, on the same files, the arms
interleaved; both arms load the checkpoints afresh, as the app does.

ratio = median(once) / median(per model); target <= 0.8 with two models. The adapted models of
the two arms must give the same outputs.

    python bench/bench_adapt.py [--quick] [--data FOLDER] [--images N] [--checkpoint DIR ...]

Default: the bundled pair (``checkpoints/smallcnn-blood-cells`` and ``-s1``, as the app loads
them), on drawn 320x240 crops; ``--data`` takes real crops spread evenly over a folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 0.8
PAIR = ("checkpoints/smallcnn-blood-cells", "checkpoints/smallcnn-blood-cells-s1")


def run(args) -> list[C.Result]:
    import torch
    from PIL import Image

    from cellhub.adapt import adapt_predictors, adapt_to_images
    from cellhub.hub import load_pretrained
    from cellhub.images import collect_images
    from cellhub.predict import Predictor
    from cellhub.synthetic import draw_blood_cell

    n = args.images or (64 if args.quick else 256)
    rounds = args.repeats or (2 if args.quick else 5)
    sources = [str(C.REPO / c) if not Path(c).exists() else c for c in (args.checkpoint or PAIR)]
    predictors = [Predictor.from_pretrained(s) for s in sources]
    with C.tempdir(args.tmp, "bench-adapt-") as tmp:
        if args.data:
            files = [str(f) for f in C.real_images(args.data, n)]
            what = f"{len(files)} real crops from {args.data}"
        else:
            for i in range(n):
                draw_blood_cell(C.BLOOD_LABELS[i % 4], size=(320, 240), seed=i).save(Path(tmp) / f"c{i:04d}.png")
            files = [tmp]
            what = f"{n} drawn crops (320x240)"
        refs, _ = collect_images(files)

        def per_model() -> list[torch.nn.Module]:
            out = []
            for s in sources:
                model = load_pretrained(s, device="cpu")
                adapt_to_images(model, refs)
                out.append(model)
            return out

        def once() -> list[torch.nn.Module]:
            return [p.model for p in adapt_predictors(predictors, refs, min_images=1)[0]]

        x = predictors[0].preprocess([Image.open(r.path).convert("RGB") for r in refs[:4]])
        with torch.no_grad():
            for old, new in zip(per_model(), once()):
                if not torch.allclose(Predictor(old).model(x), new(x), atol=1e-4):
                    raise SystemExit("adapt: the two arms adapt the models differently")
        times = C.interleaved({"per-model": per_model, "once": once}, rounds)
    base, new = C.median(times["per-model"]), C.median(times["once"])
    ratio = new / base
    C.detail(f"{what}, {len(sources)} models: per model {base:.2f} s, read once {new:.2f} s, same outputs")
    fields = {"s": f"{base:.2f}/{new:.2f}", "images": len(refs), "models": len(sources), "repeats": rounds,
              **C.env_fields(), "target": f"<={TARGET}", "status": "PASS" if ratio <= TARGET else "FAIL"}
    return [C.Result("adapt", ratio, "adapting every model of a batch, images read once / once per model;",
                     fields, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--images", type=int, default=None, help="images per round (default 256; --quick 64)")
    p.add_argument("--data", default=None, help="a folder of real single-cell crops (default: drawn ones)")
    p.add_argument("--checkpoint", action="append", default=None,
                   help="a checkpoint to adapt (repeat; default: the bundled blood-cell pair)")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
