"""mouse_vision neural predictivity: known answers for the kernel PLS, the splits, the split-half estimator, the
inter-animal ceiling, the HDF5 format, the converter and the reader's errors (all on tiny data, in-process)."""
import json
import math
import pickle
import warnings

import h5py
import numpy as np
import pytest
import torch

from common.runtime import UserError
from mouse_vision import neural_data as nd
from mouse_vision import neural_fit as nf


def nipals_pls2(X, Y, X_test, n_components, tol=1e-24, max_iter=50_000):
    """scikit-learn's PLSRegression(scale=False) algorithm (NIPALS power method, regression deflation,
    x_rotations = W (PᵀW)⁻¹), iterated to convergence: an independent reference for the kernel PLS."""
    xm, ym = X.mean(0), Y.mean(0)
    Xk, Yk = X - xm, Y - ym
    W, P, Q = [], [], []
    for _ in range(n_components):
        u = Yk[:, 0].copy()
        w_old = np.zeros(X.shape[1])
        for _ in range(max_iter):
            w = Xk.T @ u / (u @ u)
            w /= np.linalg.norm(w)
            t = Xk @ w
            c = Yk.T @ t / (t @ t)
            u = Yk @ c / (c @ c)
            if (w - w_old) @ (w - w_old) < tol:
                break
            w_old = w
        t = Xk @ w
        p, q = Xk.T @ t / (t @ t), Yk.T @ t / (t @ t)
        Xk = Xk - np.outer(t, p)
        Yk = Yk - np.outer(t, q)
        W.append(w), P.append(p), Q.append(q)
    W, P, Q = np.array(W).T, np.array(P).T, np.array(Q).T
    return (X_test - xm) @ W @ np.linalg.inv(P.T @ W) @ Q.T + ym


def kernel_predict(X, Y, tr, te, n_components, mapping="pls", eig=None):
    Xc = X - X.mean(0)
    K, Kte = nf.center_gram(torch.from_numpy(Xc @ Xc.T), tr, te)
    Yt = torch.from_numpy(Y[tr])
    mu = Yt.mean(0)
    Yc = Yt - mu
    hat = nf.pls_hat(K, Kte, Yc @ Yc.T, n_components, eig) if mapping == "pls" else nf.ridge_hat(K, Kte, Yc @ Yc.T)
    return (hat @ Yc + mu).numpy()


def test_kernel_pls_equals_nipals_pls2():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(118, 300))
    Y = X[:, :12] @ rng.normal(size=(12, 20)) + rng.normal(size=(118, 20))
    tr, te = nf.image_splits(118, 1)[0]
    for nc in (1, 25):
        ref = nipals_pls2(X[tr], Y[tr], X[te], nc)
        for eig in ("eigvalsh", "squaring"):  # the CPU and the CUDA default first estimates
            assert np.abs(kernel_predict(X, Y, tr, te, nc, eig=eig) - ref).max() < 1e-5
    # the module's benchmark reference agrees with this one when run to convergence
    conv = nf.nipals_pls_reference(X[tr], Y[tr], X[te], 4, tol=1e-24, max_iter=50_000)
    assert np.abs(conv - nipals_pls2(X[tr], Y[tr], X[te], 4)).max() < 1e-6
    # fewer features than components: PLS stops at the feature count (sklearn would raise)
    X8 = X[:, :8]
    assert np.abs(kernel_predict(X8, Y, tr, te, 25) - nipals_pls2(X8[tr], Y[tr], X8[te], 8)).max() < 1e-5


def test_kernel_pls_constant_targets_predict_the_mean():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 30))
    Y = np.full((40, 3), 2.5)  # G = 0: no component exists
    for eig in ("eigvalsh", "squaring"):
        assert np.allclose(kernel_predict(X, Y, np.arange(20), np.arange(20, 40), 25, eig=eig), 2.5)


def test_kernel_pls_batched_equals_one_by_one():
    rng = np.random.default_rng(1)
    n, m = 30, 20
    Ks, Ktes, Gs = [], [], []
    for _ in range(3):
        X = rng.normal(size=(n + m, 50))
        Y = rng.normal(size=(n + m, 7))
        K, Kte = nf.center_gram(torch.from_numpy(X @ X.T), np.arange(n), np.arange(n, n + m))
        Yc = torch.from_numpy(Y[:n] - Y[:n].mean(0))
        Ks.append(K), Ktes.append(Kte), Gs.append(Yc @ Yc.T)
    A = nf.pls_hat(torch.stack(Ks), torch.stack(Ktes), torch.stack(Gs), 10)
    for i in range(3):
        assert torch.allclose(A[i], nf.pls_hat(Ks[i], Ktes[i], Gs[i], 10), atol=1e-9)


