"""common/metrics.py against hand/numpy computations and known answers."""
import numpy as np
import pytest
import torch

from common import metrics
from common.synthetic import SimulatedPopulation, natural_images


def test_corr_matches_numpy_and_accepts_torch():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    y[:, 3] = 2 * x[:, 3] + 1
    expect = [np.corrcoef(x[:, i], y[:, i])[0, 1] for i in range(7)]
    np.testing.assert_allclose(metrics.corr(x, y), expect, atol=1e-7)
    np.testing.assert_allclose(metrics.corr(torch.tensor(x), torch.tensor(y)), expect, atol=1e-7)
    assert metrics.corr(x, y)[3] == pytest.approx(1.0)
    assert metrics.corr(x, -y)[3] == pytest.approx(-1.0)


def test_corr_zero_variance_scores_zero_and_is_counted():
    x = np.ones((10, 2))
    y = np.arange(20.0).reshape(10, 2)
    assert np.all(metrics.corr(x, y) == 0.0)
    with pytest.raises(ValueError):
        metrics.corr(np.ones((3, 2)), np.ones((4, 2)))


def test_masked_corr_ignores_masked_entries():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3))
    y = x.copy()
    y[:10] = 1e6 * rng.normal(size=(10, 3))  # garbage, masked out
    mask = np.ones_like(x, bool)
    mask[:10] = False
    np.testing.assert_allclose(metrics.masked_corr(x, y, mask), 1.0, atol=1e-12)
    np.testing.assert_allclose(metrics.masked_corr(x, y), metrics.corr(x, y))  # no mask = every entry


def test_explained_variance_hand():
    y = np.array([[1.0], [2.0], [3.0], [4.0]])
    p = np.array([[1.0], [2.0], [3.0], [5.0]])
    # SS_res = 1, SS_tot = 5 → 0.8
    assert metrics.explained_variance(p, y)[0] == pytest.approx(0.8)
    assert metrics.explained_variance(y, y)[0] == pytest.approx(1.0)


def _hand_noise_stats(rep):
    """Loop-based reference for σ²_noise, Var_total (neuralpredictors' definitions)."""
    R, N, K = rep.shape
    noise = np.array([np.mean([np.var(rep[:, i, k], ddof=1) for i in range(N)]) for k in range(K)])
    total = np.array([np.var(rep[:, :, k].ravel(), ddof=1) for k in range(K)])
    return noise, total


def test_noise_variance_fev_feve_hand():
    rng = np.random.default_rng(2)
    signal = rng.normal(size=(30, 4)) * 2
    rep = signal[None] + rng.normal(size=(5, 30, 4))
    noise, total = _hand_noise_stats(rep)
    np.testing.assert_allclose(metrics.noise_variance(rep), noise)
    np.testing.assert_allclose(metrics.total_variance(rep), total)
    np.testing.assert_allclose(metrics.explainable_fraction(rep), (total - noise) / total)
    pred = signal + 0.3
    mse = ((rep - pred[None]) ** 2).reshape(-1, 4).mean(0)
    np.testing.assert_allclose(metrics.feve(rep, pred), 1 - (mse - noise) / (total - noise))


def test_noise_free_repeats_give_fraction_one_and_perfect_prediction_feve_one():
    signal = np.random.default_rng(3).normal(size=(20, 3))
    rep = np.repeat(signal[None], 4, axis=0)
    np.testing.assert_allclose(metrics.explainable_fraction(rep), 1.0)
    np.testing.assert_allclose(metrics.feve(rep, signal), 1.0)
    np.testing.assert_allclose(metrics.corr(signal, rep.mean(0)), 1.0)
    np.testing.assert_allclose(metrics.oracle_corr(rep), 1.0)


def test_nan_repeats_are_ignored():
    rng = np.random.default_rng(4)
    rep = rng.normal(size=(6, 25, 3))
    with_nan = rep.copy()
    with_nan[5, :, :] = np.nan  # a missing sixth repeat everywhere = 5 repeats
    np.testing.assert_allclose(metrics.noise_variance(with_nan), metrics.noise_variance(rep[:5]))
    np.testing.assert_allclose(metrics.explainable_fraction(with_nan), metrics.explainable_fraction(rep[:5]))
    np.testing.assert_allclose(metrics.oracle_corr(with_nan), metrics.oracle_corr(rep[:5]))


