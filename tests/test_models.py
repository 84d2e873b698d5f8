"""cellhub.models and cellhub.transforms: registry, factory, CAM helpers, preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image

from cellhub.models import (
    MODEL_NAMES,
    MODEL_REGISTRY,
    PretrainedWeightsUnavailable,
    SmallCNN,
    available_models,
    cam_layer,
    create_model,
    is_gap_linear_head,
)
from cellhub.transforms import eval_transform, preprocess, resolve_data_config, to_pil, train_transform

TINY = 32


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one thread is faster, and much faster on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(w: int = 60, h: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def test_builtin_models_are_registered():
    assert set(MODEL_NAMES) <= set(available_models())
    assert available_models()[0] == "smallcnn"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_forward_backward_and_cam_contract(name):
    torch.manual_seed(0)
    model = create_model(name, "blood-cells", pretrained=False, image_size=TINY)
    cfg = model.cellhub_config
    assert cfg["model_name"] == name
    assert cfg["labels"] == ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    assert cfg["task"] == "blood-cells"
    assert cfg["pretrained"] is False
    assert cfg["pretrained_cfg"]["input_size"] == [3, TINY, TINY]

    x = torch.randn(2, 3, TINY, TINY)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 4)
    logits.logsumexp(-1).mean().backward()
    head = model.get_classifier()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    first = next(p for p in model.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0

    model.eval()
    captured = {}
    handle = cam_layer(model).register_forward_hook(lambda m, i, o: captured.setdefault("out", o.detach().clone()))
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    handle.remove()
    assert feats.ndim == 4 and feats.shape[0] == 2
    # the CAM layer's output IS the feature map that forward_features returns
    torch.testing.assert_close(captured["out"], feats)
    if is_gap_linear_head(model):
        # logits come from global average pooling + one linear layer: CAM is exact
        torch.testing.assert_close(head(feats.mean((2, 3))), out, rtol=1e-4, atol=1e-5)
    else:
        assert name == "vgg16"  # a 4096-d MLP sits between the feature map and the classifier
        assert head.in_features != feats.shape[1]


def test_gap_linear_flags():
    assert [MODEL_REGISTRY[n].gap_linear_head for n in MODEL_NAMES] == [True, True, True, False, True]


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError) as e:
        create_model("resnet-9000", "malaria", pretrained=False)
    msg = str(e.value)
    assert "resnet-9000" in msg
    for name in MODEL_NAMES:
        assert name in msg


def test_labels_as_task_or_list():
    m = create_model("smallcnn", "malaria", pretrained=False, image_size=TINY)
    assert m.cellhub_config["labels"] == ["parasitized", "uninfected"]
    m = create_model("smallcnn", ["parasitized", "uninfected"], pretrained=False, image_size=TINY)
    assert m.cellhub_config["task"] == "malaria"  # recognised from its labels
    m = create_model("smallcnn", ["a", "b", "c"], pretrained=False, image_size=TINY)
    assert m.cellhub_config["task"] is None and m(torch.randn(1, 3, TINY, TINY)).shape == (1, 3)
    with pytest.raises(ValueError, match="Unknown task 'bogus'"):
        create_model("smallcnn", "bogus", pretrained=False)
    with pytest.raises(ValueError, match="unique"):
        create_model("smallcnn", ["a", "a"], pretrained=False)
    with pytest.raises(ValueError, match="at least 2"):
        create_model("smallcnn", ["a"], pretrained=False)
    with pytest.raises(ValueError, match="image_size"):
        create_model("smallcnn", "malaria", pretrained=False, image_size=4)


def test_smallcnn_config_is_self_describing():
    m = create_model("smallcnn", "malaria", pretrained=False, image_size=64)
    cfg = m._hub_mixin_config
    assert cfg["labels"] == ["parasitized", "uninfected"]
    assert cfg["image_size"] == 64 and cfg["num_classes"] == 2
    assert cfg["mean"] and cfg["std"] and cfg["interpolation"] == "bilinear"
    assert isinstance(m.head, torch.nn.Linear)
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    with pytest.raises(ValueError, match="labels"):
        SmallCNN(num_classes=3, labels=["a", "b"])


def test_smallcnn_group_norm_needs_no_batch_statistics():
    """norm="group": an image's output does not depend on the batch it came in, even in training
    mode (BatchNorm's does); other models refuse the option with the choices named."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, TINY, TINY)
    for norm, independent in (("group", True), ("batch", False)):
        m = create_model("smallcnn", "malaria", pretrained=False, image_size=TINY, norm=norm, drop_rate=0.0).train()
        assert m.cellhub_config["norm"] == norm and m._hub_mixin_config["norm"] == norm
        with torch.no_grad():
            same = torch.allclose(m(x)[:1], m(x[:1].expand(4, -1, -1, -1))[:1], atol=1e-5)
        assert same is independent, norm
    kinds = {type(x).__name__ for x in create_model("smallcnn", "malaria", pretrained=False, norm="group").modules()}
    assert "GroupNorm" in kinds and "BatchNorm2d" not in kinds
    with pytest.raises(ValueError, match="norm 'group' is not available for resnet18.*smallcnn"):
        create_model("resnet18", "malaria", pretrained=False, norm="group")
    with pytest.raises(ValueError, match="norm='layer'.*batch, group"):
        SmallCNN(num_classes=2, norm="layer")
    with pytest.raises(ValueError, match="divisible by 8"):
        SmallCNN(num_classes=2, widths=(12, 24), depths=(1, 1), norm="group")


def test_smallcnn_depths_build_a_deeper_network_that_reloads(tmp_path):
    """depths="2,2,2,2": two conv blocks in every stage (5 -> 8 convs), recorded in the checkpoint so
    that loading it and starting a new training from it rebuild the same network; wrong values and
    models without stages are refused with the fix named."""
    from cellhub import hub
    from cellhub.training.pipeline import model_from_checkpoint

    def convs(m):
        return sum(isinstance(x, nn.Conv2d) for x in m.modules())

    torch.manual_seed(0)
    deep = create_model("smallcnn", "malaria", pretrained=False, image_size=TINY, depths="2,2,2,2").eval()
    assert convs(deep) == 8 and convs(create_model("smallcnn", "malaria", pretrained=False, image_size=TINY)) == 5
    assert deep.cellhub_config["depths"] == [2, 2, 2, 2]
    folder = hub.save_pretrained(deep, tmp_path / "deep")
    assert "conv-BatchNorm-ReLU stages of 2, 2, 2, 2 blocks" in (folder / "README.md").read_text()
    loaded = hub.load_pretrained(folder).eval()
    x = torch.randn(2, 3, TINY, TINY)
    with torch.no_grad():
        assert torch.allclose(loaded(x), deep(x), atol=1e-6)
    again = model_from_checkpoint(str(folder), ["a", "b", "c"])
    assert convs(again) == 8 and again.cellhub_config["depths"] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="4 whole numbers from 1 to 8.*1,1,1,2"):
        create_model("smallcnn", "malaria", pretrained=False, depths="2,2")
    with pytest.raises(ValueError, match="not adjustable for 'resnet18'.*smallcnn"):
        create_model("resnet18", "malaria", pretrained=False, depths=(1, 1, 1, 1))