def test_ridge_hat_is_kernel_ridge_with_loo_choice():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(80, 40))
    Y = X @ rng.normal(size=(40, 5)) + 0.1 * rng.normal(size=(80, 5))
    tr, te = np.arange(50), np.arange(50, 80)
    pred = kernel_predict(X, Y, tr, te, 0, mapping="ridge")
    Xc, Yc = X[tr] - X[tr].mean(0), Y[tr] - Y[tr].mean(0)
    scale = np.trace(Xc @ Xc.T) / len(tr)

    def primal(alpha):
        B = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(40), Xc.T @ Yc)
        return (X[te] - X[tr].mean(0)) @ B + Y[tr].mean(0)

    def loo(alpha):  # brute-force leave-one-out with the centring of the closed form (all train images)
        H = Xc @ np.linalg.solve(Xc.T @ Xc + alpha * np.eye(40), Xc.T)
        return ((((np.eye(len(tr)) - H) @ Yc) / (1 - np.diag(H))[:, None]) ** 2).sum()

    best = min(nf.RIDGE_GRID, key=lambda a: loo(a * scale))
    assert np.abs(pred - primal(best * scale)).max() < 1e-8


def test_image_splits_and_trial_halves_are_the_originals_permutations():
    splits = nf.image_splits(118, 10)
    for s, (tr, te) in enumerate(splits):
        perm = np.random.RandomState(s).permutation(118)
        assert np.array_equal(tr, perm[:59]) and np.array_equal(te, perm[59:])
    assert [len(t) for t in nf.image_splits(50, 1)[0]] == [25, 25]
    h = nf.trial_halves(50, 100)
    assert h.shape == (100, 50) and (h.sum(1) == 25).all()
    assert set(np.flatnonzero(h[7])) == set(np.random.RandomState(7).permutation(50)[:25])
    with pytest.raises(UserError):
        nf.image_splits(118, 1, n_train=117)


def test_half_means_nan_aware():
    r = np.arange(4 * 2 * 1, dtype=np.float64).reshape(4, 2, 1)  # trials × images × units
    r[0, 0, 0] = np.nan
    halves = np.array([[1, 1, 0, 0]])
    Yh = nf.half_means(r, halves)
    assert Yh.shape == (1, 2, 2, 1)
    assert Yh[0, 0, 0, 0] == 2.0  # trial 1 only (trial 0 missing)
    assert Yh[0, 1, 1, 0] == (5.0 + 7.0) / 2


def test_spearman_brown_denominator_hand_values():
    # SB(0.8) = 1.6/1.8, SB(0.6) = 1.2/1.6 → 0.5 / sqrt(0.8889 · 0.75)
    assert nf.corrected_score(0.5, 0.8, 0.6) == pytest.approx(0.5 / math.sqrt(16 / 18 * 0.75), abs=1e-12)
    assert np.isnan(nf.corrected_score(0.5, -0.2, 0.5))  # negative product → NaN
    # two negative factors: SB(−0.2) = −0.5, SB(−0.3) = −0.6/0.7 → finite, as in the release
    assert nf.corrected_score(0.5, -0.2, -0.3) == pytest.approx(0.5 / math.sqrt(0.5 * 0.6 / 0.7), abs=1e-12)


def _planted(rng, feats, n_units=40, trials=20, rho=0.97):
    """Units = a linear map of `feats` plus trial noise so the trial average has reliability rho."""
    f = feats - feats.mean(0)
    sig = f @ rng.normal(size=(f.shape[1], n_units))
    sig = (sig - sig.mean(0)) / sig.std(0)
    sd = math.sqrt(trials * (1 - rho) / rho)
    return sig[None] + sd * rng.normal(size=(trials, len(f), n_units))


def test_noise_corrected_score_near_one_for_true_features_and_zero_for_random():
    rng = np.random.default_rng(3)
    # a 20-wide layer (PLS stops at 20 components): the estimator is ≈ sqrt((1 + ρ_P)(1 + ρ_Y)) / 2 for the true
    # features (ρ = half-split reliabilities of predictions and data), so near 1 only for reliable units
    true = rng.normal(size=(118, 20))
    resp = _planted(rng, true)
    grams = {}
    for name, x in (("true", true), ("random", rng.normal(size=(118, 20)))):
        xc = x - x.mean(0)
        grams[name] = torch.from_numpy(xc @ xc.T)
    Yh = nf.half_means(resp, nf.trial_halves(resp.shape[0], 4))
    s = nf.split_half_scores(torch.stack([grams["true"], grams["random"]]), Yh, nf.image_splits(118, 3), "pls", 25,
                             torch.device("cpu"))
    assert s.shape == (2, 3, 4, 40)
    good, rand = nf.summarize(s[0]), nf.summarize(s[1])
    assert good["median"] > 0.9 and good["n_nan_units"] == 0
    assert abs(rand["median"]) < 0.2


