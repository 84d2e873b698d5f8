"""One batch pipeline: many files (folders, zips) -> every model's predictions and their consensus (and the
results CSV, streamed and resumable).

:func:`iter_decoded` is the engine: chunks of inputs read and decoded in threads (and run through
each model's preprocessing there), the next chunk while the caller runs the models on this one,
so memory stays bounded however many files there are. :func:`predict_files` drives it for the
command line and the app; :func:`cellhub.evaluation.predict_dataset` drives it for dataset rows.
"""
from __future__ import annotations

import csv
import json
import logging
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from .cellcheck import check_cell_image
from .fields import whole_field_problem
from .images import DEFAULT_LIMITS, ImageRef, InputError, Limits, read_image
from .predict import Consensus, Prediction, Predictor, consensus
from .serving import cpu_cores

__all__ = ["BatchResult", "class_counts", "predict_files", "decode_files", "distinct_configs", "DecodedChunk", "iter_decoded", "ProgressFn",
           "CsvStream", "csv_parts", "done_rows", "merge_csv_parts"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]
T = TypeVar("T")


def iter_decoded(
    items: Sequence[T],
    decode: Callable[[T, Any], Any],
    *,
    read: Callable[[list[T]], Sequence[Any]] | None = None,
    chunk_size: int = 32,
    workers: int | None = None,
) -> Iterator[tuple[int, list[T], list[Any]]]:
    """Yield ``(start, chunk, [decode(item, raw) for item, raw in zip(chunk, read(chunk))])``.

    ``read`` runs in one read-ahead thread, a chunk at a time and in order (zip members share a
    file handle; dataset rows are sliced at once); ``decode`` runs in a pool of ``workers``
    threads (default CPUs + 1, at most 8; image decoding and resizing release the GIL). The next
    chunk is read and decoded while the caller works on this one, so at most two chunks are held.
    Without ``read``, ``raw`` is the item itself.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks = [list(items[i : i + chunk_size]) for i in range(0, len(items), chunk_size)]
    n_workers = max(1, workers or min(8, cpu_cores() + 1))
    with ThreadPoolExecutor(max_workers=n_workers) as pool, ThreadPoolExecutor(max_workers=1) as ahead:

        def run(chunk: list[T]) -> list[Any]:
            raws = read(chunk) if read is not None else chunk
            return list(pool.map(decode, chunk, raws))

        pending = ahead.submit(run, chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            decoded = pending.result()  # type: ignore[union-attr]
            if k + 1 < len(chunks):
                pending = ahead.submit(run, chunks[k + 1])
            yield k * chunk_size, chunk, decoded


def _read_blobs(refs: list[ImageRef], limits: Limits) -> list[bytes | InputError]:
    """Each file's bytes (capped by ``limits``), or the :class:`InputError` that says why not."""
    blobs: list[bytes | InputError] = []
    archives: dict[Path, zipfile.ZipFile] = {}
    try:
        for ref in refs:
            try:
                zf = None
                if ref.member is not None:
                    zf = archives.get(ref.path) or archives.setdefault(ref.path, zipfile.ZipFile(ref.path))
                blobs.append(ref.read_bytes(limits, archive=zf))
            except (OSError, zipfile.BadZipFile, RuntimeError, NotImplementedError, KeyError) as exc:
                blobs.append(InputError(f"{ref.name}: cannot be read ({exc})."))
    finally:
        for zf in archives.values():
            zf.close()
    return blobs


def class_counts(labels: Iterable[str | None], label_order: Sequence[str]) -> list[tuple[str, int, float]]:
    """``(label, count, percent)`` for every label in ``label_order`` (percent of labelled items)."""
    counts = Counter(lab for lab in labels if lab is not None)
    total = sum(counts.values())
    return [(lab, counts.get(lab, 0), 100.0 * counts.get(lab, 0) / total if total else 0.0) for lab in label_order]


