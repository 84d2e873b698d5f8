"""Near-duplicate grouping that scales: copies of one cell share a group, in about linear time.

For folders that carry no smears, no patient ids and no group column: copies of one cell
(rotated, mirrored, shifted, resized, re-compressed — the Kaggle crops are ~35 such copies of
each of ~276 cells) must not land on both sides of a validation split.

Each image gets a *signature* centred on its most strongly stained spot (a white cell's nucleus):
colour rings around that point, sampled in polar coordinates on a copy ~60 pixels high. Rotating or
mirroring the image about that point only turns or reverses the rings, so

- the magnitudes of the rings' angular Fourier coefficients are unchanged: a short vector, whose
  nearest neighbours (one matrix product per block of rows) are each image's *candidates*;
- a candidate is *verified* by the best normalised circular cross-correlation of the rings over
  every rotation and both mirror images, computed in the Fourier domain. On the Kaggle TRAIN crops
  (groups known from the smears) copies score 0.84 (median; 95% of them above 0.65), other cells
  among the candidates 0.37.

Verified pairs are joined, strongest first, into groups of at most :data:`MAX_GROUP` images (a
bound on the damage when many distinct but similar-looking cells chain together). Cost: signatures O(n) (the image decode
dominates); candidate search n^2 x 384 multiply-adds in blocks of rows (memory O(n)); verification
O(n k). What it cannot see: a copy whose stained spot is cut off by the border, or another cell of
the same field (use the smears for that: :mod:`cellhub.smears`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["NEAR_THRESHOLD", "MAX_GROUP", "signatures", "near_duplicate_groups", "candidate_pairs", "verify_pairs"]

logger = logging.getLogger(__name__)

SIDE = 60          # the signature is taken on a copy this many pixels on its short side
RINGS = 16         # rings from 1 px to half the short side
ANGLES = 64        # samples per ring
KEEP = 16          # angular frequencies kept for verification (1..KEEP; the mean is dropped)
MAG_BINS = 8       # angular frequencies whose magnitudes make the candidate vector
#: verification score (normalised cross-correlation, best rotation/mirror) that joins two images, and
#: the largest group that joining may build (strongest pairs are joined first). Chosen on the
#: development data (``bench/bench_groups.py``): on the Kaggle TRAIN crops, against their smear
#: groups, 1.8% of images fall outside their cell's main group and 1 image joins another field's
#: group; on PBC (every image a distinct cell) 12% of images share a group, none larger than 256.
NEAR_THRESHOLD = 0.65
MAX_GROUP = 256
#: a score this high is the same picture (re-saved, resized): joined whatever the group size
IDENTICAL = 0.995


def _small_rgb(path: str) -> np.ndarray:
    """The image as float32 RGB, resized so that its short side is :data:`SIDE` (JPEGs decoded at reduced size)."""
    with Image.open(path) as im:
        w, h = im.size
        short = max(1, min(w, h))
        target = (max(1, round(w * SIDE / short)), max(1, round(h * SIDE / short)))
        if im.format == "JPEG":
            im.draft("RGB", target)
        rgb = im.convert("RGB")
        if rgb.size != target:
            rgb = rgb.resize(target, Image.BILINEAR, reducing_gap=2.0)
        return np.asarray(rgb, dtype=np.float32)


def _rings(rgb: np.ndarray) -> np.ndarray:
    """``(3, RINGS, ANGLES)`` colour rings around the stain centre, each ring's mean removed."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    pad = rgb.sum(-1) < 60  # black fill from rotation (Kaggle) or around a segmented cell (NIH)
    stain = b - r           # haematoxylin / Giemsa-stained nuclei and parasites: blue over red
    stain[pad] = -255
    h, w = stain.shape
    cy, cx = h / 2, w / 2
    if (~pad).any():
        mask = stain >= max(float(np.percentile(stain[~pad], 97)), 20.0)
        ys, xs = np.nonzero(mask)
        if len(xs):
            weight = stain[mask] - stain[mask].min() + 1
            cy, cx = float(np.average(ys, weights=weight)), float(np.average(xs, weights=weight))
    radius = np.linspace(1, SIDE / 2, RINGS, dtype=np.float32)[:, None]
    angle = np.linspace(0, 2 * np.pi, ANGLES, endpoint=False, dtype=np.float32)[None]
    map_x = (cx + radius * np.cos(angle)).astype(np.float32)
    map_y = (cy + radius * np.sin(angle)).astype(np.float32)
    valid = cv2.remap((~pad).astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderValue=0) > 0.5
    out = np.empty((3, RINGS, ANGLES), dtype=np.float32)
    n_valid = np.maximum(valid.sum(1, keepdims=True), 1)
    for c, channel in enumerate((r, g, b)):
        s = cv2.remap(channel, map_x, map_y, cv2.INTER_LINEAR, borderValue=0)
        mean = (s * valid).sum(1, keepdims=True) / n_valid
        out[c] = np.where(valid, s, mean) - mean
    return out