def test_interanimal_ceiling_near_one_and_synthetic_file(tmp_path):
    path = nd.write_synthetic(tmp_path / "n.h5", areas=("VISp", "VISl"), animals_per_area=3, units_per_animal=12,
                              n_trials=20, reliability_range=(0.93, 0.97), image_hw=(40, 52), missing_frac=0.02)
    stim, dataset, animals, info = nd.read_neural(path)
    assert dataset == "synthetic" and stim.shape == (118, 40, 52) and list(animals) == ["VISp", "VISl"]
    assert animals["VISp"][0].responses.shape == (20, 118, 12) and np.isnan(animals["VISp"][0].responses).any()
    args = type("A", (), dict(n_halves=4, mapping="pls", n_components=25))()
    c = nf.ceiling_scores(animals, nf.image_splits(118, 2), lambda n: nf.trial_halves(n, 4), args, torch.device("cpu"))
    for area in ("VISp", "VISl"):
        assert c[area].shape == (2, 4, 36)
        assert nf.summarize(c[area])["median"] > 0.85


def test_longest_run_and_percentile_filter():
    assert list(nd.longest_run(np.array([0, 1, 1, 0, 1, 1, 1, 0], bool))) == [4, 5, 6]
    assert list(nd.longest_run(np.array([1, 1, 0, 1, 1], bool))) == [0, 1]  # first on ties
    assert list(nd.longest_run(np.array([0, 1, 0], bool))) == [1]  # one bin (the release returns None)
    assert nd.longest_run(np.zeros(3, bool)) is None
    # 75th percentile of 10, 20, 30, 40 = 32.5 → ceil 33: only the 40-unit animal stays
    assert nd.percentile_filter({"a": 10, "b": 20, "c": 30, "d": 40}, 75) == ["d"]


def _neuropixels_payload(rng):
    """A tiny pickle payload in the original's structure (plain dict / ndarray instead of xarray)."""
    trials, n_img, n_bins = 6, 10, 5
    # area VISp: animal 1 (units 0-3), animal 2 (units 4-5); area VISl: animal 3 (units 6-7)
    area = np.array(["VISp"] * 6 + ["VISl"] * 2)
    spec = np.array([1, 1, 1, 1, 2, 2, 3, 3])
    r = np.full((n_bins, 8), 0.1)
    r[1:4, 0] = [0.6, 0.7, 0.6]   # kept
    r[1:4, 1] = [0.5, 0.55, 0.2]  # kept
    r[:, 2] = 0.8                 # reliable but running-modulated → dropped
    r[:, 3] = 0.4                 # unreliable → dropped
    r[2, 4:6] = 0.9               # animal 2: 2 units, window = bin 2 only
    r[0:2, 6:8] = 0.7             # VISl animal 3
    pval = np.array([0.5, np.nan, 0.01, 0.5, 0.5, 0.5, 0.5, 0.5])
    rates = rng.normal(size=(trials, n_img, n_bins, 8)).astype(np.float32)
    rates[0, :, :, 0] = np.nan  # a missing trial
    return {"stimuli": rng.integers(0, 255, (n_img, 24, 30), dtype=np.uint8),
            "neural_data": {"values": rates, "dims": ("trials", "frame_id", "time_relative_to_stimulus_onset", "units"),
                            "coords": {"unit_id": np.arange(100, 108), "specimen_id": spec, "visual_area": area,
                                       "run_pval_ns": pval, "splithalf_r_mean": r,
                                       "time_relative_to_stimulus_onset": np.arange(n_bins) * 0.01}}}


def test_converter_selection_and_refusal(tmp_path):
    rng = np.random.default_rng(4)
    payload = _neuropixels_payload(rng)
    src = tmp_path / "mouse_neuropixels_visual_data_with_reliabilities.pkl"
    src.write_bytes(pickle.dumps(payload))
    calcium = {"stimuli": payload["stimuli"], "neural_data": {"values": rng.normal(size=(4, 10, 3)),
               "dims": ("trials", "frame_id", "units"),
               "coords": {"cell_specimen_id": [7, 8, 9], "specimen_id": [5, 5, 5], "visual_area": ["VISam"] * 3,
                          "p_run_mod_ns": [0.5, 0.5, 0.001], "reliability_mean": [0.8, 0.5, 0.9]}}}
    src2 = tmp_path / "calcium.pkl"
    src2.write_bytes(pickle.dumps(calcium))
    out = tmp_path / "neural.h5"
    with pytest.raises(UserError, match="trust_pickle"):
        nd.convert([str(src)], out)
    assert not out.exists()
    nd.convert([str(src), str(src2)], out, trust_pickle=True)
    with h5py.File(out) as f:
        srcs = json.loads(f.attrs["sources"])
        assert srcs[0]["sha256"] == nd.sha256(src) and len(srcs) == 2
        visp = f["neuropixels/VISp"]
        # animal 1 has 2 units, animal 2 has 2: the 75th percentile is 2, both stay
        assert sorted(visp.keys()) == ["1", "2"]
        assert list(visp["1/unit_id"][()]) == [100, 101]
        assert list(visp["1"].attrs["time_window_ms"]) == [10.0, 40.0]  # median r ≥ 0.3 in bins 1-3
        with warnings.catch_warnings():  # the missing trial is NaN in every bin
            warnings.simplefilter("ignore", RuntimeWarning)
            exp = np.nanmean(payload["neural_data"]["values"][:, :, 1:4][..., [0, 1]], axis=2)
        np.testing.assert_allclose(visp["1/responses"][()], exp, rtol=1e-6)
        assert np.isnan(visp["1/responses"][0, :, 0]).all()
        assert list(f["neuropixels/VISl/3/unit_id"][()]) == [106, 107]
        assert list(f["calcium/VISam/5/unit_id"][()]) == [7]
    stim, _, animals, _ = nd.read_neural(out, areas=["VISp"])
    assert stim.shape == (10, 24, 30) and [a.name for a in animals["VISp"]] == ["1", "2"]