def test_smallcnn_mixin_round_trip_is_strict(tmp_path):
    torch.manual_seed(0)
    m = create_model("smallcnn", "malaria", pretrained=False, image_size=TINY).eval()
    m.save_pretrained(tmp_path / "ok")
    loaded = SmallCNN.from_pretrained(tmp_path / "ok")
    x = torch.randn(2, 3, TINY, TINY)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)
    assert loaded.labels == ["parasitized", "uninfected"]

    # weights that do not match the config are an error, not a silent partial load
    wide = SmallCNN(num_classes=2, widths=[8, 16, 32, 64], image_size=TINY)
    wide.save_pretrained(tmp_path / "bad")
    import json

    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["widths"] = [32, 64, 128, 256]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="size mismatch|Missing|Unexpected|Error"):
        SmallCNN.from_pretrained(tmp_path / "bad")


def test_freeze_backbone_trains_only_the_head():
    torch.manual_seed(0)
    m = create_model("resnet18", "malaria", pretrained=False, image_size=TINY, freeze_backbone=True)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    m.train()
    assert m.training and not m.bn1.training  # backbone BatchNorm stays in eval mode
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    loss = torch.nn.functional.cross_entropy(m(torch.randn(4, 3, TINY, TINY)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    opt.step()
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # no backbone weight, no BN running statistic moved
    assert m.cellhub_config["freeze_backbone"] is True
    m.eval()
    assert not m.training
    import copy

    clone = copy.deepcopy(m).train()  # e.g. an EMA copy keeps the behaviour, on its own modules
    assert clone.training and not clone.bn1.training and not m.training


def test_pretrained_offline_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedWeightsUnavailable) as e:
        create_model("resnet18", "malaria", pretrained=True, image_size=TINY)
    msg = str(e.value)
    assert "pretrained=False" in msg and "--from-scratch" in msg and "HF_HUB_CACHE" in msg


def _offline_hf_cache(tmp_path, monkeypatch):
    """An offline HF cache under tmp_path with an empty snapshot of timm/resnet18.tv_in1k; returns its folder."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--timm--resnet18.tv_in1k"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snap


def test_pretrained_uses_timms_hub_download_through_the_hf_cache(tmp_path, monkeypatch):
    """pretrained=True goes through timm's real download path: a populated HF cache is used."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    imagenet = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    snap = _offline_hf_cache(tmp_path, monkeypatch)
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(snap / "model.safetensors"),
              metadata={"format": "pt"})

    m = create_model("resnet18", "malaria", pretrained=True, image_size=TINY)
    torch.testing.assert_close(m.conv1.weight, imagenet.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(m.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var, rtol=0, atol=0)
    assert m.fc.out_features == 2  # new head for the task
    assert m.cellhub_config["pretrained"] is True
    assert m.cellhub_config["base_model"] == "timm/resnet18.tv_in1k"


def test_pretrained_never_reads_a_pickled_checkpoint(tmp_path, monkeypatch):
    """A cache (or Hub repo) that holds only pytorch_model.bin is no source of weights: timm's fallback
    to the pickle is switched off, the pickle is never opened, and the error says what to do."""
    import timm

    snap = _offline_hf_cache(tmp_path, monkeypatch)
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=1000).state_dict(),
               snap / "pytorch_model.bin")

    def no_pickles(*a, **k):
        raise AssertionError("torch.load was called on a downloaded checkpoint")

    monkeypatch.setattr(torch, "load", no_pickles)
    with pytest.raises(PretrainedWeightsUnavailable) as e:
        create_model("resnet18", "malaria", pretrained=True, image_size=TINY)
    assert "--from-scratch" in str(e.value)


