"""cellhub.batch.iter_decoded: the one engine under predict_files and evaluation.predict_dataset."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value

from cellhub import create_model, transforms
from cellhub.batch import iter_decoded
from cellhub.evaluation import adapt_batchnorm, predict_dataset
from cellhub.synthetic import draw_malaria_cell


def test_iter_decoded_keeps_order_and_reads_in_sequence():
    reads = []

    def read(chunk):
        reads.append((threading.get_ident(), list(chunk)))
        return [x * 10 for x in chunk]

    out = list(iter_decoded(list(range(23)), lambda item, raw: (item, raw + 1), read=read, chunk_size=5, workers=3))
    assert [start for start, _, _ in out] == [0, 5, 10, 15, 20]
    assert [d for _, _, ds in out for d in ds] == [(i, 10 * i + 1) for i in range(23)]
    assert [c for _, c in reads] == [list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)]
    assert len({t for t, _ in reads}) == 1  # one read-ahead thread, in order
    with pytest.raises(ValueError, match="chunk_size"):
        list(iter_decoded([1], lambda i, r: r, chunk_size=0))
    assert list(iter_decoded([], lambda i, r: r)) == []


def _cells_dataset(tmp_path, n):
    paths = []
    for i in range(n):
        img, _ = draw_malaria_cell("parasitized" if i % 2 else "uninfected", size=48, seed=i)
        paths.append(str(tmp_path / f"c{i}.png"))
        img.save(paths[-1])
    return Dataset.from_dict({"image": paths, "label": [0] * n}, features=Features(image=Image(), label=Value("int64")))


def test_predict_dataset_equals_the_model_on_each_image(tmp_path):
    torch.manual_seed(0)
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=32).eval()
    ds = _cells_dataset(tmp_path, 7)
    tf = transforms.eval_transform(transforms.resolve_data_config(model))
    with torch.no_grad():
        expected = torch.softmax(model(torch.stack([tf(ds[i]["image"]) for i in range(7)])), 1).numpy()
    got = predict_dataset(model, ds, batch_size=3, progress=False, device="cpu")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    px = ds.map(lambda r: {"pixels": np.asarray(r["image"].convert("RGB").resize((32, 32)))},
                remove_columns=["image"])
    assert predict_dataset(model, px, batch_size=4, progress=False).shape == (7, 2)


def test_adapt_batchnorm_re_estimates_the_statistics_on_the_new_images(tmp_path):
    """AdaBN: the first BatchNorm's running mean becomes the mean of its inputs over the new images
    (12 images in batches of 4: the average of equal batches' means is the overall mean)."""
    torch.manual_seed(0)
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=32).eval()
    ds = _cells_dataset(tmp_path, 12)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen = []
    hook = bns[0].register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    before = predict_dataset(model, ds, batch_size=4, progress=False, device="cpu")
    hook.remove()
    x = torch.cat(seen)
    expected_mean = x.mean(dim=(0, 2, 3))
    assert not torch.allclose(bns[0].running_mean, expected_mean, atol=1e-3)  # fresh stats: zeros
    momenta = [bn.momentum for bn in bns]

    assert adapt_batchnorm(model, ds, batch_size=4, progress=False, device="cpu") == len(bns) > 0
    torch.testing.assert_close(bns[0].running_mean, expected_mean, atol=1e-4, rtol=1e-4)
    assert all(bn.num_batches_tracked.item() == 3 for bn in bns)
    assert [bn.momentum for bn in bns] == momenta and not model.training
    after = predict_dataset(model, ds, batch_size=4, progress=False, device="cpu")
    assert np.abs(after - before).max() > 1e-3  # the new statistics change the predictions
    again = predict_dataset(model, ds, batch_size=5, progress=False, device="cpu")
    np.testing.assert_allclose(again, after, atol=1e-5)  # fixed statistics: per-image, batch-independent
    with pytest.raises(ValueError, match="No images"):
        adapt_batchnorm(model, ds.select([]), progress=False)


def test_adapt_batchnorm_leaves_a_groupnorm_model_as_it_is(tmp_path):
    torch.manual_seed(0)
    model = create_model("smallcnn", "malaria", pretrained=False, image_size=32, norm="group").eval()
    ds = _cells_dataset(tmp_path, 5)
    before = predict_dataset(model, ds, progress=False, device="cpu")
    assert adapt_batchnorm(model, ds, progress=False, device="cpu") == 0
    np.testing.assert_array_equal(predict_dataset(model, ds, progress=False, device="cpu"), before)
