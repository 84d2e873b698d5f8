"""cellhub.serving: the cache janitor, the queue plan, in-flight counting; app.py's clean SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cellhub.serving import CacheJanitor, InFlight, folder_bytes, forget_files, serving_plan, worker_plan

ROOT = Path(__file__).resolve().parents[1]


def _file(path: Path, size: int, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_janitor_deletes_oldest_first_down_to_the_cap_and_spares_young_files(tmp_path):
    old = [_file(tmp_path / f"h{i}" / "upload.png", 1000, age=600 - i) for i in range(5)]  # oldest: h0
    young = _file(tmp_path / "new" / "cam.png", 5000, age=1)
    seen = []
    janitor = CacheJanitor(tmp_path, max_bytes=7000, min_age=60, max_age=3600, on_deleted=seen.extend, trim=False)
    deleted = janitor.sweep()
    # 10,000 bytes, cap 7,000: the three oldest go; the young file stays although it is the largest
    assert sorted(deleted) == sorted(str(p) for p in old[:3])
    assert seen == deleted and young.exists() and all(p.exists() for p in old[3:])
    assert folder_bytes(tmp_path) == 7000
    assert not (tmp_path / "h0").exists()  # emptied folders are removed
    assert janitor.sweep() == []


def test_janitor_removes_files_past_max_age_under_the_cap(tmp_path):
    stale = _file(tmp_path / "a.png", 10, age=1000)
    fresh = _file(tmp_path / "b.png", 10, age=100)
    janitor = CacheJanitor(tmp_path, max_bytes=10**9, min_age=60, max_age=900, trim=False)
    assert janitor.sweep() == [str(stale)] and fresh.exists()
    with pytest.raises(ValueError):
        CacheJanitor(tmp_path, max_bytes=0)


def test_forget_files_drops_paths_from_registries():
    reg = {"a", "b", "c"}
    forget_files([reg], ["b", "zz"])
    assert reg == {"a", "c"}


def test_serving_plan_holds_a_minute_of_work():
    assert worker_plan(cores=2) == (2, 1)
    assert worker_plan(cores=16) == (8, 2)
    assert worker_plan(cores=4, workers=1) == (1, 4)
    plan = serving_plan(0.25, workers=2, threads_per_worker=1)
    assert plan.queue_size == 480  # 60 s x 2 workers / 0.25 s
    assert serving_plan(10.0, workers=1, threads_per_worker=2).queue_size == 64  # the floor
    assert serving_plan(0.25, workers=2, threads_per_worker=1, queue_size=5).queue_size == 5
    with pytest.raises(ValueError):
        serving_plan(0.0, workers=1, threads_per_worker=1)


def test_inflight_waits_for_running_requests():
    inflight = InFlight()
    release = threading.Event()

    def request():
        with inflight:
            release.wait(5)

    t = threading.Thread(target=request)
    t.start()
    while inflight.count == 0:
        time.sleep(0.01)
    assert inflight.wait_idle(0.05) is False
    release.set()
    assert inflight.wait_idle(5) is True and inflight.count == 0
    t.join()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import torch

    from cellhub import create_model
    from cellhub.hub import save_pretrained

    torch.manual_seed(0)
    return save_pretrained(create_model("smallcnn", "malaria", pretrained=False, image_size=32),
                           tmp_path_factory.mktemp("ckpt") / "tiny")


def test_app_stops_cleanly_on_sigterm(tmp_path, tiny_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TMPDIR=str(tmp_path), HF_HUB_OFFLINE="1")
    env.pop("GRADIO_TEMP_DIR", None)
    proc = subprocess.Popen([sys.executable, "app.py", "--no-bundled", "--models", str(tiny_checkpoint),
                             "--port", str(port), "--queue-size", "8"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        assert list(tmp_path.glob("cellhub-app-*")), "the app keeps its uploads and outputs in a folder of its own"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "Stopped." in out
    assert not list(tmp_path.glob("cellhub-app-*")), "temporary folders are removed on SIGTERM"
