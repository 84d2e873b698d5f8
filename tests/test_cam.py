"""Grad-CAM: the exact forward-pass CAM equals pytorch-grad-cam for GAP+linear heads; overlays."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cellhub import cam
from cellhub.models import create_model


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _same_map(exact: np.ndarray, reference: np.ndarray) -> bool:
    """Correlation >= 0.999, or both empty (a class with only negative evidence has no map)."""
    if reference.max() == 0:
        return exact.max() == 0
    return _corr(exact, reference) >= 0.999


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_exact_cam_matches_pytorch_grad_cam(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, "blood-cells", pretrained=False, image_size=64).eval()
    x = torch.rand(4, 3, 64, 64)
    assert cam.supports_exact_cam(model)
    logits, raw = cam.class_activation_maps(model, x)  # all classes' maps from one forward pass
    assert raw.shape[:2] == (4, 4)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
    classes = [0, 1, 2, 3]  # image i, class i: every class is checked
    exact = cam.normalize_cams(raw[torch.arange(4), torch.tensor(classes)], (64, 64))
    reference = cam.gradcam(model, x, classes, method="gradcam")
    assert exact.shape == reference.shape == (4, 64, 64)
    # same maps; gradcam() computes only the chosen class (another summation order: ~1e-6)
    np.testing.assert_allclose(cam.gradcam(model, x, classes, method="exact"), exact, atol=1e-5)
    assert all(_same_map(exact[i], reference[i]) for i in range(4))
    assert sum(reference[i].max() > 0 for i in range(4)) >= 2  # real maps were compared
    predicted = cam.gradcam(model, x)  # default: each image's predicted class, exact path
    reference = cam.gradcam(model, x, logits.argmax(dim=1).tolist(), method="gradcam")
    assert all(_same_map(predicted[i], reference[i]) for i in range(4))


class _RedDetector(nn.Module):
    """Model whose only feature is 'redness': class 0 = red, class 1 = not red.

    ``gap=False`` pools with a global *max* instead: same shapes, but not GAP + linear.
    """

    def __init__(self, gap: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 1, kernel_size=1), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1))
            self.features[0].bias.zero_()
        self.gap = gap
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc.bias.zero_()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        return self.fc(a.mean(dim=(2, 3)) if self.gap else a.amax(dim=(2, 3)))


def _red_square(at: tuple[int, int]) -> torch.Tensor:
    x = torch.full((1, 3, 16, 16), 0.5)
    r, c = at
    x[0, :, r : r + 4, c : c + 4] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    return x


@pytest.mark.parametrize("method", ["exact", "gradcam"])
def test_cam_points_at_the_evidence(method: str) -> None:
    model = _RedDetector().eval()
    x = _red_square((10, 2))
    maps = cam.gradcam(model, x, 0, method=method, layer=model.features)
    peak = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert 10 <= peak[0] < 14 and 2 <= peak[1] < 6
    assert maps[0][10:14, 2:6].mean() > 0.9 and maps[0][:6, 8:].mean() < 0.05


def test_exact_cam_refuses_a_head_that_is_not_gap_linear() -> None:
    model = _RedDetector(gap=False).eval()  # max-pool + linear: the exact CAM would be wrong
    x = _red_square((0, 0))
    with pytest.raises(cam.NotGapLinearError, match="not linear"):
        cam.class_activation_maps(model, x, model.features)
    with pytest.raises(cam.NotGapLinearError):
        cam.gradcam(model, x, 0, method="exact", layer=model.features)


def test_out_of_range_class_is_an_error_not_silence() -> None:
    model = _RedDetector().eval()
    x = _red_square((0, 0))
    for method in ("exact", "gradcam"):
        with pytest.raises(ValueError, match="class index 7 is out of range.*2 classes"):
            cam.gradcam(model, x, 7, method=method, layer=model.features)
    with pytest.raises(ValueError, match="2 entries for a batch of 1"):
        cam.gradcam(model, x, [0, 1], layer=model.features)


@pytest.mark.slow
def test_vgg16_head_uses_pytorch_grad_cam() -> None:
    torch.manual_seed(0)
    model = create_model("vgg16", "malaria", pretrained=False, image_size=64).eval()
    assert not cam.supports_exact_cam(model)
    x = torch.rand(1, 3, 64, 64).repeat(2, 1, 1, 1)
    maps, logits = cam.gradcam(model, x, [0, 1], return_logits=True)  # both classes, one backward
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    assert maps.max() > 0.99  # at least one class has a real (normalised) map
    torch.testing.assert_close(logits[0], logits[1])
    with pytest.raises(cam.NotGapLinearError):  # the numerical check refuses VGG's MLP head
        cam.class_activation_maps(model, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(logits[:1], model(x[:1]))


def test_overlay_keeps_image_size_and_box() -> None:
    img = Image.new("RGB", (40, 30), (200, 200, 200))
    heat = np.zeros((8, 8), np.float32)
    heat[2:6, 2:6] = 1.0
    out = cam.overlay(img, heat)
    assert out.size == (40, 30) and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    assert not np.array_equal(arr[15, 20], arr[0, 0])  # hot centre differs from cold corner
    boxed = np.asarray(cam.overlay(img, heat, box=(10, 0, 30, 30)))
    assert (boxed[:, :10] == 200).all() and (boxed[:, 30:] == 200).all()  # outside the model's view: untouched
    assert not (boxed[:, 10:30] == 200).all()
    with pytest.raises(ValueError, match="2-D"):
        cam.overlay(img, np.zeros((2, 3, 4)))


class _RegionModel(nn.Module):
    """Class 1's logit is the mean of the input's top-left 16x16 quarter; class 0's is fixed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = x[:, :, :16, :16].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(region), 4.0 * region], dim=1)


def test_occlusion_map_finds_the_evidence() -> None:
    """Hiding the region the class depends on lowers its probability; nothing else does."""
    x = torch.full((2, 3, 32, 32), 1.0)
    maps, logits = cam.occlusion_maps(_RegionModel(), x, patch=8, stride=4)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(logits, _RegionModel()(x))
    for m in maps:
        y, x0 = np.unravel_index(m.argmax(), m.shape)
        assert y < 16 and x0 < 16  # inside the region
        assert m[:16, :16].mean() > 0.5 and m[20:, 20:].max() == 0.0  # outside it: no drop at all
    # through gradcam(): the same maps; a class index is validated as for Grad-CAM
    np.testing.assert_allclose(cam.gradcam(_RegionModel(), x, [1, 1], method="occlusion"), maps, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        cam.gradcam(_RegionModel(), x, 5, method="occlusion")
    with pytest.raises(ValueError, match="patch must be"):
        cam.occlusion_maps(_RegionModel(), x, patch=64)


def test_predictor_uses_the_registry_heat_map_method() -> None:
    """EfficientNet-Lite0's CAM does not localise: its Predictor draws occlusion maps by default;
    the small CNN keeps its exact CAM; an explicit method wins."""
    from cellhub.predict import Predictor

    img = Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8))
    lite = Predictor(create_model("efficientnet_lite0", "malaria", pretrained=False, image_size=32))
    assert lite.cam_method == "occlusion"
    out = lite.predict([img], with_cam=True)[0]
    assert out.cam is not None and out.cam.shape == (32, 32)
    small = Predictor(create_model("smallcnn", "malaria", pretrained=False, image_size=32))
    assert small.cam_method == "auto"
    forced = Predictor(create_model("efficientnet_lite0", "malaria", pretrained=False, image_size=32), cam_method="exact")
    assert forced.cam_method == "exact" and forced.predict([img], with_cam=True)[0].cam.shape == (32, 32)
