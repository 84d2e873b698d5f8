"""The Gradio app, launched in-process on a free port and driven through gradio_client."""
from __future__ import annotations

import csv
import io
import socket
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
from cellhub import hub  # noqa: E402
from cellhub.models import create_model  # noqa: E402
from cellhub.images import Limits  # noqa: E402
from cellhub.predict import load_predictors  # noqa: E402
from cellhub.synthetic import draw_blood_cell, draw_malaria_cell, draw_smear  # noqa: E402

BLOOD_LABELS = {"eosinophil", "lymphocyte", "monocyte", "neutrophil"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoints(root: Path) -> dict[str, Path]:
    """Two blood-cell models (one with an abstention threshold) and one malaria model."""
    out = {}
    for i, (name, task, thr) in enumerate(
        [("small-a", "blood-cells", 0.5), ("small-b", "blood-cells", None), ("small-malaria", "malaria", 0.6)]
    ):
        torch.manual_seed(i)
        model = create_model("smallcnn", task, pretrained=False, image_size=32)
        model.cellhub_config["abstention_threshold"] = thr
        out[name] = hub.save_pretrained(model, root / name)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def server(checkpoints: dict[str, Path]) -> Iterator[tuple[str, Client]]:
    sources = app.model_sources([str(checkpoints["small-malaria"])], bundled=False,
                                env=f"{checkpoints['small-a']}, {checkpoints['small-b']}")
    predictors, failures = load_predictors(sources)
    assert not failures
    demo = app.build_app(predictors, limits=Limits(max_pixels=200_000), concurrency=2, queue_size=16)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, max_file_size=app.MAX_UPLOAD)
    try:
        yield url, Client(url, verbose=False)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def cell_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "cell.png"
    draw_blood_cell("neutrophil", size=(96, 72), seed=3).save(path)
    return path


def test_model_sources_and_bundled_discovery(tmp_path: Path, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "not-a-checkpoint").mkdir()
    for name in ("b-model", "a-model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert [p.name for p in app.bundled_checkpoints(tmp_path)] == ["a-model", "b-model"]
    monkeypatch.setattr(app, "BUNDLED_DIR", tmp_path)
    monkeypatch.setenv(app.ENV_MODELS, "org/one,org/two  org/one")
    assert app.model_sources(["./mine"]) == [str(tmp_path / "a-model"), str(tmp_path / "b-model"), "org/one", "org/two", "./mine"]
    assert app.model_sources(["./mine"], bundled=False) == ["org/one", "org/two", "./mine"]


def test_predict_returns_one_result_per_model_with_a_cam(server: tuple[str, Client], cell_png: Path) -> None:
    _, client = server
    out = client.predict(handle_file(str(cell_png)), "blood-cells", api_name="/predict")
    consensus_md, summary, *slots = out
    assert "Consensus:" in consensus_md
    assert [m["model"] for m in summary["models"]] == ["small-a", "small-b"]
    assert summary["image_size"] == [96, 72]
    assert summary["consensus"]["label"] in BLOOD_LABELS
    assert "small-b has no abstention threshold" in " ".join(summary["consensus"]["notes"])
    if summary["consensus"]["uncertain"]:
        assert "Uncertain — refer for manual review" in consensus_md
    assert len(slots) == 3 * 2  # (header, probabilities, CAM) per slot; two blood-cell models
    for (header, label, cam_path), model in zip(zip(*[iter(slots)] * 3), summary["models"]):
        assert model["model"] in header and "ms" in header
        assert label["label"] == model["label"]
        assert {c["label"] for c in label["confidences"]} == BLOOD_LABELS
        with Image.open(cam_path) as cam_img:
            assert cam_img.size == (96, 72)  # the overlay is at the image's own size


def test_predict_other_task_fills_only_its_models(server: tuple[str, Client], cell_png: Path) -> None:
    _, client = server
    img = draw_malaria_cell("parasitized", size=40, seed=1)[0]
    path = cell_png.parent / "malaria.png"
    img.save(path)
    consensus_md, summary, *slots = client.predict(handle_file(str(path)), "malaria", api_name="/predict")
    assert [m["model"] for m in summary["models"]] == ["small-malaria"]
    assert not any(slots[3:])  # the second slot belongs to no malaria model: empty
    assert set(summary["models"][0]["probs"]) == {"parasitized", "uninfected"}


def test_predict_batch_on_a_zip(server: tuple[str, Client], tmp_path: Path) -> None:
    _, client = server
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            buf = io.BytesIO()
            draw_blood_cell(["eosinophil", "monocyte", "neutrophil"][i], size=(64, 48), seed=i).save(buf, "PNG")
            zf.writestr(f"smear1/cell_{i}.png", buf.getvalue())
        zf.writestr("smear1/notes.txt", "junk")
        zf.writestr("../../etc/evil.png", b"x")
    summary_md, table, csv_path, skipped_md = client.predict([handle_file(str(archive))], "blood-cells", api_name="/predict_batch")
    assert table["headers"] == ["file", "small-a label", "small-a confidence", "small-b label", "small-b confidence",
                                "consensus", "agreement", "uncertain", "reasons"]
    assert [row[0] for row in table["data"]] == [f"batch.zip/smear1/cell_{i}.png" for i in range(3)]
    assert all(row[5] in BLOOD_LABELS for row in table["data"])
    assert "differential" in summary_md.lower() and "3 image(s)" in summary_md
    assert "notes.txt" in skipped_md and "unsafe path" in skipped_md
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == table["headers"] and len(rows) == 4


def test_predict_batch_on_several_images(server: tuple[str, Client], tmp_path: Path) -> None:
    _, client = server
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"m{i}.png")
        draw_malaria_cell("uninfected", size=32, seed=i)[0].save(paths[-1])
    summary_md, table, _, _ = client.predict([handle_file(str(p)) for p in paths], "malaria", api_name="/predict_batch")
    assert [row[0] for row in table["data"]] == ["m0.png", "m1.png"]
    assert "parasitized" in summary_md and "uninfected" in summary_md


