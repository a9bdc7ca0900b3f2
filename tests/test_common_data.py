"""common/datasets.py and common/synthetic.py: readers on generated trees, bad input, corruptions, batching."""
import shutil

import numpy as np
import pytest
import torch

from common import datasets, synthetic
from common.runtime import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthetic.write_tiny_imagenet(tmp_path_factory.mktemp("tiny") / "tin", n_classes=4,
                                         n_train_per_class=3, n_val_per_class=2, size=32, seed=0)


def _labels_by_name(ds):
    return sorted((p.name, y) for p, y in ds.samples)


def test_tiny_imagenet_reader_as_shipped(tiny):
    wnids = (tiny / "wnids.txt").read_text().split()
    train = datasets.TinyImageNet(tiny, "train")
    assert train.classes == sorted(wnids) and len(train) == 12
    img, y = train[0]
    assert img.size == (32, 32) and y == 0
    val = datasets.TinyImageNet(tiny, "val")
    assert len(val) == 8
    ann = {l.split("\t")[0]: l.split("\t")[1] for l in (tiny / "val" / "val_annotations.txt").read_text().splitlines()}
    for p, y in val.samples:
        assert val.classes[y] == ann[p.name]


def test_tiny_imagenet_reorganised_val_gives_the_same_labels(tiny, tmp_path):
    reorg = synthetic.write_tiny_imagenet(tmp_path / "tin2", n_classes=4, n_train_per_class=3, n_val_per_class=2,
                                          size=32, seed=0, reorganised_val=True)
    assert not (reorg / "val" / "val_annotations.txt").exists()
    assert _labels_by_name(datasets.TinyImageNet(reorg, "val")) == _labels_by_name(datasets.TinyImageNet(tiny, "val"))


def test_tiny_imagenet_bad_inputs(tiny, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        datasets.TinyImageNet(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "val" / "val_annotations.txt").unlink()
    with pytest.raises(UserError, match="val_annotations.txt"):
        datasets.TinyImageNet(broken, "val")
    (broken / "train" / "n12345678" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="n12345678.*not listed"):
        datasets.TinyImageNet(broken, "train")
    (broken / "wnids.txt").unlink()
    with pytest.raises(UserError, match="wnids.txt"):
        datasets.TinyImageNet(broken, "train")


def test_truncated_jpeg_names_the_file(tiny, tmp_path):
    bad = tmp_path / "trunc"
    shutil.copytree(tiny, bad)
    ds = datasets.TinyImageNet(bad, "train")
    path = ds.samples[0][0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=path.name):
        ds[0]


def test_imagefolder_and_imagenet_reader(tiny, tmp_path):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for p, y in datasets.TinyImageNet(tiny, "train").samples:
            d = root / split / p.parent.parent.name
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, d / p.name)
    tr = datasets.imagenet_split(root, "train")
    assert len(tr) == 12 and tr.classes == datasets.read_wnids(tiny)
    with pytest.raises(UserError, match="val"):
        shutil.rmtree(root / "val")
        datasets.imagenet_split(root, "val")
    with pytest.raises(UserError, match="not one of"):
        datasets.ImageFolderDataset(root / "train", classes=tr.classes[:2])


def test_tiny_imagenet_c_writer_and_walker(tiny, tmp_path):
    croot = synthetic.write_tiny_imagenet_c(tmp_path / "tic", tiny, corruptions=("fog", "pixelate"), severities=(1, 5),
                                            max_per_class=1)
    classes = datasets.read_wnids(tiny)
    got = [(c, s, len(ds)) for c, s, ds in datasets.iter_tiny_imagenet_c(croot, classes=classes, severities=(1, 5))]
    assert got == [("fog", 1, 4), ("fog", 5, 4), ("pixelate", 1, 4), ("pixelate", 5, 4)]
    _, _, ds = next(datasets.iter_tiny_imagenet_c(croot, classes=classes, severities=(1,)))
    assert sorted(y for _, y in ds.samples) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="severity"):
        list(datasets.iter_tiny_imagenet_c(croot, classes=classes, severities=(2,)))


# The corruptions whose ImageNet-C parameters grow with severity change the image more at every step; glass blur
# (its iteration count is not monotone in severity), zoom blur (overlapping zoom ranges) and frost (a different
# texture crop per severity) are not monotone in pixel distance, in ImageNet-C either, and are checked end to end.
NOT_MONOTONE = {"glass_blur", "zoom_blur", "frost"}


def test_all_corruptions_all_severities_change_the_image_monotonically():
    img = synthetic.make_class_images(1, 1, size=64, seed=3)[0][0]
    assert len(synthetic.CORRUPTIONS) == 15
    for name in synthetic.CORRUPTIONS:
        dist = []
        for s in range(1, 6):
            out = synthetic.corrupt(img, name, s, rng=0)
            assert out.shape == img.shape and out.dtype == np.uint8
            dist.append(np.abs(out.astype(float) - img).mean())
        assert dist[0] > 0, name
        if name in NOT_MONOTONE:
            assert dist[4] > dist[0], (name, dist)
        else:
            assert all(b > a for a, b in zip(dist, dist[1:])), (name, dist)
    with pytest.raises(ValueError):
        synthetic.corrupt(img, "rain", 1)


