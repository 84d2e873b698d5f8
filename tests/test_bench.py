"""Smoke test of the benchmark harness: bench/run.py runs one benchmark in a micro mode and
prints its summary line in the documented format (the figures themselves are not checked)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _common as C  # noqa: E402


def test_result_line_format() -> None:
    r = C.Result("demo", 1.234, "fast/slow;", {"a_ms": 12.345, "n": 3, "what": "two words"}, "python bench/x.py --quick")
    assert r.line() == "demo: ratio=1.23 fast/slow; a_ms=12.35 n=3 what='two words' cmd='python bench/x.py --quick'"
    assert C.Result("demo", None, "x").line().startswith("demo: ratio=n/a x")
    assert C.percentile([1, 2, 3, 4], 50) == 2.5 and C.percentile([5.0], 95) == 5.0
    assert C.median([3.0, 1.0, 2.0]) == 2.0


def test_run_py_runs_one_benchmark_and_prints_the_line(tmp_path: Path) -> None:
    md = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--only", "cam",
           "--bench-args", "--models smallcnn --repeats 2", "--markdown", str(md), "--note", "smoke test"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pattern = re.compile(r"^cam: ratio=\d+\.\d\d \S.* corr_min=(\S+) .*status=(PASS|FAIL) "
                         r"cmd='python bench/bench_cam.py --quick --models smallcnn --repeats 2'$", re.M)
    lines = pattern.findall(proc.stdout)
    assert len(lines) == 2, proc.stdout  # once as it runs, once in the summary
    assert float(lines[0][0]) >= 0.999  # the exact CAM matches pytorch-grad-cam's
    text = md.read_text()
    assert "`python bench/run.py --quick --only cam" in text and "smoke test" in text and "cam: ratio=" in text