# GroupNorm starts slower on this toy problem (a loss plateau of ~60 steps at lr 3e-3; seeds 0-3
# all learn it in 120 steps at 1e-3)
@pytest.mark.parametrize("norm,lr,steps", [("batch", 3e-3, 40), ("group", 1e-3, 120)])
def test_smallcnn_learns_synthetic_cells_in_seconds(norm, lr, steps):
    from cellhub.synthetic import draw_malaria_cell

    def cells(seed0: int) -> list[Image.Image]:
        return [draw_malaria_cell(("parasitized", "uninfected")[i % 2], size=TINY, seed=seed0 + i)[0]
                for i in range(32)]

    torch.manual_seed(0)
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=TINY, norm=norm)
    tf = train_transform(model)
    train, held_out = cells(0), cells(1000)
    y = torch.tensor([i % 2 for i in range(32)])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):  # BatchNorm running statistics need a few dozen steps to settle
        loss = torch.nn.functional.cross_entropy(model(torch.stack([tf(im) for im in train])), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(preprocess(held_out, model)).argmax(1) == y).float().mean().item()
    assert acc >= 0.9, acc


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------


def test_resolve_data_config_from_every_source():
    m = create_model("resnet18", "malaria", pretrained=False, image_size=48)
    want = resolve_data_config(m)
    assert want["input_size"] == (3, 48, 48) and want["crop_pct"] == 1.0
    assert resolve_data_config(m.cellhub_config) == want
    assert resolve_data_config({"cellhub": m.cellhub_config}) == want
    assert resolve_data_config(m.pretrained_cfg) == want
    with pytest.raises(ValueError, match="input_size"):
        resolve_data_config({"foo": 1})
    with pytest.raises(ValueError, match="interpolation"):
        resolve_data_config({"input_size": [3, 8, 8], "interpolation": "sinc"})


