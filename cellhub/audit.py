"""Leakage audit of a cell-image dataset: ``python -m cellhub audit PATH [--task T] [--json OUT]``.

What it checks, and why:

- images and distinct groups (slide/patient, microscope field, source smear, near-duplicate copies)
  per split and class: how many
  *independent* samples a dataset really has (the Kaggle blood-cell TRAIN split is ~10,000 crops
  of ~276 cells);
- groups found in more than one split, at every level the data supports (blood-cell crops with
  their smears: the source smear *and* the microscope field, so that a field photographed twice —
  a re-imaged field, whose smears are different files — is named with the smears on each side):
  such a group leaks between training and evaluation;
- exact duplicates (same file bytes) and near-duplicates (256-bit perceptual hash, invariant to
  the eight 90-degree rotations/flips: catches resized, re-compressed, rotated/flipped copies,
  not arbitrary-angle augmentations — those are what the groups are for) across splits; within
  a split, exact duplicates and near-duplicate pairs that fall in *different* groups (copies the
  grouping missed, which a grouped split could leak);
- when there is no validation split: the grouped split :func:`cellhub.data.split_by_group` would
  draw, with the near-duplicate pairs it leaves across it, next to a random split of the same size;
- every skipped file and why.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage

from .data import image_paths, image_refs, load_cell_dataset, split_by_group
from .data.groups import field_of_smears, smear_of_crops

__all__ = ["audit_dataset", "format_report", "image_hashes"]

logger = logging.getLogger(__name__)

_DIHEDRAL = (None, PILImage.Transpose.ROTATE_90, PILImage.Transpose.ROTATE_180, PILImage.Transpose.ROTATE_270,
             PILImage.Transpose.FLIP_LEFT_RIGHT, PILImage.Transpose.FLIP_TOP_BOTTOM,
             PILImage.Transpose.TRANSPOSE, PILImage.Transpose.TRANSVERSE)
_MAX_LISTED = 20


_HASH_SIZE = 16  # 16x16 = 256-bit pHash: 64-bit hashes match unrelated cell images (uniform backgrounds)
_WORDS = _HASH_SIZE * _HASH_SIZE // 64


def _hash_one(item: dict[str, Any]) -> tuple[str, np.ndarray]:
    """(md5 of the file bytes, ``(8, 4)`` uint64: a 256-bit pHash per 90-degree rotation/flip) of one image."""
    import imagehash

    data = item.get("bytes")
    if data is None:
        with open(item["path"], "rb") as fh:
            data = fh.read()
    md5 = hashlib.md5(data).hexdigest()
    side = _HASH_SIZE * 4
    with PILImage.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("L", (2 * side, 2 * side))
        small = im.convert("L").resize((side, side), PILImage.LANCZOS)
    hashes = np.empty((8, _WORDS), dtype=np.uint64)
    for k, op in enumerate(_DIHEDRAL):
        bits = imagehash.phash(small if op is None else small.transpose(op), hash_size=_HASH_SIZE).hash
        hashes[k] = np.packbits(np.asarray(bits, dtype=bool).ravel()).view(">u8").astype(np.uint64)
    return md5, hashes


def image_hashes(ds, *, progress: bool = True, workers: int | None = None) -> tuple[list[str], np.ndarray]:
    """md5 of every image's bytes and an ``(N, 8, 4)`` uint64 array: 256-bit pHash of each rotation/flip."""
    from tqdm.auto import tqdm

    items = image_refs(ds)
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        out = list(tqdm(pool.map(_hash_one, items, chunksize=32), total=len(items), desc="hashing images",
                        unit="img", disable=not progress or len(items) < 200))
    md5s = [m for m, _ in out]
    ph = np.stack([h for _, h in out]) if out else np.zeros((0, 8, _WORDS), dtype=np.uint64)
    return md5s, ph


