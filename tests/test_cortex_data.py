"""cortex_readouts/data.py: the TVSD .mat readers (v7.3 = HDF5) in both orientations, MATLAB empties, the image
list with object references, the electrode → array → area maps and their errors."""
import h5py
import numpy as np
import pytest

from common.runtime import UserError
from cortex_readouts import data


def _mat(path, arrays, empty=()):
    data._write_mat(path, arrays)
    with h5py.File(path, "a") as f:
        for k in empty:  # MATLAB's empty array: its size vector, flagged MATLAB_empty
            f.create_dataset(k, data=np.array([0, 0], np.uint64)).attrs["MATLAB_empty"] = 1
    return path


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    n_train, n_test, reps, e = 30, 7, 4, 12
    return {"train_MUA": rng.normal(size=(n_train, e)), "test_MUA": rng.normal(size=(n_test, e)),
            "test_MUA_reps": rng.normal(size=(reps, n_test, e)), "reliab": rng.uniform(size=(6, e)),
            "oracle": rng.uniform(size=(e, 1))}


@pytest.mark.parametrize("transposed", [False, True])
def test_normmua_both_orientations(tmp_path, toy, transposed):
    arrays = {k: v.transpose(tuple(range(v.ndim))[::-1]) for k, v in toy.items()} if transposed else toy
    d = data.read_normmua(_mat(tmp_path / "THINGS_normMUA.mat", arrays))
    np.testing.assert_array_equal(d["train"], toy["train_MUA"])
    np.testing.assert_array_equal(d["test"], toy["test_MUA"])
    np.testing.assert_array_equal(d["test_reps"], toy["test_MUA_reps"])
    np.testing.assert_allclose(d["reliab"], toy["reliab"].mean(0))
    np.testing.assert_array_equal(d["oracle"], toy["oracle"][:, 0])
    with open(tmp_path / "THINGS_normMUA.mat", "rb") as f:  # a MATLAB v7.3 header in the 512-byte userblock
        assert f.read(10) == b"MATLAB 7.3"


def test_tvsd_sized_square_ambiguity_uses_22248(tmp_path):
    """train (22248, 100) and test (100, 100) share both axes; the TVSD image count decides."""
    tr = np.zeros((data.N_TRAIN, 100))
    tr[:, 0] = 1
    d = data.read_normmua(_mat(tmp_path / "a.mat", {"train_MUA": tr.T, "test_MUA": np.eye(100)}))
    assert d["train"].shape == (data.N_TRAIN, 100) and d["train"][:, 0].all()


def test_normmua_errors(tmp_path, toy):
    with pytest.raises(UserError, match="key 'test_MUA' missing"):
        data.read_normmua(_mat(tmp_path / "a.mat", {"train_MUA": toy["train_MUA"]}))
    with pytest.raises(UserError, match="share no electrode axis"):
        data.read_normmua(_mat(tmp_path / "b.mat", {"train_MUA": toy["train_MUA"], "test_MUA": np.zeros((7, 5))}))
    with pytest.raises(UserError, match="2-D"):
        data.read_normmua(_mat(tmp_path / "c.mat", {"train_MUA": toy["train_MUA"][None], "test_MUA": toy["test_MUA"]}))
    with pytest.raises(UserError, match="does not exist"):
        data.read_normmua(tmp_path / "nope.mat")
    (tmp_path / "d.mat").write_text("not hdf5")
    with pytest.raises(UserError, match="not a MATLAB v7.3"):
        data.read_normmua(tmp_path / "d.mat")


