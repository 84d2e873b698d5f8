"""Benchmarks `train-input` and `train-cpu-opts`: CPU training throughput (small CNN).

`train-input` -- epoch throughput (images/s) of the decode-once cache against a torchvision
``ImageFolder`` that decodes every JPEG every epoch. Both arms run the same training step
(AdamW + cross-entropy, as in ``cellhub.training.fit``), the same ``train_transform`` of the
model's data config, the same batch size and the same DataLoader worker count
(``training.pipeline.auto_workers``); only the dataset differs:

* ``imagefolder`` -- ``torchvision.datasets.ImageFolder(root, transform=train_transform)``  (baseline)
* ``cached``      -- ``cellhub.data.cache_resized`` (decoded once, built before timing; its build
                     time is reported) read through ``cellhub.data.ImageRowDataset``, the
                     dataset ``fit()`` trains on

ratio = cached img/s / imagefolder img/s (median over interleaved epochs); target >= 1.5.
``loader_only`` repeats the comparison without the model (the input pipeline alone).

`train-cpu-opts` -- the training step alone on fixed batches: eager NCHW (baseline) against
channels_last, ``torch.compile`` and both; ratio = best variant / eager NCHW, with the
compile time. (``fit()`` uses channels_last only on CUDA and does not compile.)

    python bench/bench_train_input.py [--quick] [--n 512] [--epochs 3] [--no-compile]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET = 1.5


def _step_fn(model, opt):
    import torch.nn.functional as F

    def step(x, y) -> None:
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_input(args) -> C.Result:
    import torch
    from datasets import ClassLabel, Dataset, Features, Image
    from torchvision.datasets import ImageFolder

    from cellhub import create_model, data, transforms
    from cellhub.training import pipeline

    n = args.n or (128 if args.quick else 512)
    epochs = args.epochs or (2 if args.quick else 3)
    with C.tempdir(args.tmp, "cellhub-bench-train-") as tmp:
        root = Path(tmp) / "images"
        if args.data:
            files = C.real_images(args.data, n)
            for i, f in enumerate(files):
                d = root / f.parent.name
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{i:05d}{f.suffix.lower()}").symlink_to(f.resolve())
            source = f"real images from {args.data}"
        else:
            C.write_blood_cell_folder(root, n)
            source = "synthetic 320x240 JPEG"
        torch.manual_seed(0)
        model = create_model("smallcnn", "blood-cells", pretrained=False)
        dcfg = transforms.resolve_data_config(model)
        train_tf = transforms.train_transform(dcfg)

        folder = ImageFolder(str(root), transform=train_tf)
        names = folder.classes
        hf = Dataset.from_dict(
            {"image": [p for p, _ in folder.samples], "label": [y for _, y in folder.samples]},
            features=Features(image=Image(), label=ClassLabel(names=names)),
        )
        size = int(dcfg["input_size"][-1])
        cache_hw = pipeline.cache_size(hf, size)
        t0 = time.perf_counter()
        cached = data.cache_resized(hf, cache_hw, Path(tmp) / "cache", progress=False)
        cache_s = time.perf_counter() - t0
        pixel_set = data.ImageRowDataset(cached, train_tf)

        workers = pipeline.auto_workers(False) if args.workers is None else args.workers
        bs = args.batch_size

        def loader(ds):
            return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True)

        loaders = {"imagefolder": loader(folder), "cached": loader(pixel_set)}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step = _step_fn(model, opt)
        model.train()
        seen: dict[str, int] = {}

        def epoch(name: str):
            def run() -> None:
                k = 0
                for x, y in loaders[name]:
                    step(x, y)
                    k += len(y)
                seen[name] = k
            return run

        def input_only(name: str):
            def run() -> None:
                for _x, _y in loaders[name]:
                    pass
            return run

        times = C.interleaved({k: epoch(k) for k in loaders}, rounds=epochs, warmup=1)
        in_times = C.interleaved({k: input_only(k) for k in loaders}, rounds=epochs, warmup=0)
    ips = {k: seen[k] / C.median(v) for k, v in times.items()}
    in_ips = {k: seen[k] / C.median(v) for k, v in in_times.items()}
    ratio = ips["cached"] / ips["imagefolder"]
    in_ratio = in_ips["cached"] / in_ips["imagefolder"]
    C.detail(f"train-input: imagefolder {ips['imagefolder']:.1f} img/s, cached {ips['cached']:.1f} img/s "
             f"(x{ratio:.2f}); input pipeline alone {in_ips['imagefolder']:.0f} -> {in_ips['cached']:.0f} img/s "
             f"(x{in_ratio:.2f}); cache built once in {cache_s:.1f} s for {n} images at {cache_hw}")
    fields = {
        "cached_img_s": ips["cached"], "imagefolder_img_s": ips["imagefolder"],
        "loader_only": f"{in_ratio:.2f}x({in_ips['imagefolder']:.0f}->{in_ips['cached']:.0f}img/s)",
        "cache_build_s": cache_s, "model": "smallcnn", "n": n, "images": source, "batch": bs,
        "workers": workers, "epochs": epochs, "device": "cpu",
    }
    fields.update(C.env_fields())
    fields.update(target=f">={TARGET}", status="PASS" if ratio >= TARGET else "FAIL")
    return C.Result("train-input", ratio, "epoch img/s decode-once cache / ImageFolder decoding every epoch;",
                    fields, C.command())


def cpu_opts(args) -> C.Result:
    import torch

    from cellhub import create_model

    bs = args.batch_size
    steps = args.steps or (3 if args.quick else 5)
    size = None
    variants = ["eager", "channels_last"]
    if not args.no_compile:
        variants += ["compile"] if args.quick else ["compile", "compile+channels_last"]
    arms = {}
    compile_s: dict[str, float] = {}
    for v in variants:
        torch.manual_seed(0)
        model = create_model("smallcnn", "blood-cells", pretrained=False).train()
        size = model.cellhub_config["pretrained_cfg"]["input_size"][-1]
        cl = "channels_last" in v
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run_model = torch.compile(model) if v.startswith("compile") else model
        step = _step_fn(run_model, opt)
        x = torch.randn(bs, 3, size, size)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 4, (bs,))
        t0 = time.perf_counter()
        step(x, y)  # first step: kernels, and the whole compilation for compiled variants
        step(x, y)
        compile_s[v] = time.perf_counter() - t0

        def arm(step=step, x=x, y=y) -> None:
            for _ in range(steps):
                step(x, y)
        arms[v] = arm
    times = C.interleaved(arms, rounds=args.repeats or (2 if args.quick else 5), warmup=0)
    ips = {k: bs * steps / C.median(v) for k, v in times.items()}
    best = max(ips, key=ips.get)
    ratio = ips[best] / ips["eager"]
    C.detail("train-cpu-opts: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in ips.items())
             + "; first two steps (incl. compile): " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()))
    fields = {f"{k}_img_s": v for k, v in ips.items()}
    fields.update({f"{k}_first_steps_s": compile_s[k] for k in compile_s if k.startswith("compile")})
    fields.update(best=best, model="smallcnn", px=size, batch=bs, steps=steps, device="cpu")
    fields.update(C.env_fields())
    return C.Result("train-cpu-opts", ratio, f"train step img/s best variant ({best}) / eager NCHW;", fields,
                    C.command())


def run(args) -> list[C.Result]:
    out = []
    if args.part in ("all", "input"):
        out.append(train_input(args))
    if args.part in ("all", "opts"):
        out.append(cpu_opts(args))
    return out


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--n", type=int, default=None, help="training images (default 512; --quick 128)")
    p.add_argument("--epochs", type=int, default=None, help="timed epochs per arm (default 3; --quick 2)")
    p.add_argument("--steps", type=int, default=None, help="train-cpu-opts: steps per timed round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: fit()'s own choice)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--part", choices=("all", "input", "opts"), default="all")
    p.add_argument("--data", default=None, help="class folders of real images to train on instead of synthetic ones")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
