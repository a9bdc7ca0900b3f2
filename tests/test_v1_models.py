"""v1_constrained/models.py: known-answer tests of the five V1 components and the 13-model zoo."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from v1_constrained.models import (MODEL_TYPES, DoGConv2d, DoGLayer, LocallyConnected2d, PolarTransform,
                                   StdDivNorm, TunedNorm, build_model, count_parameters, lc_broadcast, polar_broadcast,
                                   polar_masks, remap_release_keys, replace_head)

# The release's parameter counts (explaining_v1 models, 1000 classes; totals include frozen Parameters, not
# buffers; composite_a's 35,156,346 is also in its Brain-Score metadata.yml).
PARAMS = {
    "resnet50": (25_557_032, 25_557_032),
    "resnet50_cortical_magnification": (25_557_032, 25_557_032),
    "resnet50_center_surround": (25_559_459, 25_559_336),
    "resnet50_local_rf": (34_957_352, 34_957_352),
    "resnet50_composite_f": (34_957_352, 34_957_352),
    "resnet50_tuned_norm": (25_754_408, 25_557_800),
    "resnet50_composite_e": (25_754_408, 25_557_800),
    "resnet50_div_norm": (26_736_683, 26_736_683),
    "resnet50_composite_a": (35_156_346, 34_959_656),
    "resnet50_composite_d": (35_156_346, 34_959_656),
    "resnet50_composite_b": (35_154_728, 34_958_120),
    "resnet50_composite_g": (35_154_728, 34_958_120),
    "resnet50_composite_c": (34_958_970, 34_958_888),
}


def test_table_covers_every_model_type():
    assert set(PARAMS) == set(MODEL_TYPES) and len(MODEL_TYPES) == 13


# ----------------------------------------------------------------------------- initialisation = the release's


def release_init(model_type: str, name: str, module: torch.nn.Module, pname: str, p: torch.Tensor):
    """The distribution the release code draws parameter `name` from, written out from its construction order:
    torchvision's init loop (kaiming-normal fan_out on every Conv2d, BN weight 1 / bias 0) runs inside resnet50()
    and inside the release's ResNetComposite constructor, so it covers the composites' ConvDog conv too; Linear
    keeps PyTorch's default; resnet50_center_surround swaps layer1[i].conv2 for Sequential(Conv2d, DoG) after
    resnet50() returned, so that conv keeps PyTorch's default Conv2d init (models/center_surround.py); the V1
    modules draw their own (utils/DoG.py, LocallyConnected2d.py, DivisiveNormalization.py)."""
    if isinstance(module, torch.nn.Conv2d):
        fan_in, fan_out = p[0].numel(), p.shape[0] * p[0, 0].numel()
        if model_type == "resnet50_center_surround" and re.fullmatch(r"layer1\.[012]\.conv2\.0\.weight", name):
            return ("uniform", -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))  # kaiming_uniform(a=√5)
        return ("normal", 0.0, math.sqrt(2.0 / fan_out))
    if isinstance(module, torch.nn.BatchNorm2d):
        return ("const", 1.0 if pname == "weight" else 0.0)
    if isinstance(module, torch.nn.Linear):
        b = 1 / math.sqrt(module.in_features)
        return ("uniform", -b, b)
    if isinstance(module, DoGConv2d):
        k = module.k
        r = torch.arange(2 * k + 1.0) - k
        return {"sigma1": ("uniform", k / 2, k / 2 + 1), "sigma2_scale": ("uniform", k / 2, k / 2 + 1),
                "total_scale": ("normal", 0.0, 2.0), "bias": ("const", 0.0),
                "kernel_dists": ("exact", r[None] ** 2 + r[:, None] ** 2)}[pname]
    if isinstance(module, LocallyConnected2d):
        return ("normal", 0.0, 1.0)
    if isinstance(module, TunedNorm):
        n = module.n_channels
        q = (torch.arange(n) - n // 2).abs().float()
        return {"sigmas": ("uniform", n / 8, n / 8 + 1),
                "channel_distances": ("exact", torch.stack([torch.roll(q, i) for i in range(n)]))}[pname]
    if isinstance(module, StdDivNorm):
        return {"A": ("uniform", 0, 1), "rho": ("uniform", 1, 2), "sigma": ("uniform", 1, 2),
                "theta": ("uniform", 0, 2 * math.pi), "v": ("normal", module.kernel_size // 2, 1.0),
                "w": ("normal", module.kernel_size // 2, 1.0), "bias": ("uniform", 1, 2)}[pname]
    raise AssertionError(f"{model_type}: no release init rule for {name} ({type(module).__name__})")


def check_release_init(model_type: str, model: torch.nn.Module) -> int:
    """Every parameter's empirical statistics against its release rule (tolerances ~6 standard errors)."""
    checked = 0
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            rule = release_init(model_type, name, module, pname, p)
            x = p.detach().double().flatten()
            n = x.numel()
            if rule[0] == "const":
                assert (x == rule[1]).all(), name
            elif rule[0] == "exact":
                assert torch.equal(p.detach(), rule[1].to(p.dtype)), name
            elif rule[0] == "uniform":
                lo, hi = rule[1:]
                assert x.min() >= lo and x.max() <= hi, (name, x.min().item(), x.max().item(), lo, hi)
                if n >= 100:  # both bounds reached (a narrower uniform fails here) and the uniform's std
                    assert x.min() - lo < 20 * (hi - lo) / n and hi - x.max() < 20 * (hi - lo) / n, name
                    sd = (hi - lo) / math.sqrt(12)
                    assert abs(x.std().item() / sd - 1) < 6 / math.sqrt(n) + 1e-3, (name, x.std().item(), sd)
            else:
                mu, sd = rule[1:]
                assert abs(x.mean().item() - mu) < 6 * sd / math.sqrt(n), (name, x.mean().item(), mu)
                assert abs(x.std().item() / sd - 1) < 6 / math.sqrt(2 * n) + 1e-3, (name, x.std().item(), sd)
                if n >= 2000:  # a normal, not a uniform of the same std (kurtosis 3 vs 1.8)
                    kurt = (((x - x.mean()) / x.std()) ** 4).mean().item()
                    assert abs(kurt - 3) < 0.6, (name, kurt)
            checked += 1
    return checked


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_zoo_counts_shapes_and_release_init(name):
    torch.manual_seed(0)
    model = build_model(name, 1000).eval()
    assert count_parameters(model) == PARAMS[name]
    assert check_release_init(name, model) == len(list(model.parameters()))
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    model.layer1.register_forward_hook(lambda m, i, o: seen.update(layer1=o))
    model.avgpool.register_forward_hook(lambda m, i, o: seen.update(pool=o))
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
        assert seen["layer1"].shape == (2, 256, 16, 16)  # the Brain-Score V1 layer
        replace_head(model, 200)
        assert model.fc(seen["pool"].flatten(1)).shape == (2, 200)
    assert model.fc.weight.shape == (200, 2048)


