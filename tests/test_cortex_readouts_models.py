"""cortex_readouts/models.py and backbones.py: layer shapes, readouts against references, regularisers against hand
values, planted readouts recovered, gradient descent → closed-form ridge, the joint fit = per-array fits, and the
best layer of a sweep is the planted one."""
import numpy as np
import pytest
import torch

from common import metrics
from common.runtime import UserError
from cortex_readouts import backbones, models


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", ["vgg19", "inception"])
def test_layer_shapes_every_named_layer(name):
    bb, _ = backbones.build_backbone(name, None, 224)
    shapes = backbones.layer_shapes(bb)
    expected = {  # (channels, map size) at 224 px: the repo's / lucid's table
        "vgg19": [(64, 224)] * 2 + [(128, 112)] * 2 + [(256, 56)] * 4 + [(512, 28)] * 4 + [(512, 14)] * 4,
        "inception": [(64, 112), (64, 56), (192, 56), (512, 14), (512, 14), (512, 14), (528, 14), (832, 14),
                      (832, 7), (1024, 7)],
    }[name]
    assert list(shapes) == backbones.LAYERS[name]
    assert [(c, h) for c, h, w in shapes.values()] == expected
    out = bb(torch.rand(2, 3, 40, 40), [bb.layer_names[2]])  # resized to 224 inside; post-ReLU
    assert out[bb.layer_names[2]].min() >= 0
    assert backbones.layer_shapes(bb, max_map=28)[bb.layer_names[0]][1:] == (28, 28)


def test_weights_file_loads_and_truncated_backbone_matches_torchvision(tmp_path):
    torch.manual_seed(1)
    ref = backbones._vgg19_features()  # torchvision's VGG-19 'features' (cfg E), keys features.N.*
    sd = {**ref.state_dict(), "classifier.6.weight": torch.zeros(2, 2)}  # the classifier is never run: ignored
    torch.save(sd, tmp_path / "vgg19.pth")
    bb, tag = backbones.build_backbone("vgg19", str(tmp_path / "vgg19.pth"), 32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.features[:12](bb.preprocess(x))  # conv 10 + its ReLU
        got = bb(x, ["features.10"])["features.10"]
    torch.testing.assert_close(got, want)
    assert tag.startswith("vgg19-")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="does not fit"):
        backbones.build_backbone("vgg19", str(tmp_path / "bad.pth"), 32)


def test_dense_readout_equals_einsum_reference():
    torch.manual_seed(0)
    ro = models.CadenaReadout(5, 4, 3, 7, output="elu")
    ro.set_norm_stats(torch.rand(5), torch.rand(5) + 0.5)
    x = torch.rand(6, 5, 4, 3)
    z = torch.relu((x - ro.running_mean[:, None, None]) / torch.sqrt(ro.running_var[:, None, None] + ro.bn_eps))
    ref = torch.einsum("bchw,chwn->bn", z, ro.dense_weight()) + ro.bias
    torch.testing.assert_close(ro(x), torch.nn.functional.elu(ref - 1) + 1)


def test_factorised_readout_equals_dense_with_outer_product_weight():
    torch.manual_seed(0)
    b = models.BashivanReadout(5, 4, 3, 7)
    with torch.no_grad():
        b.mask.normal_()  # signed: the readout uses |w_s|
        b.bias.normal_()
    d = models.CadenaReadout(5, 4, 3, 7)
    with torch.no_grad():
        d.weight.copy_(torch.einsum("np,nc->ncp", b.mask.abs(), b.features).reshape(7, 5, 4, 3))
        d.bias.copy_(b.bias)
    x = torch.rand(6, 5, 4, 3)
    torch.testing.assert_close(b(x), d(x))
    torch.testing.assert_close(b.dense_weight(), d.dense_weight().detach())