def test_bad_input_gives_a_clear_error_and_the_server_keeps_serving(server: tuple[str, Client], tmp_path: Path, cell_png: Path) -> None:
    _, client = server
    text = tmp_path / "report.txt"
    text.write_text("this is not an image")
    with pytest.raises(Exception, match="not an image"):
        client.predict(handle_file(str(text)), "blood-cells", api_name="/predict")
    with pytest.raises(Exception, match=r"Invalid file type.*\['image', '.zip'\]"):  # gr.File's own check
        client.predict([handle_file(str(text))], "blood-cells", api_name="/predict_batch")
    fake = tmp_path / "fake.png"
    fake.write_text("a text file named .png")
    with pytest.raises(Exception, match=r"None of the 1 file\(s\) could be read as an image: fake.png: not an image"):
        client.predict([handle_file(str(fake))], "blood-cells", api_name="/predict_batch")
    with pytest.raises(Exception, match="No files uploaded"):
        client.predict([], "blood-cells", api_name="/predict_batch")
    with pytest.raises(Exception, match="platelets.*not in the list of choices|Unknown task 'platelets'"):
        client.predict(handle_file(str(cell_png)), "platelets", api_name="/predict")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (600, 400), (200, 180, 190)).save(huge)  # 0.24 MP > the 0.2 MP limit of this server
    with pytest.raises(Exception, match=r"600x400 pixels .* over the 0.2 MP limit"):
        client.predict(handle_file(str(huge)), "blood-cells", api_name="/predict")
    _, summary, *_ = client.predict(handle_file(str(cell_png)), "blood-cells", api_name="/predict")
    assert len(summary["models"]) == 2  # still serving