def test_init_check_catches_the_kaiming_center_surround_convs():
    """The divergence the check exists for: kaiming-normal (std 0.059) on the pre-DoG convs instead of the
    default Conv2d init (std 0.024) must fail it."""
    torch.manual_seed(0)
    model = build_model("resnet50_center_surround", 10)
    w = model.layer1[1].conv2[0].weight
    assert w.abs().max() <= 1 / math.sqrt(64 * 9) and w.std().item() == pytest.approx(1 / math.sqrt(3 * 64 * 9), rel=0.03)
    torch.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")
    with pytest.raises(AssertionError):
        check_release_init("resnet50_center_surround", model)


def test_forward_features_layer1():
    model = build_model("resnet50_composite_a").eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 64), upto="layer1").shape == (1, 256, 16, 16)


def test_component_placement_per_model():
    a = build_model("resnet50_composite_a")
    assert a.use_polar and a.lpp is not None
    assert [type(b.conv2).__name__ for b in a.layer1] == ["ConvDoG", "ConvDoG", "LocallyConnected2d"]
    assert all(isinstance(b.dn, TunedNorm) for b in a.layer1)
    lrf = build_model("resnet50_local_rf")
    assert isinstance(lrf.layer1[2].conv2[0], torch.nn.Dropout2d) and isinstance(lrf.layer1[2].conv2[1], LocallyConnected2d)
    cs = build_model("resnet50_center_surround")
    assert all(isinstance(b.conv2[1], DoGLayer) for b in cs.layer1)
    dn = build_model("resnet50_div_norm")
    assert all(isinstance(b.dn, StdDivNorm) for b in dn.layer1) and not dn.use_polar
    # composites always carry the polar buffers (release state_dict layout), used or not
    assert "lpp.pooling_masks" in build_model("resnet50_composite_g").state_dict()
    assert "lpp.pooling_masks" not in build_model("resnet50").state_dict()


