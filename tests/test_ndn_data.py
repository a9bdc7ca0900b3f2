"""ndn_baselines: the reader of the Antolík 2016 region files, scaling, pooling, and the synthetic writer."""
import json

import numpy as np
import pytest

from common.runtime import UserError
from ndn_baselines import data

SMALL = {1: dict(neurons=7, train=40, val=12, reps=5), 2: dict(neurons=4, train=30, val=12, reps=4),
         3: dict(neurons=6, train=40, val=12, reps=6)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return data.write_synthetic(tmp_path_factory.mktemp("ndn_data"), sizes=SMALL, seed=3)


def _copy(root, tmp_path):
    dst = tmp_path / "copy"
    for r in (1, 2, 3):
        (dst / f"region{r}").mkdir(parents=True)
        for f in data.FILES:
            (dst / f"region{r}" / f).write_bytes((root / f"region{r}" / f).read_bytes())
    return dst


def test_synthetic_files_have_the_real_names_shapes_and_ranges(root):
    for r, s in SMALL.items():
        d = root / f"region{r}"
        assert sorted(p.name for p in d.iterdir()) == sorted(data.FILES)
        arrays = {f: np.load(d / f) for f in data.FILES}
        assert all(a.dtype == np.float64 for a in arrays.values())
        assert arrays["training_inputs.npy"].shape == (s["train"], 961)
        assert arrays["training_set.npy"].shape == (s["train"], s["neurons"])
        assert arrays["validation_inputs.npy"].shape == (s["val"], 961)
        assert arrays["raw_validation_set.npy"].shape == (s["reps"], s["val"], s["neurons"])
        x = arrays["training_inputs.npy"]
        assert 0 <= x.min() and x.max() <= data.PIXEL_MAX * (1 + 1e-12) and x.max() > 0.5 * data.PIXEL_MAX
        assert arrays["training_set.npy"].min() >= 0
        np.testing.assert_allclose(arrays["validation_set.npy"], arrays["raw_validation_set.npy"].mean(0))
    truth = json.loads((root / "ground_truth.json").read_text())
    assert 0 < truth["regions"]["region1"]["true_ceiling_mean"] <= 1
    assert data.REGION_SIZES[1] == dict(neurons=103, train=1800, val=50, reps=10)  # the real defaults


def test_reader_raw_scale_and_scalings(root):
    reg = data.load_region(root, 1)
    np.testing.assert_array_equal(reg.train_x, np.load(root / "region1" / "training_inputs.npy"))  # raw: untouched
    assert reg.n_neurons == 7 and reg.raw_val.shape == (5, 12, 7)
    ds = data.make_dataset([reg], "raw")
    assert ds.train.images.max() <= data.PIXEL_MAX * (1 + 1e-12) and ds.train.mask is None
    assert ds.train.images.shape == (40, 1, 31, 31)  # rows of 961 pixels are row-major 31×31 images
    np.testing.assert_array_equal(ds.train.images[3, 0].numpy(), reg.train_x[3].reshape(31, 31))
    x6 = data.make_dataset([reg], "x1e6").train.images
    assert 100 < x6.max() <= 255 + 1e-9
    z = data.make_dataset([reg], "zscore")
    assert abs(z.train.images.mean()) < 1e-10 and abs(z.train.images.std(unbiased=False) - 1) < 1e-10
    # validation uses the training statistics unless the msc-neuro quirk is asked for
    m, s = reg.train_x.mean(), reg.train_x.std()
    np.testing.assert_allclose(z.val.images.flatten(1).numpy(), (reg.val_x - m) / s)
    own = data.make_dataset([reg], "zscore", val_own_stats=True).val.images
    assert abs(own.mean()) < 1e-10
    assert 0 < ds.blocks[0]["oracle"] < ds.blocks[0]["avg_ceiling"] <= 1


def test_pooled_regions_block_masks(root):
    regs = [data.load_region(root, r) for r in (1, 2, 3)]
    ds = data.make_dataset(regs, "zscore")
    assert ds.train.responses.shape == (110, 17) and ds.val.responses.shape == (36, 17)
    m = ds.train.mask.numpy()
    assert m[:40, :7].all() and not m[:40, 7:].any()
    assert m[40:70, 7:11].all() and not m[40:70, :7].any() and not m[40:70, 11:].any()
    assert m[70:, 11:].all() and not m[70:, :11].any()
    assert (ds.train.responses.numpy()[m == 0] == 0).all()
    assert [b["neurons"] for b in ds.blocks] == [slice(0, 7), slice(7, 11), slice(11, 17)]
    assert data.region_list("all") == [[1], [2], [3]] and data.region_list("pooled") == [[1, 2, 3]]
    assert data.region_list("1,2") == [[1, 2]]
    with pytest.raises(UserError, match="--region"):
        data.region_list("4")


def test_raw_validation_axis_order_is_detected(root, tmp_path):
    dst = _copy(root, tmp_path)
    raw = np.load(root / "region1" / "raw_validation_set.npy")  # (5, 12, 7)
    np.save(dst / "region1" / "raw_validation_set.npy", raw.transpose(1, 0, 2))  # (12, 5, 7)
    np.testing.assert_array_equal(data.load_region(dst, 1).raw_val, raw)


@pytest.mark.parametrize("break_it, message", [
    (lambda d: (d / "region1" / "training_set.npy").unlink(), "missing file .*training_set.npy"),
    (lambda d: np.save(d / "region1" / "training_inputs.npy", np.zeros((40, 960))), "expected 961 pixels"),
    (lambda d: np.save(d / "region1" / "training_set.npy", np.full((40, 7), np.nan)), "NaN"),
    (lambda d: np.save(d / "region1" / "validation_set.npy", np.zeros((12, 6))), "7 neurons but validation_set.npy has 6"),
    (lambda d: np.save(d / "region1" / "training_set.npy", np.zeros((39, 7))), "40 images but training_set.npy has 39"),
    (lambda d: np.save(d / "region1" / "raw_validation_set.npy", np.zeros((5, 11, 7))), "raw_validation_set.npy: expected"),
    (lambda d: np.save(d / "region1" / "validation_inputs.npy", np.array([{"a": 1}]), allow_pickle=True), "not a readable"),
])
def test_reader_errors_are_clear(root, tmp_path, break_it, message):
    dst = _copy(root, tmp_path)
    break_it(dst)
    with pytest.raises(UserError, match=message):
        data.load_region(dst, 1)
    with pytest.raises(UserError, match="missing folder"):
        data.load_region(tmp_path / "nowhere", 1)
