"""Benchmark `cam`: what a Grad-CAM costs on top of a prediction (batch 1, CPU).

For each model (ResNet18 at 224 px, the small CNN at its default 96 px), with
``cellhub.predict.Predictor`` on a 320x240 synthetic white-cell crop, interleaved:

* ``predict``      -- ``Predictor.predict([img], with_cam=False)``            (the baseline)
* ``predict+cam``  -- ``Predictor.predict([img], with_cam=True)``             (what the app does)
* ``naive``        -- ``Predictor.predict([img], with_cam=False)`` followed by a separate
                      pytorch-grad-cam pass (``cellhub.cam.gradcam(..., method="gradcam")``)

ratio = median(predict+cam) / median(predict); target <= 1.15 for GAP+linear heads.
The CAM is checked against pytorch-grad-cam's ``GradCAM`` run directly on the same input and
class: Pearson correlation >= 0.999 on every test image.

    python bench/bench_cam.py [--quick] [--models resnet18 smallcnn] [--repeats N]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 1.15
MIN_CORR = 0.999


def reference_gradcam(model, x, class_idx: int):
    """pytorch-grad-cam's GradCAM, called directly (independent of cellhub.cam)."""
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cellhub.models import cam_layer

    with torch.enable_grad(), GradCAM(model=model, target_layers=[cam_layer(model)]) as engine:
        maps = engine(input_tensor=x.clone().requires_grad_(True), targets=[ClassifierOutputTarget(class_idx)])
    model.zero_grad(set_to_none=True)
    return np.asarray(maps[0], dtype=np.float64)


def correlation(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b, atol=1e-6) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def measure(name: str, rounds: int, n_check: int) -> dict:
    import torch

    from cellhub import cam as cam_lib
    from cellhub import create_model, synthetic
    from cellhub.cam import supports_exact_cam
    from cellhub.predict import Predictor

    torch.manual_seed(0)
    model = create_model(name, "blood-cells", pretrained=False)
    pred = Predictor(model, device="cpu")
    imgs = [synthetic.draw_blood_cell(C.BLOOD_LABELS[i % 4], seed=100 + i) for i in range(max(n_check, 1))]
    img = imgs[0]

    def naive() -> None:
        p = pred.predict([img], with_cam=False)[0]
        x = pred.preprocess([img])
        cam_lib.gradcam(pred.model, x, pred.labels.index(p.label), method="gradcam")

    times = C.interleaved(
        {
            "predict": lambda: pred.predict([img], with_cam=False),
            "predict+cam": lambda: pred.predict([img], with_cam=True),
            "naive": naive,
        },
        rounds=rounds,
        warmup=3,
    )
    corrs = []
    for im in imgs:
        p = pred.predict([im], with_cam=True)[0]
        ref = reference_gradcam(pred.model, pred.preprocess([im]), pred.labels.index(p.label))
        corrs.append(correlation(p.cam, ref))
    med = {k: C.median(v) for k, v in times.items()}
    return {
        "model": name,
        "exact": supports_exact_cam(pred.model),
        "predict_ms": 1000 * med["predict"],
        "cam_ms": 1000 * med["predict+cam"],
        "naive_ms": 1000 * med["naive"],
        "ratio": med["predict+cam"] / med["predict"],
        "naive_ratio": med["naive"] / med["predict"],
        "spread": max(C.spread(v) for v in times.values()),
        "corr_min": min(corrs),
    }


def run(args) -> list[C.Result]:
    rounds = args.repeats or (12 if args.quick else 60)
    n_check = 2 if args.quick else 8
    rows = []
    for name in args.models:
        r = measure(name, rounds, n_check)
        rows.append(r)
        C.detail(
            f"{name}: predict {r['predict_ms']:.1f} ms, predict+CAM {r['cam_ms']:.1f} ms "
            f"(x{r['ratio']:.3f}), naive forward+pytorch-grad-cam {r['naive_ms']:.1f} ms (x{r['naive_ratio']:.2f}), "
            f"exact CAM: {r['exact']}, min corr vs pytorch-grad-cam {r['corr_min']:.5f} over {n_check} images, "
            f"spread {r['spread']:.2f}"
        )
    worst = max(rows, key=lambda r: r["ratio"])
    ok = all(r["ratio"] <= TARGET for r in rows if r["exact"]) and all(r["corr_min"] >= MIN_CORR for r in rows)
    fields: dict = {}
    for r in rows:
        fields[f"{r['model']}"] = f"{r['ratio']:.3f}"
    for r in rows:
        fields[f"{r['model']}_ms"] = f"{r['predict_ms']:.1f}/{r['cam_ms']:.1f}/{r['naive_ms']:.1f}"
    for r in rows:
        fields[f"naive_{r['model']}"] = f"{r['naive_ratio']:.2f}x"
    fields["corr_min"] = f"{min(r['corr_min'] for r in rows):.5f}"
    fields["batch"] = 1
    fields["device"] = "cpu"
    fields["repeats"] = rounds
    fields.update(C.env_fields())
    fields["target"] = f"<={TARGET}"
    fields["status"] = "PASS" if ok else "FAIL"
    return [C.Result("cam", worst["ratio"], "(predict+CAM)/predict worst model;", fields, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--models", nargs="+", default=["resnet18", "smallcnn"], help="model names (cellhub registry)")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