@dataclass
class BatchResult:
    """Predictions for a batch of files from several models of one task."""

    models: list[str]
    labels: list[str]
    files: list[str] = field(default_factory=list)
    predictions: list[dict[str, Prediction]] = field(default_factory=list)
    consensus: list[Consensus] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: images predicted, and their consensus labels counted (also when the rows are not kept)
    n_predicted: int = 0
    label_counts: Counter = field(default_factory=Counter)
    n_uncertain: int = 0

    def header(self) -> list[str]:
        cols = ["file"]
        for m in self.models:
            cols += [f"{m} label", f"{m} confidence"]
        return cols + ["consensus", "agreement", "uncertain", "reasons"]

    def add(self, name: str, preds: dict[str, Prediction], *, keep: bool = True) -> Consensus:
        """Count one image's predictions (and keep them, with ``keep``); returns their consensus."""
        cons = consensus(list(preds.values()))
        self.n_predicted += 1
        self.label_counts[cons.label] += 1
        self.n_uncertain += bool(cons.uncertain)
        if keep:
            self.files.append(name)
            self.predictions.append(preds)
            self.consensus.append(cons)
        return cons

    def row(self, name: str, preds: dict[str, Prediction], cons: Consensus) -> list[Any]:
        """One CSV row (the columns of :meth:`header`)."""
        row: list[Any] = [name]
        for m in self.models:
            row += [preds[m].label, round(preds[m].confidence, 4)]
        return row + [cons.label, f"{len(cons.agree)}/{len(preds)}", cons.uncertain, "; ".join(cons.reasons)]

    def rows(self) -> list[list[Any]]:
        return [self.row(n, p, c) for n, p, c in zip(self.files, self.predictions, self.consensus)]

    def counts(self) -> list[tuple[str, int, float]]:
        """Per-class counts of the consensus labels (all images, flagged ones included)."""
        labels = self.label_counts.elements() if self.label_counts else (c.label for c in self.consensus)
        return class_counts(labels, self.labels)

    def gathered(self, procs: Any) -> BatchResult:
        """On the main process of a data-parallel run (:class:`cellhub.distributed.Processes`), this
        result with every process's counts summed (rows are not gathered: they went to per-process
        CSV parts); the other processes get theirs back unchanged."""
        parts = procs.gather({"n": self.n_predicted, "labels": dict(self.label_counts), "uncertain": self.n_uncertain,
                              "skipped": self.skipped, "seconds": self.seconds})
        if not procs.is_main:
            return self
        self.n_predicted = sum(p["n"] for p in parts)
        self.label_counts = sum((Counter(p["labels"]) for p in parts), Counter())
        self.n_uncertain = sum(p["uncertain"] for p in parts)
        self.skipped = [s for p in parts for s in p["skipped"]]
        self.seconds = max(p["seconds"] for p in parts)  # they ran side by side
        return self

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(self.header())
            writer.writerows(self.rows())
        return path


def _task_labels(predictors: Sequence[Predictor]) -> list[str]:
    labels: list[str] = []
    for p in predictors:
        labels += [lab for lab in p.labels if lab not in labels]
    return labels


def _decoder(transforms: Sequence[Callable[[Image.Image], torch.Tensor]], limits: Limits, check_cells: bool,
             task: str | None = None) -> Callable[[ImageRef, bytes | InputError], tuple[Image.Image, list[torch.Tensor]] | InputError]:
    """``decode(ref, blob)``: the image and its tensors for each transform, or the InputError saying why not."""

    def decode(ref: ImageRef, blob: bytes | InputError) -> tuple[Image.Image, list[torch.Tensor]] | InputError:
        if isinstance(blob, InputError):
            return blob
        try:
            img = read_image(blob, name=ref.name, limits=limits)
        except InputError as exc:
            return exc
        if check_cells:
            verdict = check_cell_image(img)
            if not verdict.ok:
                return InputError(f"{ref.name}: not a blood-cell image: {verdict.reason}; not classified.")
            problem = whole_field_problem(img, task)
            if problem:
                return InputError(f"{ref.name}: {problem}. Not classified.")
        return img, [t(img) for t in transforms]

    return decode


def distinct_configs(configs: Sequence[Any]) -> tuple[list[int], list[int]]:
    """One preprocessing per distinct data config: ``(first, which)``, where ``first[k]`` is the index
    of the first holder of the k-th distinct config (in order of appearance) and ``which[i]`` the
    distinct config of ``configs[i]``. Models that share a config share its tensors."""
    keys = [json.dumps(c, sort_keys=True, default=str) for c in configs]
    distinct = list(dict.fromkeys(keys))
    return [keys.index(k) for k in distinct], [distinct.index(k) for k in keys]


@dataclass
class DecodedChunk:
    """One chunk of :func:`decode_files`: the images that decoded, their tensors (one per transform),
    and the ``(name, reason)`` of those that did not."""

    start: int
    refs: list[ImageRef]
    images: list[Image.Image]
    tensors: list[list[torch.Tensor]]
    skipped: list[tuple[str, str]]


def decode_files(
    refs: Sequence[ImageRef],
    transforms: Sequence[Callable[[Image.Image], torch.Tensor]],
    *,
    limits: Limits = DEFAULT_LIMITS,
    check_cells: bool = True,
    task: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
) -> Iterator[DecodedChunk]:
    """Read, check and preprocess ``refs`` ``batch_size`` at a time, in threads (:func:`iter_decoded`).

    Each image is run through every one of ``transforms``. A file that cannot be read or decoded,
    or (with ``check_cells``) that is not a stained blood-cell image or is a whole microscope field
    where a crop is expected, is not decoded further: it comes back in the chunk's ``skipped`` with
    the reason.
    """
    decode = _decoder(transforms, limits, check_cells, task)
    for start, chunk, decoded in iter_decoded(list(refs), decode, read=lambda c: _read_blobs(c, limits),
                                              chunk_size=batch_size, workers=workers):
        out = DecodedChunk(start, [], [], [], [])
        for ref, item in zip(chunk, decoded):
            if isinstance(item, InputError):
                out.skipped.append((ref.name, str(item).removeprefix(f"{ref.name}: ")))
            else:
                out.refs.append(ref)
                out.images.append(item[0])
                out.tensors.append(item[1])
        yield out


