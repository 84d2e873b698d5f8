"""cellhub.training: a small CNN learns; resume is exact; checkpoints survive interruption."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cellhub.training import trainer
from cellhub.synthetic import draw_blood_cell
from cellhub.tasks import get_task
from cellhub.training import CHECKPOINT_DIRNAME, TrainConfig, fit, load_training_state


def make_blood_dataset(path, n_cells=10, copies=2, test_cells=6, size=48):
    """A saved DatasetDict of synthetic white cells; each cell appears ``copies`` times (rotated),
    all copies sharing one group, as in the Kaggle data."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    task = get_task("blood-cells")
    feats = Features({"image": Image(), "label": ClassLabel(names=list(task.labels)),
                      "group": Value("string"), "file": Value("string")})

    def split(n, k, seed):
        rows = {"image": [], "label": [], "group": [], "file": []}
        for li, lab in enumerate(task.labels):
            for c in range(n):
                cell = draw_blood_cell(lab, size=(size, size), seed=seed * 1000 + li * 100 + c)
                for r in range(k):
                    rows["image"].append(cell.rotate(90 * r))
                    rows["label"].append(li)
                    rows["group"].append(f"s{seed}-{lab}-{c}")
                    rows["file"].append(f"{lab}_{c}_{r}.png")
        return Dataset.from_dict(rows, features=feats)

    DatasetDict(train=split(n_cells, copies, 1), test=split(test_cells, 1, 2)).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def blood(tmp_path_factory):
    return make_blood_dataset(tmp_path_factory.mktemp("blood") / "ds")


def _cfg(data, out, cache, **kw):
    base = dict(dataset=str(data), model="smallcnn", epochs=5, batch_size=8, lr=3e-3, image_size=32,
                warmup_epochs=0.5, output_dir=str(out), cache_dir=str(cache), n_boot=100, progress=False,
                num_threads=1)  # tiny models: one thread is as fast, and robust on a busy machine
    base.update(kw)
    return TrainConfig(**base)


def test_small_cnn_learns_synthetic_cells(blood, tmp_path):
    m = fit(_cfg(blood, tmp_path / "run", tmp_path / "cache", save_checkpoints=False))
    test = m["splits"]["test"]
    # 4 classes: chance is 0.25
    assert test["accuracy"] >= 0.6, test
    assert m["split"]["name"] == "test" and m["accuracy"] == test["accuracy"]
    # grouped validation: 20% of the 40 training cells, every copy of a cell on one side
    val = m["splits"]["validation"]
    assert val["n_groups"] * 2 == val["n_images"]
    assert 0 < m["abstention"]["threshold"] <= 1
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["cellhub"]["abstention_threshold"] == pytest.approx(m["abstention"]["threshold"])
    assert cfg["cellhub"]["labels"] == list(get_task("blood-cells").labels)
    assert cfg["cellhub"]["recipe"]["model"] == "smallcnn"
    assert not (tmp_path / "run" / CHECKPOINT_DIRNAME).exists()
    # the grouping used is recorded and the card says it (the saved dataset's own group column)
    assert m["grouping"] == {"requested": "auto", "group_by": "column", "method": {"train": "column", "test": "column"}}
    assert "groups: column (the default for this data" in " ".join(m["notes"])
    assert "group column of the source dataset" in (tmp_path / "run" / "README.md").read_text()


def test_group_by_file_treats_every_image_as_independent(blood, tmp_path):
    m = fit(_cfg(blood, tmp_path / "run", tmp_path / "cache", epochs=1, save_checkpoints=False, group_by="file"))
    assert m["grouping"]["group_by"] == "file"
    val = m["splits"]["validation"]
    assert val["n_groups"] == val["n_images"]  # copies of a cell may now sit on both sides: the user's choice
    assert "each image is its own group" in (tmp_path / "run" / "README.md").read_text()
    with pytest.raises(ValueError, match="works on local image folders"):
        fit(_cfg(blood, tmp_path / "run2", tmp_path / "cache", epochs=1, group_by="near-duplicates"))


class _Interrupt(Exception):
    pass