def test_array_exports_skip_matlab_empty(tmp_path):
    rng = np.random.default_rng(1)
    a2 = {"train_MUA": rng.normal(size=(20, 3, 1)), "test_MUA": rng.normal(size=(5, 3, 1)), "good_chns": np.ones((3, 1))}
    a7 = {"train_MUA": rng.normal(size=(20, 2, 1)), "test_MUA": rng.normal(size=(5, 2, 1)), "good_chns": np.ones((2, 1))}
    _mat(tmp_path / "THINGS_exportMUA_array2.mat", a2)
    _mat(tmp_path / "THINGS_exportMUA_array6.mat", {"good_chns": np.ones((1, 1))}, empty=("train_MUA", "test_MUA"))
    _mat(tmp_path / "THINGS_exportMUA_array7.mat", a7)
    d = data.read_array_exports(tmp_path)
    assert d["train"].shape == (20, 5) and d["array_of_electrode"].tolist() == [2, 2, 2, 7, 7]
    np.testing.assert_array_equal(d["train"][:, 3:], a7["train_MUA"][..., 0])
    emap = data.electrode_map(5, "N", array_of_electrode=d["array_of_electrode"])
    assert emap["area"] == ["V1"] * 5


def test_image_list_object_references(tmp_path):
    names_tr, names_te = ["aardvark/aardvark_01b.jpg", "zebra/zebra_02s.jpg"], ["abacus/abacus_13s.jpg"]
    data.write_things_imgs(tmp_path / "things_imgs.mat", names_tr, names_te)
    with h5py.File(tmp_path / "things_imgs.mat", "r") as f:  # stored with Windows separators, as TVSD
        ref = f["train_imgs/things_path"][0, 0]
        assert "".join(map(chr, f[ref][()].reshape(-1))) == "aardvark\\aardvark_01b.jpg"
    assert data.read_image_list(tmp_path / "things_imgs.mat", "train") == names_tr  # row order, '/' separators
    assert data.read_image_list(tmp_path / "things_imgs.mat", "test") == names_te
    (tmp_path / "l.txt").write_text("b\\x.png\na/y.png\n")
    assert data.read_image_list(tmp_path / "l.txt", "train") == ["b/x.png", "a/y.png"]


def test_electrode_maps_and_sites():
    n = data.electrode_map(1024, "N")
    f = data.electrode_map(1024, "F")
    assert n["area"][511] == "V1" and n["area"][512] == "V4" and n["area"][767] == "V4" and n["area"][768] == "IT"
    assert f["area"][512] == "IT" and f["area"][831] == "IT" and f["area"][832] == "V4"
    assert n["array"][63] == 1 and n["array"][64] == 2 and n["array"][1023] == 16
    with pytest.raises(UserError, match="1024"):
        data.electrode_map(1000, "N")
    small = data.electrode_map(32, "N", array_size=2)
    keep = np.ones(32, bool)
    keep[[0, 1]] = False  # array 1 has no electrode left
    sites = data.make_sites(small, ["areas", "array3"], keep)
    assert [len(sites[a]) for a in ("V1", "V4", "IT")] == [14, 8, 8]
    assert sites["array3_V1"].tolist() == [2, 3]  # indices into the kept electrodes
    with pytest.raises(UserError, match="--sites"):
        data.make_sites(small, ["V2"], keep)


def test_split_never_touches_test_and_is_seeded():
    tr, va = data.split_train_val(100, 0.1, seed=3)
    assert len(va) == 10 and len(set(tr) | set(va)) == 100 and not set(tr) & set(va)
    assert np.array_equal(va, data.split_train_val(100, 0.1, seed=3)[1])


def test_synthetic_writer_roundtrip(tmp_path):
    root = data.write_synthetic(tmp_path / "s", n_train=20, n_test=6, n_reps=4, image_size=16, n_per_array=2)
    d = data.load_dataset(root, "N", array_size=2)
    assert d["train"].shape == (20, 32) and d["test_reps"].shape == (4, 6, 32)
    assert len(d["train_images"]) == 20 and d["train_images"][0].endswith("class000/class000_00.png")
    img = data.ImageFiles(d["test_images"], 16)[0]
    assert img.shape == (3, 16, 16) and 0 <= img.min() and img.max() <= 1
    assert np.allclose(d["test"], d["test_reps"].mean(0))
    with pytest.raises(UserError, match="no electrode left"):
        data.load_dataset(root, "N", array_size=2, reliab_threshold=2.0)  # nothing survives
