"""Benchmark `app`: the Gradio demo end to end.

* ``ready_s``  -- seconds from ``python app.py ...`` (a fresh process) until its HTTP server answers.
* latency of one upload (``/predict`` through ``gradio_client``: one cell image through every
  loaded model of the task, each with its Grad-CAM overlay) -- p50 / p95 alone, and under 8
  concurrent clients (each its own ``gradio_client.Client``), with the requests/s served.

The baseline is the same work done in-process, without the server: ``read_image`` +
``Predictor.predict([img], with_cam=True)`` + ``Predictor.overlay`` for every model of the task
(what the app's handler calls). ratio = p50 through the app (one client) / p50 in-process, i.e.
the cost of the web layer (upload, queue, PNG encoding of the overlays, download).
``no_model_roundtrip_p50_ms`` is the floor of that layer: an upload to an unknown task, which the
app rejects with ``gr.Error`` before any model runs.

Models: ``--models DIR...`` (checkpoint folders or Hub ids), else the bundled ``checkpoints/``
when it has any (unless ``--untrained`` names architectures), else small *untrained* checkpoints written to a temp dir with
``cellhub.create_model`` + ``cellhub.hub.save_pretrained`` (the line says which).

    python bench/bench_app.py [--quick] [--models DIR ...] [--clients 8] [--requests 30]
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

READY_TIMEOUT = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoints(root: Path, names: list[str]) -> list[Path]:
    """Small untrained checkpoints (task blood-cells), written through the real save path."""
    import torch

    from cellhub import create_model
    from cellhub.hub import save_pretrained

    out = []
    for name in names:
        torch.manual_seed(0)
        model = create_model(name, "blood-cells", pretrained=False)
        out.append(save_pretrained(model, root / f"{name}-untrained"))
    return out


def wait_ready(url: str, proc: subprocess.Popen, t0: float, log: Path) -> float:
    while time.perf_counter() - t0 < READY_TIMEOUT:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with code {proc.returncode} before it was ready; log:\n"
                             + log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"app.py was not ready after {READY_TIMEOUT:.0f} s; log:\n" + log.read_text()[-3000:])


def run(args) -> list[C.Result]:
    from gradio_client import Client, handle_file

    from cellhub import synthetic
    from cellhub.images import read_image
    from cellhub.predict import load_predictors

    n_req = args.requests or (8 if args.quick else 40)
    per_client = args.per_client or (2 if args.quick else 6)
    bundled = sorted(p for p in (C.REPO / "checkpoints").glob("*/config.json")) if not (args.models or args.untrained) else []
    with C.tempdir(args.tmp, "cellhub-bench-app-") as tmp:
        tmp = Path(tmp)
        app_args: list[str] = []
        if args.models:
            sources = list(args.models)
            what_models = "given"
            app_args = ["--no-bundled", "--models", *sources]
        elif bundled:
            sources = [str(p.parent) for p in bundled]
            what_models = "bundled"
        else:
            names = args.untrained or (["smallcnn", "resnet18"] if args.quick else ["smallcnn", "resnet18", "resnet50"])
            sources = [str(p) for p in make_checkpoints(tmp / "ckpt", names)]
            what_models = "untrained-temp(" + "+".join(names) + ")"
            app_args = ["--no-bundled", "--models", *sources]

        # in-process baseline, and the task with the most models
        predictors, failures = load_predictors(sources, device="cpu")
        if failures:
            raise SystemExit(f"could not load {failures}")
        by_task: dict[str, list] = {}
        for p in predictors:
            by_task.setdefault(str(p.task), []).append(p)
        task = args.task or max(by_task, key=lambda t: len(by_task[t]))
        task_preds = by_task[task]
        img_path = tmp / "cell.png"
        if task == "malaria":
            synthetic.draw_malaria_cell("parasitized", size=128, seed=3)[0].save(img_path)
        else:
            synthetic.draw_blood_cell("neutrophil", seed=3).save(img_path)

        def direct() -> None:
            img = read_image(img_path)
            for p in task_preds:
                pred = p.predict([img], with_cam=True)[0]
                if pred.cam is not None:
                    p.overlay(img, pred)

        direct()
        direct_t = C.interleaved({"direct": direct}, rounds=max(5, n_req // 2), warmup=1)["direct"]
        del predictors
        task_preds = []  # free the models before the app loads its own (direct() is not called again)

        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        log = tmp / "app.log"
        env = dict(os.environ)
        # start the app as users do: the harness' own OpenMP default is not passed on
        if C.USER_OMP_WAIT_POLICY is None:
            env.pop("OMP_WAIT_POLICY", None)
        if args.omp_passive:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        cmd = [sys.executable, str(C.REPO / "app.py"), *app_args, "--port", str(port)]
        if args.app_concurrency:
            cmd += ["--concurrency", str(args.app_concurrency)]
        with open(log, "w") as fh:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=str(C.REPO), stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            ready_s = wait_ready(url, proc, t0, log)
            client = Client(url, verbose=False)
            image = handle_file(str(img_path))

            def one(c, img=image) -> float:
                t = time.perf_counter()
                out = c.predict(img, task, api_name="/predict")
                dt = time.perf_counter() - t
                if not isinstance(out, (list, tuple)) or len(out) < 2 + 3 * len(by_task[task]):
                    raise SystemExit(f"unexpected /predict output: {str(out)[:300]}")
                return dt

            one(client)  # first request: lazy imports, kernels
            single = [one(client) for _ in range(n_req)]

            def rejected() -> float:
                # the web layer alone: upload + queue + an immediate gr.Error (unknown task, no model runs)
                t = time.perf_counter()
                try:
                    client.predict(image, "no-such-task", api_name="/predict")
                except Exception:  # noqa: BLE001 - gradio_client raises AppError for gr.Error
                    return time.perf_counter() - t
                raise SystemExit("app.py accepted an unknown task; the floor measurement is invalid")

            floor = [rejected() for _ in range(max(3, n_req // 2))]

            clients = [Client(url, verbose=False) for _ in range(args.clients)]
            client_images = [image] * args.clients
            if args.distinct_images:  # each client uploads its own image (no identical outputs)
                client_images = []
                for i in range(args.clients):
                    path = tmp / f"cell-{i}.png"
                    synthetic.draw_blood_cell(C.BLOOD_LABELS[i % 4], seed=1000 + i).save(path)
                    client_images.append(handle_file(str(path)))
            lat: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()

            def worker(c, img) -> None:
                for _ in range(per_client):
                    try:
                        dt = one(c, img)
                    except Exception as exc:  # noqa: BLE001 - report, do not hang the benchmark
                        with lock:
                            errors.append(repr(exc)[:200])
                        continue
                    with lock:
                        lat.append(dt)

            threads = [threading.Thread(target=worker, args=(c, im)) for c, im in zip(clients, client_images)]
            tc = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - tc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    for e in sorted(set(errors)):
        C.detail(f"concurrent request failed ({errors.count(e)}x): {e}")
    p50, p95 = C.percentile(single, 50), C.percentile(single, 95)
    d50 = C.median(direct_t)
    c50, c95 = C.percentile(lat, 50), C.percentile(lat, 95)
    ratio = p50 / d50
    n_models = len(by_task[task])
    f50 = C.percentile(floor, 50)
    C.detail(f"app: ready in {ready_s:.1f} s; /predict ({n_models} models with CAM, task {task}) "
             f"p50 {p50 * 1000:.0f} ms p95 {p95 * 1000:.0f} ms alone; in-process {d50 * 1000:.0f} ms; "
             f"upload+queue+error round trip (no model) {f50 * 1000:.0f} ms; "
             f"{args.clients} clients: p50 {c50 * 1000:.0f} ms p95 {c95 * 1000:.0f} ms, {len(lat) / wall:.2f} req/s")
    fields = {
        "ready_s": ready_s, "p50_ms": p50 * 1000, "p95_ms": p95 * 1000, "inproc_p50_ms": d50 * 1000,
        "no_model_roundtrip_p50_ms": f50 * 1000,
        f"p50_{args.clients}clients_ms": c50 * 1000, f"p95_{args.clients}clients_ms": c95 * 1000,
        f"req_s_{args.clients}clients": len(lat) / wall, "failed": len(errors),
        "models": what_models, "n_models": n_models, "task": task, "requests": n_req,
        "app_omp": env.get("OMP_WAIT_POLICY", "default"),
        "concurrent_images": "distinct" if args.distinct_images else "identical", "device": "cpu", "load": C.load_average(),
    }
    return [C.Result("app", ratio, "p50 upload latency through app.py+gradio_client / same models in-process;",
                     fields, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--models", nargs="+", default=None, metavar="ID_OR_DIR", help="checkpoints to serve")
    p.add_argument("--untrained", nargs="+", default=None, help="architectures for the temp untrained checkpoints")
    p.add_argument("--task", default=None, help="task to upload to (default: the one with most models)")
    p.add_argument("--requests", type=int, default=None, help="sequential requests (default 40; --quick 8)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--per-client", type=int, default=None, help="requests per concurrent client (default 6; --quick 2)")
    p.add_argument("--app-concurrency", type=int, default=None, help="pass --concurrency N to app.py")
    p.add_argument("--distinct-images", action="store_true",
                   help="each concurrent client uploads its own image (default: all upload the same one, the worst "
                   "case for gradio's output cache)")
    p.add_argument("--omp-passive", action="store_true",
                   help="start app.py with OMP_WAIT_POLICY=PASSIVE (default: the environment as users have it)")
    return C.run_benchmark(p, run, argv)


if __name__ == "__main__":
    sys.exit(main())