def test_eval_transform_matches_timm_and_accepts_arrays():
    import timm.data

    m = create_model("smallcnn", "blood-cells", pretrained=False, image_size=TINY)
    img = _image(64, 48)
    x = eval_transform(m)(img)
    assert x.shape == (3, TINY, TINY) and x.dtype == torch.float32
    ref = timm.data.create_transform(**timm.data.resolve_data_config(model=m), is_training=False)(img)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    torch.testing.assert_close(eval_transform(m)(np.asarray(img)), x, rtol=0, atol=0)
    torch.testing.assert_close(eval_transform(m)(img.convert("RGBA")), x, rtol=0, atol=0)
    assert eval_transform(m)(np.asarray(img.convert("L"))).shape == (3, TINY, TINY)
    batch = preprocess([img, img], m)
    assert batch.shape == (2, 3, TINY, TINY)
    with pytest.raises(TypeError, match="uint8"):
        eval_transform(m)(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="PIL"):
        to_pil("cell.png")


def test_train_transform_is_label_preserving_augmentation():
    m = create_model("smallcnn", "malaria", pretrained=False, image_size=TINY)
    tf = train_transform(m)
    img = _image(40, 40, seed=3)
    torch.manual_seed(0)
    import random

    random.seed(0)
    outs = [tf(img) for _ in range(12)]
    assert all(o.shape == (3, TINY, TINY) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # random
    # without colour jitter the output is a flip/rotation of the eval image: same pixel multiset
    plain = train_transform(m, jitter=0, hue=0)(img)
    ev = eval_transform(m)(img)
    torch.testing.assert_close(plain.flatten().sort().values, ev.flatten().sort().values)


@pytest.mark.parametrize("name", ["smallcnn", "resnet18", "resnet50", "vgg16"])
def test_conv_bn_fusion_for_inference_keeps_outputs_and_leaves_the_model_alone(name: str) -> None:
    from cellhub import cam as cam_lib
    from cellhub.models import cam_layer, fuse_conv_bn_for_inference

    torch.manual_seed(0)
    model = create_model(name, "blood-cells", pretrained=False, image_size=64).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for m in model.modules():  # non-trivial statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    fused = fuse_conv_bn_for_inference(model)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
    if n_bn == 0:  # vgg16: nothing to fuse, the model itself comes back
        assert fused is model
        return
    assert fused is not model
    assert sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn  # original untouched
    assert fused.cellhub_config == model.cellhub_config
    assert type(cam_layer(fused)) is type(cam_layer(model))
    maps_fused = cam_lib.gradcam(fused, x, 1)
    maps_plain = cam_lib.gradcam(model, x, 1)
    np.testing.assert_allclose(maps_fused, maps_plain, atol=2e-3)  # maps in [0, 1]
