"""`python -m cellhub adapt`: BatchNorm statistics re-estimated on a lab's own images, saved as a checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cellhub import create_model, hub
from cellhub.adapt import adapt_to_images, run_adapt
from cellhub.cli import main
from cellhub.evaluation import reestimate_batchnorm
from cellhub.images import collect_images
from cellhub.predict import Predictor
from cellhub.synthetic import draw_malaria_cell


def _bns(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A checkpoint, and a folder of 40 drawn cells of another 'lab' (tinted), a corrupt file and a page of text."""
    tmp = tmp_path_factory.mktemp("adapt")
    torch.manual_seed(0)
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=32)
    with torch.no_grad():
        model.head.weight.normal_(0, 2.0)
    ckpt = hub.save_pretrained(model.eval(), tmp / "ckpt")
    folder = tmp / "our-lab"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
    for i in range(40):
        img, _ = draw_malaria_cell("parasitized" if i % 3 == 0 else "uninfected", size=48, seed=100 + i)
        px = np.asarray(img, dtype=np.float32) * np.array([0.8, 0.95, 1.1])  # another stain
        Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(folder / ("a" if i % 2 else "b") / f"c{i}.png")
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (64, 64), "white").save(folder / "b" / "blank.png")
    return ckpt, folder


def test_reestimate_runs_a_small_tail_with_the_batch_before_it():
    torch.manual_seed(0)
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=16).eval()
    x = torch.rand(9, 3, 16, 16)
    assert reestimate_batchnorm(model, [x[:4], x[4:8], x[8:]], device="cpu") == len(_bns(model))
    assert all(bn.num_batches_tracked.item() == 2 for bn in _bns(model))  # [4, 4+1], not [4, 4, 1]
    first = _bns(model)[0]
    seen = []
    hook = first.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].mean(dim=(0, 2, 3))))
    with torch.no_grad():
        model(x[:4])
        model(x[4:])
    hook.remove()
    torch.testing.assert_close(first.running_mean, (seen[0] + seen[1]) / 2, atol=1e-5, rtol=1e-5)


def test_keep_blends_the_checkpoint_statistics_with_the_new_ones():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16) * 2
    base = create_model("smallcnn", "malaria", pretrained=False, image_size=16).eval()
    with torch.no_grad():
        for bn in _bns(base):
            bn.running_mean.uniform_(-1, 1)
    full, half = (create_model("smallcnn", "malaria", pretrained=False, image_size=16).eval() for _ in range(2))
    for m in (full, half):
        m.load_state_dict(base.state_dict())
    reestimate_batchnorm(full, [x], device="cpu")
    reestimate_batchnorm(half, [x], device="cpu", keep=0.5)
    for b, f, h in zip(_bns(base), _bns(full), _bns(half)):
        torch.testing.assert_close(h.running_mean, (b.running_mean + f.running_mean) / 2)
        torch.testing.assert_close(h.running_var, (b.running_var + f.running_var) / 2)
    with pytest.raises(ValueError, match="keep must be in"):
        reestimate_batchnorm(half, [x], device="cpu", keep=1.0)


def test_reestimate_without_images_keeps_the_statistics():
    torch.manual_seed(0)
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=16).eval()
    with torch.no_grad():
        _bns(model)[0].running_mean.fill_(0.5)
    with pytest.raises(ValueError, match="No images"):
        reestimate_batchnorm(model, iter([]), device="cpu")
    assert torch.all(_bns(model)[0].running_mean == 0.5) and _bns(model)[0].momentum == 0.1


