"""v1_constrained/data.py: the paper's 64x64 transforms and both on-disk layouts."""
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from common import synthetic
from common.runtime import UserError
from v1_constrained import data as v1data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthetic.write_tiny_imagenet(tmp_path_factory.mktemp("v1d") / "tiny", n_classes=3, n_train_per_class=2,
                                         n_val_per_class=2, seed=1)


def test_transforms_give_64px_and_half_normalisation():
    white = Image.new("RGB", (300, 200), (255, 255, 255))
    black = Image.new("RGB", (64, 64), (0, 0, 0))
    for t in (v1data.imagenet_transform(True), v1data.imagenet_transform(False)):
        x = t(white)
        assert x.shape == (3, 64, 64)
        torch.testing.assert_close(x, torch.ones(3, 64, 64))          # (1 - 0.5) / 0.5
    for t in (v1data.tinyimagenet_transform(True), v1data.tinyimagenet_transform(False), v1data.corruption_transform()):
        torch.testing.assert_close(t(black), -torch.ones(3, 64, 64))  # (0 - 0.5) / 0.5
    assert v1data.tinyimagenet_transform(False)(white).shape == (3, 64, 64)  # val resizes to 64x64


def test_tiny_imagenet_val_read_as_shipped(tiny):
    # the release needed val/ reorganised into class folders by hand; val_annotations.txt is read directly here
    assert v1data.detect_dataset(tiny) == "tinyimagenet"
    val = v1data.load_split("tinyimagenet", tiny, "val")
    train = v1data.load_split("tinyimagenet", tiny, "train")
    assert len(val) == 6 and len(train) == 6 and val.classes == train.classes
    assert sorted(set(y for _, y in val.samples)) == [0, 1, 2]
    x, y = val[0]
    assert x.shape == (3, 64, 64)


def test_imagenet_layout(tiny, tmp_path):
    root = tmp_path / "imagenet"
    val = v1data.load_split("tinyimagenet", tiny, "val")
    for split, samples in (("train", v1data.load_split("tinyimagenet", tiny, "train").samples), ("val", val.samples)):
        for path, label in samples:
            d = root / split / val.classes[label]
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, d / Path(path).name)
    assert v1data.detect_dataset(root) == "imagenet"
    tr = v1data.load_split("imagenet", root, "train")
    va = v1data.load_split("imagenet", root, "val", classes=tr.classes)
    assert tr.classes == val.classes and len(va) == 6
    assert tr[0][0].shape == (3, 64, 64)
    with pytest.raises(UserError):
        v1data.load_split("imagenet", tmp_path / "missing", "train")
