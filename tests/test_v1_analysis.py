"""v1_constrained/analysis.py (--mode v1_props): the grating generator and the V1 property formulas against hand-built
units with known answers (Gabor filters at known orientations, DoG vs Gaussian units, linear vs energy units)."""
import math

import numpy as np
import pytest
import torch

from v1_constrained import analysis as an

PROTO = an.protocol("quick")


def coords():
    c = (torch.arange(an.PX, dtype=torch.float64) + 0.5 - an.PX / 2) / an.PPD
    return c.view(-1, 1), c.view(1, -1)   # y (down), x in degrees


def gabor(theta_deg, sf=1.542, sigma=0.5, phase=0.0):
    y, x = coords()
    th = math.radians(theta_deg)
    env = torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    return env * torch.cos(2 * math.pi * sf * (x * math.cos(th) + y * math.sin(th)) + phase)


def gauss(sigma):
    y, x = coords()
    g = torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def linear_units(kernels):
    """respond(images in [0, 1]) → (N, units): the kernels applied to the normalised image at the centre."""
    k = torch.stack(kernels).flatten(1).float()
    return lambda img: ((img[:, 0] - 0.5) / 0.5).flatten(1) @ k.t()


def props_of(respond):
    return an.properties(an.measure(respond, PROTO, "cpu"), PROTO)


def test_grating_generator_orientation_and_frequency_by_fft():
    # (cycles along x, cycles along y) over the 64 px = 8° image → sf = |k| / 8 cpd, θ = atan2(ky, kx)
    for kx, ky in ((8, 0), (0, 8), (4, 3), (-3, 4), (12, 5)):
        sf, theta = math.hypot(kx, ky) / 8.0, math.degrees(math.atan2(ky, kx))
        img = an.gratings(np.array([[sf, theta, 30.0, 100.0, 0, 0]]))[0, 0].double() - 0.5
        spec = np.abs(np.fft.fft2(img.numpy()))
        iy, ix = np.unravel_index(np.argmax(spec), spec.shape)
        got = {(int(ix + 32) % 64 - 32, int(iy + 32) % 64 - 32)}
        assert got <= {(kx, ky), (-kx, -ky)}, (kx, ky, got)
        assert spec[iy, ix] == pytest.approx(0.5 * 64 * 64 / 2, rel=1e-3)   # a pure full-contrast sinusoid
    # the aperture: grey outside the radius, the grating inside; phase shifts the pattern
    img = an.gratings(np.array([[1.0, 0.0, 90.0, 1.0, 0, 0]]))[0, 0]
    assert img[0, 0] == 0.5 and img[31, 31] == pytest.approx(0.5 + 0.5 * math.cos(2 * math.pi * -0.0625), abs=1e-6)
    assert img.min() >= 0 and img.max() <= 1


def test_formulas_on_hand_curves():
    ang = np.arange(0, 180, 15.0)
    assert an.circular_variance(np.ones(12), ang) == pytest.approx(1.0)
    delta = np.zeros(12)
    delta[3] = 1
    assert an.circular_variance(delta, ang) == pytest.approx(0.0)
    # SSI = (max − last)/max; GSF = diameter of the first radius ≥ 95 % of max
    radii = np.array([0.5, 1, 2, 3, 4.0])
    ssi, gsf, sd = an.size_properties(np.array([2.0, 10, 9.6, 5, 4]), radii)
    assert ssi == pytest.approx(0.6) and gsf == 2.0 and sd == 8.0
    assert np.isnan(an.size_properties(np.array([1.0, 2, 3, 3, 3]), radii)[1])   # no suppression: NaN
    pk, bw, sel = an.sf_properties(np.exp(-np.log2(np.array(an.SF_GRID)) ** 2), an.SF_GRID)
    assert pk == pytest.approx(1.0, rel=0.05) and 0 < bw < 100 and 0 < sel <= 1


def test_gabor_layer_orientations_are_recovered():
    thetas = list(range(0, 180, 15))
    p = props_of(linear_units([gabor(t) for t in thetas]))
    assert p["kept"]["orientation"].all()
    for t, pref in zip(thetas, p["preferred_orientation"]):
        d = abs(pref - t) % 180
        assert min(d, 180 - d) <= 15, (t, pref)
    assert np.nanmax(p["circular_variance"]) < 0.5, p["circular_variance"]
    assert np.all(p["orthogonal_preferred_ratio"] < 0.3)
    assert np.allclose(p["rf_centroid_x"], 0, atol=0.25) and np.allclose(p["rf_centroid_y"], 0, atol=0.25)


def test_dog_unit_is_surround_suppressed_and_gaussian_is_not():
    """A balanced DoG (centre σ 0.5°, surround 1.5°) is suppressed by large gratings (SSI ≈ 0.6 on this protocol);
    a small Gaussian (σ 0.15°) is not. (A wide Gaussian, σ ≳ 0.6°, is: its hard-edged grating patches average out
    over its extent — so the Gaussian must be small.)"""
    dog = gauss(0.5) - gauss(1.5)
    p = props_of(linear_units([dog, gauss(0.15)]))
    assert p["ssi"][0] > 0.5, p["ssi"]
    assert p["ssi"][1] < 0.1, p["ssi"]
    assert np.isfinite(p["grating_summation_field"][0]) and np.isnan(p["grating_summation_field"][1])


def test_linear_unit_modulates_and_energy_unit_does_not():
    even, odd = gabor(0.0), gabor(0.0, phase=math.pi / 2)
    lin = linear_units([even])
    pair = linear_units([even, odd])
    energy = lambda img: pair(img).pow(2).sum(1, keepdim=True).sqrt()  # noqa: E731
    f_lin = props_of(lin)["f1_f0"][0]
    f_en = props_of(energy)["f1_f0"][0]
    assert f_lin > 1 and f_en < 1, (f_lin, f_en)
    assert f_lin == pytest.approx(math.pi / 2, rel=0.15)   # half-wave rectified sinusoid: F1/F0 = π/2


def test_orientation_histogram_wraps():
    assert an.orientation_histogram([0, 10, 170, 45, 100, 135, np.nan]) == {"0": 3, "45": 1, "90": 1, "135": 1}