def _signature(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        rings = _rings(_small_rgb(path))
    except (OSError, ValueError, cv2.error) as exc:  # unreadable: the caller gives it a group of its own
        logger.warning("near-duplicates: cannot read %s (%s); it gets a group of its own", path, exc)
        return None
    spec = np.fft.rfft(rings, axis=-1)[..., 1:KEEP + 1].astype(np.complex64)
    vec = np.abs(spec[..., :MAG_BINS]).ravel().astype(np.float32)
    return vec / (np.linalg.norm(vec) + 1e-9), spec


def signatures(paths: Sequence[str], *, progress: bool = True, workers: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate vectors ``(n, d)``, ring spectra ``(n, 3, RINGS, KEEP)`` and an ``ok`` mask (readable)."""
    workers = workers or min(8, os.cpu_count() or 1)
    n = len(paths)
    vecs = np.zeros((n, 3 * RINGS * MAG_BINS), dtype=np.float32)
    specs = np.zeros((n, 3, RINGS, KEEP), dtype=np.complex64)
    ok = np.zeros(n, dtype=bool)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_signature, [str(p) for p in paths], chunksize=64)
        for i, sig in enumerate(tqdm(results, total=n, desc="near-duplicate signatures", unit="img",
                                     disable=not progress or n < 500)):
            if sig is not None:
                vecs[i], specs[i], ok[i] = sig[0], sig[1], True
    return vecs, specs, ok


def candidate_pairs(vecs: np.ndarray, k: int = 10, block: int = 512) -> np.ndarray:
    """``(n, k)`` indices of each row's ``k`` most similar other rows (cosine), in blocks of rows."""
    n = len(vecs)
    k = min(k, n - 1)
    out = np.zeros((n, max(k, 0)), dtype=np.int64)
    if k <= 0:
        return out
    for start in range(0, n, block):
        sims = vecs[start:start + block] @ vecs.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf
        out[start:start + block] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return out


def verify_pairs(specs: np.ndarray, cand: np.ndarray, block: int = 256) -> np.ndarray:
    """``(n, k)`` verification scores: best normalised cross-correlation over rotations and mirroring."""
    n, k = cand.shape
    energy = np.sqrt((np.abs(specs) ** 2).sum((1, 2, 3))) + 1e-9
    scores = np.zeros((n, k), dtype=np.float32)
    for start in range(0, n, block):
        a = specs[start:start + block]                  # (b, 3, R, K)
        b = specs[cand[start:start + block]]            # (b, k, 3, R, K)
        best = None
        for z in (np.einsum("icrf,ijcrf->ijf", a, b.conj()),  # same orientation
                  np.einsum("icrf,ijcrf->ijf", a, b)):        # mirror image
            full = np.zeros((len(a), k, ANGLES // 2 + 1), dtype=np.complex64)
            full[..., 1:KEEP + 1] = z
            corr = np.fft.irfft(full, n=ANGLES, axis=-1).max(-1) * (ANGLES / 2)
            best = corr if best is None else np.maximum(best, corr)
        scores[start:start + block] = best / (energy[start:start + block, None] * energy[cand[start:start + block]])
    return scores


def _join(n: int, rows: np.ndarray, cols: np.ndarray, scores: np.ndarray, max_group: int) -> np.ndarray:
    """Union-find over the verified pairs, strongest first; a join that would pass ``max_group`` is refused
    unless the two images are the same picture (score >= :data:`IDENTICAL`)."""
    parent = np.arange(n)
    size = np.ones(n, dtype=np.int64)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for e in np.argsort(-scores, kind="stable"):
        a, b = find(int(rows[e])), find(int(cols[e]))
        # identical copies (score ~1) always join: the cap is against chains of similar cells
        if a != b and (size[a] + size[b] <= max_group or scores[e] >= IDENTICAL):
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def near_duplicate_groups(paths: Sequence[str], names: Sequence[str] | None = None, *,
                          threshold: float = NEAR_THRESHOLD, max_group: int = MAX_GROUP, k: int = 10,
                          progress: bool = True,
                          workers: int | None = None) -> list[str]:
    """One group per image: copies of one cell share ``"near:<name of its first member>"``.

    ``names`` (default: the paths) are what group ids are built from, e.g. paths relative to the
    dataset root. An unreadable image gets ``"unreadable:<name>"``. See the module docstring.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    if max_group < 2:
        raise ValueError(f"max_group must be at least 2, got {max_group!r}.")
    paths = [str(p) for p in paths]
    names = [str(x) for x in (names if names is not None else paths)]
    if len(names) != len(paths):
        raise ValueError(f"names has {len(names)} entries for {len(paths)} paths.")
    vecs, specs, ok = signatures(paths, progress=progress, workers=workers)
    good = np.nonzero(ok)[0]
    labels = np.full(len(paths), -1, dtype=np.int64)
    if len(good):
        cand = candidate_pairs(vecs[good], k=k)
        if cand.shape[1]:
            scores = verify_pairs(specs[good], cand)
            rows, cols = np.nonzero(scores >= threshold)
            labels[good] = _join(len(good), rows, cand[rows, cols], scores[rows, cols], max_group)
        else:
            labels[good] = np.arange(len(good))
    first: dict[int, str] = {}
    for i in good:
        lab = int(labels[i])
        if lab not in first or names[i] < first[lab]:
            first[lab] = names[i]
    out = [f"near:{first[int(labels[i])]}" if ok[i] else f"unreadable:{names[i]}" for i in range(len(paths))]
    logger.info("near-duplicates: %d images in %d groups (threshold %.2f)", len(paths), len(set(out)), threshold)
    return out
