"""cellhub demo: classify blood-smear cell images with every loaded model, side by side.

    python app.py                                  # bundled checkpoints in ./checkpoints, http://127.0.0.1:7860
    python app.py --models org/model ./my_ckpt     # add Hub models or local checkpoint folders
    python app.py --no-bundled --models org/model  # only those
    CELLHUB_MODELS="org/a org/b" python app.py     # the same through the environment (Hugging Face Spaces)

Layout and wiring only: model logic lives in ``cellhub.predict`` and ``cellhub.cam``; labels,
preprocessing and abstention thresholds come from each checkpoint's ``config.json``.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import inspect
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Before torch starts OpenMP: idle OpenMP threads sleep instead of spinning. The app runs model
# calls in several threads next to Gradio's own; spinning threads made CPU inference 10-40x slower
# on a busy 2-core machine (bench/RESULTS.md, run 1, finding 1). Set it in the environment to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from cellhub.batch import BatchResult, predict_files  # noqa: E402
from cellhub.cellcheck import check_cell_image  # noqa: E402
from cellhub.fields import (  # noqa: E402
    ROW_HEADER,
    FieldsResult,
    analyze_fields,
    annotate,
    cell_crops,
    classified_kind,
    result_rows,
    whole_field_problem,
)
from cellhub.images import DEFAULT_LIMITS, InputError, Limits, collect_images, read_image  # noqa: E402
from cellhub.predict import Consensus, Prediction, Predictor, consensus, load_predictors  # noqa: E402
from cellhub.serving import (  # noqa: E402
    CacheJanitor,
    InFlight,
    ServingPlan,
    forget_files,
    limit_malloc_arenas,
    serving_plan,
    worker_plan,
)
from cellhub.tasks import TASKS  # noqa: E402

logger = logging.getLogger("cellhub.app")

ROOT = Path(__file__).resolve().parent
BUNDLED_DIR = ROOT / "checkpoints"
ENV_MODELS = "CELLHUB_MODELS"
#: upload size the server accepts at all (a batch .zip); per-image limits are in ``Limits``
MAX_UPLOAD = "300mb"
BATCH_SIZE = 32

DISCLAIMER = (
    "Research and teaching tool — **not a medical device**. Predictions can be wrong, especially on "
    "images unlike the training data (other stains, microscopes, magnifications); a flagged result "
    "must be reviewed by a qualified person."
)


# ---------------------------------------------------------------------------------------------
# Model discovery
# ---------------------------------------------------------------------------------------------


def bundled_checkpoints(root: str | Path | None = None) -> list[Path]:
    """Checkpoint folders (with a ``config.json``) directly under ``root`` (default
    ``./checkpoints`` next to app.py), sorted by name."""
    root = Path(BUNDLED_DIR if root is None else root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def model_sources(models: Sequence[str] = (), *, bundled: bool = True, env: str | None = None) -> list[str]:
    """Bundled checkpoints + ``CELLHUB_MODELS`` (comma/space separated) + ``--models``, deduplicated."""
    env = os.environ.get(ENV_MODELS, "") if env is None else env
    sources = [str(p) for p in bundled_checkpoints()] if bundled else []
    sources += [s for s in env.replace(",", " ").split() if s]
    sources += [str(m) for m in models]
    seen: set[str] = set()
    return [s for s in sources if not (s in seen or seen.add(s))]


def _task_of(predictor: Predictor) -> str:
    """The checkpoint's task; a checkpoint without one is matched to a task by its labels."""
    if predictor.task:
        return str(predictor.task)
    for name, task in TASKS.items():
        if sorted(task.labels) == sorted(predictor.labels):
            return name
    return "custom: " + ", ".join(predictor.labels)


def _task_title(task: str) -> str:
    spec = TASKS.get(task)
    return task.replace("-", " ").capitalize() if spec is None else spec.name.replace("-", " ").capitalize()


# ---------------------------------------------------------------------------------------------
# Formatting (pure functions, no model logic)
# ---------------------------------------------------------------------------------------------


def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _threshold_text(p: Predictor) -> str:
    return "none in checkpoint" if p.threshold is None else f"{p.threshold:.3f}"


def models_markdown(by_task: dict[str, list[Predictor]], failures: Sequence[tuple[str, str]]) -> str:
    if not by_task:
        lines = ["**No model is loaded.** Start the app with `python app.py --models ORG/NAME` or a checkpoint folder."]
    else:
        lines = ["| model | task | architecture | labels | abstention threshold |", "|---|---|---|---|---|"]
        for task, preds in by_task.items():
            for p in preds:
                lines.append(
                    f"| {p.name} | {task} | {p.architecture} | {', '.join(p.labels)} | {_threshold_text(p)} |"
                )
    for src, err in failures:
        lines.append(f"\n⚠️ could not load `{src}`: {err.splitlines()[0][:300]}")
    return "\n".join(lines)


def consensus_markdown(cons: Consensus, n_models: int) -> str:
    if cons.label is None:
        return "No prediction."
    head = f"### Consensus: **{cons.label}** — {len(cons.agree)} of {n_models} model(s) agree ({', '.join(cons.agree)})"
    if cons.uncertain:
        body = "⚠️ **Uncertain — refer for manual review:** " + "; ".join(cons.reasons) + "."
    else:
        body = "✅ All models agree and every confidence is at or above its checkpoint's abstention threshold."
    notes = "".join(f"\n\nℹ️ {n}." for n in cons.notes)
    return f"{head}\n\n{body}{notes}"


