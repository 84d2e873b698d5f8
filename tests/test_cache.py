"""cellhub.cache: file-identity keys and atomic writes, shared by data, smears, svm and hub."""
from __future__ import annotations

import hashlib
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
    k2 = cache.files_key([a, b])
    assert k2 != k1
    b.write_text("yz")  # same size, other bytes
    assert cache.files_key([a, b]) != k2
    assert cache.files_key([a]) != cache.files_key([b])
    with pytest.raises(OSError):
        cache.files_key([tmp_path / "missing"])


def test_a_resynced_file_keeps_its_key_and_its_digest_is_read_once(tmp_path, monkeypatch):
    """New mtimes on the same bytes (a copy, an rsync, a fresh checkout) keep every cache key; the
    digest is remembered on disk, so a later process does not read the file again."""
    monkeypatch.setenv("CELLHUB_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "a.bin"
    a.write_bytes(bytes(range(256)) * 10)
    key = cache.files_key([a])
    ident = cache.file_identity(a)
    assert ident == (2560, cache.content_digest(a)) and len(ident[1]) == 32
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: new mtime, same bytes
    assert cache.files_key([a]) == key and cache.file_identity(a) == ident
    copy = tmp_path / "copy" / "a.bin"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    assert cache.file_identity(copy) == ident  # the same bytes elsewhere: the same identity
    assert cache.file_identity(tmp_path / "missing") is None
    assert (tmp_path / "cache" / "digests" / "digests.sqlite").is_file()
    # another process (a fresh memo) finds the digest on disk and reads no file
    fresh = cache._DigestMemo()
    opened = []
    real_open = open

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    assert fresh.get(a) == ident
    assert str(a) not in opened
    a.write_bytes(bytes(range(256)) * 9 + bytes(256))  # edited: same size, other bytes
    assert fresh.get(a) != ident and str(a) in opened
    fresh.flush()
    import sqlite3

    with sqlite3.connect(tmp_path / "cache" / "digests" / "digests.sqlite") as db:  # one row per file, not per stamp
        assert db.execute("SELECT COUNT(*) FROM files WHERE path=?", (str(a),)).fetchone()[0] == 1


def test_digests_fall_back_to_memory_when_the_cache_cannot_be_written(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CELLHUB_CACHE", str(blocker))  # the cache root is a file: no SQLite there
    a = tmp_path / "a.txt"
    a.write_text("abc")
    memo = cache._DigestMemo()
    with caplog.at_level("WARNING", logger="cellhub.cache"):
        d1 = memo.get(a)
        d2 = memo.get(a)
    assert d1 == d2 == (3, hashlib.blake2b(b"abc", digest_size=16).hexdigest())
    assert caplog.text.count("not remembered on disk") == 1  # said once, not per file


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


def _item(root, kind, name, size, days_ago, now):
    path = root / kind / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - 86400 * days_ago, now - 86400 * days_ago))
    return path


def test_prune_cache_removes_least_recently_used_items_of_known_kinds_only(tmp_path):
    now = 2_000_000_000.0
    old = _item(tmp_path, "resized", "a.arrow", 3000, 40, now)
    mid = _item(tmp_path, "resized", "b.arrow", 2000, 10, now)
    new = _item(tmp_path, "validated", "c.json", 1000, 1, now)
    hf = tmp_path / "hf-datasets" / "imagefolder"  # a folder counts as one item, sized and dated by its files
    _item(tmp_path, "hf-datasets/imagefolder", "d.arrow", 500, 5, now)
    os.utime(hf, (now - 86400 * 50, now - 86400 * 50))
    other = _item(tmp_path, "not-cellhub", "keep.txt", 10_000, 400, now)  # not a cellhub folder: never touched

    entries = cache.cache_entries(tmp_path)
    assert [e.path for e in entries] == [old, mid, hf, new]
    assert [e.size for e in entries] == [3000, 2000, 500, 1000]

    removed, failed = cache.prune_cache(tmp_path, older_than_days=7, dry_run=True, now=now)
    assert [e.path for e in removed] == [old, mid] and not failed and old.exists()
    removed, _ = cache.prune_cache(tmp_path, max_bytes=1600, now=now)  # oldest first until the rest fits
    assert [e.path for e in removed] == [old, mid] and not old.exists() and not mid.exists()
    assert hf.is_dir() and new.exists()
    removed, _ = cache.prune_cache(tmp_path, clear=True, kinds=["hf-datasets"])
    assert [e.path for e in removed] == [hf] and not hf.exists() and new.exists()
    assert other.exists()
    with pytest.raises(ValueError, match="say what to remove"):
        cache.prune_cache(tmp_path)
    with pytest.raises(ValueError, match=">= 0"):
        cache.prune_cache(tmp_path, older_than_days=-1)
    with pytest.raises(ValueError, match="unknown cache kind"):
        cache.prune_cache(tmp_path, clear=True, kinds=["home"])


def test_a_cache_hit_marks_the_file_used_and_a_large_cache_is_announced(tmp_path, caplog):
    path = tmp_path / "groups" / "g.json"
    cache.cached_json(path, lambda: {"a": 1}, what="groups")
    os.utime(path, (1_000_000, 1_000_000))
    assert cache.cached_json(path, lambda: {"a": 2}, what="groups") == {"a": 1}
    assert path.stat().st_mtime > 1_000_000
    assert not cache.prune_cache(tmp_path, older_than_days=1)[0]
    with caplog.at_level("WARNING"):
        assert cache.warn_if_large(tmp_path, limit=10**9) == path.stat().st_size
        assert "cellhub cache" not in caplog.text
        cache.warn_if_large(tmp_path, limit=1)
    assert "python -m cellhub cache --older-than 30" in caplog.text


def test_cache_command_lists_and_frees(tmp_path, capsys):
    from cellhub.cli import main

    now = __import__("time").time()
    old = _item(tmp_path, "resized", "a.arrow", 3 * 1024 ** 2, 90, now)
    new = _item(tmp_path, "smears", "b.json", 1024, 0, now)
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3.0 MB in 2 item(s)" in out and "resized" in out and "90 days ago" in out and "--older-than" in out
    assert main(["cache", "--cache-dir", str(tmp_path), "--older-than", "30", "--dry-run"]) == 0
    assert "would remove 1 item(s), 3.0 MB" in capsys.readouterr().out and old.exists()
    assert main(["cache", "--cache-dir", str(tmp_path), "--older-than", "30"]) == 0
    assert "removed 1 item(s)" in capsys.readouterr().out and not old.exists() and new.exists()
    assert main(["cache", "--cache-dir", str(tmp_path), "--clear", "--kind", "smears"]) == 0
    assert not new.exists()
