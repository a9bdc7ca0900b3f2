"""ndn_baselines: known-answer tests of the HSM layers, losses, regularizers, and of training many seeds at once."""
import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ndn_baselines import data, losses, models
from ndn_baselines import main as ndn_main

D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """The study trains tiny models with one intra-op thread (see main.py --threads); restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _set(param, values):
    with torch.no_grad():
        param.copy_(torch.as_tensor(values, dtype=param.dtype).reshape(param.shape))


# ----------------------------------------------------------------------------- DoG layer


def test_dog_sums_to_alpha_difference_and_centre_matches_formula():
    size = 101  # large grid: the Gaussians' tails are negligible
    bank = models.DoGBank(models.make_generators([0]), 2, size)
    a1, s1, a2, s2, ux, uy = [3.0, 1.5], [2.0, 4.0], [1.0, 2.5], [3.0, 1.5], [50.0, 47.0], [50.0, 53.0]
    for p, v in zip((bank.alpha1, bank.sigma1, bank.alpha2, bank.sigma2, bank.ux, bank.uy), (a1, s1, a2, s2, ux, uy)):
        _set(p, [v])
    f = bank.filters()[0]  # (K, size, size), [y, x]
    for k in range(2):
        assert f[k].sum().item() == pytest.approx(a1[k] - a2[k], abs=1e-9)
        centre = a1[k] / (2 * math.pi * s1[k]) - a2[k] / (2 * math.pi * (s1[k] + s2[k]))
        assert f[k, int(uy[k]), int(ux[k])].item() == pytest.approx(centre, rel=1e-12)
    # x is the column index: a point 3 px right of the centre equals the formula there
    k, dx = 0, 3.0
    g = lambda a, s: a * math.exp(-dx**2 / (2 * s)) / (2 * math.pi * s)  # noqa: E731
    assert f[k, 50, 53].item() == pytest.approx(g(a1[k], s1[k]) - g(a2[k], s1[k] + s2[k]), rel=1e-12)


def test_dog_bounds_clamp_with_zero_gradient_and_sigma_bug():
    bank = models.DoGBank(models.make_generators([0]), 2, 31)
    assert bank.sigma_bounds == (1.0, 25.0) and bank.centre_bounds == (2.0, 29.0)
    # filter 0: every parameter outside its bounds; filter 1: all inside
    _set(bank.alpha1, [[-1.0, 2.0]])
    _set(bank.sigma1, [[30.0, 3.0]])
    _set(bank.ux, [[0.5, 15.0]])
    _set(bank.uy, [[40.0, 14.0]])
    _set(bank.alpha2, [[-2.0, 1.0]])
    _set(bank.sigma2, [[0.2, 5.0]])
    img = torch.randn(4, 961, generator=torch.Generator().manual_seed(0), dtype=D64)
    (torch.matmul(img, bank.filters().reshape(1, 2, -1).transpose(1, 2)) ** 2).sum().backward()
    for name in ("alpha1", "sigma1", "ux", "uy", "alpha2", "sigma2"):
        grad = getattr(bank, name).grad[0]
        assert grad[0].item() == 0.0, f"clamped {name} must get zero gradient"
        assert grad[1].item() != 0.0, f"free {name} must get a gradient"
    a1, s1, ux, uy, a2, s2 = (t[0, 0].item() for t in bank.clamped())
    assert (a1, s1, ux, uy, s2) == (models.ALPHA_EPS, 25.0, 2.0, 29.0, 26.0)
    # NDN3 >= 60c4fa2: σ bounds (1, 0) → tf.clip_by_value returns 1 → both widths frozen (surround 2)
    buggy = models.DoGBank(models.make_generators([0]), 3, 31, sigma_bug=True)
    _, s1, _, _, _, s2 = buggy.clamped()
    assert torch.all(s1 == 1.0) and torch.all(s2 == 2.0)


def test_uy_init_bug_and_degenerate_conv_dog_bounds():
    plain = models.DoGBank(models.make_generators(range(20)), 9, 31)
    buggy = models.DoGBank(models.make_generators(range(20)), 9, 31, uy_init_bug=True)
    assert plain.uy.max() <= 29 and buggy.uy.max() > 29
    assert torch.allclose(buggy.uy - plain.uy, torch.full_like(plain.uy, 2.0))
    assert models.DoGBank(models.make_generators([0]), 2, 3).centre_bounds == (1.0, 1.0)
    assert models.DoGBank(models.make_generators([0]), 2, 3, degenerate_bounds_bug=True).centre_bounds == (2.0, 1.0)


# ----------------------------------------------------------------------------- sizes and parameter counts


def test_hidden_sizes_and_bl4_parameter_count():
    for n, hidden in ((103, 20), (55, 11), (102, 20)):
        net = models.build_model(dict(arch="hsm", hidden_ratio=0.2), n, [0])
        assert net.layers[1].weight.shape == (1, hidden, 9)
        assert net(torch.zeros(2, 961, dtype=D64)).shape == (1, 2, n)
    bl4 = models.build_model(dict(arch="hsm", reg={"out": {"l2": 0.1}}), 103, [0, 1, 2])
    assert models.count_parameters(bl4) == 9 * 6 + 9 + 9 * 20 + 20 + 20 * 103 + 103 == 2426
    assert models.count_parameters(bl4, "ndn3") == 2444  # NDN3 stores 8 values per DoG filter


# ----------------------------------------------------------------------------- losses and regularizers


def test_losses_match_hand_formulas_and_masks():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 5, 4, generator=g, dtype=D64) * 3
    y = torch.poisson(torch.full((2, 5, 4), 2.0, dtype=D64), generator=g)
    mask = (torch.rand(2, 5, 4, generator=g) > 0.3).to(D64)
    p, t, m = pred.numpy(), y.numpy(), mask.numpy()
    for r in range(2):
        hand_p = sum((p[r, b, n] - t[r, b, n] * math.log(p[r, b, n] + 1e-6)) * m[r, b, n]
                     for b in range(5) for n in range(4)) / 5
        hand_g = sum((t[r, b, n] - p[r, b, n]) ** 2 * m[r, b, n] for b in range(5) for n in range(4)) / 5
        assert losses.poisson_loss(pred, y, mask)[r].item() == pytest.approx(hand_p, rel=1e-12)
        assert losses.gaussian_loss(pred, y, mask)[r].item() == pytest.approx(hand_g, rel=1e-12)
    # masked entries contribute nothing, whatever their target or prediction
    y2, pred2 = y.clone(), pred.clone()
    y2[mask == 0] = 1234.0
    pred2[mask == 0] = 0.01
    for fn in (losses.poisson_loss, losses.gaussian_loss):
        assert torch.allclose(fn(pred, y, mask), fn(pred2, y2, mask), rtol=0, atol=1e-10)


def _hand_laplacian(w):
    H, W = w.shape
    out = np.zeros_like(w)
    for i in range(H):
        for j in range(W):
            nb = sum(w[a, b] for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)) if 0 <= a < H and 0 <= b < W)
            out[i, j] = nb - 4 * w[i, j]
    return out


def test_regularizers_match_hand_formulas():
    w5 = torch.randn(2, 3, 2, 4, 5, generator=torch.Generator().manual_seed(2), dtype=D64)  # (R, out, C, H, W)
    w = w5.numpy()
    for r in range(2):
        flat = w[r].reshape(3, -1)
        assert losses.l1_penalty(w5)[r].item() == pytest.approx(np.abs(w[r]).sum())
        assert losses.l2_penalty(w5)[r].item() == pytest.approx(0.5 * (w[r] ** 2).sum())  # tf.nn.l2_loss's ½
        d2x = sum((_hand_laplacian(w[r, o, c]) ** 2).sum() for o in range(3) for c in range(2))
        assert losses.d2x_penalty(w5)[r].item() == pytest.approx(d2x)
        mx = sum(flat[o, i] ** 2 * flat[o, j] ** 2 for o in range(3) for i in range(flat.shape[1])
                 for j in range(flat.shape[1]) if i != j)
        assert losses.max_penalty(w5)[r].item() == pytest.approx(mx)
        mf = sum(w[r, o, c, y, x] ** 2 * w[r, o, c2, y, x] ** 2 for o in range(3) for c in range(2) for c2 in range(2)
                 for y in range(4) for x in range(5) if c != c2)
        assert losses.max_filt_penalty(w5)[r].item() == pytest.approx(mf)
    total = losses.penalty(w5, {"l1": 0.5, "l2": 2.0, "d2x": 0.0})
    assert torch.allclose(total, 0.5 * losses.l1_penalty(w5) + 2.0 * losses.l2_penalty(w5))
    # a dense layer on a (C, H, W) input regularizes each unit's weights viewed as that map
    lin = models.Linear(models.make_generators([0, 1]), (2, 4, 5), 3, reg={"d2x": 1.5})
    view = lin.weight.detach().reshape(2, 3, 2, 4, 5)
    assert torch.allclose(lin.penalty(), 1.5 * losses.d2x_penalty(view))


# ----------------------------------------------------------------------------- conv and separable layers


def test_tf_same_conv_shapes_and_batched_conv():
    assert models.same_padding(31, 7, 4) == (8, 2, 2)
    assert models.same_padding(31, 4, 2) == (16, 1, 2)  # TF puts the extra pixel after
    gens = models.make_generators([0, 1, 2])
    conv = models.Conv(gens, (1, 31, 31), 5, 7).double()
    assert conv.stride == 4 and conv.out_shape == (5, 8, 8)
    x = torch.randn(6, 1, 31, 31, generator=torch.Generator().manual_seed(3), dtype=D64)
    y = conv(x)
    assert y.shape == (3, 6, 5, 8, 8)
    for r in range(3):  # each seed = a plain conv with its own kernels, TF-SAME padded
        ref = F.softplus(F.conv2d(F.pad(x, (2, 2, 2, 2)), conv.weight[r], conv.bias[r], stride=4))
        assert torch.allclose(y[r], ref, atol=1e-12)
    per_seed = torch.stack([x, 2 * x, -x])
    y2 = conv(per_seed)  # per-seed inputs go through the grouped conv
    for r, s in enumerate((1, 2, -1)):
        ref = F.softplus(F.conv2d(F.pad(s * x, (2, 2, 2, 2)), conv.weight[r], conv.bias[r], stride=4))
        assert torch.allclose(y2[r], ref, atol=1e-12)


def test_separable_readout_equals_outer_product_weight():
    gens = models.make_generators([0, 1])
    sep = models.SepLinear(gens, (3, 4, 4), 5, act="lin")
    x = torch.randn(7, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=D64)
    y = sep(x)
    for r in range(2):
        chan = sep.chan[r] / sep.chan[r].norm(dim=0, keepdim=True)  # (C, U), unit-norm per output unit
        w = torch.einsum("cu,pu->cpu", chan, sep.space[r]).reshape(-1, 5)  # (C·H·W, U)
        assert torch.allclose(y[r], x.reshape(7, -1) @ w + sep.bias[r], atol=1e-12)


# ----------------------------------------------------------------------------- many seeds at once


def _tiny_dataset(n_train=48, n_neurons=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + 20, 961, generator=g, dtype=D64)
    y = torch.poisson(torch.full((n_train + 20, n_neurons), 2.0, dtype=D64), generator=g)
    blocks = [dict(name="r", images=slice(0, 20), neurons=slice(0, n_neurons), oracle=0.0, avg_ceiling=0.0)]
    return data.Dataset(data.split(x[:n_train], y[:n_train]), data.split(x[n_train:], y[n_train:]), blocks)


def _fit(net, ds, gens, epochs, lr=1e-2, batch_size=16, order_gen=None) -> np.ndarray:
    """main.py's loop without the run folder: evaluate the initial weights, then train and evaluate each epoch.
    Returns the mean validation correlation per seed after each epoch, (epochs + 1, R)."""
    opt = ndn_main.make_optimizer(net, lr)
    curve = [ndn_main.evaluate(net, ds, losses.poisson_loss)["val_corr"].mean(1)]
    for _ in range(epochs):
        ndn_main.train_epoch(net, opt, ds, gens, batch_size, losses.poisson_loss, contextlib.nullcontext, order_gen)
        curve.append(ndn_main.evaluate(net, ds, losses.poisson_loss)["val_corr"].mean(1))
    return np.stack(curve)


def _train(cfg, seeds, ds, epochs=3, batch_size=16, shared_order=False):
    gens = models.make_generators(seeds)
    order_gen = torch.Generator().manual_seed(11) if shared_order else None
    net = models.build_model(cfg, ds.n_neurons, seeds, gens=gens)
    return net, _fit(net, ds, gens, epochs, batch_size=batch_size, order_gen=order_gen)  # (evals, R)


@pytest.mark.parametrize("cfg, shared_order", [
    (dict(arch="hsm", n_dog=3, hidden_ratio=0.5, dropout=0.2, bias_init="normal", reg={"out": {"l2": 0.1}}), False),
    (dict(arch="hsm", n_dog=3, hidden_ratio=0.5, dropout=0.2, bias_init="normal", reg={"out": {"l2": 0.1}}), True),
    (dict(arch="conv", conv_filters=2, conv_size=7, hidden_type="sep", reg={"conv": {"d2x": 0.01}, "hidden": {"l1": 0.1}}),
     False),
])
def test_batched_seeds_equal_separately_trained_seeds(cfg, shared_order):
    """Seeds [3, 5, 8] in one stacked model == three one-seed runs (same weights and curves, float64).
    Default: each seed shuffles with its own generator; shared_order: one order generator for all, in both."""
    ds = _tiny_dataset()  # 48 images, batch 16 → 3 steps/epoch
    seeds = [3, 5, 8]
    stacked, curve = _train(cfg, seeds, ds, shared_order=shared_order)
    for i, s in enumerate(seeds):
        alone, curve1 = _train(cfg, [s], ds, shared_order=shared_order)
        for (name, p), q in zip(stacked.state_dict().items(), alone.state_dict().values()):
            assert torch.allclose(p[i:i + 1], q, rtol=1e-9, atol=1e-11), f"seed {s}: {name} differs"
        np.testing.assert_allclose(curve[:, i], curve1[:, 0], rtol=1e-9, atol=1e-11)
    assert not np.allclose(curve[:, 0], curve[:, 1])  # different seeds really differ
    # the same seed reproduces the same curve exactly
    _, again = _train(cfg, seeds, ds, shared_order=shared_order)
    np.testing.assert_array_equal(curve, again)


def test_teacher_student_bl4_beats_ln():
    """Data from a random HSM (Poisson noise) is fit by a bl4 student to corr > 0.5, above an LN baseline."""
    n_neurons, n_train = 20, 600
    imgs = data.synthetic.natural_images(n_train + 50, 31, seed=7).double().reshape(n_train + 50, -1)
    z = (imgs - imgs[:n_train].mean()) / imgs[:n_train].std()
    with torch.no_grad():
        rates = data.hsm_teacher(n_neurons, seed=7)(z)[0]
    g = torch.Generator().manual_seed(8)
    train_y = torch.poisson(rates[:n_train], generator=g)
    val_y = torch.poisson(rates[n_train:].expand(10, -1, -1).contiguous(), generator=g).mean(0)
    blocks = [dict(name="r", images=slice(0, 50), neurons=slice(0, n_neurons), oracle=0.0, avg_ceiling=0.0)]
    ds = data.Dataset(data.split(z[:n_train].float(), train_y.float()), data.split(z[n_train:].float(), val_y.float()),
                      blocks)
    scores = {}
    for name, cfg, epochs in (("bl4", dict(arch="hsm", bias_init="normal", reg={"out": {"l2": 0.1}}), 40),
                              ("ln", dict(arch="ln", bias_init="normal", reg={"out": {"d2x": 100.0}}), 40)):
        gens = models.make_generators([0])
        net = models.build_model(cfg, n_neurons, [0], gens=gens).float()
        scores[name] = float(_fit(net, ds, gens, epochs)[-1, 0])
    assert scores["bl4"] > 0.5, scores
    assert scores["bl4"] > scores["ln"] + 0.05, scores