def heat_map_name(p: Predictor | None) -> str:
    """What the model's heat map is: Grad-CAM, or an occlusion map where its CAM does not localise."""
    return "occlusion map" if p is not None and p.cam_method == "occlusion" else "Grad-CAM"


def model_header(p: Predictor, pred: Prediction) -> str:
    flag = " · ⚠️ under threshold" if pred.abstain else ""
    if pred.cam is None:
        cam_note = " · no Grad-CAM for this model type"
    elif heat_map_name(p) == "occlusion map":
        cam_note = " · heat map: occlusion (where hiding a patch lowers the probability most)"
    else:
        cam_note = ""
    return (
        f"#### {p.name}\n{pred.label} ({pred.confidence:.1%}) · {_fmt_seconds(pred.seconds)} · "
        f"threshold {_threshold_text(p)}{flag}{cam_note}"
    )


def counts_markdown(result: BatchResult, task: str) -> str:
    n = len(result.files)
    flagged = sum(c.uncertain for c in result.consensus)
    title = "White-cell differential" if task == "blood-cells" else "Share of cells by class"
    lines = [
        f"### {title} — {n} image(s), consensus of {len(result.models)} model(s), {_fmt_seconds(result.seconds)}",
        "| class | count | % |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {count} | {pct:.1f}% |" for label, count, pct in result.counts()]
    lines.append(f"\n{flagged} of {n} image(s) flagged **uncertain — refer for manual review**.")
    return "\n".join(lines)