def test_composite_flags_are_per_instance():
    # release bug 4: class-attribute flags made composite_a lose its polar transform after building d
    d = build_model("resnet50_composite_d")
    a = build_model("resnet50_composite_a")
    d2 = build_model("resnet50_composite_d")
    assert a.use_polar and not d.use_polar and not d2.use_polar


# ----------------------------------------------------------------------------- LocallyConnected2d


def test_lc_with_tied_weights_equals_conv2d():
    torch.manual_seed(0)
    lc = LocallyConnected2d(5, 7, output_size=6, kernel_size=3, stride=1, padding=1)
    w = torch.randn(7, 5, 3, 3)
    with torch.no_grad():  # same (out, in, kh*kw) filter at every position, row-major patch index
        lc.weight.copy_(w.reshape(7, 5, 1, 1, 9).expand(7, 5, 6, 6, 9).unsqueeze(0))
    x = torch.randn(3, 5, 6, 6)
    torch.testing.assert_close(lc(x), F.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,padding,bias", [(1, 1, False), (2, 0, True)])
def test_lc_equals_broadcast_form_values_and_grads(stride, padding, bias):
    torch.manual_seed(1)
    out = (9 + 2 * padding - 3) // stride + 1
    lc = LocallyConnected2d(4, 6, output_size=out, kernel_size=3, stride=stride, padding=padding, bias=bias)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    y = lc(x)
    y_ref = lc_broadcast(x, lc.weight, 3, stride, padding, lc.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, lc.weight), g)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, lc.weight), g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-4)


def test_lc_layout_and_channels_last():
    lc = LocallyConnected2d(64, 64, output_size=16)
    assert lc.weight.shape == (1, 64, 64, 16, 16, 9) and lc.weight.numel() == 9_437_184
    assert abs(lc.weight.std().item() - 1) < 0.01  # the release's randn init
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(lc(x.contiguous(memory_format=torch.channels_last)), lc(x))
    with pytest.raises(ValueError):
        lc(torch.randn(1, 64, 8, 8))


# ----------------------------------------------------------------------------- polar transform


def test_polar_masks_per_ring():
    p = PolarTransform()
    assert p.pooling_masks.shape == (540, 32, 32) and p.pooling_mask_counts.shape == (540,)
    # non-empty sectors per ring before the angular interpolation
    assert p.nonempty_per_ring == [1, 8, 16, 20, 24] + [30] * 10 + [25, 14, 6]
    counts = p.pooling_masks.view(18, 30, -1).sum(-1)
    assert (counts[:16] > 0).all()            # interpolated rings (inner edge ≤ 16) fill all 30 sectors
    assert (counts[16:] == 0).sum() == (30 - 14) + (30 - 6)  # outer rings keep their empty sectors
    # ring 0 is the centre pixel (16, 16) alone, copied into every sector with weight 1
    assert torch.equal(p.pooling_masks[:30, 16, 16], torch.ones(30))
    assert p.pooling_masks[:30].sum() == 30
    # before interpolation the binary masks tile the 32x32 map: every pixel in exactly one (ring, sector)
    raw, _ = polar_masks(32, interpolate=False)
    assert torch.equal(raw.sum(0), torch.ones(32, 32))
    # outer rings (inner edge > 16) are not interpolated
    assert torch.equal(p.pooling_masks[16 * 30:], raw[16 * 30:])