def test_startup_reports_loaded_and_failed_models(checkpoints: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    launched: dict = {}

    def fake_launch(self: gr.Blocks, **kw: object) -> tuple[None, str, None]:
        launched.update(kw)
        return None, f"http://{kw['server_name']}:{kw['server_port']}/", None

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    monkeypatch.delenv(app.ENV_MODELS, raising=False)
    rc = app.main(["--no-bundled", "--models", str(checkpoints["small-a"]), str(tmp_path / "missing"), "--port", "7999"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Loaded 1 of 2 model(s)" in out and "small-a" in out and "threshold=0.500" in out
    assert f"✗ {tmp_path / 'missing'}" in out and "(skipped)" in out
    assert "http://127.0.0.1:7999" in out
    assert launched["server_port"] == 7999 and launched["server_name"] == "127.0.0.1"
    assert launched["max_file_size"] == app.MAX_UPLOAD


def test_app_without_models_still_builds_and_says_how_to_add_one() -> None:
    demo = app.build_app([], failures=[("org/broken", "OSError: not found")])
    text = str(demo.config)
    assert "No model is loaded" in text and "--models" in text
    assert "could not load `org/broken`" in text


def test_concurrent_identical_uploads_all_get_complete_cam_images(server: tuple[str, Client], cell_png: Path) -> None:
    """The same image uploaded by several clients at once: every CAM download is a whole PNG.

    Returning PIL images let Gradio rewrite one content-addressed cache file in place while an
    earlier request still streamed it (truncated downloads, bench/RESULTS.md finding 6).
    """
    from concurrent.futures import ThreadPoolExecutor

    url, _ = server

    def one(_: int) -> list[str]:
        client = Client(url, verbose=False)
        _, _, *slots = client.predict(handle_file(str(cell_png)), "blood-cells", api_name="/predict")
        return [slots[2], slots[5]]

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(one, range(12)))
    assert len(results) == 12
    for cams in results:
        for path in cams:
            with Image.open(path) as im:
                im.load()  # raises on a truncated file
                assert im.size == (96, 72)


def test_handlers_run_without_the_ui(checkpoints: dict[str, Path], cell_png: Path, tmp_path: Path) -> None:
    """The module-level handlers work on an ``AppState`` alone: no Blocks, no server."""
    predictors, failures = load_predictors([str(checkpoints[n]) for n in ("small-a", "small-b", "small-malaria")])
    assert not failures
    state = app.make_state(predictors, limits=Limits(max_pixels=200_000), out_dir=tmp_path / "out")
    assert list(state.by_task) == ["blood-cells", "malaria"] and state.n_slots == 2

    consensus_md, summary, *slots = app.predict_single(state, str(cell_png), "blood-cells")
    label = summary["consensus"]["label"]
    assert label in BLOOD_LABELS and f"Consensus: **{label}**" in consensus_md
    assert [m["model"] for m in summary["models"]] == ["small-a", "small-b"]
    assert len(slots) == 6
    for header, probs, cam_path in zip(*[iter(slots)] * 3):
        assert header.startswith("#### small-") and set(probs) == BLOOD_LABELS
        assert Path(cam_path).parent == tmp_path / "out" and Path(cam_path).is_file()
        with Image.open(cam_path) as cam_img:
            assert cam_img.size == (96, 72)

    updates = app.show_slots(state, "malaria")
    assert len(updates) == 2 + 3 * 2 and updates[2]["visible"] and not updates[5]["visible"]
    with pytest.raises(gr.Error, match="Unknown task 'platelets'"):
        app.predict_single(state, str(cell_png), "platelets")

    steps: list[tuple[int, int]] = []
    summary_md, table, csv_path, skipped_md = app.predict_batch(
        state, [str(cell_png)], "blood-cells", progress=lambda p, desc=None, unit=None: steps.append(p)
    )
    assert "1 image(s)" in summary_md and [row[0] for row in table["data"]] == ["cell.png"]
    assert Path(csv_path).parent == tmp_path / "out" and skipped_md == ""
    assert steps and steps[-1] == (1, 1)


@pytest.fixture(scope="module")
def field_jpg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[int, int, int, int]]:
    """A drawn 480x360 microscope field (under the test server's 200,000-pixel limit) and its white cell's box."""
    image, box = draw_smear("neutrophil", seed=6, size=(480, 360))
    path = tmp_path_factory.mktemp("field") / "field_01.jpg"
    image.save(path, quality=95)
    return path, box


def test_analyze_field_finds_classifies_and_exports(server: tuple[str, Client], field_jpg, tmp_path: Path) -> None:
    _, client = server
    path, _ = field_jpg
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 150), (250, 250, 250)).save(blank)
    gallery, summary, table, csv_path, skipped, as_json = client.predict(
        [handle_file(str(path)), handle_file(str(blank))], "blood-cells", api_name="/analyze_field")
    assert len(gallery) == 1 and Path(gallery[0]["image"]).is_file()
    assert "Differential over 1 white cell in 1 field(s)" in summary and "| field_01.jpg | 1 |" in summary
    wbc = [row for row in table["data"] if row[2] == "wbc"]
    assert len(wbc) == 1 and wbc[0][7] in BLOOD_LABELS
    assert any(row[2] == "rbc" for row in table["data"])
    rows = list(csv.reader(open(csv_path, newline="")))
    assert rows[0] == app.ROW_HEADER and len(rows) == 1 + len(table["data"])
    assert "blank.png" in skipped  # a blank photo is reported, the field still analysed
    cells = as_json["images"][0]["cells"]
    assert as_json["task"] == "blood-cells" and {c["kind"] for c in cells} >= {"wbc", "rbc"}


def test_analyze_field_bad_upload_is_a_message(server: tuple[str, Client], tmp_path: Path, cell_png: Path) -> None:
    _, client = server
    blank = tmp_path / "blank.png"
    Image.new("RGB", (200, 150), (250, 250, 250)).save(blank)
    with pytest.raises(Exception, match="No field could be analysed: blank.png"):
        client.predict([handle_file(str(blank))], "blood-cells", api_name="/analyze_field")
    # the server keeps serving
    assert client.predict(handle_file(str(cell_png)), "blood-cells", api_name="/predict")[1]["consensus"]["label"]


class _Selected:
    """What Gradio hands a ``.select`` handler: the clicked cell's [row, column]."""

    def __init__(self, row: int) -> None:
        self.index = [row, 0]


def test_selected_cell_gets_every_models_cam(checkpoints: dict[str, Path], field_jpg, tmp_path: Path) -> None:
    predictors, _ = load_predictors([str(checkpoints[n]) for n in ("small-a", "small-b", "small-malaria")])
    state = app.make_state(predictors, out_dir=tmp_path / "out")
    path, box = field_jpg
    outputs = app.analyze_field_upload(state, [str(path)], "blood-cells", progress=lambda *a, **k: None)
    table, session = outputs[2], outputs[-1]
    row = next(i for i, r in enumerate(table["data"]) if r[2] == "wbc")
    cams, note = app.field_cell_cam(state, session, _Selected(row))
    assert [c[1].split(":")[0] for c in cams] == ["small-a", "small-b"] and all(Path(c[0]).is_file() for c in cams)
    assert "field_01.jpg" in note
    rbc_row = next(i for i, r in enumerate(table["data"]) if r[2] == "rbc")
    cams, note = app.field_cell_cam(state, session, _Selected(rbc_row))
    assert cams == [] and "do not classify it" in note
