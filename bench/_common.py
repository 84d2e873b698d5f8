"""Shared helpers for the benchmarks in ``bench/``: argument parsing, interleaved timing,
synthetic image folders, the one-line result format, and a description of the machine.

Every benchmark prints exactly one summary line per measurement in the form::

    NAME: ratio=X.XX <what the ratio is> key=value ... cmd="python bench/bench_NAME.py ..."

The ratio is always measured against a baseline named on the line, in the same run, with the
two arms interleaved (A, B, A, B, ...) so that load from other processes hits both alike.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/bench_x.py` from anywhere imports this checkout's cellhub
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# On a shared CPU, OpenMP's default busy-waiting makes torch 10-40x slower and erratic when other
# processes compete for the cores (measured: ResNet18 batch-1 forward 50 ms -> 200-2,400 ms at load 6
# on 2 cores). Benchmarks default to passive waiting; OMP_WAIT_POLICY=ACTIVE in the environment
# measures the other. Must be set before torch is imported.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")  # as the user started us (None: unset)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BLOOD_LABELS = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")


# ------------------------------------------------------------------------------------ results
@dataclass
class Result:
    """One benchmark's summary line."""

    name: str
    ratio: float | None
    #: what the ratio is, e.g. "(predict+CAM)/predict"
    what: str
    fields: dict[str, Any] = field(default_factory=dict)
    cmd: str = ""

    def line(self) -> str:
        ratio = "n/a" if self.ratio is None else f"{self.ratio:.2f}"
        parts = [f"{self.name}: ratio={ratio} {self.what}"]
        for k, v in self.fields.items():
            parts.append(f"{k}={_fmt(v)}")
        parts.append(f"cmd={shlex.quote(self.cmd)}" if self.cmd else "")
        return " ".join(p for p in parts if p)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "nan"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}" if abs(v) >= 1e-3 else f"{v:.2e}"
    s = str(v)
    return shlex.quote(s) if (" " in s or not s) else s


def command(argv: Sequence[str] | None = None) -> str:
    """The command that produced this run, relative to the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    try:
        script_s = script.resolve().relative_to(REPO).as_posix()
    except ValueError:
        script_s = str(script)
    return " ".join(["python", script_s, *map(shlex.quote, argv[1:])])


def emit(result: Result) -> None:
    print(result.line(), flush=True)


def detail(msg: str) -> None:
    """A detail line (indented, so it is never mistaken for a summary line)."""
    print(f"    {msg}", flush=True)


# ------------------------------------------------------------------------------------ options
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run; minutes on 2 cores)")
    p.add_argument("--repeats", type=int, default=None, help="rounds of interleaved measurement (default: per benchmark)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--tmp", default=None, help="folder for temporary images/checkpoints (default: a fresh temp dir)")
    return p


def run_benchmark(p: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Sequence[Result]],
                  argv: Sequence[str] | None = None) -> int:
    """Every benchmark's ``main``: parse, set torch's threads, run, print each summary line."""
    args = p.parse_args(argv)
    setup_torch(args.threads)
    for r in run(args):
        emit(r)
    return 0


def setup_torch(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))


def env_fields() -> dict[str, Any]:
    """Fields every CPU line carries: torch threads, OpenMP wait policy, load average at the end."""
    import torch

    return {"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_WAIT_POLICY", "default"),
            "load": load_average()}


def tempdir(base: str | None, prefix: str) -> tempfile.TemporaryDirectory:
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=base)


# ------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(arms: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every arm once per round, in turn, ``warmup + rounds`` times; seconds per call of the
    timed rounds. Interleaving makes background load fall on all arms alike."""
    out: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(warmup + rounds):
        for name, fn in arms.items():
            dt = timed(fn)
            if r >= warmup:
                out[name].append(dt)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100]."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median: how noisy the repeats were."""
    m = median(xs)
    return float((max(xs) - min(xs)) / m) if xs and m > 0 else float("nan")


# ------------------------------------------------------------------------------------ machine
def load_average() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux/macOS
        return "n/a"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load": load_average(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------------ images
def write_blood_cell_folder(root: str | Path, n: int, *, size: tuple[int, int] = (320, 240), fmt: str = "jpeg",
                            by_class: bool = True, seed: int = 0) -> Path:
    """``n`` synthetic white-cell crops (cellhub.synthetic), saved like Kaggle TRAIN JPEGs.

    ``by_class``: ``root/EOSINOPHIL/_0_i.jpeg`` (an ImageFolder tree); else all files in ``root``.
    """
    from cellhub import synthetic

    root = Path(root)
    for i in range(n):
        label = BLOOD_LABELS[i % len(BLOOD_LABELS)]
        folder = root / synthetic.BLOOD_FOLDERS[label] if by_class else root
        folder.mkdir(parents=True, exist_ok=True)
        img = synthetic.draw_blood_cell(label, size=size, seed=seed + i)
        if fmt == "jpeg":
            img.save(folder / f"_{i // len(BLOOD_LABELS)}_{i}.jpeg", quality=90)
        else:
            img.save(folder / f"cell_{i}.{fmt}")
    return root


def real_images(path: str | Path, n: int) -> list[Path]:
    """Up to ``n`` image files under ``path`` (e.g. /work/shared/data/blood-cells/...), evenly spread."""
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in exts and p.is_file())
    if not files:
        raise SystemExit(f"--data {path}: no image files found there")
    if len(files) <= n:
        return files
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]
