"""mtl_cotraining data: the batch cyclers (pattern, fractions, ratio schedule), early stopping on a scripted score
sequence, the session-pickle and Cadena readers on generated files, and the restricted unpickler."""
import os
import pickle

import numpy as np
import pytest
import torch

from common.runtime import UserError
from mtl_cotraining import data
from mtl_cotraining.main import EarlyStopping


# ----------------------------------------------------------------------------- cycling


def test_mtl_cycler_pattern_k2_three_sessions():
    images = [f"img{i}" for i in range(5)]
    neural = {"s1": ["a1", "a2"], "s2": ["b1"], "s3": ["c1", "c2", "c3"]}  # short loaders restart
    items = list(data.MTLCycler(images, neural, 2))
    assert len(items) == 15 == len(data.MTLCycler(images, neural, 2))
    assert [k for k, *_ in items] == ["neural", "neural", "image"] * 5
    assert sum(step for *_, step in items) == 5 and all(step == (k == "image") for k, *_, step in items)
    sessions = [s for k, s, *_ in items if k == "neural"]
    assert sessions == ["s1", "s2", "s3"] * 3 + ["s1"]  # round-robin over the sessions
    batches = [b for k, _, b, _ in items if k == "neural"]
    assert batches == ["a1", "b1", "c1", "a2", "b1", "c2", "a1", "b1", "c3", "a2"]
    assert [b for k, _, b, _ in items if k == "image"] == images


def test_fractional_ratios():
    images = list(range(5))
    items = list(data.MTLCycler(images, {"s": [0]}, 0.5))
    assert len(items) == 7 and [k[0] for k, *_ in items] == list("iniinii")
    assert data.neural_counts(10, 0.3) == [0, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert sum(data.neural_counts(10, 0.3, original_fraction=True)) == 0  # the original's k = 0.3: never
    assert data.neural_counts(4, 0.5, original_fraction=True) == data.neural_counts(4, 0.5)
    assert data.neural_counts(4, 1.5) == [1, 2, 1, 2]


def test_ratio_schedule_epoch_lengths():
    sched = data.parse_ratio("1:1,3:2")
    m = 4
    lengths = [len(data.MTLCycler(list(range(m)), {"s": [0]}, data.ratio_for_epoch(sched, e), e)) for e in (1, 2, 3, 4)]
    assert lengths == [2 * m, 2 * m, 3 * m, 3 * m]
    assert data.parse_ratio("0.5") == {1: data.Fraction(1, 2)}
    for bad in ("x", "2:1", "1:-1"):
        with pytest.raises(UserError):
            data.parse_ratio(bad)


def test_long_cycler_steps_every_n_sessions():
    items = list(data.LongCycler({"a": [1, 2, 3], "b": [4]}))
    assert [s for _, s, _, _ in items] == ["a", "b"] * 3
    assert [b for *_, b, _ in items] == [1, 4, 2, 4, 3, 4]
    assert [st for *_, st in items] == [False, True] * 3


def test_early_stopping_scripted_sequence():
    # every round ends with a restore of the best weights; the last round's end stops training
    scores = (1, 2, 2, 1, 3, 3, 2.5, 3.0, 3.0)
    es = EarlyStopping(patience=2, rounds=2, threshold=0.0)
    assert [es.step(s) for s in scores[:7]] == ["improved", "improved", "wait", "restore", "improved", "wait", "stop"]
    es = EarlyStopping(patience=2, rounds=3, threshold=0.5)  # improvement means score > best + 0.5
    assert [es.step(s) for s in scores] == ["improved", "improved", "wait", "restore", "improved", "wait", "restore",
                                            "wait", "stop"]
    es2 = EarlyStopping(2, 2)
    es2.load_state_dict(EarlyStopping(2, 2).state_dict() | {"best": 3.0, "wait": 1, "round": 1})
    assert es2.step(2.0) == "stop"


def test_lr_plateau_cuts_on_scripted_scores():
    p = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1, min_lr=1e-4)
    lrs = []
    for s in (1, 1, 1, 2, 2, 2):
        sched.step(s)
        lrs.append(round(opt.param_groups[0]["lr"], 6))
    assert lrs == [0.1, 0.1, 0.03, 0.03, 0.03, 0.009]


# ----------------------------------------------------------------------------- readers


def _session(sid, n_neurons, tr_ids, te_ids, rng, bins=14):
    return {"subject_id": 1, "session_id": sid,
            "training_responses": rng.poisson(1.0, (n_neurons, bins, len(tr_ids))).astype(np.float64),
            "testing_responses": rng.poisson(1.0, (n_neurons, bins, len(te_ids))).astype(np.float64),
            "training_image_ids": np.asarray(tr_ids), "testing_image_ids": np.asarray(te_ids)}