def test_converter_errors(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"stimuli": np.zeros((2, 3, 3), np.uint8)}))
    with pytest.raises(UserError, match="neural_data"):
        nd.convert([str(bad)], tmp_path / "o.h5", trust_pickle=True)
    with pytest.raises(UserError, match="no such file"):
        nd.convert([str(tmp_path / "absent.pkl")], tmp_path / "o.h5", trust_pickle=True)


def _write(path, responses_by_area, n_stim=10):
    areas = {a: [dict(name="1", responses=r, unit_id=np.arange(r.shape[2]))] for a, r in responses_by_area.items()}
    return nd.write_neural(path, np.zeros((n_stim, 8, 8), np.uint8), {"neuropixels": {"areas": areas}})


def test_reader_errors(tmp_path):
    ok = np.ones((4, 10, 3), np.float32)
    p = _write(tmp_path / "a.h5", {"VISp": ok})
    with pytest.raises(UserError, match="no area VISam"):
        nd.read_neural(p, areas=["VISam"])
    with pytest.raises(UserError, match="no dataset 'calcium'"):
        nd.read_neural(p, "calcium")
    p = _write(tmp_path / "b.h5", {"VISp": np.ones((4, 9, 3), np.float32)})
    with pytest.raises(UserError, match="9 images but /stimuli has 10"):
        nd.read_neural(p)
    dead = ok.copy()
    dead[..., 1] = np.nan
    p = _write(tmp_path / "c.h5", {"VISp": dead})
    with pytest.raises(UserError, match="unit.*1.*NaN in every trial"):
        nd.read_neural(p)
    with pytest.raises(UserError, match="no such file"):
        nd.read_neural(tmp_path / "none.h5")
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="not an HDF5 file"):
        nd.read_neural(tmp_path / "junk.h5")


def test_preprocess_matches_the_release_transform():
    img = (np.arange(30 * 40) % 251).astype(np.uint8).reshape(30, 40)
    assert nf.preprocess_stimuli(img[None]).shape == (1, 3, 64, 64)
    # a uniform gray image stays uniform through the resizes and crop: (g/255 − mean_c) / std_c per channel
    x = nf.preprocess_stimuli(np.full((1, 30, 40), 100, np.uint8))
    expected = (100 / 255 - torch.tensor(nf.IMAGENET_MEAN)) / torch.tensor(nf.IMAGENET_STD)
    assert torch.allclose(x[0].mean((1, 2)), expected.float(), atol=1e-6) and x[0].std((1, 2)).max() < 1e-6
    # gray → 3 identical channels before the per-channel normalisation
    raw = nf.preprocess_stimuli(img[None], normalize=False)
    assert torch.equal(raw[0, 0], raw[0, 1]) and torch.equal(raw[0, 1], raw[0, 2])


def test_torchvision_model_features_and_unknown_name():
    model, layers = nf.build("torchvision:mobilenet_v3_small", None)
    assert layers == ["features", "avgpool", "classifier"]
    x = torch.randn(4, 3, 64, 64)
    grams = nf.feature_grams(model, x, ["features.1", "avgpool"], torch.device("cpu"))
    assert grams["features.1"].shape == (4, 4) and torch.linalg.eigvalsh(grams["avgpool"]).min() > -1e-8
    with torch.no_grad():  # the hooked layer's flattened activations, centred, give the same Gram matrix
        f = torch.flatten(model.avgpool(model.features(x)), 1).double()
    f = f - f.mean(0)
    assert torch.allclose(grams["avgpool"], f @ f.T, rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match="torchvision has no model"):
        nf.build("torchvision:no_such_net", None)