def test_polar_matmul_equals_broadcast_and_known_values():
    torch.manual_seed(0)
    for variant in ("release", "brainscore"):
        p = PolarTransform(variant=variant)
        x = torch.randn(2, 3, 32, 32)
        y = p(x)
        assert y.shape == (2, 3, 16, 16)
        torch.testing.assert_close(y, polar_broadcast(p, x), rtol=1e-5, atol=1e-5)
    # average pooling: a constant map gives that constant on every covered cell; the centre pixel's value
    # fills ring 0
    p = PolarTransform()
    pooled = (torch.full((1, 1024), 3.0) @ p.pool_matrix()).view(18, 30)
    torch.testing.assert_close(pooled[:16], torch.full((16, 30), 3.0))
    assert (pooled[16:][p.pooling_masks.view(18, 30, -1)[16:].sum(-1) == 0] == 0).all()
    x = torch.zeros(1, 1024)
    x[0, 16 * 32 + 16] = 5.0
    ring0 = (x @ p.pool_matrix()).view(18, 30)
    assert torch.equal(ring0[0], torch.full((30,), 5.0)) and ring0[1:].abs().sum() == 0
    # the two variants differ only by the extra radial reflect padding
    assert not torch.allclose(PolarTransform(variant="brainscore")(torch.randn(1, 1, 32, 32)),
                              PolarTransform()(torch.randn(1, 1, 32, 32)))


def test_polar_float64_forward_equals_float64_reference():
    """The pooling matrix is built in the input's precision: float64 forwards of the polar models equal a float64
    reference (broadcast over masks rebuilt in float64) to 1e-12, which float32-built masks would miss (~1e-8)."""
    torch.manual_seed(0)
    p = PolarTransform().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert p.pool_matrix(torch.float64).dtype == torch.float64
    torch.testing.assert_close(p(x), polar_broadcast(p, x), rtol=0, atol=1e-12)
    m32 = polar_masks(32, dtype=torch.float32)[0].double()   # what a float32-built matrix would use
    ref32 = (x.unsqueeze(2) * m32).sum((-1, -2)) / m32.sum((-1, -2)).clamp(min=1)
    assert (p.finish(ref32.view(2, 3, 18, 30)) - p(x)).abs().max() > 1e-10
    m64 = polar_masks(32, dtype=torch.float64)[0].flatten(1)

    def reference(t):  # sums over each mask, divided afterwards (the release's order), masks rebuilt in float64
        pooled = torch.einsum("ncp,kp->nck", t.flatten(2), m64) / m64.sum(1).clamp(min=1)
        return p.finish(pooled.view(*t.shape[:2], 18, 30))

    for name in ("resnet50_cortical_magnification", "resnet50_composite_a"):
        torch.manual_seed(1)
        model = build_model(name, 10).double().eval()
        img = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        with torch.no_grad():
            out = model(img)
            model.lpp.forward = reference
            ref = model(img)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- tuned normalization


