"""Benchmark `stain-norm`: what stain normalisation (``--stain-norm reinhard``) costs a prediction.

The bundled blood-cell model's shape (small CNN, 80 px, nucleus crop) twice, with the same weights:
without a ``stain_norm`` in its config (the baseline) and with ``reinhard`` (each image's CIELAB
moments mapped after the resize, ``cellhub.transforms.stain_normalise``). Each arm classifies the
same drawn smear images (640x480, one white cell each) with ``Predictor.predict(images, with_cam=False)`` (preprocessing
included), the arms interleaved.

ratio = median(with stain normalisation) / median(without); target <= 1.1 (the whole-field speed
budget of issue #11 has room for it only if it is small).

    python bench/bench_stainnorm.py [--quick] [--images N] [--repeats N]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 1.1


def run(args) -> list[C.Result]:
    import torch

    from cellhub import create_model, transforms
    from cellhub.predict import Predictor
    from cellhub.synthetic import draw_smear

    n = args.images or (16 if args.quick else 64)
    rounds = args.repeats or (5 if args.quick else 15)
    images = [draw_smear(C.BLOOD_LABELS[i % 4], seed=i)[0] for i in range(n)]
    torch.manual_seed(0)
    plain = create_model("smallcnn", list(C.BLOOD_LABELS), pretrained=False, image_size=80).eval()
    plain.cellhub_config["cell_crop"] = transforms.cell_crop_spec("nucleus")
    normed = create_model("smallcnn", list(C.BLOOD_LABELS), pretrained=False, image_size=80).eval()
    normed.load_state_dict(plain.state_dict())
    normed.cellhub_config.update(cell_crop=plain.cellhub_config["cell_crop"],
                                 stain_norm=transforms.stain_norm_spec("reinhard"))
    arms = {name: Predictor(m) for name, m in (("plain", plain), ("stain-norm", normed))}
    times = C.interleaved({k: (lambda p=p: p.predict(images, with_cam=False)) for k, p in arms.items()}, rounds)
    base, new = C.median(times["plain"]), C.median(times["stain-norm"])
    ratio = new / base
    C.detail(f"{n} drawn smear images ({images[0].size[0]}x{images[0].size[1]} px): without {1000 * base / n:.2f} ms/img, "
             f"with stain normalisation {1000 * new / n:.2f} ms/img")
    fields = {"ms_per_img": f"{1000 * base / n:.2f}/{1000 * new / n:.2f}", "images": n, "repeats": rounds,
              **C.env_fields(), "target": f"<={TARGET}", "status": "PASS" if ratio <= TARGET else "FAIL"}
    return [C.Result("stain-norm", ratio, "predict with stain normalisation / without;", fields, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--images", type=int, default=None, help="drawn images per round (default 64; --quick 16)")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