def test_regularisers_hand_values():
    # +4 Laplacian: 0 on a constant map, 4² + 4·1 = 20 for a centred delta on 3 × 3 (valid: one output value 4)
    assert models.laplace_sq(torch.ones(1, 3, 3), models.LAPLACE_PAPER).item() == 0
    delta = torch.zeros(1, 3, 3)
    delta[0, 1, 1] = 1
    assert models.laplace_sq(delta, models.LAPLACE_PAPER).item() == 16  # the one valid output is 4
    assert models.laplace_sq(torch.ones(1, 3, 3), models.LAPLACE_REPO).item() == 64  # laplace-sign: (−8)² ≠ 0
    # Cadena per-neuron terms on w[C=2, 3, 3, N=1]: channel 0 = ones, channel 1 = 2·delta
    ro = models.CadenaReadout(2, 3, 3, 1)
    with torch.no_grad():
        ro.weight.zero_()
        ro.weight[0, 0] = 1  # [N, C, H, W]
        ro.weight[0, 1, 1, 1] = 2
    t = ro.per_neuron_penalty()
    assert t["smooth"].item() == pytest.approx(0 + 8**2)
    assert t["group"].item() == pytest.approx(3 + 2)  # ‖ones(3×3)‖ + ‖2δ‖
    assert t["l1"].item() == pytest.approx(9 + 2)
    # paper penalty of a group = mean over its neurons of the weighted terms
    coefs = {"smooth": torch.tensor([0.1]), "group": torch.tensor([0.01]), "l1": torch.tensor([0.01])}
    total = models.penalty(ro, [torch.tensor([0])], coefs, "paper")
    assert total.item() == pytest.approx(0.1 * 64 + 0.01 * 5 + 0.01 * 11)
    # the repo's terms (sums; group-l2 = Σ(2w)²; reshape + N×N kernel stack, computed in closed form)
    r = ro.repo_penalty(torch.tensor([0]))
    assert r["group"].item() == pytest.approx(4 * (9 + 4)) and r["l1"].item() == pytest.approx(11)
    w = ro.dense_weight().detach().contiguous().reshape(2, 1, 3, 3)
    stack = models.LAPLACE_REPO.expand(1, 1, 3, 3)
    brute = torch.sqrt(torch.nn.functional.conv2d(w, stack).square().sum())
    assert r["smooth"].item() == pytest.approx(brute.item(), rel=1e-5)


def test_repo_smoothness_matches_the_n_by_n_kernel_stack():
    torch.manual_seed(0)
    ro = models.CadenaReadout(3, 5, 4, 4)
    w = ro.dense_weight().detach().contiguous().reshape(3, 4, 5, 4)  # the repo's reshape of w [C,H,W,N] to [C,N,H,W]
    stack = models.LAPLACE_REPO.expand(4, 4, 3, 3)
    brute = torch.sqrt(torch.nn.functional.conv2d(w, stack).square().sum())
    assert ro.repo_penalty(torch.arange(4))["smooth"].item() == pytest.approx(brute.item(), rel=1e-5)


def test_bn_momentum_mapping():
    assert models.torch_momentum(0.9) == pytest.approx(0.1)
    ro = models.build_readout("bashivan", (2, 1, 1), 1, quirks="paper")
    assert ro.bn_momentum == pytest.approx(0.1) and ro.norm == "fixed"
    orig = models.build_readout("bashivan", (2, 1, 1), 1, quirks="original")
    assert orig.bn_momentum == 0.9 and orig.norm == "batch"
    orig.train()
    x = torch.ones(4, 2, 1, 1) * 3
    orig(x)
    # PyTorch: running = (1 − m)·running + m·batch → momentum 0.9 keeps only 10 % of the old value
    torch.testing.assert_close(orig.running_mean, torch.full((2,), 0.9 * 3))