def test_resume_reaches_the_same_weights(blood, tmp_path, monkeypatch):
    # with mixup: its draws depend on (seed, epoch, step) only, so a resumed run blends the same pairs;
    # with a moving average of the weights, saved with the checkpoint and restored
    kw = dict(epochs=3, image_size=16, max_train_samples=48, train_eval_samples=16, n_boot=20, mixup=0.3, ema=0.9,
              select_from_epoch=3)
    cache = tmp_path / "cache"
    # the first training in a process may run other CPU kernels (oneDNN picks them on first use,
    # which changes the last bits): warm up, so that both runs below take the same paths
    fit(_cfg(blood, tmp_path / "warm", cache, **dict(kw, epochs=1, select_from_epoch=1), save_checkpoints=False))
    full = fit(_cfg(blood, tmp_path / "a", cache, **kw))

    real_save = trainer.save_training_state

    def save_then_die(out, **state):
        path = real_save(out, **state)
        if state["info"]["epoch"] == 2:
            raise _Interrupt("killed after epoch 2")
        return path

    monkeypatch.setattr(trainer, "save_training_state", save_then_die)
    with pytest.raises(_Interrupt):
        fit(_cfg(blood, tmp_path / "b", cache, **kw))
    monkeypatch.setattr(trainer, "save_training_state", real_save)
    assert load_training_state(tmp_path / "b")["epoch"] == 2
    assert not (tmp_path / "b" / "model.safetensors").exists()

    resumed = fit(_cfg(blood, tmp_path / "b", cache, resume=True, **kw))

    for name in ("model.safetensors", f"{CHECKPOINT_DIRNAME}/model.safetensors",
                 f"{CHECKPOINT_DIRNAME}/optimizer.safetensors", f"{CHECKPOINT_DIRNAME}/ema.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("seconds", "images_per_second")} for e in h]  # noqa: E731
    assert strip(ha) == strip(hb)
    assert full["accuracy"] == resumed["accuracy"]

    # the checkpoint is the moving average of the selected (here: the last) epoch, not the raw weights
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    raw = load_file(str(tmp_path / "a" / CHECKPOINT_DIRNAME / "model.safetensors"))
    avg = load_file(str(tmp_path / "a" / CHECKPOINT_DIRNAME / "ema.safetensors"))
    assert full["best_epoch"] == 3 and all(torch.equal(saved[k], avg[f"module.{k}"]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved if saved[k].is_floating_point())

    # resuming with different settings is refused, naming the setting
    with pytest.raises(ValueError, match="lr was"):
        fit(_cfg(blood, tmp_path / "b", cache, resume=True, **dict(kw, lr=1e-2)))
    # a checkpoint older than a setting (not in its recipe) was made at that setting's default
    state_file = tmp_path / "b" / CHECKPOINT_DIRNAME / "state.json"
    state = json.loads(state_file.read_text())
    del state["recipe"]["scale_jitter"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="scale_jitter was 0.0, now 0.2"):
        fit(_cfg(blood, tmp_path / "b", cache, resume=True, **dict(kw, scale_jitter=0.2)))
    assert fit(_cfg(blood, tmp_path / "b", cache, resume=True, **kw))["accuracy"] == full["accuracy"]


def test_checkpoint_survives_a_crash_while_writing(blood, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kw = dict(epochs=2, image_size=16, max_train_samples=24, train_eval_samples=8, n_boot=10)
    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def torn_write(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 6:  # second checkpoint, second file: write half of it, then "die"
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            raise _Interrupt("killed while writing")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", torn_write)
    with pytest.raises(_Interrupt):
        fit(_cfg(blood, out, tmp_path / "cache", **kw))
    state = load_training_state(out)
    assert state is not None and state["epoch"] == 1  # the previous checkpoint is intact

    # killed between the two renames: only last_checkpoint.prev exists
    os.replace(out / CHECKPOINT_DIRNAME, out / f"{CHECKPOINT_DIRNAME}.prev")
    assert load_training_state(out)["epoch"] == 1

    # a damaged file is detected by its checksum instead of being loaded
    victim = out / f"{CHECKPOINT_DIRNAME}.prev" / "optimizer.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert load_training_state(out) is None


def test_bad_settings_fail_early():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(dataset="x", epochs=0).validate()
    with pytest.raises(ValueError, match="select_metric"):
        TrainConfig(dataset="x", select_metric="auc").validate()
    with pytest.raises(ValueError, match="select_from_epoch"):
        TrainConfig(dataset="x", epochs=4, select_from_epoch=5).validate()
    with pytest.raises(ValueError, match="norm 'group' is not available for vgg16"):
        TrainConfig(dataset="x", model="vgg16", norm="group").validate()
    with pytest.raises(ValueError, match="--init-from"):
        TrainConfig(dataset="x", norm="group", init_from="some/checkpoint").validate()
    TrainConfig(dataset="x", norm="group").validate()
    with pytest.raises(ValueError, match="depths 'two'"):
        TrainConfig(dataset="x", depths="two").validate()
    with pytest.raises(ValueError, match="--depths 2,2,2,2 with --init-from"):
        TrainConfig(dataset="x", depths="2,2,2,2", init_from="some/checkpoint").validate()
    TrainConfig(dataset="x", depths="2,2,2,2").validate()


def test_loss_drop_leaves_the_largest_losses_of_a_batch_out():
    import torch.nn.functional as F

    logits = torch.tensor([[4.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])  # the last one is "mislabeled": the model reads it as class 0
    per = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(trainer.batch_loss(logits, y), per.mean())
    dropped = trainer.batch_loss(logits, y, drop=0.25)
    assert torch.allclose(dropped, per[:3].mean())
    dropped.backward()
    assert torch.all(logits.grad[3] == 0) and torch.all(logits.grad[:3].abs().sum(1) > 0)
    # never the whole batch; label smoothing applies to the examples kept
    one = logits[:1].detach()
    assert torch.allclose(trainer.batch_loss(one, y[:1], drop=0.4), F.cross_entropy(one, y[:1]))
    smooth = trainer.batch_loss(logits.detach(), y, label_smoothing=0.1, drop=0.25)
    assert torch.allclose(smooth, F.cross_entropy(logits.detach()[:3], y[:3], label_smoothing=0.1))
    with pytest.raises(ValueError, match="loss_drop"):
        TrainConfig(dataset="x", loss_drop=0.5).validate()


def test_mixup_blends_pairs_of_a_batch_and_mixes_their_losses():
    import torch.nn.functional as F

    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).reshape(4, 3, 2, 2)
    mixed, perm, lam = trainer.mixup_batch(x.clone(), 0.2, seed=0, epoch=1, step=5)
    assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == [0, 1, 2, 3]
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm])
    again, perm2, lam2 = trainer.mixup_batch(x.clone(), 0.2, seed=0, epoch=1, step=5)  # a resumed run draws the same
    assert lam2 == lam and torch.equal(perm2, perm) and torch.equal(again, mixed)
    assert trainer.mixup_batch(x.clone(), 0.2, seed=0, epoch=1, step=6)[2] != lam
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y, y2 = torch.tensor([0, 1, 0]), torch.tensor([1, 1, 0])
    want = (0.7 * F.cross_entropy(logits, y, reduction="none") + 0.3 * F.cross_entropy(logits, y2, reduction="none"))
    assert torch.allclose(trainer.batch_loss(logits, y, y2=y2, lam=0.7), want.mean())
    assert torch.allclose(trainer.batch_loss(logits, y, y2=y2, lam=0.7, drop=0.34), want.sort().values[:2].mean())
    with pytest.raises(ValueError, match="mixup"):
        TrainConfig(dataset="x", mixup=-1).validate()
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema"):
            TrainConfig(dataset="x", ema=bad).validate()


def test_ema_copies_first_then_averages_with_a_ramped_decay():
    m = torch.nn.BatchNorm1d(2)
    ema = trainer.ema_model(m, 0.998)
    with torch.no_grad():
        m.weight.fill_(2.0)
        m.num_batches_tracked.fill_(5)
    ema.update_parameters(m)  # the first update copies
    assert torch.equal(ema.module.weight, m.weight) and int(ema.module.num_batches_tracked) == 5
    with torch.no_grad():
        m.weight.fill_(4.0)
        m.num_batches_tracked.fill_(6)
    ema.update_parameters(m)  # one update before: decay min(0.998, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module.weight, torch.full((2,), d * 2.0 + (1 - d) * 4.0))
    assert int(ema.module.num_batches_tracked) == 6  # integer buffers follow the model
    for _ in range(5000):  # late in a long run the decay reaches its cap
        ema.update_parameters(m)
    with torch.no_grad():
        m.weight.fill_(5.0)
    ema.update_parameters(m)
    assert torch.allclose(ema.module.weight, torch.full((2,), 0.998 * 4.0 + 0.002 * 5.0))


def test_the_saved_epoch_is_chosen_from_select_from_epoch_on(blood, tmp_path):
    kw = dict(epochs=3, image_size=16, max_train_samples=48, train_eval_samples=16, n_boot=20, save_checkpoints=False)
    m = fit(_cfg(blood, tmp_path / "run", tmp_path / "cache", select_from_epoch=3, loss_drop=0.1, norm="group", mixup=0.2,
                 **kw))
    assert m["best_epoch"] == 3
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["best"] for h in history] == [False, False, True]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["cellhub"]["recipe"]["select_from_epoch"] == 3
    assert cfg["cellhub"]["recipe"]["loss_drop"] == 0.1  # the recipe records it
    assert cfg["cellhub"]["recipe"]["mixup"] == 0.2
    assert cfg["cellhub"]["recipe"]["norm"] == "group" and cfg["cellhub"]["norm"] == "group"
    from cellhub.hub import load_pretrained

    assert isinstance(load_pretrained(tmp_path / "run").stages[0][0][1], torch.nn.GroupNorm)


def test_model_from_checkpoint_keeps_the_backbone_and_replaces_a_foreign_head(tmp_path):
    from cellhub import create_model
    from cellhub.hub import save_pretrained
    from cellhub.svm import SVMClassifier
    from cellhub.training.pipeline import model_from_checkpoint

    torch.manual_seed(0)
    src = create_model("smallcnn", "blood-cells", pretrained=False, image_size=40)
    folder = save_pretrained(src, tmp_path / "blood")
    notes = []
    same = model_from_checkpoint(str(folder), get_task("blood-cells").labels, notes=notes)
    sd_src, sd_same = src.state_dict(), same.state_dict()
    assert all(torch.equal(sd_src[k], sd_same[k]) for k in sd_src)  # every weight, the head too
    assert same.cellhub_config["pretrained_cfg"]["input_size"] == [3, 40, 40]  # its preprocessing
    other = model_from_checkpoint(str(folder), ["parasitized", "uninfected"], image_size=32, notes=notes)
    sd_other = other.state_dict()
    assert sd_other["head.weight"].shape == (2, 256)
    assert all(torch.equal(sd_src[k], sd_other[k]) for k in sd_src if not k.startswith("head."))
    assert other.cellhub_config["labels"] == ["parasitized", "uninfected"]
    assert other.cellhub_config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert "same labels" in notes[0] and "new classifier head" in notes[1]
    grouped = save_pretrained(create_model("smallcnn", "blood-cells", pretrained=False, image_size=40, norm="group"),
                              tmp_path / "grouped")  # the checkpoint's normalisation layers are kept
    assert model_from_checkpoint(str(grouped), ["a", "b"]).cellhub_config["norm"] == "group"
    svm_dir = tmp_path / "svm"
    SVMClassifier(["a", "b"]).fit(np.random.default_rng(0).normal(size=(20, 4)), [0, 1] * 10).save_pretrained(svm_dir)
    with pytest.raises(ValueError, match="SVM"):
        model_from_checkpoint(str(svm_dir), ["a", "b"])


def test_fit_init_from_a_checkpoint_on_new_data(blood, tmp_path):
    first = tmp_path / "first"
    fit(_cfg(blood, first, tmp_path / "cache", epochs=2, save_checkpoints=False))
    m = fit(_cfg(blood, tmp_path / "second", tmp_path / "cache", epochs=1, save_checkpoints=False,
                 init_from=str(first), model="resnet18"))  # the checkpoint's architecture wins
    cfg = json.loads((tmp_path / "second" / "config.json").read_text())
    recipe = cfg["cellhub"]["recipe"]
    assert recipe["model"] == "smallcnn" and m["model"] == "smallcnn"
    assert recipe["init_from"] == "local folder 'first' (checkpoint)"
    assert any("initialised from" in n for n in recipe["notes"])


def test_fit_on_two_sources_reports_each_and_pooled(tmp_path):
    """--dataset A --dataset B: one task, validation per source, metrics per source and pooled."""
    from cellhub.synthetic import write_imagefolder

    a = write_imagefolder(tmp_path / "lab-a", task="blood-cells", n_per_class=6, size=32, splits=None)
    b = write_imagefolder(tmp_path / "lab-b", task="blood-cells", n_per_class=6, size=32, splits=None, seed=1)
    (b / "basophil").mkdir()  # a class the 4-class task does not have: left out and said so
    draw_blood_cell("neutrophil", size=(32, 32), seed=99).save(b / "basophil" / "x.png")
    m = fit(_cfg(a, tmp_path / "run", tmp_path / "cache", dataset=[str(a), str(b)], epochs=1, save_checkpoints=False,
                 group_by="file"))
    assert m["sources"] == ["lab-a", "lab-b"]
    val = m["splits"]["validation"]
    per = val["per_source"]
    assert set(per) == {"lab-a", "lab-b"} and per["lab-a"]["n_images"] + per["lab-b"]["n_images"] == val["n_images"]
    assert per["lab-a"]["n_images"] > 0 and per["lab-b"]["n_images"] > 0  # validation drawn within each source
    notes = " ".join(m["notes"])
    assert "lab-b: ignored basophil/" in notes and "lab-a: train" in notes
    card = (tmp_path / "run" / "README.md").read_text()
    assert "| validation / lab-a |" in card and "| validation / lab-b |" in card
    recipe = json.loads((tmp_path / "run" / "config.json").read_text())["cellhub"]["recipe"]
    assert recipe["dataset"] == "local folder 'lab-a' (imagefolder) + local folder 'lab-b' (imagefolder)"


def test_each_source_is_named_with_its_own_layout(tmp_path):
    from cellhub.training.pipeline import public_dataset_name

    (tmp_path / "blood-cells").mkdir()
    (tmp_path / "pbc").mkdir()
    both = [str(tmp_path / "blood-cells"), str(tmp_path / "pbc")]
    assert public_dataset_name(both, ["kaggle-blood-cells", "imagefolder"]) == (
        "local folder 'blood-cells' (kaggle-blood-cells) + local folder 'pbc' (imagefolder)")
    assert public_dataset_name(both + ["user/hub-set"], "imagefolder").endswith("+ user/hub-set")
    assert public_dataset_name(both[1], ["imagefolder"]) == "local folder 'pbc' (imagefolder)"
    with pytest.raises(ValueError, match="2 datasets but 1 source kinds"):
        public_dataset_name(both, ["imagefolder"])


def test_group_kfold_keeps_every_group_in_one_fold_and_stratifies(blood):
    from datasets import load_from_disk

    from cellhub.data import cv_fold, group_kfold

    ds = load_from_disk(str(blood))["train"]  # 40 cells x 2 copies, 10 per label
    folds = group_kfold(ds, 5, seed=0)
    groups, labels = np.asarray(ds["group"]), np.asarray(ds["label"])
    assert set(folds.tolist()) == set(range(5))
    for g in set(groups):
        assert len(set(folds[groups == g].tolist())) == 1  # a cell's copies never straddle folds
    for f in range(5):  # stratified: every fold holds every label (10 cells per label, 5 folds)
        assert set(labels[folds == f].tolist()) == {0, 1, 2, 3}
    parts = cv_fold(load_from_disk(str(blood)), 5, 2, seed=0)
    assert set(parts) == {"train", "validation", "holdout"}  # the test split is the final model's
    held = set(parts["holdout"]["group"])
    assert held == set(groups[folds == 2])
    assert not held & (set(parts["train"]["group"]) | set(parts["validation"]["group"]))
    assert len(parts["train"]) + len(parts["validation"]) + len(parts["holdout"]) == len(ds)
    with pytest.raises(ValueError, match="at least 50 groups"):
        group_kfold(ds, 50)


def test_cross_validate_pools_out_of_fold_predictions_and_resumes(blood, tmp_path, monkeypatch):
    from cellhub.training import cross_validate, format_cv_table
    from cellhub.training import cv as cvmod

    out = tmp_path / "run"
    cfg = _cfg(blood, out, tmp_path / "cache", epochs=2, cv=3, save_checkpoints=False)
    m = cross_validate(cfg)
    cv = json.loads((out / "cv.json").read_text())
    assert cv["k"] == 3 and len(cv["folds"]) == 3
    # every training image is out-of-fold exactly once: the pool is the whole of train
    assert cv["pooled"]["n_images"] == 80 and sum(r["n_images"] for r in cv["folds"]) == 80
    assert cv["pooled"]["n_groups"] == 40
    # each fold names the files it held out (the dataset's ``file``): together every training image once
    from cellhub import load_cell_dataset
    from cellhub.training.state import holdout_files, load_holdout, save_holdout

    held = [(holdout_files(out / "cv" / f"fold-{i + 1}"), load_holdout(out / "cv" / f"fold-{i + 1}")) for i in range(3)]
    files = [f for fs, _ in held for f in fs]
    assert all(len(fs) == len(h[1]) for fs, h in held)
    assert len(files) == len(set(files)) == 80 and set(files) == set(load_cell_dataset(str(blood))["train"]["file"])
    # a fold saved without files (older runs) has none
    save_holdout(tmp_path / "old", *held[0][1])
    assert holdout_files(tmp_path / "old") is None and holdout_files(tmp_path / "absent") is None
    assert load_holdout(tmp_path / "old")[2] == held[0][1][2]
    accs = [r["accuracy"] for r in cv["folds"]]
    assert cv["mean"]["accuracy"] == pytest.approx(np.mean(accs))
    assert cv["sd"]["accuracy"] == pytest.approx(np.std(accs, ddof=1))
    lo, hi = cv["pooled"]["ci95"]
    assert lo <= cv["pooled"]["accuracy"] <= hi
    for i in range(3):  # each fold: scored on its holdout, chose its epoch on a validation split of the rest
        fm = json.loads((out / "cv" / f"fold-{i + 1}" / "metrics.json").read_text())
        assert fm["split"]["name"] == "holdout" and "test" not in fm["splits"]
        assert "cross-validation fold" in " ".join(fm["notes"])
    # the final model trained on all the data carries the figures; its card shows them
    assert m["split"]["name"] == "test" and m["cross_validation"]["k"] == 3
    card = (out / "README.md").read_text()
    assert "Grouped 3-fold cross-validation" in card and "**mean ± sd**" in card
    assert "grouped 3-fold" in format_cv_table(cv)
    # --resume with every fold done trains no fold again (only the final model's call remains)
    calls = []
    monkeypatch.setattr(cvmod, "fit", lambda c, **kw: calls.append(c.cv_fold) or {"ok": True})
    assert cross_validate(_cfg(blood, out, tmp_path / "cache", epochs=2, cv=3, resume=True)) == {"ok": True}
    assert calls == [None]
    (out / "cv" / "fold-2" / "holdout.npz").unlink()  # an unfinished fold is trained again, the others not
    monkeypatch.undo()
    first = (out / "cv" / "fold-1" / "holdout.npz").stat().st_mtime_ns
    again = cross_validate(_cfg(blood, out, tmp_path / "cache", epochs=2, cv=3, resume=True, cv_only=True))
    assert (out / "cv" / "fold-2" / "holdout.npz").is_file()
    assert (out / "cv" / "fold-1" / "holdout.npz").stat().st_mtime_ns == first
    assert again["pooled"]["n_images"] == 80 and "pooled" in again and "splits" not in again  # --cv-only


def test_cv_settings_fail_early():
    with pytest.raises(ValueError, match="at least 2 folds"):
        TrainConfig(dataset="x", cv=1).validate()
    with pytest.raises(ValueError, match="--cv-only needs --cv"):
        TrainConfig(dataset="x", cv_only=True).validate()


def test_a_timm_model_records_the_resampling_its_training_saw(blood, tmp_path):
    """timm's configs say bicubic; training sees the decode-once cache (bilinear). The checkpoint must
    say bilinear, so that predicting from the image files reproduces the training run's figures."""
    from cellhub import create_model, data, evaluation
    from cellhub.data import load_cell_dataset
    from cellhub.hub import load_pretrained

    assert create_model("efficientnet_lite0", "blood-cells", pretrained=False).pretrained_cfg["interpolation"] == "bicubic"
    m = fit(_cfg(blood, tmp_path / "run", tmp_path / "cache", model="efficientnet_lite0", pretrained=False,
                 epochs=1, save_checkpoints=False))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["interpolation"] == data.CACHE_INTERPOLATION == "bilinear"
    assert cfg["cellhub"]["pretrained_cfg"]["interpolation"] == "bilinear"
    test = load_cell_dataset(blood, progress=False)["test"]
    again = evaluation.evaluate_model(load_pretrained(tmp_path / "run"), test, n_boot=10, progress=False)
    assert again["accuracy"] == pytest.approx(m["splits"]["test"]["accuracy"], abs=1e-9)
