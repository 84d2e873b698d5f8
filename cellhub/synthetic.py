"""Procedurally drawn blood-smear images, for tests and offline smoke runs.

Nothing here is real data: the drawings only keep the features that make the tasks learnable
(nucleus shape and granules for white cells, a ring-shaped parasite for malaria) and the
folder layouts users get from Kaggle, so that every code path can run offline in seconds.

- White cells (task ``blood-cells``) sit among red cells on a textured background:
  eosinophil = bilobed nucleus with orange granules, lymphocyte = large round nucleus with a thin
  rim of cytoplasm, monocyte = kidney-shaped nucleus in a large cell, neutrophil = 3-5 small lobes.
- Red cells (task ``malaria``) on a black background; a parasitized cell carries a purple ring
  with a chromatin dot at a known position.

The ``write_*`` functions lay the images out like the Kaggle downloads (see ARCHITECTURE.md).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .tasks import get_task

__all__ = [
    "draw_blood_cell",
    "draw_smear",
    "draw_malaria_cell",
    "write_kaggle_blood_cells",
    "write_kaggle_malaria",
    "write_imagefolder",
    "BLOOD_FOLDERS",
]

BLOOD_FOLDERS = {"eosinophil": "EOSINOPHIL", "lymphocyte": "LYMPHOCYTE",
                 "monocyte": "MONOCYTE", "neutrophil": "NEUTROPHIL"}

_BACKGROUND = (232, 214, 212)
_RBC = (214, 148, 150)
_CYTOPLASM = (205, 186, 218)
_NUCLEUS = (92, 42, 132)
_GRANULE = (190, 105, 140)  # pink-red eosinophilic granules, as stained (within the stain palette)


def _check_label(task: str, label: str) -> str:
    labels = get_task(task).labels
    key = str(label).lower()
    if key not in labels:
        raise ValueError(f"Unknown {task} label {label!r}. Choose one of: {', '.join(labels)}.")
    return key


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill, outline=None) -> None:
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=outline)


def _jitter(rng: np.random.Generator, color: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _texture(img: Image.Image, rng: np.random.Generator, sigma: float = 6.0) -> Image.Image:
    """Add blurred noise so the drawing has texture (local features) like a real micrograph."""
    arr = np.asarray(img, dtype=np.float32)
    noise = rng.normal(0.0, sigma, size=arr.shape[:2] + (1,)).astype(np.float32)
    out = np.clip(arr + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(out).filter(ImageFilter.GaussianBlur(0.6))


def _red_cells(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int],
               n: int, radius: float, avoid: tuple[float, float, float] | None = None) -> None:
    w, h = size
    for _ in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if avoid is not None and math.hypot(cx - avoid[0], cy - avoid[1]) < avoid[2] + radius * 0.6:
            continue
        r = radius * rng.uniform(0.85, 1.15)
        _ellipse(draw, cx, cy, r, r * rng.uniform(0.85, 1.0), fill=_jitter(rng, _RBC), outline=(196, 128, 132))
        _ellipse(draw, cx, cy, r * 0.45, r * 0.4, fill=_jitter(rng, (226, 176, 176), 6))


def _white_cell(draw: ImageDraw.ImageDraw, rng: np.random.Generator, label: str,
                cx: float, cy: float, r: float) -> None:
    """Draw one white cell of ``label`` centred on (cx, cy) with cell radius ``r``."""
    nucleus = _jitter(rng, _NUCLEUS, 10)
    angle = rng.uniform(0, 2 * math.pi)
    if label == "lymphocyte":
        r *= 0.75
        _ellipse(draw, cx, cy, r, r, fill=_jitter(rng, (190, 190, 230)))
        _ellipse(draw, cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2), r * 0.82, r * 0.8, fill=nucleus)
        return
    cell_r = r * (1.2 if label == "monocyte" else 1.0)
    _ellipse(draw, cx, cy, cell_r, cell_r * rng.uniform(0.9, 1.0), fill=_jitter(rng, _CYTOPLASM))
    if label == "eosinophil":
        for _ in range(70):  # orange granules all over the cytoplasm
            a, d = rng.uniform(0, 2 * math.pi), cell_r * math.sqrt(rng.uniform(0.05, 0.85))
            gx, gy = cx + d * math.cos(a), cy + d * math.sin(a)
            _ellipse(draw, gx, gy, 2.2, 2.2, fill=_jitter(rng, _GRANULE, 15))
        for s in (-1, 1):  # two lobes
            lx, ly = cx + s * 0.38 * r * math.cos(angle), cy + s * 0.38 * r * math.sin(angle)
            _ellipse(draw, lx, ly, r * 0.33, r * 0.3, fill=nucleus)
    elif label == "monocyte":
        _ellipse(draw, cx, cy, r * 0.75, r * 0.58, fill=nucleus)
        bx, by = cx + 0.62 * r * math.cos(angle), cy + 0.62 * r * math.sin(angle)
        _ellipse(draw, bx, by, r * 0.42, r * 0.42, fill=_jitter(rng, _CYTOPLASM))  # the kidney's notch
    elif label == "neutrophil":
        n_lobes = int(rng.integers(3, 6))
        centres = []
        for i in range(n_lobes):
            a = angle + 2 * math.pi * i / n_lobes
            centres.append((cx + 0.45 * r * math.cos(a), cy + 0.45 * r * math.sin(a)))
        for (x0, y0), (x1, y1) in zip(centres, centres[1:]):
            draw.line([x0, y0, x1, y1], fill=nucleus, width=max(2, int(r * 0.08)))
        for x, y in centres:
            _ellipse(draw, x, y, r * 0.2, r * 0.2, fill=nucleus)
    else:  # pragma: no cover - guarded by _check_label
        raise ValueError(label)


def draw_smear(label: str, seed: int = 0, size: tuple[int, int] = (640, 480)) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A full smear with many red cells and one white cell of ``label``.

    Returns the image and the white cell's box ``(xmin, ymin, xmax, ymax)``.
    """
    label = _check_label("blood-cells", label)
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size, _jitter(rng, _BACKGROUND, 6))
    draw = ImageDraw.Draw(img)
    r = min(w, h) * 0.085
    cx, cy = rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.3 * h, 0.7 * h)
    _red_cells(draw, rng, size, n=int(w * h / 2200), radius=min(w, h) * 0.05, avoid=(cx, cy, r * 1.25))
    _white_cell(draw, rng, label, cx, cy, r)
    box = (int(cx - 1.3 * r), int(cy - 1.3 * r), int(cx + 1.3 * r), int(cy + 1.3 * r))
    return _texture(img, rng), box