def _planted(n=700, c=8, h=7, w=7, seed=0):
    """Features with a planted factorised readout OF THE READOUT'S OWN INPUT (BN → ReLU of the features):
    electrode k pools a 3 × 3 patch at a known position."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g) * torch.rand(1, c, 1, 1, generator=g) * 3
    mean, var = models.channel_stats(x.numpy(), np.arange(500))
    front = models.BashivanReadout(c, h, w, 1)
    front.set_norm_stats(mean.float(), var.float())
    z = front.front(x)
    rf = [(1, 1), (5, 2), (3, 5), (2, 4)]
    mask = torch.zeros(len(rf), h, w)
    for k, (i, j) in enumerate(rf):
        mask[k, i - 1:i + 2, j - 1:j + 2] = 1
    feat_w = torch.randn(len(rf), c, generator=g)
    y = torch.einsum("nchw,khw,kc->nk", z, mask, feat_w)
    y = y + 0.1 * y.std(0) * torch.randn(y.shape, generator=g)
    return x, y, rf, mean, var


def test_planted_factorised_readout_recovered():
    x, y, rf, mean, var = _planted()
    ro = models.BashivanReadout(8, 7, 7, 4)
    ro.set_norm_stats(mean.float(), var.float())
    coefs = models.coefficient_vectors("bashivan", "paper", ["V1"] * 4, {"smooth": 1e-3, "l1": 1e-3, "l2": 1e-4})
    models.fit_gradient(ro, x[:500], y[:500], x[500:600], y[500:600], [torch.arange(4)], coefs, lr=2e-2,
                        batch_size=64, max_steps=800, eval_every=50, patience=4)
    r = metrics.corr(models.predict(ro, x[600:]), y[600:])
    assert r.min() > 0.9, r
    peaks = [divmod(int(m.abs().argmax()), 7) for m in ro.mask.detach()]
    assert all(abs(pi - i) <= 1 and abs(pj - j) <= 1 for (pi, pj), (i, j) in zip(peaks, rf)), peaks


def test_gradient_descent_with_l2_converges_to_closed_form_ridge():
    g = torch.Generator().manual_seed(0)
    for n, d in ((40, 12), (10, 25)):  # primal (n > D) and dual (n ≤ D) branches
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = x @ torch.randn(d, 3, generator=g, dtype=torch.float64) + torch.randn(n, 3, generator=g, dtype=torch.float64)
        sol = models.ridge_path(x, y, x[:5], y[:5], alphas=(0.3,))
        lam = sol["lam"][0].item()
        w = torch.zeros(d, 3, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            loss = (y - x @ w - b).square().sum() + lam * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(w.detach(), sol["weight"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(b.detach(), sol["bias"], atol=1e-6, rtol=1e-6)
    # plain gradient descent reaches the same point
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 2, generator=g, dtype=torch.float64)
    sol = models.ridge_path(x, y, x, y, alphas=(1.0,))
    lam, w, b = sol["lam"][0].item(), torch.zeros(6, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for _ in range(4000):
        res = y - x @ w - b
        w += 0.005 * (x.T @ res - lam * w)
        b += 0.005 * res.sum(0)
    torch.testing.assert_close(w, sol["weight"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["cadena", "bashivan"])
def test_joint_fit_of_all_arrays_equals_per_array_fits(kind):
    torch.manual_seed(0)
    x = torch.rand(120, 4, 5, 5, dtype=torch.float64)
    y = torch.randn(120, 5, dtype=torch.float64) + x.flatten(1)[:, :5] * 3
    groups = [torch.tensor([0, 1, 2]), torch.tensor([3, 4])]  # two arrays of different sizes
    mean, var = models.channel_stats(x.numpy(), np.arange(100))
    areas = ["V1"] * 3 + ["IT"] * 2

    def fit(cols):
        torch.manual_seed(1)
        ro = models.build_readout(kind, (4, 5, 5), 5).double()
        ro.set_norm_stats(mean, var)
        with torch.no_grad():  # the same initial values for every electrode in both fits
            for name, ax in ro.electrode_params():
                p = getattr(ro, name)
                p.copy_(p.index_select(ax, torch.arange(5)))
        keep = torch.tensor(cols)
        sub = models.build_readout(kind, (4, 5, 5), len(cols)).double()
        sub.set_norm_stats(mean, var)
        with torch.no_grad():
            for name, ax in ro.electrode_params():
                getattr(sub, name).copy_(getattr(ro, name).index_select(ax, keep))
        gs = [torch.arange(len(cols))] if len(cols) < 5 else groups
        cf = models.coefficient_vectors(kind, "paper", [areas[i] for i in cols], {})
        models.fit_gradient(sub, x[:100], y[:100][:, keep], x[100:], y[100:][:, keep], gs, cf, lr=1e-2,
                            batch_size=25, max_steps=60, eval_every=10, patience=2, seed=5)
        return sub

    joint = fit([0, 1, 2, 3, 4])
    for g in groups:
        alone = fit(g.tolist())
        for name, ax in joint.electrode_params():
            torch.testing.assert_close(getattr(joint, name).index_select(ax, g), getattr(alone, name), atol=1e-10, rtol=1e-9)


def test_best_layer_is_the_planted_one():
    """Sites simulated as linear readouts of two known layers of a (random) VGG-19: the ridge sweep over every
    layer picks each site's planted layer on the validation split."""
    torch.manual_seed(0)
    bb, _ = backbones.build_backbone("vgg19", None, 32)
    imgs = torch.rand(260, 3, 32, 32)
    with torch.no_grad():
        feats = {k: backbones.pool_map(v, 4) for k, v in bb(imgs, bb.layer_names).items()}
    planted = {"site_a": "features.5", "site_b": "features.28"}
    g = torch.Generator().manual_seed(0)
    ys = []
    for layer in planted.values():  # 3 electrodes per site, each a spatial average of 4 channels of BN → ReLU
        f = feats[layer]
        mean, var = models.channel_stats(f.numpy(), np.arange(200))
        front = models.CadenaReadout(*f.shape[1:], 1)
        front.set_norm_stats(mean.float(), var.float())
        z = front.front(f).mean((2, 3))
        w = torch.zeros(z.shape[1], 3)
        for k in range(3):
            w[torch.randperm(z.shape[1], generator=g)[:4], k] = torch.rand(4, generator=g) + 0.5
        y = z @ w
        ys.append(y + 0.3 * y.std(0) * torch.randn(y.shape, generator=g))
    y = torch.cat(ys, 1)
    tr, va = slice(0, 200), slice(200, 260)
    val = {}
    for layer, f in feats.items():
        mean, var = models.channel_stats(f.numpy(), np.arange(200))
        ro, _ = models.ridge_readout(f[tr], y[tr], f[va], y[va], mean, var)
        r = metrics.corr(models.predict(ro, f[va]), y[va])
        val[layer] = [r[:3].mean(), r[3:].mean()]
    layers = list(feats)
    best = [layers[int(np.argmax([val[k][i] for k in layers]))] for i in range(2)]
    assert best == list(planted.values()), {k: np.round(v, 3).tolist() for k, v in val.items()}


def test_bashivan_regularisers_hand_values():
    ro = models.BashivanReadout(2, 3, 3, 1)
    with torch.no_grad():
        ro.mask.zero_()
        ro.mask[0, 4] = 2.0  # a delta of height 2 at the centre of the 3 × 3 mask
        ro.features.copy_(torch.tensor([[1.0, -2.0]]))
    t = ro.per_neuron_penalty()
    assert t["smooth"].item() == pytest.approx(64)  # (4 · 2)²
    assert t["l1"].item() == pytest.approx(2) and t["l2"].item() == pytest.approx(0.5 * (4 + 5))
    r = ro.repo_penalty(torch.tensor([0]))  # padding 5: the whole (−4-centre) kernel pattern × 2 is seen
    assert r["smooth"].item() == pytest.approx((4 * 2**2 + 8**2) ** 0.5)
    assert r["l1"].item() == pytest.approx(3) and r["l2"].item() == pytest.approx(4.5)
