"""Benchmark `gpu-train`: ResNet18 / ResNet50 training throughput at 224 px on one GPU.

For each model (``cellhub.create_model(name, "blood-cells", pretrained=False)``), the training
step of ``cellhub.training.fit`` (forward, float32 cross-entropy, backward, AdamW step) on
batches already on the device, so that the figure is the model's compute, not the input
pipeline, interleaved:

* ``fp32``          -- float32, NCHW, eager                                    (the baseline)
* ``bf16+cl``       -- bf16 autocast + channels_last, eager (what ``fit()`` does on CUDA)
* ``bf16+cl+compile`` -- the same under ``torch.compile``

ratio = best variant img/s / fp32 img/s for ResNet18 (ResNet50's on the line too).
``fit_input_limit_img_s`` is the other half of the story: how many images/s ``fit()``'s CPU input
pipeline (``transforms.train_transform`` on decode-once pixels, in ``_auto_workers(True)``
DataLoader workers) can deliver on this machine -- the ceiling for end-to-end training.
Targets on one H100: ratio >= 2.5 and >= 6,000 img/s for ResNet18.

Without a GPU this runs a CPU smoke test of the same code (ResNet18, small batch, few steps,
no compile) and says plainly that no GPU was measured; ``--quick`` is that smoke test on any machine.

    python bench/bench_gpu_train.py [--quick] [--models resnet18 resnet50] [--batch-size 256] [--steps 30]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_RATIO = 2.5
TARGET_IMG_S = 6000.0


def make_step(name: str, variant: str, device, batch: int, size: int):
    import torch
    import torch.nn.functional as F

    from cellhub import create_model

    torch.manual_seed(0)
    model = create_model(name, "blood-cells", pretrained=False).to(device).train()
    cl = "cl" in variant.split("+")
    bf16 = variant.startswith("bf16")
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    fwd = torch.compile(model) if variant.endswith("compile") else model
    x = torch.randn(batch, 3, size, size, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def feed_rate(name: str, n: int = 60) -> tuple[float, int]:
    """Images/s one CPU core gets through ``fit()``'s train transform on decode-once cached pixels
    at this model's input size, and the worker count ``fit()`` would use on CUDA here."""
    import numpy as np

    from cellhub import create_model, transforms
    from cellhub.training import pipeline

    dcfg = transforms.resolve_data_config(create_model(name, "blood-cells", pretrained=False))
    size = int(dcfg["input_size"][-1])
    tf = transforms.train_transform(dcfg)
    px = np.random.default_rng(0).integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)  # 320x240 aspect
    for _ in range(3):
        tf(px)
    t0 = time.perf_counter()
    for _ in range(n):
        tf(px)
    return n / (time.perf_counter() - t0), pipeline.auto_workers(True)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, variants: list[str], device, batch: int, size: int, steps: int, rounds: int) -> dict:
    import torch

    arms, first = {}, {}
    for v in variants:
        step = make_step(name, v, device, batch, size)
        t0 = time.perf_counter()
        for _ in range(3 if device.type == "cuda" else 1):  # warm-up (and compilation)
            step()
        sync(device)
        first[v] = time.perf_counter() - t0

        def arm(step=step) -> None:
            for _ in range(steps):
                step()
            sync(device)
        arms[v] = arm
    times = C.interleaved(arms, rounds=rounds, warmup=0)
    ips = {k: batch * steps / C.median(v) for k, v in times.items()}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ips": ips, "first": first}


def run(args) -> list[C.Result]:
    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if on_gpu else "cpu")
    smoke = args.quick or not on_gpu
    size = args.image_size or (224 if not smoke else 224)
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    if smoke:
        models = args.models[:1]
        batch = args.batch_size or (32 if on_gpu else 4)
        steps = args.steps or (5 if on_gpu else 2)
        rounds = args.repeats or 2
        variants = ["fp32", "bf16+cl"] + (["bf16+cl+compile"] if on_gpu and not args.no_compile else [])
    else:
        models = args.models
        batch = args.batch_size or 256
        steps = args.steps or 30
        rounds = args.repeats or 3
        variants = ["fp32", "bf16+cl"] + ([] if args.no_compile else ["bf16+cl+compile"])
    res = {}
    for name in models:
        b = batch if name == "resnet18" or args.batch_size else max(1, batch // 2)
        r = measure(name, variants, device, b, size, steps, rounds)
        res[name] = (r, b)
        C.detail(f"{name} batch {b} at {size}px on {device}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in r["ips"].items())
                 + "; warm-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["first"].items()))
    per_core, workers = feed_rate(models[0], 20 if smoke else 100)
    C.detail(f"input pipeline: fit()'s train_transform at {size}px runs at {per_core:.0f} img/s per CPU core; "
             f"with the {workers} DataLoader workers fit() uses on CUDA here it feeds at most "
             f"~{per_core * workers:.0f} img/s")
    head_name = "resnet18" if "resnet18" in res else models[0]
    head = res[head_name][0]["ips"]
    best = max(head, key=head.get)
    ratio = head[best] / head["fp32"]
    fields: dict = {"best": best, f"{head_name}_best_img_s": head[best], f"{head_name}_fp32_img_s": head["fp32"]}
    for name, (r, b) in res.items():
        if name != head_name:
            nb = max(r["ips"], key=r["ips"].get)
            fields[name] = f"{r['ips'][nb] / r['ips']['fp32']:.2f}x({r['ips']['fp32']:.0f}->{r['ips'][nb]:.0f}img/s,{nb})"
    fields["fit_input_limit_img_s"] = f"{per_core * workers:.0f}({workers}workers_x_{per_core:.0f}img/s/core)"
    fields.update(px=size, batch=batch, steps=steps, repeats=rounds, device=str(device))
    if on_gpu:
        fields["gpu"] = torch.cuda.get_device_name(0)
        ok = ratio >= TARGET_RATIO and head[best] >= TARGET_IMG_S
        fields.update(target=f">={TARGET_RATIO}x_and_>={TARGET_IMG_S:.0f}img/s_resnet18",
                      status=("PASS" if ok else "FAIL") + ("(smoke:quick)" if smoke else ""))
    else:
        fields.update(C.env_fields())
        fields["status"] = "NO-GPU:cpu-smoke-run-only(no_GPU_was_measured)"
    what = "train img/s best (bf16+channels_last[+compile]) / fp32 NCHW eager;"
    if not on_gpu:
        what = "NO GPU MEASURED - CPU smoke run of the GPU benchmark: " + what
    return [C.Result("gpu-train", ratio, what, fields, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--batch-size", type=int, default=None, help="ResNet18 batch (ResNet50 gets half); default 256")
    p.add_argument("--image-size", type=int, default=None, help="default 224")
    p.add_argument("--steps", type=int, default=None, help="steps per timed round (default 30)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cpu", action="store_true", help="force the CPU smoke run even when a GPU is present")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
