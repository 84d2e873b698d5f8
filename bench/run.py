"""Run every cellhub benchmark and print one summary line per benchmark.

    python bench/run.py [--quick] [--only cam folder ...] [--data DIR] [--markdown bench/RESULTS.md]

Each benchmark runs as its own process (``python bench/bench_NAME.py``), so one benchmark's
threads, compiled kernels or server cannot disturb the next. Their summary lines have the form

    NAME: ratio=X.XX <what the ratio is> key=value ... cmd='python bench/bench_NAME.py ...'

``--quick`` uses small sizes and few repeats and finishes in under 5 minutes on two CPU cores.
``--markdown FILE`` appends the machine, the command, the date and the lines to FILE.
See bench/README.md for what each benchmark measures and its baseline.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HERE = Path(__file__).resolve().parent
#: benchmark name -> (script, extra args in --quick mode)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "cam": ("bench_cam.py", []),
    "folder": ("bench_folder.py", []),
    "train-input": ("bench_train_input.py", ["--no-compile"]),
    "gpu-train": ("bench_gpu_train.py", []),
    "app": ("bench_app.py", []),
    "soak": ("bench_soak.py", ["--minutes", "1"]),
    "groups": ("bench_groups.py", []),
    "fields": ("bench_fields.py", []),
    "stain-norm": ("bench_stainnorm.py", []),
    "cell-crop": ("bench_cellcrop.py", []),
    "resync": ("bench_resync.py", []),
    "adapt": ("bench_adapt.py", []),
}
#: benchmarks that accept --data
TAKES_DATA = {"folder", "train-input", "soak", "groups", "cell-crop", "adapt"}
LINE = re.compile(r"^[a-z0-9][a-z0-9-]*: ratio=")


def run_one(name: str, quick: bool, data: str | None, timeout: float, extra: list[str]) -> tuple[list[str], float, int]:
    script, quick_args = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script)] + (["--quick", *quick_args] if quick else [])
    if data and name in TAKES_DATA:
        cmd += ["--data", data]
    cmd += extra
    t0 = time.perf_counter()
    lines: list[str] = []
    env = dict(os.environ)
    if C.USER_OMP_WAIT_POLICY is None:  # let each benchmark see the user's environment, not ours
        env.pop("OMP_WAIT_POLICY", None)
    try:
        proc = subprocess.run(cmd, cwd=str(C.REPO), capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        shown = " ".join(["python", f"bench/{script}", *cmd[2:]])
        return [f"{name}: ratio=n/a TIMEOUT after {timeout:.0f} s cmd='{shown}'"], time.perf_counter() - t0, 124
    for line in proc.stdout.splitlines():
        if LINE.match(line):
            lines.append(line)
        elif line.startswith("    "):
            print(line, flush=True)
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        print(f"    {name} failed (exit {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
        shown = " ".join(["python", f"bench/{script}", *cmd[2:]])
        lines.append(f"{name}: ratio=n/a FAILED exit={proc.returncode} cmd='{shown}'")
    return lines, time.perf_counter() - t0, proc.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats: < 5 min on 2 CPU cores")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=None, help="run only these")
    ap.add_argument("--data", default=None, help="real images for the folder and train-input benchmarks")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 240 quick, 1800 full)")
    ap.add_argument("--bench-args", default="", help="extra arguments for every benchmark run (quoted), "
                    "e.g. \"--threads 1\"; mostly useful with --only")
    ap.add_argument("--markdown", type=Path, default=None, help="append the results as a section to this file")
    ap.add_argument("--note", default="", help="a remark for the --markdown section (e.g. the load on the machine)")
    args = ap.parse_args(argv)

    names = args.only or list(BENCHMARKS)
    timeout = args.timeout or (240.0 if args.quick else 1800.0)
    info = C.machine()
    started = dt.datetime.now().astimezone()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    t0 = time.perf_counter()
    all_lines: list[str] = []
    failed = 0
    for name in names:
        print(f"== {name}", flush=True)
        lines, secs, rc = run_one(name, args.quick, args.data, timeout, shlex.split(args.bench_args))
        failed += rc != 0
        for line in lines:
            print(line, flush=True)
        print(f"    ({name}: {secs:.0f} s)", flush=True)
        all_lines += lines
    total = time.perf_counter() - t0
    print("\nsummary:")
    for line in all_lines:
        print(line)
    print(f"total {total:.0f} s, load average at the end {C.load_average()}")

    if args.markdown:
        cmd = C.command()
        section = [
            f"\n## Run of {started:%Y-%m-%d %H:%M %Z}\n",
            f"- command: `{cmd}`",
            "- machine: " + ", ".join(f"{k}={v}" for k, v in info.items()),
            f"- load average at the end: {C.load_average()}; total {total:.0f} s",
        ]
        if args.note:
            section.append(f"- note: {args.note}")
        section += ["", "```", *all_lines, "```", ""]
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write("\n".join(section))
        print(f"appended to {args.markdown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