def _near_pairs(a: np.ndarray, b: np.ndarray, threshold: int, same: bool = False,
                chunk: int = 128) -> list[tuple[int, int, int]]:
    """(i, j, distance): min over a's 8 rotations/flips of the Hamming distance to b_j is <= threshold."""
    pairs: list[tuple[int, int, int]] = []
    if len(a) == 0 or len(b) == 0:
        return pairs
    b0 = b[:, 0, :]  # (nb, W)
    for start in range(0, len(a), chunk):
        block = a[start:start + chunk]  # (c, 8, W)
        dist = np.zeros((len(block), 8, len(b0)), dtype=np.uint16)
        for w in range(block.shape[2]):
            dist += np.bitwise_count(block[:, :, w, None] ^ b0[None, None, :, w])
        best = dist.min(axis=1)  # (c, nb)
        ii, jj = np.nonzero(best <= threshold)
        for i, j in zip(ii, jj):
            gi = start + int(i)
            if same and gi >= int(j):
                continue
            pairs.append((gi, int(j), int(best[i, j])))
    return pairs


def audit_dataset(source: str | os.PathLike, task: str | None = None, *, cache_dir: str | os.PathLike | None = None,
                  smear_dir: str | os.PathLike | None = None, near_threshold: int = 20, val_fraction: float = 0.2,
                  seed: int = 0, group_by: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Audit ``source`` (anything :func:`cellhub.load_cell_dataset` accepts); returns a JSON-able dict.

    ``near_threshold`` is the largest Hamming distance (of 256 bits) between perceptual hashes
    that counts as a near-duplicate. The default (20) found every resized and re-compressed
    copy of 400 real crops and no false match among them; a 64-bit pHash does not separate cell
    images (large uniform backgrounds) well enough. ``group_by`` is the grouping of the counts and
    of the split check (:data:`cellhub.data.groups.GROUP_BY`; ``auto`` by default); sharing across
    splits is reported at every level under ``shared_by_level``.
    """
    t0 = time.perf_counter()
    dsd, report = load_cell_dataset(source, task, cache_dir=cache_dir, return_report=True,
                                    smear_dir=smear_dir, group_by=group_by, progress=progress)
    t_load = time.perf_counter() - t0
    splits = list(dsd)
    names = dsd[splits[0]].features["label"].names
    out: dict[str, Any] = {
        "source": str(source), "task": report.task, "source_kind": report.source_kind, "root": report.root,
        "smear_dir": report.smear_dir, "group_method": report.group_method,
        "group_by": report.group_by, "group_by_requested": report.group_by_requested,
        "smear_attribution": report.smear_attribution, "near_duplicate_threshold": near_threshold,
        "splits": {}, "notes": list(report.notes), "ignored_nested_duplicates": report.ignored_duplicates,
    }
    labels: dict[str, np.ndarray] = {}
    groups: dict[str, np.ndarray] = {}
    files: dict[str, list[str]] = {}
    for split in splits:
        ds = dsd[split]
        lab = np.asarray(list(ds["label"]))
        grp = np.asarray([str(g) for g in ds["group"]])
        labels[split], groups[split], files[split] = lab, grp, [str(f) for f in ds["file"]]
        per_class = {}
        for i, name in enumerate(names):
            m = lab == i
            per_class[name] = {"images": int(m.sum()), "groups": int(len(set(grp[m])))}
        multi = sum(1 for g in set(grp) if len(set(lab[grp == g])) > 1) if len(grp) < 200_000 else None
        out["splits"][split] = {
            "images": len(ds), "groups": int(len(set(grp))), "per_class": per_class,
            "unmatched_images": int(sum(g.startswith("unmatched:") for g in grp)),
            "groups_with_several_labels": multi,
        }
    shared = {}
    for a, b in combinations(splits, 2):
        both = sorted(set(groups[a]) & set(groups[b]))
        shared[f"{a}|{b}"] = {"count": len(both), "groups": both[:_MAX_LISTED]}
    out["shared_groups"] = shared
    out["shared_by_level"] = _shared_by_level(dsd, report, groups, cache_dir, progress)

    t1 = time.perf_counter()
    md5s: dict[str, list[str]] = {}
    phs: dict[str, np.ndarray] = {}
    for split in splits:
        md5s[split], phs[split] = image_hashes(dsd[split], progress=progress)
    t_hash = time.perf_counter() - t1

    out.update(_duplicates(splits, md5s, phs, groups, files, near_threshold))

    if "validation" not in dsd and "train" in dsd and len(dsd["train"]) > 1:
        out["grouped_validation_check"] = _split_check(dsd["train"], phs["train"], groups["train"],
                                                       near_threshold, val_fraction, seed)
    out["skipped"] = [{"path": p, "reason": r} for p, r in report.skipped]
    out["skipped_by_reason"] = dict(Counter(r.split(" (")[0] for _, r in report.skipped))
    out["seconds"] = {"load": round(t_load, 2), "hash": round(t_hash, 2),
                      "total": round(time.perf_counter() - t0, 2)}
    return out


def _levels(dsd, report, groups: dict[str, np.ndarray], cache_dir, progress: bool) -> dict[str, dict[str, list]]:
    """split -> groups at each level: ``smear`` and ``field`` for blood-cell crops with smears, else the one used.

    Also ``smear_of`` (split -> source smear per crop, ``None`` unmatched) for naming re-imaged fields."""
    if report.group_by not in ("field", "smear") or not report.smear_dir:
        return {report.group_by or "group": {s: list(g) for s, g in groups.items()}}
    from .cache import default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    smear_dir = Path(report.smear_dir)
    fields = field_of_smears(smear_dir, cache, progress)
    smear_level, field_level, smear_of = {}, {}, {}
    for split, g in groups.items():
        paths = image_paths(dsd[split])
        found = smear_of_crops(paths, smear_dir, cache, progress)  # cached by the load
        sm = [found.get(p) for p in paths]
        smear_of[split] = sm
        smear_level[split] = [s or grp for s, grp in zip(sm, g)]
        field_level[split] = [f"field:{fields.get(s, s)}" if s else grp for s, grp in zip(sm, g)]
    return {"smear": smear_level, "field": field_level, "_smear_of": smear_of}


def _shared_by_level(dsd, report, groups: dict[str, np.ndarray], cache_dir, progress: bool) -> dict[str, Any]:
    """Groups found in two splits, at every level; re-imaged fields named with the smears on each side."""
    levels = _levels(dsd, report, groups, cache_dir, progress)
    smear_of = levels.pop("_smear_of", None)
    out: dict[str, Any] = {}
    for level, by_split in levels.items():
        pairs = {}
        for a, b in combinations(list(by_split), 2):
            both = sorted(set(by_split[a]) & set(by_split[b]))
            entry: dict[str, Any] = {"count": len(both), "groups": both[:_MAX_LISTED]}
            if level == "field" and smear_of is not None:
                entry["fields"] = [_field_sides(f, a, b, by_split, smear_of) for f in both[:_MAX_LISTED]]
            pairs[f"{a}|{b}"] = entry
        out[level] = pairs
    return out


def _field_sides(field: str, a: str, b: str, by_split: dict[str, list], smear_of: dict[str, list]) -> dict[str, Any]:
    """The smears of ``field`` on each side and whether it is a re-imaged field (different smears per side)."""
    sides = {s: sorted({sm for sm, f in zip(smear_of[s], by_split[s]) if f == field and sm}) for s in (a, b)}
    return {"field": field, "smears": sides, "re_imaged": not (set(sides[a]) & set(sides[b]))}


def _duplicates(splits: list[str], md5s: dict[str, list[str]], phs: dict[str, np.ndarray],
                groups: dict[str, np.ndarray], files: dict[str, list[str]], near_threshold: int) -> dict[str, Any]:
    """Exact (same bytes) and near (perceptual hash) duplicates within each split and across splits."""
    out: dict[str, Any] = {}
    exact_within = {}
    for split in splits:
        by = defaultdict(list)
        for i, m in enumerate(md5s[split]):
            by[m].append(i)
        dups = [[files[split][i] for i in idx] for idx in by.values() if len(idx) > 1]
        exact_within[split] = {"sets": len(dups), "extra_copies": sum(len(d) - 1 for d in dups),
                               "examples": dups[:_MAX_LISTED]}
    out["exact_duplicates_within_split"] = exact_within
    near_within = {}
    for split in splits:
        near = _near_pairs(phs[split], phs[split], near_threshold, same=True)
        g = groups[split]
        cross = [(i, j, d) for i, j, d in near if g[i] != g[j]]
        near_within[split] = {
            "pairs": len(near), "pairs_in_different_groups": len(cross),
            "examples_in_different_groups": [[files[split][i], g[i], files[split][j], g[j], d]
                                             for i, j, d in cross[:_MAX_LISTED]],
        }
    out["near_duplicates_within_split"] = near_within
    cross_exact, cross_near = {}, {}
    for a, b in combinations(splits, 2):
        index_b = defaultdict(list)
        for j, m in enumerate(md5s[b]):
            index_b[m].append(j)
        ex = [(files[a][i], files[b][j]) for i, m in enumerate(md5s[a]) for j in index_b.get(m, [])]
        cross_exact[f"{a}|{b}"] = {"count": len(ex), "examples": [list(p) for p in ex[:_MAX_LISTED]]}
        near = _near_pairs(phs[a], phs[b], near_threshold)
        cross_near[f"{a}|{b}"] = {
            "pairs": len(near), "images_in_" + a: len({i for i, _, _ in near}),
            "images_in_" + b: len({j for _, j, _ in near}),
            "examples": [[files[a][i], files[b][j], d] for i, j, d in near[:_MAX_LISTED]],
        }
    out["exact_duplicates_across_splits"] = cross_exact
    out["near_duplicates_across_splits"] = cross_near
    return out


def _split_check(train, ph: np.ndarray, grp: np.ndarray, threshold: int, val_fraction: float,
                 seed: int) -> dict[str, Any]:
    """Near-duplicate pairs across the grouped validation split vs. a random split of the same size."""
    ds = train.add_column("_row", list(range(len(train))))
    parts = split_by_group(ds, val_fraction=val_fraction, seed=seed)
    tr_idx = np.asarray(list(parts["train"]["_row"]), dtype=np.int64)
    va_idx = np.asarray(list(parts["validation"]["_row"]), dtype=np.int64)
    grouped = _near_pairs(ph[va_idx], ph[tr_idx], threshold) if len(va_idx) else []
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train))
    r_va, r_tr = perm[:len(va_idx)], perm[len(va_idx):]
    random_pairs = _near_pairs(ph[r_va], ph[r_tr], threshold) if len(va_idx) else []
    return {
        "validation_images": int(len(va_idx)), "validation_groups": int(len(set(grp[va_idx]))),
        "train_images": int(len(tr_idx)),
        "groups_on_both_sides": int(len(set(grp[va_idx]) & set(grp[tr_idx]))),
        "near_duplicate_pairs_across_grouped_split": len(grouped),
        "validation_images_with_a_near_duplicate_in_train_grouped": len({i for i, _, _ in grouped}),
        "near_duplicate_pairs_across_random_split": len(random_pairs),
        "validation_images_with_a_near_duplicate_in_train_random": len({i for i, _, _ in random_pairs}),
    }


def _format_levels(levels: dict[str, Any]) -> list[str]:
    """Sharing per level; re-imaged fields named, with what they mean."""
    if len(levels) < 2:
        return []
    lines = []
    for level, pairs in levels.items():
        for key, v in pairs.items():
            a, b = key.split("|")
            lines.append(f"  {level}s in both {a} and {b}: {v['count']}")
            for f in v.get("fields", []):
                kind = "re-imaged field" if f["re_imaged"] else "same smear"
                lines.append(f"    {f['field']}: {kind}: {a} smears {', '.join(f['smears'][a]) or '-'}; "
                             f"{b} smears {', '.join(f['smears'][b]) or '-'}")
    if any(f["re_imaged"] for pairs in levels.values() for v in pairs.values() for f in v.get("fields", [])):
        lines.append("    a re-imaged field is one area of the slide photographed in two smears: the cells cut from "
                     "them can be the same cell, so the split leaks although no smear is shared. Group by field "
                     "(the default) when you split or evaluate.")
    return lines


def format_report(r: dict[str, Any]) -> str:
    """The audit as readable text."""
    lines = [f"Audit of {r['source']}  (task {r['task']}, layout {r['source_kind']})"]
    if r.get("root"):
        lines.append(f"  dataset root: {r['root']}")
    if r.get("smear_dir"):
        lines.append(f"  smears:       {r['smear_dir']}")
    for split, s in r["splits"].items():
        method = r["group_method"].get(split, "?")
        att = r["smear_attribution"].get(split)
        extra = f", {att:.1%} of images attributed to a smear" if att is not None else ""
        lines.append(f"\n[{split}] {s['images']} images, {s['groups']} distinct groups (grouping: {method}{extra})")
        width = max(len(n) for n in s["per_class"])
        for name, c in s["per_class"].items():
            lines.append(f"    {name:<{width}}  {c['images']:>7} images  {c['groups']:>6} groups")
        if s.get("unmatched_images"):
            lines.append(f"    {s['unmatched_images']} images matched no smear (fallback groups 'unmatched:...')")
        if s.get("groups_with_several_labels"):
            lines.append(f"    {s['groups_with_several_labels']} groups hold images of more than one class")
    lines.append(f"\ngrouping: {r.get('group_by')} ("
                 + ("the default for this data; change with --group-by)" if r.get("group_by_requested") == "auto"
                    else "--group-by)"))
    for key, v in r["shared_groups"].items():
        a, b = key.split("|")
        ex = f" e.g. {', '.join(v['groups'][:5])}" if v["groups"] else ""
        lines.append(f"groups in both {a} and {b}: {v['count']}{ex}")
    lines += _format_levels(r.get("shared_by_level", {}))
    for split, v in r["exact_duplicates_within_split"].items():
        lines.append(f"exact duplicates within {split}: {v['sets']} sets ({v['extra_copies']} extra copies)")
    for split, v in r.get("near_duplicates_within_split", {}).items():
        lines.append(f"near-duplicate pairs within {split}: {v['pairs']}, of which in different groups "
                     f"(a copy the grouping did not catch): {v['pairs_in_different_groups']}")
        for ex in v["examples_in_different_groups"][:5]:
            lines.append(f"    {ex[0]} ({ex[1]})  ~  {ex[2]} ({ex[3]}), distance {ex[4]}")
    for key, v in r["exact_duplicates_across_splits"].items():
        a, b = key.split("|")
        lines.append(f"exact duplicates across {a}/{b}: {v['count']}")
    for key, v in r["near_duplicates_across_splits"].items():
        a, b = key.split("|")
        lines.append(f"near-duplicates across {a}/{b} (pHash distance <= {r['near_duplicate_threshold']}/256, "
                     f"any 90-degree rotation/flip): {v['pairs']} pairs")
    chk = r.get("grouped_validation_check")
    if chk:
        lines.append(
            f"\nNo validation split: split_by_group would hold out {chk['validation_images']} images "
            f"({chk['validation_groups']} groups; groups on both sides: {chk['groups_on_both_sides']}).")
        lines.append(
            f"  validation images with a near-duplicate in train: grouped split "
            f"{chk['validation_images_with_a_near_duplicate_in_train_grouped']}, random split of the same size "
            f"{chk['validation_images_with_a_near_duplicate_in_train_random']}")
    if r["skipped"]:
        lines.append(f"\nskipped {len(r['skipped'])} files: "
                     + ", ".join(f"{n} {k}" for k, n in r["skipped_by_reason"].items()))
        for item in r["skipped"][:_MAX_LISTED]:
            lines.append(f"    {item['path']}: {item['reason']}")
        if len(r["skipped"]) > _MAX_LISTED:
            lines.append(f"    ... and {len(r['skipped']) - _MAX_LISTED} more (see --json)")
    else:
        lines.append("\nskipped files: none")
    if r.get("ignored_nested_duplicates"):
        lines.append(f"nested duplicate copy ignored: {r['ignored_nested_duplicates']} files")
    sec = r["seconds"]
    lines.append(f"time: {sec['total']:.1f} s (load {sec['load']:.1f} s, hashing {sec['hash']:.1f} s)")
    return "\n".join(lines)