def draw_blood_cell(label: str, size: tuple[int, int] = (320, 240), seed: int = 0) -> Image.Image:
    """One white cell of ``label`` among red cells, centred, like a Kaggle TRAIN crop."""
    label = _check_label("blood-cells", label)
    rng = np.random.default_rng(seed)
    w, h = size
    img = Image.new("RGB", size, _jitter(rng, _BACKGROUND, 6))
    draw = ImageDraw.Draw(img)
    r = min(w, h) * 0.28
    cx, cy = w / 2 + rng.uniform(-0.08, 0.08) * w, h / 2 + rng.uniform(-0.08, 0.08) * h
    _red_cells(draw, rng, size, n=14, radius=min(w, h) * 0.17, avoid=(cx, cy, r * 1.25))
    _white_cell(draw, rng, label, cx, cy, r)
    return _texture(img, rng)


def draw_malaria_cell(label: str, size: int = 128, seed: int = 0,
                      tint: tuple[int, int, int] = (0, 0, 0)) -> tuple[Image.Image, tuple[int, int] | None]:
    """One red cell on black; ``parasitized`` cells carry a ring parasite.

    Returns the image and the parasite's centre ``(x, y)`` in pixels (``None`` when uninfected).
    ``tint`` shifts the cell colour (used to give each synthetic patient its own staining).
    """
    label = _check_label("malaria", label)
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    c = size / 2
    rx, ry = size * rng.uniform(0.36, 0.44), size * rng.uniform(0.34, 0.44)
    base = tuple(int(np.clip(a + b, 0, 255)) for a, b in zip((218, 160, 170), tint))
    _ellipse(draw, c, c, rx, ry, fill=_jitter(rng, base, 10))
    _ellipse(draw, c + rng.uniform(-3, 3), c + rng.uniform(-3, 3), rx * 0.5, ry * 0.45,
             fill=_jitter(rng, tuple(min(255, v + 12) for v in base), 6))
    pos = None
    if label == "parasitized":
        a, d = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.5)
        px, py = c + d * rx * math.cos(a), c + d * ry * math.sin(a)
        pr = size * rng.uniform(0.07, 0.11)
        width = max(2, int(round(size / 40)))
        draw.ellipse([px - pr, py - pr, px + pr, py + pr], outline=_jitter(rng, (110, 40, 150), 10), width=width)
        dot = pr * 0.45
        draw.ellipse([px + pr * 0.6 - dot, py - pr * 0.6 - dot, px + pr * 0.6 + dot, py - pr * 0.6 + dot],
                     fill=(70, 20, 110))
        pos = (int(round(px)), int(round(py)))
    else:
        for _ in range(int(rng.integers(0, 3))):  # faint staining artefacts, not parasites
            x, y = c + rng.uniform(-0.5, 0.5) * rx, c + rng.uniform(-0.5, 0.5) * ry
            _ellipse(draw, x, y, 2, 2, fill=_jitter(rng, (200, 140, 160), 8))
    arr = np.asarray(img, dtype=np.float32)
    mask = arr.sum(axis=2, keepdims=True) > 0
    arr = np.where(mask, arr + rng.normal(0, 4, size=arr.shape[:2] + (1,)), arr)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), pos