def test_class_images_are_learnable_by_a_simple_probe():
    """Nearest-class-mean on colour histograms beats chance by a wide margin (the classes are real),
    and all 208 class specs are distinct."""
    specs = synthetic.class_specs()
    assert len(specs) == len(set(specs)) == 208
    x, y, _ = synthetic.make_class_images(20, 6, size=32, seed=0)
    xt, yt, _ = synthetic.make_class_images(10, 6, size=32, seed=1)

    def hist(a):  # mean colour of the 10% of pixels farthest from the image's median colour (the object)
        flat = a.reshape(len(a), -1, 3).astype(float)
        d = np.abs(flat - np.median(flat, axis=1, keepdims=True)).sum(-1)
        top = np.argsort(d, axis=1)[:, -flat.shape[1] // 10:]
        return np.take_along_axis(flat, top[..., None], axis=1).mean(1)

    means = np.stack([hist(x)[y == k].mean(0) for k in range(6)])
    pred = ((hist(xt)[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yt).mean() > 0.6  # chance is 1/6


def test_ensure_synthetic_writes_once(tmp_path, capsys):
    calls = []

    def writer(p):
        calls.append(p)
        (p / "x.txt").write_text("1")

    a = synthetic.ensure_synthetic(tmp_path, "demo", writer)
    b = synthetic.ensure_synthetic(tmp_path, "demo", writer)
    assert a == b == tmp_path / "synthetic" / "demo" and len(calls) == 1
    assert (a / "x.txt").read_text() == "1"
    assert "embedded synthetic data" in capsys.readouterr().out


def test_tensor_batcher_reproducible_and_complete():
    x = torch.arange(10).float()[:, None]
    y = torch.arange(10)
    b = datasets.TensorBatcher(x, y, batch_size=4, seed=1)
    assert len(b) == 3
    b.set_epoch(2)
    first = [yb.tolist() for _, yb in b]
    assert sorted(sum(first, [])) == list(range(10))
    b.set_epoch(2)
    assert [yb.tolist() for _, yb in b] == first
    b.set_epoch(3)
    assert [yb.tolist() for _, yb in b] != first
    assert len(datasets.TensorBatcher(x, batch_size=4, drop_last=True)) == 2


def test_shard_sampler_covers_each_index_once():
    shards = [list(datasets.ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_neural_responses_validation():
    imgs, resp = torch.rand(5, 1, 8, 8), torch.rand(5, 3)
    d = datasets.NeuralResponses(imgs, resp, repeats=torch.rand(4, 5, 3), source="x.npy")
    assert d.n_images == 5 and d.n_neurons == 3
    sub = d.subset([0, 2])
    assert sub.n_images == 2 and sub.repeats.shape == (4, 2, 3)
    with pytest.raises(UserError, match="x.npy.*responses"):
        datasets.NeuralResponses(imgs, torch.rand(4, 3), source="x.npy")
    bad = resp.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        datasets.NeuralResponses(imgs, bad)
    with pytest.raises(UserError, match="repeats"):
        datasets.NeuralResponses(imgs, resp, repeats=torch.rand(4, 3, 5))


def test_simulated_population_shapes_and_determinism():
    imgs = synthetic.natural_images(20, 16, channels=3, seed=0)
    assert imgs.shape == (20, 3, 16, 16) and 0 <= imgs.min() and imgs.max() <= 1
    for kind in ("v1", "deep"):
        pop = synthetic.SimulatedPopulation(7, 16, channels=3, kind=kind, seed=4)
        r = pop.rates(imgs)
        assert r.shape == (20, 7) and (r >= 0).all()
        s1, s2 = pop.sample(imgs, 3, seed=9), pop.sample(imgs, 3, seed=9)
        assert s1.shape == (3, 20, 7) and torch.equal(s1, s2)
        assert torch.equal(synthetic.SimulatedPopulation(7, 16, channels=3, kind=kind, seed=4).rates(imgs), r)
    with pytest.raises(ValueError):
        pop.rates(torch.rand(2, 1, 8, 8))


def test_line_plot_writes_a_png_with_the_curves(tmp_path):
    from PIL import Image

    from common import plots

    path = plots.line_plot(tmp_path / "figs" / "c.png",
                           [{"label": "val", "x": [0, 1, 2], "y": [0.1, 0.5, 0.7], "lo": [0, 0.4, 0.6], "hi": [0.2, 0.6, 0.8]},
                            {"label": "train", "x": [0, 1, 2], "y": [0.2, 0.3, 0.4]}],
                           title="t", ylabel="corr", hlines=[(0.9, "ceiling")])
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (440, 720, 3)
    blue = (np.abs(img.astype(int) - [31, 119, 180]).sum(-1) < 30).sum()
    assert blue > 100  # the first curve was drawn