def predict_files(
    predictors: Sequence[Predictor],
    refs: Sequence[ImageRef],
    *,
    limits: Limits = DEFAULT_LIMITS,
    batch_size: int = 32,
    workers: int | None = None,
    with_cam: bool = False,
    progress: ProgressFn | None = None,
    on_chunk: Callable[[list[ImageRef], list[Image.Image], list[dict[str, Prediction]]], None] | None = None,
    forward_batch_size: int | None = None,
    keep_results: bool = True,
    check_cells: bool = True,
) -> BatchResult:
    """Predict every image with every model: ``batch_size`` images decoded at once, run through
    each model ``forward_batch_size`` at a time (default: each predictor's own, 8 on the CPU).

    Chunks are decoded and preprocessed in parallel threads by :func:`iter_decoded` (``workers``;
    default CPUs + 1, at most 8), the next chunk while the models run on this one; memory stays
    bounded for large batches. Undecodable files are skipped and listed in
    ``result.skipped``. ``progress(done, total, message)`` is called after each chunk;
    ``on_chunk(refs, images, predictions)`` lets a caller use the decoded images (e.g. to save
    CAM overlays, or to stream rows to a CSV) before they are dropped. With ``keep_results=False``
    the result keeps only the counts and the skipped files, so memory stays flat for any number
    of images. With ``check_cells`` an image that does not look like a stained blood-cell image
    (:func:`cellhub.cellcheck.check_cell_image`) is not classified: it is listed in ``skipped`` as
    "not a blood-cell image" with the reason; so is one that looks like a whole microscope field
    rather than one cell's crop (:func:`cellhub.fields.whole_field_problem`).
    """
    if not predictors:
        raise ValueError("no models to predict with")
    names = [p.name for p in predictors]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    result = BatchResult(models=names, labels=_task_labels(predictors))
    t0 = time.perf_counter()
    total = len(refs)
    if progress:
        progress(0, total, "decoding images")
    first, which = distinct_configs([p.data_config for p in predictors])  # models sharing one share the tensors
    transforms = [predictors[i].transform for i in first]

    tasks = {str(p.task) for p in predictors}
    chunks = decode_files(refs, transforms, limits=limits, check_cells=check_cells,
                          task=tasks.pop() if len(tasks) == 1 else None, batch_size=batch_size, workers=workers)
    for chunk in chunks:
        result.skipped += chunk.skipped
        good_refs, images, tensors = chunk.refs, chunk.images, chunk.tensors
        if images:
            # one batch per distinct preprocessing, read by every model that shares it; each model runs
            # it in its own forward batches (8 on the CPU: faster per image)
            stacked = [torch.stack([t[k] for t in tensors]) for k in range(len(first))]
            per_model = {
                p.name: p.predict_preprocessed(stacked[which[j]], with_cam=with_cam, batch_size=forward_batch_size)
                for j, p in enumerate(predictors)
            }
            chunk_preds = [{m: per_model[m][i] for m in names} for i in range(len(images))]
            for ref, preds in zip(good_refs, chunk_preds):
                result.add(ref.name, preds, keep=keep_results)
            if on_chunk is not None:
                on_chunk(good_refs, images, chunk_preds)
        if progress:
            done = min(chunk.start + batch_size, total)
            progress(done, total, f"{done}/{total} images")
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- results CSV
def csv_parts(path: Path) -> list[Path]:
    """The per-process files of an ``accelerate launch`` run writing ``path`` (``path.part0``, ...), in rank order."""
    parts = path.parent.glob(path.name + ".part*")
    return sorted((p for p in parts if p.name[len(path.name) + 5:].isdigit()),
                  key=lambda p: int(p.name[len(path.name) + 5:]))


def done_rows(path: Path | None, header: list[str]) -> set[str]:
    """Files an earlier run already wrote to ``path`` (and to its per-process parts, if it was cut off)."""
    done: set[str] = set()
    if path is None:
        return done
    for f in [path, *csv_parts(path)]:
        if not f.is_file() or f.stat().st_size == 0:
            continue
        with open(f, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        if rows and rows[0] != header:
            raise ValueError(f"--resume: {f} has the columns {rows[0]}, not {header}: it was written by "
                             "other models. Use a new --csv file.")
        done |= {r[0] for r in rows[1:] if r}
    return done


class CsvStream:
    """The results CSV, written a chunk at a time (flushed); appended to when resuming."""

    def __init__(self, path: Path | None, header: list[str], append: bool) -> None:
        self.path = path
        self._fh = self._writer = None
        if path is None:
            return
        fresh = not (append and path.is_file() and path.stat().st_size > 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "w" if fresh else "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._fh)
        if fresh:
            self._writer.writerow(header)

    def write(self, rows: list[list[Any]]) -> None:
        if self._writer is not None:
            self._writer.writerows(rows)
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def merge_csv_parts(path: Path, header: list[str], resume: bool) -> None:
    """Append the per-process parts' rows to ``path`` in rank order (the input order), then delete them."""
    out = CsvStream(path, header, append=resume)
    try:
        for part in csv_parts(path):
            with open(part, newline="", encoding="utf-8") as fh:
                out.write(list(csv.reader(fh))[1:])
            part.unlink()
    finally:
        out.close()