def test_tuned_norm_matrix():
    n = 16
    tn = TunedNorm(n)
    d = tn.channel_distances
    assert not d.requires_grad and tn.sigmas.requires_grad
    assert torch.equal(d, torch.roll(torch.roll(d, 1, 0), 1, 1))   # circulant
    assert torch.equal(d[0], (torch.arange(n) - n // 2).abs().float())  # q_j = |j - n//2|
    g = tn.matrix()
    torch.testing.assert_close(g.sum(0), torch.ones(n))           # columns sum to 1
    with torch.no_grad():
        tn.sigmas.fill_(2.0)                                       # equal sigmas: G is circulant too
    g = tn.matrix()
    torch.testing.assert_close(g, torch.roll(torch.roll(g, 1, 0), 1, 1))
    assert torch.equal(g.argmax(1), (torch.arange(n) + n // 2) % n)  # the opposite channel inhibits most
    selfc = TunedNorm(n, center="self")
    with torch.no_grad():
        selfc.sigmas.fill_(2.0)
    assert torch.equal(selfc.matrix().argmax(1), torch.arange(n))
    # y_i = x_i / (1 + Σ_j G_ij x_j), by hand
    x = torch.rand(2, n, 3, 3)
    pool = torch.einsum("ij,njhw->nihw", g, x)
    torch.testing.assert_close(tn(x), x / (1 + pool))


def test_tuned_norm_sigma_clamp_and_hand_gaussian():
    tn = TunedNorm(4)
    with torch.no_grad():
        tn.sigmas.copy_(torch.tensor([0.1, 1.0, 2.0, 3.0]))        # 0.1 is clamped to 0.5
    s = torch.tensor([0.5, 1.0, 2.0, 3.0])
    d = tn.channel_distances
    g = torch.exp(-d ** 2 / (2 * s ** 2))
    torch.testing.assert_close(tn.matrix(), g / g.sum(0))


# ----------------------------------------------------------------------------- standard DN


def test_std_div_norm_hand_formula():
    dn = StdDivNorm(2, 3)
    assert count_parameters(dn) == (6 * 4 + 1, 6 * 4 + 1)
    k = dn.kernels()
    i, j, r, c = 1, 0, 2, 0   # kernel of out 1 / in 0 at grid row 2 (y=3), col 0 (x=1)
    A, rho, sig, th, v, w = (getattr(dn, n)[i, j, 0, 0].item() for n in ("A", "rho", "sigma", "theta", "v", "w"))
    x, y = 1.0, 3.0
    xr, yr = x * math.cos(th) + y * math.sin(th), -x * math.sin(th) + y * math.cos(th)
    q = (xr - v) ** 2 / max(rho ** 2, 0.1) + (yr - w) ** 2 / max(sig ** 2, 0.1)
    expect = abs(A / max(2 * math.pi * rho * sig, 0.1)) * math.exp(-0.5 * q)
    assert abs(k[i, j, r, c].item() - expect) < 1e-6
    x = torch.rand(1, 2, 5, 5)
    torch.testing.assert_close(dn(x), x / (F.conv2d(x, k, padding=1) + dn.bias.abs()))


# ----------------------------------------------------------------------------- DoG


def test_dog_sign_behaviour_both_forms():
    torch.manual_seed(0)
    for form in ("original", "textbook"):
        dog = DoGConv2d(16, k=2, form=form)
        assert count_parameters(dog) == (3 * 256 + 25 + 16, 3 * 256)
        k = dog.kernels().detach().view(256, 5, 5)
        sign_a = torch.sign(dog.total_scale.detach().view(256))
        if form == "original":
            # the release's σ/π bracket is negative everywhere: single-signed kernels of sign −a
            assert (torch.sign(k) == -sign_a.view(256, 1, 1)).all()
        else:
            # a true centre-surround: centre has the sign of a, the rim (distance ≥ 2) the opposite one
            assert (torch.sign(k[:, 2, 2]) == sign_a).all()
            rim = torch.cat([k[:, 0, :], k[:, 4, :], k[:, :, 0], k[:, :, 4]], dim=1)
            assert (torch.sign(rim) == -sign_a.view(256, 1)).all()
        # L2-normalised across kernels at each pixel (the release's normalisation)
        torch.testing.assert_close(k.pow(2).sum(0), torch.ones(5, 5))


def test_dog_layer_touches_only_first_16_channels():
    layer = DoGLayer(16)
    x = torch.randn(2, 64, 16, 16)
    y = layer(x)
    assert y.shape == x.shape
    assert torch.equal(y[:, 16:], x[:, 16:])
    torch.testing.assert_close(y[:, :16], F.conv2d(x[:, :16], layer.dog_conv.kernels(), padding=2))
    assert (layer.dog_conv.kernel_dists[2, 2] == 0) and (layer.dog_conv.kernel_dists[0, 0] == 8)


# ----------------------------------------------------------------------------- release checkpoints


def test_release_sequential_keys_are_remapped():
    src = build_model("resnet50_cortical_magnification", 10)
    names = {"conv1": "0", "bn1": "1", "lpp": "3", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7", "fc": "10"}
    release = {names[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in src.state_dict().items()}
    dst = build_model("resnet50_cortical_magnification", 10)
    dst.load_state_dict(remap_release_keys(release), strict=True)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])
