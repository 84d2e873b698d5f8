"""Benchmark `folder`: images/s predicting a folder, batched with parallel decoding vs a per-image loop.

A folder of synthetic 320x240 JPEG white-cell crops (``cellhub.synthetic``, like the Kaggle
TRAIN crops) -- or real images with ``--data`` -- is classified by one checkpoint, interleaved:

* ``loop``     -- for each file: ``read_image(path)`` then ``Predictor.predict([img])``  (the baseline)
* ``batched``  -- ``collect_images([folder])`` + ``predict_files([predictor], refs, batch_size=32)``,
                  which decodes each chunk of 32 in parallel threads and runs it through the model
                  in the Predictor's forward batches (8 on the CPU; conv+BatchNorm folded,
                  channels_last weights: what
                  ``python -m cellhub predict CKPT FOLDER`` does)
* ``before``   -- the same ``predict_files`` call as it was before run 1's fix: the model in NCHW
                  (contiguous) format, BatchNorm not folded into the convolutions, one forward
                  per chunk of 32. Reported as ``before=``
                  (its img/s over the loop's); not the headline ratio. ``--no-before`` skips it.

Both without CAM. ratio = images/s batched / images/s loop; target >= 2. The two arms must give
the same labels (checked).

    python bench/bench_folder.py [--quick] [--n 1000] [--model smallcnn] [--data DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 2.0


def run(args) -> list[C.Result]:
    import numpy as np
    import torch

    from cellhub import create_model
    from cellhub.batch import predict_files
    from cellhub.images import collect_images, read_image
    from cellhub.predict import Predictor

    n = args.n or (200 if args.quick else 1000)
    rounds = args.repeats or (2 if args.quick else 3)
    results = []
    with C.tempdir(args.tmp, "cellhub-bench-folder-") as tmp:
        if args.data:
            files = C.real_images(args.data, n)
            folder = Path(tmp) / "images"
            folder.mkdir()
            for i, f in enumerate(files):  # symlinks: the folder holds exactly these n files
                (folder / f"{i:05d}{f.suffix.lower()}").symlink_to(f.resolve())
            source = f"real images from {args.data}"
        else:
            folder = C.write_blood_cell_folder(Path(tmp) / "images", n, by_class=False)
            source = "synthetic 320x240 JPEG"
        refs, skipped = collect_images([folder])
        if skipped or len(refs) != n:
            raise SystemExit(f"expected {n} images in {folder}, found {len(refs)} (skipped {skipped[:3]})")
        paths = [r.path for r in refs]
        for model_name in args.models:
            torch.manual_seed(0)
            pred = Predictor(create_model(model_name, "blood-cells", pretrained=False), device="cpu")
            out: dict[str, list] = {}

            def loop() -> None:
                out["loop"] = [pred.predict([read_image(p)], with_cam=False)[0] for p in paths]

            def batched() -> None:
                res = predict_files([pred], refs, batch_size=args.batch_size, workers=args.workers, with_cam=False)
                out["batched"] = [d[pred.name] for d in res.predictions]

            torch.manual_seed(0)
            old = Predictor(create_model(model_name, "blood-cells", pretrained=False), device="cpu")
            torch.manual_seed(0)  # the pre-fix path: the same weights, unfused, NCHW
            old.model = create_model(model_name, "blood-cells", pretrained=False).eval()

            def before() -> None:
                res = predict_files([old], refs, batch_size=args.batch_size, workers=args.workers, with_cam=False,
                                    forward_batch_size=args.batch_size)
                out["before"] = [d[old.name] for d in res.predictions]

            arms = {"loop": loop, "batched": batched}
            if not args.no_before:
                arms["before"] = before
            for q in (pred, old):
                q.predict([read_image(paths[0])], with_cam=False)  # load kernels once
            times = C.interleaved(arms, rounds=rounds, warmup=0)
            a = np.array([[p.probs[k] for k in pred.labels] for p in out["loop"]])
            b = np.array([[p.probs[k] for k in pred.labels] for p in out["batched"]])
            same = int((a.argmax(1) == b.argmax(1)).sum())
            if same != n:
                raise SystemExit(f"batched and per-image predictions disagree on {n - same} of {n} images")
            if "before" in out:
                c = np.array([[p.probs[k] for k in old.labels] for p in out["before"]])
                if int((a.argmax(1) == c.argmax(1)).sum()) != n:
                    raise SystemExit("NCHW predictions disagree with the per-image loop")
            ips = {k: n / C.median(v) for k, v in times.items()}
            ratio = ips["batched"] / ips["loop"]
            C.detail(f"{model_name}: loop {ips['loop']:.1f} img/s, batched {ips['batched']:.1f} img/s "
                     f"(x{ratio:.2f})"
                     + (f", before (NCHW, one forward per chunk of {args.batch_size}) {ips['before']:.1f} img/s "
                        f"(x{ips['before'] / ips['loop']:.2f})" if "before" in ips else "")
                     + f"; max |prob diff| {np.abs(a - b).max():.2e}; spread "
                     f"{max(C.spread(v) for v in times.values()):.2f}")
            results.append((model_name, ratio, ips))
    head = results[0]
    fields: dict = {"model": head[0], "batched_img_s": head[2]["batched"], "loop_img_s": head[2]["loop"]}
    if "before" in head[2]:
        fields["before"] = (f"{head[2]['before'] / head[2]['loop']:.2f}x({head[2]['before']:.0f}img/s,"
                            f"NCHW,forward_batch{args.batch_size})")
    for name, ratio, ips in results[1:]:
        fields[f"{name}"] = f"{ratio:.2f}x({ips['batched']:.0f}/{ips['loop']:.0f}img/s)" + (
            f",before={ips['before'] / ips['loop']:.2f}x" if "before" in ips else "")
    fields.update(n=n, images=source, batch=args.batch_size, repeats=rounds, device="cpu")
    fields.update(C.env_fields())
    fields["target"] = f">={TARGET}"
    fields["status"] = "PASS" if all(r[1] >= TARGET for r in results) else "FAIL"
    return [C.Result("folder", head[1], "img/s batched+parallel-decode / img/s per-image loop;", fields, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--n", type=int, default=None, help="images in the folder (default 1000; --quick 200)")
    p.add_argument("--models", nargs="+", default=["smallcnn"], help="models; the first is the headline")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: predict_files' own)")
    p.add_argument("--no-before", action="store_true", help="skip the pre-fix arm (NCHW, one forward per chunk)")
    p.add_argument("--data", default=None, help="use real images from this folder instead of synthetic ones")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
