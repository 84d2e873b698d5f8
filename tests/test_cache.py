"""cellhub.cache: file-identity keys and atomic writes, shared by data, smears, svm and hub."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cellhub import cache


def test_files_key_changes_when_a_file_changes(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x")
    b.write_text("y")
    k1 = cache.files_key([a, b])
    assert cache.files_key([a, b]) == k1
    assert cache.files_key([b, a]) != k1  # the list's order is part of the key
    b.write_text("yy")  # size changes
    assert cache.files_key([a, b]) != k1
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.files_key([a]) != cache.files_key([b])
    with pytest.raises(OSError):
        cache.files_key([tmp_path / "missing"])


def test_cached_json_computes_once_and_checks_validity(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": 1}

    path = tmp_path / "sub" / "c.json"
    assert cache.cached_json(path, compute, what="x") == {"a": 1}
    assert cache.cached_json(path, compute, what="x") == {"a": 1}
    assert len(calls) == 1
    assert cache.cached_json(path, compute, what="x", valid=lambda v: "b" in v) == {"a": 1}
    assert len(calls) == 2  # an entry that fails the check is recomputed
    path.write_text("{torn")
    assert cache.cached_json(path, compute, what="x") == {"a": 1} and len(calls) == 3
    assert cache.cached_json(None, compute, what="x") == {"a": 1} and len(calls) == 4


def test_atomic_path_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.json"
    cache.atomic_write_json(path, {"n": np.int64(3), "v": np.arange(2), "p": tmp_path})
    assert cache.read_json(path) == {"n": 3, "v": [0, 1], "p": str(tmp_path)}
    with pytest.raises(RuntimeError):
        with cache.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert cache.read_json(path)["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temporary left behind


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLHUB_CACHE", str(tmp_path))
    assert cache.default_cache_dir("smears") == tmp_path / "smears"
    from cellhub import data, smears

    assert smears.default_cache_dir() == tmp_path / "smears"
    assert data.default_cache_dir() == tmp_path