def test_adapt_cli_writes_an_adapted_checkpoint(lab, tmp_path, capsys):
    ckpt, folder = lab
    before = (ckpt / "model.safetensors").read_bytes()
    out = tmp_path / "adapted"
    assert main(["adapt", str(ckpt), str(folder), "--out", str(out), "--min-images", "40", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "on 40 image(s)" in printed and "broken.png" in printed and "blank.png" in printed
    assert (ckpt / "model.safetensors").read_bytes() == before  # the original is untouched

    cfg = json.loads((out / "config.json").read_text())["cellhub"]
    assert cfg["adaptation"]["images"] == 40 and cfg["adaptation"]["skipped"] == 2
    assert cfg["adaptation"]["from"] == str(ckpt) and cfg["labels"] == ["parasitized", "uninfected"]
    card = (out / "README.md").read_text()
    assert "Adapted to a lab's own images" in card and "40 unlabelled images" in card
    assert "`local folder ckpt`" in card and str(ckpt) not in card  # no machine-local path in a public card

    original, adapted = hub.load_pretrained(ckpt), hub.load_pretrained(out)
    # the same statistics as adapting in memory, with the same seed and images
    again = hub.load_pretrained(ckpt)
    refs, _ = collect_images([folder])
    report = adapt_to_images(again, refs, seed=0)
    assert report.n_images == 40 and {n.split("/")[-1] for n, _ in report.skipped} == {"broken.png", "blank.png"}
    for a, b, o in zip(_bns(adapted), _bns(again), _bns(original)):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert not torch.allclose(a.running_mean, o.running_mean)
    for (name, w), (_, w0) in zip(adapted.state_dict().items(), original.state_dict().items()):
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            torch.testing.assert_close(w, w0)  # only the statistics changed
    img = Image.open(folder / "a" / "c1.png")
    p0, p1 = Predictor(original).predict([img])[0], Predictor(adapted).predict([img])[0]
    assert p0.probs != p1.probs


def test_adapt_refuses_what_it_cannot_do_and_writes_nothing(lab, tmp_path, capsys):
    ckpt, folder = lab
    out = tmp_path / "adapted"
    assert main(["adapt", str(ckpt), str(folder), "--out", str(out), "--min-images", "41", "--no-progress"]) == 2
    assert "Only 40 of the 42 images could be used" in capsys.readouterr().err and not out.exists()
    assert main(["adapt", str(ckpt), str(folder / "a" / "c1.png"), "--out", str(out), "--no-progress"]) == 2
    assert "at least 64" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["adapt", str(ckpt), str(folder), "--out", str(out), "--min-images", "8", "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["adapt", str(ckpt), str(folder), "--out", str(ckpt), "--no-progress"]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main(["adapt", str(ckpt), str(tmp_path / "nowhere"), "--out", str(fresh), "--no-progress"]) == 2
    assert "nowhere: no such file" in capsys.readouterr().err
    assert main(["adapt", str(tmp_path / "no-ckpt"), str(folder), "--out", str(fresh), "--no-progress"]) == 2
    assert "could not load checkpoint" in capsys.readouterr().err and not fresh.exists()
    assert main(["adapt", str(ckpt), str(ckpt), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "checkpoint folder, not images" in capsys.readouterr().err and not (tmp_path / "x").exists()

    torch.manual_seed(0)
    gn = hub.save_pretrained(create_model("smallcnn", "malaria", pretrained=False, image_size=32, norm="group").eval(),
                             tmp_path / "gn")
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        run_adapt(str(gn), [folder], tmp_path / "gn-adapted", min_images=8)
    assert not (tmp_path / "gn-adapted").exists()


def test_adapt_predictors_reloads_each_checkpoint_adapts_it_and_keeps_the_others(lab, tmp_path):
    """The app's "adapt to this batch": the predictor's own (fused) model is not touched; a fresh copy from
    its checkpoint is adapted exactly as `adapt_to_images` adapts one; a GroupNorm model is kept, with a note."""
    from cellhub.adapt import adapt_predictors

    ckpt, folder = lab
    torch.manual_seed(1)
    group = hub.save_pretrained(create_model("smallcnn", "malaria", pretrained=False, image_size=32, norm="group"),
                                tmp_path / "group")
    original, grouped = Predictor.from_pretrained(ckpt), Predictor.from_pretrained(group)
    refs, _ = collect_images([str(folder)])
    x = original.preprocess([Image.open(f).convert("RGB") for f in sorted(folder.rglob("c*.png"))[:2]])
    before = original.model(x).detach()
    adapted, report, notes = adapt_predictors([original, grouped], refs, min_images=30)
    assert [p.name for p in adapted] == ["ckpt (adapted)", "group"] and adapted[1] is grouped
    assert report.n_images == 40 and notes == ["group: used as it is (it has no BatchNorm statistics to adapt)"]
    assert adapted[0].config["adaptation"]["images"] == 40 and "adaptation" not in original.config
    torch.testing.assert_close(original.model(x).detach(), before)  # the loaded predictor is unchanged
    ref = hub.load_pretrained(ckpt)
    adapt_to_images(ref, refs)
    torch.testing.assert_close(adapted[0].model(x).detach(), Predictor(ref).model(x).detach())
    assert not torch.allclose(adapted[0].model(x).detach(), before)
    with pytest.raises(ValueError, match="adapting needs at least 64"):
        adapt_predictors([original], refs)
    loose = Predictor(hub.load_pretrained(ckpt))  # built from a model, not a checkpoint: nothing to reload
    assert adapt_predictors([loose], refs, min_images=30)[2] == [
        f"{loose.name}: used as it is (its checkpoint is not known)"]


def test_adapt_predictors_reads_the_images_once_for_several_models(lab, tmp_path, monkeypatch):
    """Two BatchNorm checkpoints of one task with different input sizes: every file is read and
    checked once (not once per model), and each model ends exactly where adapting it alone puts it."""
    import cellhub.batch
    from cellhub.adapt import adapt_predictors

    ckpt, folder = lab
    torch.manual_seed(2)
    other = hub.save_pretrained(create_model("smallcnn", "malaria", pretrained=False, image_size=48).eval(),
                                tmp_path / "other")
    refs, _ = collect_images([str(folder)])
    reads = []
    real = cellhub.batch._read_blobs
    monkeypatch.setattr(cellhub.batch, "_read_blobs", lambda chunk, limits: reads.extend(chunk) or real(chunk, limits))
    adapted, report, _ = adapt_predictors([Predictor.from_pretrained(ckpt), Predictor.from_pretrained(other)], refs,
                                          min_images=30)
    assert sorted(r.name for r in reads) == sorted(r.name for r in refs)  # each file once, 42 in all
    assert report.n_images == 40 and len(report.skipped) == 2
    assert report.n_layers == len(_bns(hub.load_pretrained(ckpt))) + len(_bns(hub.load_pretrained(other))) == 10
    images = [Image.open(f).convert("RGB") for f in sorted(folder.rglob("c*.png"))[:3]]
    for p, source in zip(adapted, (ckpt, other)):
        alone = hub.load_pretrained(source)
        before = Predictor(hub.load_pretrained(source))
        adapt_to_images(alone, refs)
        x = p.preprocess(images)
        torch.testing.assert_close(p.model(x).detach(), Predictor(alone).model(x).detach())
        assert not torch.allclose(p.model(x).detach(), before.model(x).detach())


def test_app_batch_adapts_to_the_upload_and_says_what_changed(lab, tmp_path, monkeypatch):
    gr = pytest.importorskip("gradio")
    app = pytest.importorskip("app")
    ckpt, folder = lab
    state = app.make_state([Predictor.from_pretrained(ckpt)], out_dir=tmp_path / "out")
    files = sorted(str(p) for p in folder.rglob("c*.png"))
    quiet = lambda *a, **k: None  # noqa: E731
    plain, table0, _, _ = app.predict_batch(state, files, "malaria", progress=quiet)
    assert "Adapted" not in plain and table0["headers"][1] == "ckpt label"
    with pytest.raises(gr.Error, match="needs at least 64"):
        app.predict_batch(state, files, "malaria", True, progress=quiet)
    import cellhub.adapt as adapt_mod  # a lower floor for the drawn batch of 40

    real = adapt_mod.adapt_predictors
    monkeypatch.setattr(adapt_mod, "adapt_predictors", lambda ps, refs, **kw: real(ps, refs, **{**kw, "min_images": 30}))
    summary, table, _, _ = app.predict_batch(state, files, "malaria", True, progress=quiet)
    assert "**Adapted to this batch**" in summary and "40 usable image(s)" in summary
    assert table["headers"][1] == "ckpt (adapted) label"
    changed = sum(a[1] != b[1] for a, b in zip(table0["data"], table["data"]))
    assert f"changed the consensus label of {changed} of 40 image(s)" in summary