def _augmented_crop(smear: Image.Image, box: tuple[int, int, int, int], rng: np.random.Generator,
                    out_size: tuple[int, int]) -> Image.Image:
    """Rotate/flip/shift a region of the smear around the white cell, like the Kaggle augmentation."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    angle = float(rng.uniform(-180, 180))
    rotated = smear.rotate(angle, center=(cx, cy), resample=Image.BILINEAR, fillcolor=_BACKGROUND)
    if rng.random() < 0.5:
        rotated = rotated.transpose(Image.FLIP_LEFT_RIGHT)
        cx = smear.width - 1 - cx
    ow, oh = out_size
    half_w, half_h = ow / 4, oh / 4  # the crop is a half-resolution region, upsampled 2x
    dx, dy = rng.uniform(-0.12, 0.12) * ow / 2, rng.uniform(-0.12, 0.12) * oh / 2
    region = (int(cx + dx - half_w), int(cy + dy - half_h), int(cx + dx + half_w), int(cy + dy + half_h))
    return rotated.crop(region).resize(out_size, Image.BILINEAR)


def write_kaggle_blood_cells(root: str | Path, n_cells_per_class: int = 3, copies: int = 4,
                             splits: Sequence[str] = ("TRAIN", "TEST"), image_size: tuple[int, int] = (320, 240),
                             with_smears: bool = True, seed: int = 0, smear_size: tuple[int, int] = (640, 480)) -> Path:
    """Write a miniature Kaggle "Blood Cell Images" download under ``root``.

    Each split gets ``n_cells_per_class`` distinct cells per class, each cut ``copies`` times
    (rotated, flipped, shifted) from its own smear; no cell is in two splits. With
    ``with_smears`` the smears go to ``dataset-master/dataset-master/JPEGImages`` with
    ``labels.csv`` and VOC ``Annotations``. ``root/_truth.json`` maps every crop (path
    relative to ``root``) to its smear id.
    """
    root = Path(root)
    images = root / "dataset2-master" / "dataset2-master" / "images"
    smear_root = root / "dataset-master" / "dataset-master"
    rng = np.random.default_rng(seed)
    truth: dict[str, str] = {}
    smear_rows: list[tuple[int, str]] = []
    smear_idx = 0
    for split in splits:
        for label, folder in BLOOD_FOLDERS.items():
            out = images / split / folder
            out.mkdir(parents=True, exist_ok=True)
            for _ in range(n_cells_per_class):
                smear, box = draw_smear(label, seed=int(rng.integers(1 << 31)), size=smear_size)
                smear_id = f"BloodImage_{smear_idx:05d}"
                if with_smears:
                    (smear_root / "JPEGImages").mkdir(parents=True, exist_ok=True)
                    (smear_root / "Annotations").mkdir(parents=True, exist_ok=True)
                    smear.save(smear_root / "JPEGImages" / f"{smear_id}.jpg", quality=95)
                    (smear_root / "Annotations" / f"{smear_id}.xml").write_text(_voc_xml(smear_id, smear.size, box))
                smear_rows.append((smear_idx, folder))
                for k in range(copies):
                    crop = _augmented_crop(smear, box, rng, image_size)
                    # like Kaggle's "_K_N.jpeg": the name does not identify the source cell
                    name = f"_{k % 10}_{int(rng.integers(1, 10**6))}.jpeg"
                    while (out / name).exists():
                        name = f"_{k % 10}_{int(rng.integers(1, 10**6))}.jpeg"
                    crop.save(out / name, quality=92)
                    truth[(out / name).relative_to(root).as_posix()] = smear_id
                smear_idx += 1
    if with_smears:
        with open(smear_root / "labels.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["", "Image", "Category"])
            for idx, folder in smear_rows:
                writer.writerow(["", idx, folder])
    (root / "_truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True))
    return root


def _voc_xml(smear_id: str, size: tuple[int, int], box: tuple[int, int, int, int]) -> str:
    return (
        f"<annotation><filename>{smear_id}.jpg</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size><object><name>WBC</name><bndbox>"
        f"<xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
        f"</bndbox></object></annotation>\n"
    )


def write_kaggle_malaria(root: str | Path, n_per_class: int = 8, n_patients: int = 4, nested_copy: bool = True,
                         size: int = 64, seed: int = 0) -> Path:
    """Write a miniature Kaggle malaria download: ``root/cell_images/{Parasitized,Uninfected}``.

    Parasitized cells come from ``n_patients`` infected patients (``C{slide}P{patient}ThinF_...``);
    uninfected cells from those patients and from uninfected-patient slides (``C{slide}NThinF_...``).
    Each patient has its own staining tint. With ``nested_copy`` the Kaggle zip's duplicate tree
    ``cell_images/cell_images/...`` is written too (same files, must not be counted twice).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    n_patients = max(1, n_patients)
    infected = [f"C{100 + i}P{60 + i}" for i in range(n_patients)]
    healthy = [f"C{10 + i}N" for i in range(max(1, n_patients // 2))]
    tints = {g: tuple(int(v) for v in rng.integers(-12, 13, size=3)) for g in infected + healthy}
    trees = [root / "cell_images"] + ([root / "cell_images" / "cell_images"] if nested_copy else [])
    for label, folder, groups in (("parasitized", "Parasitized", infected),
                                  ("uninfected", "Uninfected", infected + healthy)):
        for tree in trees:
            (tree / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            group = groups[i % len(groups)]
            img, _ = draw_malaria_cell(label, size=size, seed=int(rng.integers(1 << 31)), tint=tints[group])
            name = f"{group}ThinF_IMG_20150604_1{i % 10}2{i % 7}{i % 3}_cell_{i}.png"
            for tree in trees:
                img.save(tree / folder / name)
    return root


def write_imagefolder(root: str | Path, task: str = "malaria", n_per_class: int = 6,
                      splits: Sequence[str] | None = ("train", "test"), size: int = 64, seed: int = 0) -> Path:
    """Write a plain imagefolder tree ``root/{split}/{label}/*.png`` (or ``root/{label}`` without splits).

    Malaria file names carry a patient prefix (two patients per class and split, disjoint across
    splits), so their groups are known.
    """
    spec = get_task(task)
    root = Path(root)
    rng = np.random.default_rng(seed)
    for s_idx, split in enumerate(splits or [None]):
        base = root / split if split else root
        for label in spec.labels:
            out = base / label
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                s = int(rng.integers(1 << 31))
                if spec.name == "malaria":
                    img, _ = draw_malaria_cell(label, size=size, seed=s)
                    name = f"C{200 + 10 * s_idx + i % 2}P{300 + 10 * s_idx + i % 2}ThinF_IMG_{i}_cell_{i}.png"
                else:
                    img = draw_blood_cell(label, size=(size, size), seed=s)
                    name = f"{label}_{i}.png"
                img.save(out / name)
    return root