def skipped_markdown(skipped: Sequence[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    shown = "\n".join(f"- `{name}`: {reason}" for name, reason in skipped[:50])
    more = f"\n- … and {len(skipped) - 50} more" if len(skipped) > 50 else ""
    return f"**Skipped {len(skipped)} file(s):**\n{shown}{more}"


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def _friendly_decode_errors(image: gr.Image) -> gr.Image:
    """Make ``image``'s upload decoding errors a clear ``gr.Error`` instead of a stack trace.

    Wraps this instance's ``preprocess`` (a subclass would make Gradio write a ``.pyi`` stub
    next to app.py at import time).
    """
    original = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except gr.Error:
            raise
        except Image.DecompressionBombError as exc:
            name = getattr(payload, "orig_name", None) or "the uploaded image"
            raise gr.Error(f"{name} has too many pixels ({exc}); downscale it or crop the cell.", print_exception=False) from exc
        except Exception as exc:  # PIL could not even read the header
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            raise gr.Error(
                f"{name} is not an image that can be read ({type(exc).__name__}); upload a PNG, JPEG, "
                "TIFF, BMP or WebP cell image.",
                print_exception=False,
            ) from exc

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


@dataclass
class AppState:
    """What the handlers share, built once per app by ``make_state``.

    ``by_task`` maps a task name to its predictors (in ``TASKS`` order, other tasks after);
    ``out_dir`` holds the CAM overlays and batch CSVs; ``last_prune`` is the
    ``time.monotonic()`` of the last ``prune_outputs`` sweep.
    """

    by_task: dict[str, list[Predictor]]
    out_dir: Path
    failures: Sequence[tuple[str, str]] = ()
    limits: Limits = DEFAULT_LIMITS
    last_prune: float = field(default_factory=time.monotonic)
    #: requests running now (a shutdown waits for them)
    inflight: InFlight = field(default_factory=InFlight)

    @property
    def tasks(self) -> list[str]:
        return list(self.by_task)

    @property
    def n_slots(self) -> int:
        """Result slots on the page: one per model of the task with the most models."""
        return max((len(v) for v in self.by_task.values()), default=1)


def make_state(
    models: Sequence[Predictor],
    *,
    failures: Sequence[tuple[str, str]] = (),
    limits: Limits = DEFAULT_LIMITS,
    out_dir: str | Path | None = None,
) -> AppState:
    """Group ``models`` by task; outputs go to ``out_dir`` (default: a fresh temporary folder,
    deleted at exit)."""
    by_task: dict[str, list[Predictor]] = {}
    for p in models:
        by_task.setdefault(_task_of(p), []).append(p)
    order = {name: i for i, name in enumerate(TASKS)}
    by_task = dict(sorted(by_task.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="cellhub-app-"))
        atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    else:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    return AppState(by_task=by_task, out_dir=out_dir, failures=tuple(failures), limits=limits)


def models_for(state: AppState, task: str | None) -> list[Predictor]:
    """The predictors of ``task``; a ``gr.Error`` when none is loaded or the task is unknown."""
    if not state.by_task:
        raise gr.Error("No model is loaded; restart the app with --models or bundled checkpoints.")
    key = (task or "").strip()
    if key not in state.by_task:
        raise gr.Error(f"Unknown task {task!r}: the loaded models cover {', '.join(map(repr, state.tasks))}.")
    return state.by_task[key]


def prune_outputs(state: AppState, max_age: float = 3600.0, every: float = 60.0) -> None:
    """Delete overlays and CSVs older than ``max_age`` seconds, at most once every ``every``
    seconds, so an app built without ``main()`` (no :class:`CacheJanitor` on Gradio's folder)
    does not fill its disk either. The same sweep as the janitor's, by age only."""
    now = time.monotonic()
    if now - state.last_prune < every:
        return
    state.last_prune = now
    CacheJanitor(state.out_dir, max_bytes=2**62, min_age=max_age, max_age=max_age, trim=False).sweep()


def save_overlay(state: AppState, p: Predictor, img: Image.Image, pred: Prediction) -> str:
    """The CAM overlay as a PNG under a name of its own, returned as a path.

    Returning a PIL image makes Gradio write it to ``cache/<hash of its bytes>/image.png`` in
    place, so two requests that produce the same overlay rewrite the file while the first
    is still downloading it (truncated images under concurrent identical uploads,
    bench/RESULTS.md finding 6). Gradio copies a returned path atomically.
    """
    prune_outputs(state)
    path = state.out_dir / f"cam-{uuid.uuid4().hex}.png"
    p.overlay(img, pred).save(path, format="PNG")
    return str(path)


def predict_single(state: AppState, image: str | None, task: str) -> list[Any]:
    """``/predict``: [consensus markdown, JSON summary, then (header, probabilities, CAM path)
    per slot], the slots beyond ``task``'s models ``None``."""
    predictors = models_for(state, task)
    if not image:
        raise gr.Error("No image uploaded: drop a cell image (PNG, JPEG, TIFF, BMP or WebP) first.")
    try:
        img = read_image(image, name=Path(image).name, limits=state.limits)
    except InputError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    verdict = check_cell_image(img)
    if not verdict.ok:  # said so, not classified
        note = (f"### Not a blood-cell image\n{Path(image).name}: {verdict.reason}. Nothing was classified: upload "
                "a crop of one stained blood cell (or use the *Whole field* tab for a field photo).")
        summary = {"task": task, "image_size": list(img.size), "not_a_blood_cell": True, "reason": verdict.reason,
                   "consensus": None, "models": []}
        return [note, summary, *([None, None, None] * state.n_slots)]
    problem = whole_field_problem(img, task)
    if problem:  # one label for a whole field would mislead: said so, not classified
        note = (f"### A whole field, not one cell\n{Path(image).name}: {problem}. Nothing was classified here: "
                "use the *Whole field* tab, which finds and classifies every cell.")
        summary = {"task": task, "image_size": list(img.size), "whole_field": True, "reason": problem,
                   "consensus": None, "models": []}
        return [note, summary, *([None, None, None] * state.n_slots)]
    preds: list[Prediction] = []
    slots: list[Any] = []
    for p in predictors:
        pred = p.predict([img], with_cam=True)[0]
        preds.append(pred)
        slots += [model_header(p, pred), pred.probs, save_overlay(state, p, img, pred) if pred.cam is not None else None]
    slots += [None, None, None] * (state.n_slots - len(predictors))  # hidden slots of other tasks
    cons = consensus(preds)
    summary = {
        "task": task,
        "image_size": list(img.size),
        "consensus": cons.as_dict(),
        "models": [pr.as_dict() for pr in preds],
    }
    return [consensus_markdown(cons, len(preds)), summary, *slots]


def show_slots(state: AppState, task: str | None) -> list[Any]:
    """Show one (header, probabilities, Grad-CAM) slot per model of ``task``; clear old results."""
    predictors = state.by_task.get(task or "", [])
    updates: list[Any] = [gr.update(value=None), gr.update(value=None)]
    for i in range(state.n_slots):
        p = predictors[i] if i < len(predictors) else None
        name = p.name if p else ""
        updates += [
            gr.update(value=f"#### {name}" if p else "", visible=p is not None),
            gr.update(value=None, label=f"{name}: probabilities", visible=p is not None),
            gr.update(value=None, label=f"{name}: {heat_map_name(p)} of the predicted class", visible=p is not None),
        ]
    return updates


def rerun_single(state: AppState, image: str | None, task: str) -> list[Any]:
    """After a task switch: classify the image already on the page, if any."""
    if not image:
        return [gr.update() for _ in range(2 + 3 * state.n_slots)]
    return predict_single(state, image, task)


def adapted_for_batch(predictors: list[Predictor], refs: list[Any], limits: Limits) -> tuple[list[Predictor], str]:
    """The models adapted to the uploaded batch (``cellhub.adapt.adapt_predictors``) and the note saying so."""
    from cellhub.adapt import adapt_predictors

    try:
        adapted, report, notes = adapt_predictors(predictors, refs, limits=limits)
    except ValueError as exc:
        raise gr.Error(f"Could not adapt the models to this batch: {exc}", print_exception=False) from exc
    note = (f"**Adapted to this batch**: BatchNorm statistics re-estimated on its {report.n_images} usable image(s) "
            "(no labels read). This helps most on a lab the models were not trained on, and can cost accuracy on "
            "one they were; check on labelled images (`python -m cellhub evaluate`) before relying on it.")
    return adapted, note + "".join(f"\n- {n}" for n in notes)


def predict_batch(
    state: AppState, files: list[str] | str | None, task: str, adapt: bool = False,
    progress: gr.Progress = gr.Progress()
) -> list[Any]:
    """``/predict_batch``: [counts markdown, per-image table, CSV path, skipped-files markdown].

    ``adapt``: first fit the models to the batch itself (AdaBN; one lab's crops, at least
    ``cellhub.adapt.MIN_IMAGES``), then classify with the adapted models; the summary says how
    many consensus labels that changed. ``progress`` is called as
    ``progress((done, total), desc=..., unit="images")``.
    """
    predictors = models_for(state, task)
    if isinstance(files, (str, Path)):
        files = [files]
    paths = [str(getattr(f, "name", f)) for f in (files or []) if f]
    if not paths:
        raise gr.Error("No files uploaded: add cell images, or one .zip of them.")
    try:
        refs, skipped = collect_images(paths, names=[Path(p).name for p in paths], limits=state.limits)
    except InputError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    if not refs:
        raise gr.Error("No images found in the upload. " + "; ".join(f"{n}: {r}" for n, r in skipped[:5]))

    def report(done: int, total: int, message: str) -> None:
        progress((done, total), desc=message, unit="images")

    note = ""
    if adapt:
        progress(0.0, desc="adapting the models to this batch")
        adapted, note = adapted_for_batch(predictors, refs, state.limits)  # refused before any classifying
        original = predict_files(predictors, refs, limits=state.limits, batch_size=BATCH_SIZE)
        predictors = adapted
    result = predict_files(predictors, refs, limits=state.limits, batch_size=BATCH_SIZE, progress=report)
    if adapt:
        before = {f: c.label for f, c in zip(original.files, original.consensus)}
        changed = sum(before.get(f) != c.label for f, c in zip(result.files, result.consensus))
        note += f"\n\nAdapting changed the consensus label of {changed} of {len(result.files)} image(s)."
    result.skipped = skipped + result.skipped
    if not result.files:
        raise gr.Error(
            f"None of the {len(refs)} file(s) could be read as an image: "
            + "; ".join(f"{n}: {r}" for n, r in result.skipped[:5])
        )
    prune_outputs(state)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    csv_path = result.write_csv(state.out_dir / f"cellhub-{task}-{stamp}.csv")
    table = {"headers": result.header(), "data": result.rows()}
    summary = counts_markdown(result, task) + (f"\n\n{note}" if note else "")
    return [summary, table, str(csv_path), skipped_markdown(result.skipped)]


# ------------------------------------------------------------------------------ whole fields
def fields_summary_markdown(result: FieldsResult, task: str) -> str:
    """The pooled differential or parasitemia with its 95% interval, then a table per field."""
    s = result.summary
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = []
    if task == "malaria":
        lo, hi = s["ci95"]
        lines.append(f"### Parasitemia {pct(s['parasitemia'])} (95% CI {pct(lo)}–{pct(hi)})")
        lines.append(f"{s['n_parasitized']} parasitized of {s['n_rbc']} red cells in {s['fields']} field(s); "
                     f"{s.get('n_uncertain_rbc', 0)} flagged uncertain (without them: "
                     f"{pct(s['parasitemia_confident'])} of {s['n_rbc_confident']}).")
        more = s.get("malaria_more_cells_needed")
        if more:
            lines.append(f"About {more} more red cells would narrow the interval to ±{100 * s['malaria_half_width']:g} "
                         "points.")
    else:
        n = s.get("n_wbc", 0)
        lines.append(f"### Differential over {n} white cell{'s' if n != 1 else ''} in {s['fields']} field(s)")
        lines += ["", "| class | cells | share | 95% CI |", "|---|---|---|---|"]
        for label, d in s.get("differential", {}).items():
            lo, hi = d["ci95"]
            lines.append(f"| {label} | {d['count']} | {pct(d['fraction'])} | {pct(lo)}–{pct(hi)} |")
        more = s.get("differential_more_cells_needed")
        lines.append("")
        if more:
            lines.append(f"About {more} more white cells would narrow every interval to "
                         f"±{100 * s['differential_half_width']:g} points (a lab differential counts 100 cells).")
        if s.get("n_uncertain_wbc"):
            lines.append(f"{s['n_uncertain_wbc']} white cell(s) flagged uncertain: review them (yellow boxes).")
    lines += ["", "| field | white cells | red cells | platelets | uncertain | labels |", "|---|---|---|---|---|---|"]
    for im in result.images:
        c = im.counts
        labels = ", ".join(f"{k} {v}" for k, v in c["by_label"].items()) or "–"
        lines.append(f"| {im.file} | {c['wbc']} | {c['rbc']} | {c['platelet']} | {c['uncertain']} | {labels} |")
    return "\n".join(lines)


def analyze_field_upload(
    state: AppState, files: list[str] | str | None, task: str, progress: gr.Progress = gr.Progress()
) -> list[Any]:
    """``/analyze_field``: [annotated fields (gallery), summary markdown, per-cell table, CSV path,
    skipped-files markdown, JSON]; the session keeps the fields for a selected cell's Grad-CAM."""
    predictors = models_for(state, task)
    if isinstance(files, (str, Path)):
        files = [files]
    paths = [str(getattr(f, "name", f)) for f in (files or []) if f]
    if not paths:
        raise gr.Error("No files uploaded: add photos of microscope fields, or one .zip of them.")
    prune_outputs(state)
    kept: dict[str, str] = {}
    gallery: list[tuple[str, str]] = []

    def keep(res: Any, img: Image.Image) -> None:
        stem = uuid.uuid4().hex
        img.convert("RGB").save(state.out_dir / f"field-{stem}.jpg", quality=92)
        annotate(img, res).save(state.out_dir / f"annotated-{stem}.jpg", quality=90)
        kept[res.file] = str(state.out_dir / f"field-{stem}.jpg")
        gallery.append((str(state.out_dir / f"annotated-{stem}.jpg"), res.file))

    try:
        result = analyze_fields(paths, predictors, task, limits=state.limits, on_field=keep,
                                progress=lambda d, t: progress((d, t), desc="analysing fields", unit="fields"))
    except InputError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    if not result.images:
        raise gr.Error("No field could be analysed: " + "; ".join(f"{n}: {r}" for n, r in result.skipped[:5]))
    rows = [row for im in result.images for row in result_rows(im)]
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    csv_path = result.write_csv(state.out_dir / f"cellhub-fields-{task}-{stamp}.csv")
    session = {"task": task, "fields": {im.file: (kept[im.file], im) for im in result.images},
               "rows": [(r[0], int(r[1]) - 1) for r in rows]}
    return [gallery, fields_summary_markdown(result, task), {"headers": ROW_HEADER, "data": rows}, str(csv_path),
            skipped_markdown(result.skipped), result.as_dict(), session]


def field_cell_cam(state: AppState, session: dict | None, evt: gr.SelectData) -> list[Any]:
    """A row of the per-cell table selected: that cell's crop through every model, with Grad-CAM."""
    if not session or evt is None or not isinstance(evt.index, (list, tuple)):
        return [[], "Select a cell in the table to see where each model looked."]
    row = int(evt.index[0])
    if not 0 <= row < len(session["rows"]):
        return [[], "Select a cell in the table to see where each model looked."]
    file, i = session["rows"][row]
    src, res = session["fields"][file]
    cell = res.cells[i]
    kind = classified_kind(session["task"])
    if cell.kind != kind:
        return [[], f"Cell {i + 1} of {file} is a {cell.kind}: the {session['task']} models do not classify it."]
    img = read_image(src, limits=state.limits)
    wbc_boxes = [c.box for c in res.cells if c.kind == "wbc"]
    crop = cell_crops(img, [cell.box], kind, wbc_boxes)[0]
    out = []
    for p in models_for(state, session["task"]):
        pred = p.predict([crop], with_cam=True)[0]
        path = save_overlay(state, p, crop, pred) if pred.cam is not None else None
        if path:
            out.append((path, f"{p.name}: {pred.label} {pred.confidence:.0%}"))
    flag = " — uncertain, review it" if cell.uncertain else ""
    return [out, f"Cell {i + 1} of {file}: **{cell.label}**{flag}. Grad-CAM of each model's predicted class."]


def _bind(fn: Callable[..., Any], state: AppState) -> Callable[..., Any]:
    """``fn`` with ``state`` bound, for Gradio, counted in ``state.inflight`` while it runs. Its
    signature is ``fn``'s without ``state``, so Gradio still finds a ``gr.Progress`` default; it
    keeps ``fn``'s name (Gradio names an endpoint without ``api_name`` after it) and has no
    docstring (Gradio's API page would show it as the endpoint's description)."""
    bound = functools.partial(fn, state)

    def run(*args: Any, **kwargs: Any) -> Any:
        with state.inflight:
            return bound(*args, **kwargs)

    run.__name__ = run.__qualname__ = fn.__name__
    run.__signature__ = inspect.signature(bound)  # type: ignore[attr-defined]
    # Gradio finds gr.SelectData / gr.Progress parameters from the annotations: keep fn's
    run.__annotations__ = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k != "state"}
    run.__doc__ = None
    return run


def _single_tab(state: AppState) -> tuple[gr.Image, gr.Button, list[gr.components.Component]]:
    """The "Single image" tab's contents: (image input, Classify button, outputs of ``predict_single``)."""
    with gr.Row():
        image = _friendly_decode_errors(
            gr.Image(
                type="filepath",
                image_mode=None,  # our reader decodes (limits, EXIF, 16-bit) and reports errors
                sources=["upload", "clipboard"],
                label="Cell image",
                height=320,
                elem_id="single-image",
            )
        )
        with gr.Column():
            run = gr.Button("Classify", variant="primary", elem_id="classify")
            gr.Markdown(
                f"One cell crop per image (PNG, JPEG, TIFF, BMP, WebP), up to "
                f"{state.limits.max_pixels / 1e6:g} MP and {state.limits.max_image_bytes // 2**20} MB."
            )
    consensus_md = gr.Markdown(elem_id="consensus")
    slots: list[gr.components.Component] = []
    first = state.by_task.get(state.tasks[0], []) if state.tasks else []
    with gr.Row(equal_height=False):
        for i in range(state.n_slots):
            name = first[i].name if i < len(first) else ""
            with gr.Column(min_width=220):
                slots += [
                    gr.Markdown(f"#### {name}" if name else "", visible=bool(name), elem_id=f"model-{i}-header"),
                    gr.Label(
                        num_top_classes=5, label=f"{name}: probabilities", visible=bool(name), elem_id=f"model-{i}-label"
                    ),
                    gr.Image(
                        format="png",
                        label=f"{name}: {heat_map_name(first[i] if i < len(first) else None)} of the predicted class",
                        visible=bool(name),
                        interactive=False,
                        elem_id=f"model-{i}-cam",
                    ),
                ]
    with gr.Accordion("Result as JSON", open=False):
        result_json = gr.JSON(elem_id="result-json")
    return image, run, [consensus_md, result_json, *slots]


def _batch_tab() -> tuple[gr.File, gr.Checkbox, gr.Button, list[gr.components.Component]]:
    """The "Batch" tab's contents: (files input, adapt box, Classify all button, outputs of ``predict_batch``)."""
    files = gr.File(
        file_count="multiple",
        file_types=["image", ".zip"],
        label="Cell images, or a .zip of them",
        elem_id="batch-files",
    )
    adapt = gr.Checkbox(
        value=False, label="Adapt the models to this batch first (no labels needed)", elem_id="batch-adapt",
        info="For crops from a lab the models were not trained on: their BatchNorm statistics are re-estimated on "
             "this batch (at least 64 crops of one lab, of all kinds as they come). It can cost accuracy on the "
             "labs they were trained on (README, 'Adapt a model to your lab's images').")
    run_batch = gr.Button("Classify all", variant="primary", elem_id="classify-batch")
    batch_summary = gr.Markdown(elem_id="batch-summary")
    batch_table = gr.Dataframe(label="Per-image results", interactive=False, wrap=True, elem_id="batch-table")
    batch_csv = gr.File(label="Download CSV", interactive=False, elem_id="batch-csv")
    batch_skipped = gr.Markdown(elem_id="batch-skipped")
    return files, adapt, run_batch, [batch_summary, batch_table, batch_csv, batch_skipped]


def _fields_tab() -> tuple[gr.File, gr.Button, list[gr.components.Component], gr.Dataframe, list[Any]]:
    """The "Whole field" tab: (files, button, outputs of ``analyze_field_upload``, cell table, CAM outputs)."""
    files = gr.File(file_count="multiple", file_types=["image", ".zip"],
                    label="Photos of microscope fields (one smear), or a .zip of them", elem_id="field-files")
    run = gr.Button("Analyse fields", variant="primary", elem_id="analyze-fields")
    gr.Markdown("Every cell is found and boxed (white cells, red cells, platelets); the selected task's models "
                "classify the white cells (blood cells) or the red cells (malaria). Yellow boxes: uncertain.")
    gallery = gr.Gallery(label="Annotated fields", columns=2, height=420, elem_id="field-gallery")
    summary = gr.Markdown(elem_id="field-summary")
    table = gr.Dataframe(label="Cells (select a row for its Grad-CAM)", interactive=False, wrap=True,
                         elem_id="field-table")
    with gr.Row():
        cams = gr.Gallery(label="Selected cell: each model's Grad-CAM", columns=3, height=260, elem_id="field-cams")
        cam_note = gr.Markdown(elem_id="field-cam-note")
    csv_file = gr.File(label="Download CSV (one row per cell)", interactive=False, elem_id="field-csv")
    skipped = gr.Markdown(elem_id="field-skipped")
    with gr.Accordion("Result as JSON", open=False):
        as_json = gr.JSON(elem_id="field-json")
    session = gr.State(None)
    return files, run, [gallery, summary, table, csv_file, skipped, as_json, session], table, [session, cams, cam_note]


def build_app(
    models: Sequence[Predictor],
    *,
    failures: Sequence[tuple[str, str]] = (),
    limits: Limits = DEFAULT_LIMITS,
    concurrency: int = 2,
    queue_size: int = 32,
    out_dir: str | Path | None = None,
    delete_cache: tuple[int, int] = (300, 900),
) -> gr.Blocks:
    """The demo as a ``gr.Blocks`` (not launched) for already-loaded ``models``.

    At most ``concurrency`` requests run at once and ``queue_size`` wait (each told its place and
    expected wait); more are refused with "queue is full" rather than piling up on a CPU server.
    ``out_dir`` receives CAM overlays and CSVs: inside Gradio's cache folder they are served
    without a second copy. ``delete_cache`` is Gradio's own age-based sweep (every, older than; s).

    API (``gradio_client``): ``/predict`` (image file, task name), ``/predict_batch`` (list of
    image files or a .zip, task name, and optionally adapt: bool) and ``/analyze_field`` (list of field photos or a .zip, task name).
    """
    state = make_state(models, failures=failures, limits=limits, out_dir=out_dir)
    by_task, tasks = state.by_task, state.tasks
    with gr.Blocks(title="cellhub — blood-smear cell classifier", delete_cache=delete_cache) as demo:
        gr.Markdown(
            "# cellhub — blood-smear cell classifier\n"
            "Classify white blood cells (the four types eosinophil, lymphocyte, monocyte, neutrophil, or the "
            "eight classes of the PBC set) or malaria-infected red cells, from single-cell crops or whole "
            "microscope fields, with every loaded model side by side, each with a heat map of where it looked.\n\n"
            + DISCLAIMER
        )
        with gr.Accordion("Loaded models", open=not by_task or bool(failures)):
            gr.Markdown(models_markdown(by_task, failures), elem_id="models-table")
        task = gr.Radio(
            choices=[(f"{_task_title(t)} ({len(by_task[t])} model{'s' if len(by_task[t]) > 1 else ''})", t) for t in tasks],
            value=tasks[0] if tasks else None,
            label="Task",
            elem_id="task",
        )
        with gr.Tab("Single image"):
            image, run, single_outputs = _single_tab(state)
        with gr.Tab("Batch"):
            files, adapt, run_batch, batch_outputs = _batch_tab()
        with gr.Tab("Whole field"):
            field_files, run_fields, field_outputs, field_table, (session, cams, cam_note) = _fields_tab()

        single = _bind(predict_single, state)
        run.click(single, [image, task], single_outputs, api_name="predict")
        image.upload(single, [image, task], single_outputs, api_visibility="private")
        task.change(_bind(show_slots, state), [task], single_outputs, api_visibility="private").then(
            _bind(rerun_single, state), [image, task], single_outputs, api_visibility="private"
        )
        run_batch.click(_bind(predict_batch, state), [files, task, adapt], batch_outputs, api_name="predict_batch")
        run_fields.click(_bind(analyze_field_upload, state), [field_files, task], field_outputs,
                         api_name="analyze_field")
        field_table.select(_bind(field_cell_cam, state), [session], [cams, cam_note], api_visibility="private")
    demo.queue(default_concurrency_limit=max(1, concurrency), max_size=max(1, queue_size))
    demo.cellhub_state = state  # type: ignore[attr-defined]  # for the server loop (shutdown waits on it)
    return demo


#: what Gradio adds to one request on top of the models: upload, decode, PNG encode, the queue and
#: the HTTP round trips. Measured on 2 cores: ~0.1 s for a request that runs no model
#: (bench_app's no_model_roundtrip_p50_ms), ~0.2 s of a worker's time per request under 4 clients
#: (bench_soak: ~540 requests a minute through 2 workers with models taking ~12 ms).
WEB_OVERHEAD_S = 0.2


def measure_request_seconds(predictors: Sequence[Predictor], repeats: int = 3) -> float:
    """Seconds one single-image request takes a worker (every model of the busiest task, with CAM,
    measured on a drawn cell after a warm-up, plus :data:`WEB_OVERHEAD_S`): what the queue length
    is planned from."""
    from cellhub import synthetic

    by_task: dict[str, list[Predictor]] = {}
    for p in predictors:
        by_task.setdefault(_task_of(p), []).append(p)
    worst = 0.0
    for task, preds in by_task.items():
        img = (synthetic.draw_malaria_cell("parasitized", size=128, seed=1)[0] if task == "malaria"
               else synthetic.draw_blood_cell("neutrophil", seed=1))
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for p in preds:
                pred = p.predict([img], with_cam=True)[0]
                if pred.cam is not None:
                    p.overlay(img, pred)
            if i:  # the first run warms up
                times.append(time.perf_counter() - t0)
        worst = max(worst, statistics.median(times))
    return worst + WEB_OVERHEAD_S


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Serve the cellhub demo (Gradio). Loads the bundled checkpoints in ./checkpoints, the "
        f"models in ${ENV_MODELS} and those given with --models, once, at start.",
    )
    parser.add_argument("--models", nargs="+", default=[], metavar="ID_OR_DIR", help="Hub model ids or checkpoint folders")
    parser.add_argument("--no-bundled", action="store_true", help="do not load the checkpoints bundled in ./checkpoints")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="default 127.0.0.1; 0.0.0.0 to serve the network")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="default 7860")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--concurrency", type=int, default=_env_int("CELLHUB_CONCURRENCY"),
                        help="requests run at once (default: one per CPU core, at most 8, or $CELLHUB_CONCURRENCY); "
                             "the cores are shared out between them as torch threads")
    parser.add_argument("--queue-size", type=int, default=_env_int("CELLHUB_QUEUE_SIZE"),
                        help="requests waiting at most (default: what the workers serve in a minute, measured at "
                             "start, at least 64, or $CELLHUB_QUEUE_SIZE); each waiting client is told its place "
                             "and expected wait")
    parser.add_argument("--cache-max-mb", type=float, default=float(os.environ.get("CELLHUB_CACHE_MAX_MB", 400)),
                        help="disk for uploads and outputs (default 400 MB, or $CELLHUB_CACHE_MAX_MB): the oldest "
                             "files (over a minute old) are deleted above it")
    parser.add_argument("--grace", type=float, default=float(os.environ.get("CELLHUB_GRACE", 10)),
                        help="on SIGTERM / Ctrl+C, seconds to let queued and running requests finish (default 10, "
                             "or $CELLHUB_GRACE)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    return parser


def _plan(args: argparse.Namespace, predictors: Sequence[Predictor]) -> ServingPlan:
    import torch

    workers, threads = worker_plan(workers=args.concurrency)
    torch.set_num_threads(threads)
    seconds = measure_request_seconds(predictors) if args.queue_size is None else 1.0
    return serving_plan(seconds, workers=workers, threads_per_worker=threads, queue_size=args.queue_size)


def _drain_and_close(demo: gr.Blocks, grace: float) -> None:
    """Let queued and running requests finish (at most ``grace`` seconds), then close the server."""
    state: AppState = demo.cellhub_state  # type: ignore[attr-defined]
    queue = getattr(demo, "_queue", None)  # Gradio's queue: requests waiting and running

    def busy() -> int:
        waiting = len(queue) if queue is not None else 0
        running = queue.get_active_worker_count() if queue is not None else 0
        return max(state.inflight.count, running) + waiting

    print(f"Stopping: letting {busy()} queued or running request(s) finish (at most {grace:g} s)...", flush=True)
    deadline = time.monotonic() + grace
    while busy() and time.monotonic() < deadline:
        time.sleep(0.1)
    if busy():
        print(f"  {busy()} request(s) unfinished after {grace:g} s; closing anyway.", flush=True)
    demo.close()


class _StopSignals:
    """SIGTERM / Ctrl+C handling, installed before the models load so that no signal meets the
    default handler (which would kill the process and leave its temporary folders behind).

    The first signal asks for a graceful stop (drain, then close; before the server runs: stop as
    soon as it does); a second closes the server at once."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.demo: gr.Blocks | None = None
        self.grace = 10.0
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt  # block_thread closes the server now
        self.requested.set()
        if self.demo is not None:
            self._start_drain()

    def _start_drain(self) -> None:
        threading.Thread(target=_drain_and_close, args=(self.demo, self.grace), name="cellhub-shutdown",
                         daemon=True).start()

    def serve(self, demo: gr.Blocks, grace: float) -> None:
        """Block until the server is closed (after a signal, by the drain)."""
        self.demo, self.grace = demo, grace
        if self.requested.is_set():  # a signal came while the app was starting
            self._start_drain()
        demo.block_thread()  # returns once the server is closed


def _file_registries(demo: gr.Blocks) -> list[set[str]]:
    """Gradio's in-memory sets of served and uploaded file paths (each component's ``temp_files``,
    the app's upload sets), so that files the janitor deleted are forgotten there too."""
    sets = [b.temp_files for b in demo.blocks.values() if isinstance(getattr(b, "temp_files", None), set)]
    return sets + [s for s in getattr(demo, "temp_file_sets", []) if isinstance(s, set)]


def _load_and_build(args: argparse.Namespace, out_dir: Path) -> tuple[gr.Blocks, ServingPlan]:
    """Load every model once, report what loaded, plan the workers and queue, build the app."""
    sources = model_sources(args.models, bundled=not args.no_bundled)
    if not sources:
        print(f"No models to load: {BUNDLED_DIR} has no checkpoints and neither --models nor ${ENV_MODELS} is set.", file=sys.stderr)
    predictors, failures = load_predictors(sources, device=args.device)
    print(f"Loaded {len(predictors)} of {len(sources)} model(s):")
    for p in predictors:
        print(f"  ✓ {p.name:<28} task={_task_of(p):<12} labels={','.join(p.labels)}  threshold={_threshold_text(p)}")
    for src, err in failures:
        print(f"  ✗ {src}: {err.splitlines()[0]}  (skipped)")
    plan = _plan(args, predictors)
    demo = build_app(predictors, failures=failures, concurrency=plan.workers, queue_size=plan.queue_size,
                     out_dir=out_dir)
    return demo, plan


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.cache_max_mb <= 0:
        print(f"--cache-max-mb must be positive, got {args.cache_max_mb:g}", file=sys.stderr)
        return 2
    stop = _StopSignals()
    limit_malloc_arenas(2)  # before the worker threads exist: their arenas are what grows
    # uploads and outputs in one folder of ours (unless the host chose one): bounded, removed at exit
    root = Path(tempfile.mkdtemp(prefix="cellhub-app-"))
    own_cache = "GRADIO_TEMP_DIR" not in os.environ
    cache_root = Path(os.environ.setdefault("GRADIO_TEMP_DIR", str(root / "gradio")))
    out_dir = cache_root / f"cellhub-outputs-{os.getpid()}"
    janitor: CacheJanitor | None = None
    try:
        demo, plan = _load_and_build(args, out_dir)
        print(f"Serving plan: {plan.describe()}; uploads and outputs kept under {args.cache_max_mb:g} MB in "
              f"{cache_root}")
        janitor = CacheJanitor(cache_root, int(args.cache_max_mb * 2**20),
                               on_deleted=lambda paths: forget_files(_file_registries(demo), paths))
        _, local_url, share_url = demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            max_file_size=MAX_UPLOAD,
            show_error=True,
            prevent_thread_lock=True,
            quiet=True,
        )
        janitor.start()
        print(f"Serving on {local_url or f'http://{args.host}:{args.port}/'}" + (f"  public: {share_url}" if share_url else "") + "  (Ctrl+C to stop)", flush=True)
        stop.serve(demo, args.grace)
    finally:
        stop.restore()
        if janitor is not None:
            janitor.stop()
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        if own_cache:
            os.environ.pop("GRADIO_TEMP_DIR", None)
    print("Stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