def test_session_reader_on_generated_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 20, 20), dtype=np.uint8)
    tr_ids, te_ids = np.arange(1, 26), np.array([26, 26, 27, 27, 27, 28, 29, 30, 30, 30])
    s1, s2 = _session("A", 4, tr_ids, te_ids, rng), _session("B", 3, tr_ids[:20], te_ids, rng)
    data.write_sessions(tmp_path, images, [s1, s2])
    pickle.dump(_session("skip", 2, tr_ids, te_ids, rng), open(tmp_path / "neuronal_data" / data.SKIP_FILES[0], "wb"))
    sets = data.read_sessions(tmp_path, crop=2, subsample=2, split_seed=1000)
    assert sorted(sets) == ["A", "B"]
    a = sets["A"]
    # 30 image ids permuted with seed 1000; the first 24 are train ids
    perm = np.random.default_rng(1000).permutation(np.arange(1, 31))
    train_ids = set(perm[:24].tolist())
    n_tr = sum(i in train_ids for i in tr_ids)
    assert a["train"].n_images == n_tr and a["validation"].n_images == 25 - n_tr
    assert a["train"].images.shape[1:] == (1, 8, 8) and a["train"].images.dtype == torch.uint8
    # bins 0-11 summed (bins 12, 13 ignored), trials × neurons
    sel = [t for t, i in enumerate(tr_ids) if i in train_ids]
    expect = s1["training_responses"][:, :12].sum(1).T[sel]
    assert np.allclose(a["train"].responses.numpy(), expect)
    first = tr_ids[sel[0]] - 1
    assert torch.equal(a["train"].images[0, 0], torch.from_numpy(images[first, 2:-2:2, 2:-2:2]))
    # test: grouped by image, 3 repeats at most, NaN padding, mean over the valid repeats
    te = a["test"]
    assert te.n_images == 5 and te.repeats.shape == (3, 5, 4)
    assert torch.isnan(te.repeats[2, 0]).all() and torch.isfinite(te.repeats[:, 1]).all()
    summed = s1["testing_responses"][:, :12].sum(1).T
    assert np.allclose(te.responses[0].numpy(), summed[:2].mean(0))
    assert np.allclose(te.responses[1].numpy(), summed[2:5].mean(0))


def test_session_reader_errors(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    bad = _session("A", 2, [1, 2, 3, 4], [5, 6], rng, bins=8)  # < 12 time bins
    data.write_sessions(tmp_path / "a", images, [bad])
    with pytest.raises(UserError, match="12"):
        data.read_sessions(tmp_path / "a")
    ok = _session("A", 2, [1, 2, 3, 4], [5, 6], rng)
    data.write_sessions(tmp_path / "b", images, [ok])
    os.remove(tmp_path / "b" / "images" / "000006.npy")
    with pytest.raises(UserError, match="000006.npy"):
        data.read_sessions(tmp_path / "b")
    missing = {k: v for k, v in ok.items() if k != "testing_image_ids"}
    data.write_sessions(tmp_path / "c", images, [missing])
    with pytest.raises(UserError, match="testing_image_ids"):
        data.read_sessions(tmp_path / "c")


def test_cadena_reader(tmp_path):
    rng = np.random.default_rng(0)
    n, neurons = 20, 5
    images = rng.uniform(0, 255, (n, 70, 70))
    resp = rng.poisson(2.0, (4, n, neurons)).astype(np.float64)
    resp[2:, :, 0] = np.nan  # neuron 0: two repeats only
    resp[:, 3, 1] = np.nan  # neuron 1: no trial for image 3
    path = tmp_path / "cadena_ploscb_data.pkl"
    with open(path, "wb") as f:
        pickle.dump({"images": images, "responses": resp, "repetitions": np.array([2, 4, 4, 4, 4]),
                     "image_ids": np.arange(n)[:, None], "subject_id": np.zeros(n)}, f, protocol=2)
    sets = data.read_neural(path)["cadena"]  # defaults: crop 30, subsample 2 → 5 × 5
    assert sets["train"].images.shape[1:] == (1, 5, 5)
    assert sets["test"].n_images == 4 and sets["train"].n_images + sets["validation"].n_images == 16
    assert sets["test"].repeats.shape == (4, 4, neurons)
    assert np.allclose(sets["test"].responses[:, 0].numpy(), resp[:2, 16:, 0].mean(0))
    assert np.allclose(sets["test"].images[0, 0].numpy(), images[16, 30:-30:2, 30:-30:2] / 255.0, atol=1e-6)
    tr, va = data.split_indices(16, 0.2, 1000)
    where = {"train": tr, "validation": va}
    for name in ("train", "validation"):
        if 3 in where[name]:
            row = list(where[name]).index(3)
            assert not sets[name].mask[row, 1] and sets[name].responses[row, 1] == 0


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class NotNumpy:
    pass


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_accepts_numpy(tmp_path, protocol):
    obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(3), "c": [1, "x"]}
    p = tmp_path / "ok.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    back = data.load_pickle(p)
    assert np.array_equal(back["a"], obj["a"]) and back["b"] == 3 and back["c"] == [1, "x"]


def test_restricted_unpickler_refuses_other_payloads(tmp_path):
    for name, obj in (("code.pkl", _Payload()), ("class.pkl", {"training_responses": NotNumpy()})):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(obj))
        with pytest.raises(UserError, match="not allowed"):
            data.load_pickle(p)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(UserError):
        data.load_pickle(tmp_path / "junk.pkl")


def test_transforms_and_split():
    tr, va = data.split_indices(100, 0.1, 1000)
    assert len(va) == 10 and len(set(tr) | set(va)) == 100
    assert np.array_equal(va, data.split_indices(100, 0.1, 1000)[1])
    from PIL import Image
    img = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    x = data.tiny_transforms(False)(img)
    assert x.shape == (1, 64, 64) and torch.allclose(x, torch.full_like(x, (128 / 255 - data.MEAN) / data.STD), atol=1e-3)
    assert data.tiny_transforms(True)(img).shape == (1, 64, 64)
    assert torch.allclose(data.to_input(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)),
                          torch.full((1, 1, 2, 2), (1 - data.MEAN) / data.STD))
