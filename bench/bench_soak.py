"""Benchmark `soak`: the app under sustained load, a burst of clients, and a SIGTERM.

    python bench/bench_soak.py --minutes 30              # the recorded run (bench/RESULTS.md)
    python bench/bench_soak.py --quick                   # 2 minutes, 16-client burst: a smoke run

What it does, against ``python app.py`` (the bundled checkpoints, a fresh process, its upload and
output cache in a folder this benchmark watches):

1. ``--clients`` gradio_client clients send single crops without pause, alternating blood-cell and
   malaria crops (real ones with ``--data``, else drawn); every ``--zip-every``-th request of client 0
   is a .zip of ``--zip-size`` crops to ``/predict_batch``. Each minute it prints requests, errors,
   p50/p95 latency, the server's RSS and the size of its cache folder.
2. ``--burst`` clients each send ``--burst-requests`` requests at once: how many were served, how
   many refused ("queue is full"), the longest wait, and the largest queue place a client was told.
3. SIGTERM while a request runs: the exit code, whether that request was answered, whether the
   server's temporary folder is gone.

Summary line: ``soak: ratio=<RSS at the end / RSS at minute 5 (or the first minute after warm-up)>``,
the baseline being the same server's own RSS after warm-up.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_app import free_port, wait_ready  # noqa: E402

from cellhub.serving import folder_bytes  # noqa: E402


def _crops(data: str | None, tmp: Path, n: int = 40) -> tuple[list[Path], list[Path]]:
    """(blood-cell crops, malaria crops) as files."""
    if data:
        root = Path(data)
        blood = C.real_images(root / "blood-cells" / "dataset2-master", n)
        malaria = C.real_images(root / "malaria", n)
        return blood, malaria
    from cellhub import synthetic

    blood, malaria = [], []
    labels = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
    for i in range(n):
        p = tmp / f"blood-{i}.png"
        synthetic.draw_blood_cell(labels[i % 4], seed=i).save(p)
        blood.append(p)
        q = tmp / f"malaria-{i}.png"
        synthetic.draw_malaria_cell("parasitized" if i % 2 else "uninfected", size=128, seed=i)[0].save(q)
        malaria.append(q)
    return blood, malaria


def _zip(paths: list[Path], out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in paths:
            zf.write(p, p.name)
    return out


def _rss(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        return (proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))) / 2**20
    except psutil.Error:
        return float("nan")


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[float, float, bool, str]] = []  # (time, latency, ok, error)

    def add(self, t: float, latency: float, ok: bool, err: str = "") -> None:
        with self.lock:
            self.events.append((t, latency, ok, err))

    def window(self, t0: float, t1: float) -> list[tuple[float, float, bool, str]]:
        with self.lock:
            return [e for e in self.events if t0 <= e[0] < t1]


def _client_loop(url: str, k: int, stop: threading.Event, rec: Recorder, blood: list[Path], malaria: list[Path],
                 zip_path: Path, zip_every: int) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    i = 0
    while not stop.is_set():
        i += 1
        t0 = time.perf_counter()
        try:
            if k == 0 and zip_every and i % zip_every == 0:
                client.predict([handle_file(str(zip_path))], "blood-cells", api_name="/predict_batch")
            elif i % 2:
                client.predict(handle_file(str(blood[i % len(blood)])), "blood-cells", api_name="/predict")
            else:
                client.predict(handle_file(str(malaria[i % len(malaria)])), "malaria", api_name="/predict")
            rec.add(time.time(), time.perf_counter() - t0, True)
        except Exception as exc:  # an error is a result here, not a crash
            rec.add(time.time(), time.perf_counter() - t0, False, f"{type(exc).__name__}: {str(exc)[:120]}")


def _burst(url: str, n_clients: int, per_client: int, image: Path) -> dict[str, float]:
    """``n_clients`` clients submit ``per_client`` jobs each at the same moment."""
    from gradio_client import Client, handle_file

    clients = [Client(url, verbose=False) for _ in range(n_clients)]
    barrier = threading.Barrier(n_clients)
    served, refused, other = [0], [0], [0]
    waits: list[float] = []
    ranks: list[int] = []
    lock = threading.Lock()

    def one(c) -> None:
        barrier.wait()
        jobs = [(time.perf_counter(), c.submit(handle_file(str(image)), "blood-cells", api_name="/predict"))
                for _ in range(per_client)]
        for t0, job in jobs:
            best_rank = -1
            while not job.done():
                st = job.status()
                if getattr(st, "rank", None) is not None:
                    best_rank = max(best_rank, int(st.rank))
                time.sleep(0.05)
            try:
                job.result()
                with lock:
                    served[0] += 1
                    waits.append(time.perf_counter() - t0)
                    ranks.append(best_rank)
            except Exception as exc:
                with lock:
                    (refused if "queue is full" in str(exc).lower() else other)[0] += 1

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"burst_served": served[0], "burst_refused": refused[0], "burst_errors": other[0],
            "burst_max_wait_s": max(waits) if waits else float("nan"),
            "burst_max_rank": max(ranks) if ranks else -1}


def _sigterm(proc: subprocess.Popen, url: str, image: Path, tmp_root: Path) -> dict[str, object]:
    """SIGTERM while one request runs: was it answered, what exit code, is the temp folder gone?"""
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    client = Client(url, verbose=False)
    job = client.submit(handle_file(str(image)), "blood-cells", api_name="/predict")
    deadline = time.time() + 30
    while job.status().code not in (Status.PROCESSING, Status.FINISHED) and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)  # the request is running now
    try:
        job.result(timeout=30)
        answered = True
    except Exception:
        answered = False
    code = proc.wait(timeout=60)
    left = [p.name for p in tmp_root.glob("cellhub-app-*")]
    return {"sigterm_exit": code, "sigterm_inflight_answered": answered, "temp_left": len(left)}


def run(args) -> list[C.Result]:
    minutes = 2.0 if args.quick and args.minutes is None else (args.minutes or 30.0)
    burst = args.burst if args.burst is not None else (16 if args.quick else 64)
    with C.tempdir(args.tmp, "cellhub-soak-") as tmp_name:
        tmp = Path(tmp_name)
        blood, malaria = _crops(args.data, tmp)
        zip_path = _zip(blood[: args.zip_size], tmp / "batch.zip")
        cache = tmp / "gradio-cache"
        app_tmp = tmp / "app-tmp"
        app_tmp.mkdir()
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        env = dict(os.environ, GRADIO_TEMP_DIR=str(cache), TMPDIR=str(app_tmp))
        cmd = [sys.executable, "app.py", "--port", str(port), "--cache-max-mb", str(args.cache_max_mb)]
        log = tmp / "app.log"
        with open(log, "w") as fh:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=str(C.REPO), stdout=fh, stderr=subprocess.STDOUT, env=env)
            try:
                ready_s = wait_ready(url, proc, t0, log)
                C.detail(f"soak: app ready in {ready_s:.1f} s; {args.clients} clients for {minutes:g} min")
                rec, stop = Recorder(), threading.Event()
                workers = [threading.Thread(target=_client_loop, daemon=True,
                                            args=(url, k, stop, rec, blood, malaria, zip_path, args.zip_every))
                           for k in range(args.clients)]
                for w in workers:
                    w.start()
                start = time.time()
                rows = []
                for minute in range(1, int(round(minutes)) + 1):
                    time.sleep(max(0.0, start + 60 * minute - time.time()))
                    ev = rec.window(start + 60 * (minute - 1), start + 60 * minute)
                    lat = [e[1] for e in ev if e[2]]
                    row = {"minute": minute, "requests": len(ev), "errors": sum(not e[2] for e in ev),
                           "p50_ms": C.percentile(lat, 50) * 1000 if lat else float("nan"),
                           "p95_ms": C.percentile(lat, 95) * 1000 if lat else float("nan"),
                           "rss_mb": _rss(proc.pid), "cache_mb": folder_bytes(cache) / 2**20}
                    rows.append(row)
                    print("soak-minute: " + " ".join(f"{k}={C._fmt(v)}" for k, v in row.items()), flush=True)
                stop.set()
                for w in workers:
                    w.join(timeout=120)
                errors = [e[3] for e in rec.events if not e[2]]
                burst_fields = _burst(url, burst, args.burst_requests, blood[0])
                C.detail(f"soak: burst {burst_fields}")
                end = _sigterm(proc, url, blood[1], app_tmp)
            finally:
                if proc.poll() is None:
                    proc.kill()
    base_row = rows[4] if len(rows) >= 5 else rows[min(1, len(rows) - 1)]
    rss = [r["rss_mb"] for r in rows]
    after = [r["rss_mb"] for r in rows[rows.index(base_row):]]
    fields = {
        "minutes": minutes, "clients": args.clients, "requests": len(rec.events), "errors": len(errors),
        "first_error": errors[0] if errors else "none",
        "p50_ms": C.percentile([e[1] for e in rec.events if e[2]], 50) * 1000,
        "p95_ms": C.percentile([e[1] for e in rec.events if e[2]], 95) * 1000,
        "rss_start_mb": rss[0], "rss_base_mb": base_row["rss_mb"], "rss_end_mb": rss[-1],
        "rss_band_after_base": f"{min(after) / base_row['rss_mb'] - 1:+.1%}..{max(after) / base_row['rss_mb'] - 1:+.1%}",
        # the spread of RSS from the base minute on, as +-% around its middle (the "within +-5%")
        "rss_halfspread_pct": 100 * (max(after) - min(after)) / (max(after) + min(after)),
        "cache_max_mb": max(r["cache_mb"] for r in rows), "cache_cap_mb": args.cache_max_mb,
        **burst_fields, "burst_clients": burst, "burst_requests_each": args.burst_requests, **end,
        "ready_s": ready_s, "load": C.load_average(),
    }
    ratio = rss[-1] / base_row["rss_mb"]
    what = f"server RSS end / RSS at minute {base_row['minute']} (the same server after warm-up);"
    return [C.Result("soak", ratio, what, fields, C.command())]


def main(argv=None) -> int:
    p = C.parser(__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=None, help="length of the sustained load (default 30; --quick 2)")
    p.add_argument("--clients", type=int, default=4, help="clients sending without pause (default 4)")
    p.add_argument("--zip-every", type=int, default=5, help="client 0 sends a zip every N-th request (0: never)")
    p.add_argument("--zip-size", type=int, default=40, help="crops in that zip (default 40)")
    p.add_argument("--burst", type=int, default=None, help="clients of the burst (default 64; --quick 16)")
    p.add_argument("--burst-requests", type=int, default=2, help="requests each burst client sends at once")
    p.add_argument("--cache-max-mb", type=float, default=400, help="the app's --cache-max-mb (default 400)")
    p.add_argument("--data", default=None, help="folder with blood-cells/ and malaria/ (../shared/data); else drawn crops")
    args = p.parse_args(argv)
    for r in run(args):
        C.emit(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
