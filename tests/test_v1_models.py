"""v1_constrained/models.py: known-answer tests of the five V1 components and the 13-model zoo."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v1_constrained.models import (MODEL_TYPES, DoGConv2d, DoGLayer, LocallyConnected2d,  # noqa: E402
                                   PolarTransform, StdDivNorm, TunedNorm, build_model, count_parameters, polar_masks,
                                   lc_broadcast, polar_broadcast, remap_release_keys, replace_head)

# The research note's table (1000 classes; totals include frozen Parameters, not buffers).
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


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_zoo_counts_and_shapes(name):
    torch.manual_seed(0)
    model = build_model(name, 1000).eval()
    assert count_parameters(model) == PARAMS[name]
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
