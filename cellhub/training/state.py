"""Resumable training state: ``output_dir/last_checkpoint/``, written so that a kill never tears it.

Model, best model, optimizer and RNG tensors go to safetensors files (never pickle), the rest to
``state.json``, which is written last and lists every file's SHA-256. The folder is written
under a temporary name and swapped in by rename: at every instant either the previous complete
checkpoint or the new one is in place (``last_checkpoint`` or, between two renames, ``.prev``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["CHECKPOINT_DIRNAME", "save_training_state", "load_training_state", "restore_rng_state",
           "unflatten_optimizer", "state_dict_cpu", "HOLDOUT_FILENAME", "save_holdout", "load_holdout", "holdout_files"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "last_checkpoint"
#: a cross-validation fold's out-of-fold predictions (probabilities, labels, groups), in its run folder
HOLDOUT_FILENAME = "holdout.npz"
_STATE_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        m = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                m[k] = v
        meta[str(pid)] = m
    return tensors, {"param_groups": sd["param_groups"], "state_meta": meta}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(m) for pid, m in info["state_meta"].items()}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": info["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    return tensors, {
        "numpy": [np_state[0], np.asarray(np_state[1]).tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = info["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = info["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_training_state(
    output_dir: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    best_state: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    info: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``output_dir/last_checkpoint/`` atomically (temp folder, fsync, rename swap).

    At every instant either the previous complete checkpoint or the new complete one is in
    place (as ``last_checkpoint`` or, for the instant between two renames, ``last_checkpoint.prev``).
    ``state.json`` is written last and lists the SHA-256 of every tensor file.
    """
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / CHECKPOINT_DIRNAME
    prev = out / f"{CHECKPOINT_DIRNAME}.prev"
    tmp = out / f".{CHECKPOINT_DIRNAME}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    opt_tensors, opt_info = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_info = _rng_state()
    files = {"model.safetensors": model_state, "optimizer.safetensors": opt_tensors, "rng.safetensors": rng_tensors}
    if best_state is not None:
        files["best_model.safetensors"] = best_state
    if ema_state is not None:  # --ema: the moving average, to resume it exactly
        files["ema.safetensors"] = ema_state
    digests = {}
    for name, tensors in files.items():
        path = tmp / name
        save_file(tensors, str(path))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        digests[name] = _sha256(path)
    sched = dict(scheduler.state_dict())
    # our schedule is a plain function (rebuilt from the config), so nothing of it needs saving
    sched["lr_lambdas"] = [None] * len(sched.get("lr_lambdas", []))
    state = dict(info, version=_STATE_VERSION, files=digests, optimizer=opt_info, rng=rng_info, scheduler=sched)
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(final, prev)
    os.replace(tmp, final)
    _fsync_dir(out)
    if prev.exists():
        shutil.rmtree(prev, ignore_errors=True)
    return final


def _read_checkpoint(path: Path) -> dict[str, Any] | None:
    """Load a checkpoint folder, or ``None`` if it is incomplete or corrupt."""
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text())
        if state.get("version") != _STATE_VERSION:
            logger.warning("Checkpoint %s has state version %s (expected %s); ignoring it.", path,
                           state.get("version"), _STATE_VERSION)
            return None
        tensors = {}
        for name, digest in state["files"].items():
            fp = path / name
            if _sha256(fp) != digest:
                logger.warning("Checkpoint file %s is damaged (checksum mismatch).", fp)
                return None
            tensors[name] = load_file(str(fp))
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("Checkpoint %s is unreadable (%s).", path, exc)
        return None
    state["tensors"] = tensors
    return state


def load_training_state(output_dir: str | Path) -> dict[str, Any] | None:
    """The newest complete checkpoint in ``output_dir`` (``last_checkpoint`` or its ``.prev``), or None."""
    out = Path(output_dir)
    for cand in (out / CHECKPOINT_DIRNAME, out / f"{CHECKPOINT_DIRNAME}.prev"):
        if cand.is_dir():
            state = _read_checkpoint(cand)
            if state is not None:
                return state
    return None



def save_holdout(output_dir: str | Path, probs: np.ndarray, labels: np.ndarray, groups: list[str],
                 files: list[str] | None = None) -> Path:
    """Write a fold's held-out probabilities, labels, groups and, when known, each image's file
    (the dataset's ``file``: its path below its source folder; ``holdout.npz``; plain arrays, no
    pickle), atomically: a fold with this file is complete."""
    from ..cache import atomic_path

    path = Path(output_dir) / HOLDOUT_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            arrays = dict(probs=np.asarray(probs, dtype=np.float64), labels=np.asarray(labels, dtype=np.int64),
                          groups=np.asarray([str(g) for g in groups], dtype=np.str_))
            if files is not None:
                if len(files) != len(arrays["labels"]):
                    raise ValueError(f"{len(files)} files for {len(arrays['labels'])} held-out images")
                arrays["files"] = np.asarray([str(f) for f in files], dtype=np.str_)
            np.savez(fh, **arrays)
    return path


def _holdout_arrays(output_dir: str | Path) -> dict[str, np.ndarray] | None:
    """Every array of a fold's ``holdout.npz`` (no pickle), or ``None`` when absent; raises
    ``OSError``/``ValueError`` when unreadable."""
    path = Path(output_dir) / HOLDOUT_FILENAME
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def load_holdout(output_dir: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """``(probs, labels, groups)`` saved by :func:`save_holdout`, or ``None`` when absent or unreadable."""
    try:
        z = _holdout_arrays(output_dir)
        return None if z is None else (z["probs"], z["labels"], [str(g) for g in z["groups"]])
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("%s is unreadable (%s); the fold is trained again.", Path(output_dir) / HOLDOUT_FILENAME, exc)
        return None


def holdout_files(output_dir: str | Path) -> list[str] | None:
    """Each held-out image's ``file`` (its path below its source folder), in the order of
    :func:`load_holdout`'s arrays; ``None`` for a fold saved without them, absent or unreadable."""
    try:
        z = _holdout_arrays(output_dir)
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s).", Path(output_dir) / HOLDOUT_FILENAME, exc)
        return None
    return None if z is None or "files" not in z else [str(f) for f in z["files"]]