def test_oracle_corr_is_loo_hand():
    rng = np.random.default_rng(5)
    rep = rng.normal(size=(4, 15, 2)) + rng.normal(size=(1, 15, 2))
    R = rep.shape[0]
    for k in range(2):
        trials, loos = [], []
        for i in range(15):
            for t in range(R):
                trials.append(rep[t, i, k])
                loos.append((rep[:, i, k].sum() - rep[t, i, k]) / (R - 1))
        assert metrics.oracle_corr(rep)[k] == pytest.approx(np.corrcoef(trials, loos)[0, 1])


def test_spearman_brown_known_values():
    assert metrics.spearman_brown(0.5) == pytest.approx(2 / 3)
    assert metrics.spearman_brown(1.0) == pytest.approx(1.0)
    assert metrics.spearman_brown(0.5, n=3) == pytest.approx(1.5 / 2)
    np.testing.assert_allclose(metrics.noise_corrected_corr(np.array([0.5]), np.array([0.25])), [1.0])
    assert np.isnan(metrics.noise_corrected_corr(np.array([0.5]), np.array([0.0]))[0])


def test_split_half_reliability_two_repeats_is_their_correlation():
    rng = np.random.default_rng(6)
    rep = rng.normal(size=(2, 60, 3)) + rng.normal(size=(1, 60, 3))
    half = metrics.split_half_reliability(rep, n_splits=4, correct=False)
    np.testing.assert_allclose(half, metrics.corr(rep[0], rep[1]))
    np.testing.assert_allclose(metrics.split_half_reliability(rep, n_splits=4), metrics.spearman_brown(half))


def test_simulated_population_measured_ceiling_matches_known():
    """A planted population: sqrt(split-half SB reliability) ≈ the true corr(trial average, true rate),
    measured FEV ≈ true explainable fraction, and the true rates reach FEVe ≈ 1."""
    pop = SimulatedPopulation(30, 24, kind="v1", seed=0, mean_rate=1.0)
    images = natural_images(600, 24, seed=1)
    rates = pop.rates(images)
    rep = pop.sample(images, 6, seed=2)
    true_ceiling = pop.true_ceiling(rates, 6)
    measured = np.sqrt(np.clip(metrics.split_half_reliability(rep, n_splits=40), 0, None))
    assert np.abs(measured - true_ceiling).mean() < 0.02
    assert np.abs(metrics.corr(rates, rep.mean(0)) - true_ceiling).mean() < 0.02
    fev_true = pop.true_explainable_fraction(rates)
    assert np.abs(metrics.explainable_fraction(rep) - fev_true).mean() < 0.03
    assert np.nanmean(metrics.feve(rep, rates)) == pytest.approx(1.0, abs=0.05)


def test_topk_accuracy_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25]])
    labels = torch.tensor([1, 1, 0, 2])
    acc = metrics.topk_accuracy(logits, labels, ks=(1, 2, 3))
    assert acc[1] == pytest.approx(0.25)
    assert acc[2] == pytest.approx(0.5)  # rows 0 and 1
    assert acc[3] == pytest.approx(1.0)
    assert metrics.topk_correct(logits, labels, ks=(1,)) == {1: 1}


def _table(acc_by_sev):
    return {c: dict(zip(range(1, 6), accs)) for c, accs in acc_by_sev.items()}


def test_corruption_metrics():
    base = _table({"fog": [0.5, 0.4, 0.3, 0.2, 0.1], "snow": [0.6, 0.5, 0.4, 0.3, 0.2]})
    model = _table({"fog": [0.75, 0.7, 0.65, 0.6, 0.55], "snow": [0.6, 0.5, 0.4, 0.3, 0.2]})
    assert metrics.mce(base, base) == pytest.approx(100.0)
    ce = metrics.corruption_errors(model, base)
    assert ce["fog"] == pytest.approx(100 * (0.25 + 0.3 + 0.35 + 0.4 + 0.45) / (0.5 + 0.6 + 0.7 + 0.8 + 0.9))
    assert ce["snow"] == pytest.approx(100.0)
    assert metrics.mce(model, base) == pytest.approx((ce["fog"] + 100) / 2)
    assert metrics.mean_corrupted_accuracy(base) == pytest.approx(np.mean([0.5, 0.4, 0.3, 0.2, 0.1, 0.6, 0.5, 0.4, 0.3, 0.2]))
    assert metrics.relative_mce(base, 0.7, base, 0.7) == pytest.approx(100.0)
    rows = [("fog", s, a) for s, a in base["fog"].items()]
    assert metrics.corruption_table(rows) == {"fog": base["fog"]}
    with pytest.raises(ValueError):
        metrics.mce(_table({"frost": [0.5] * 5}), base)
