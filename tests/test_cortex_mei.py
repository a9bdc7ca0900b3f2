"""cortex_readouts/mei.py: known answers for the MEI pipeline (CPU, tiny images, a few seconds in all)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import metrics, synthetic
from common.runtime import UserError
from cortex_readouts import mei

S = 64  # image size of every test
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class GaborNeuron(torch.nn.Module):
    """A planted 'neuron': softplus of a Gabor filter applied to each ImageNet-normalised channel."""

    def __init__(self, freq=0.05, sigma=8.0, cx=30.0, cy=35.0, theta=0.6, phase=0.4):
        super().__init__()
        g = synthetic.gabor(S, [cx], [cy], [sigma], [theta], [freq], [phase])[0]
        self.register_buffer("g", torch.tensor(g, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def preprocess(self, x):
        return (x - self.mean) / self.std

    def forward(self, x):  # n × 1 "electrodes"
        return F.softplus((self.preprocess(x) * self.g).sum((1, 2, 3)))[:, None]


def test_zero_spectrum_is_uniform_grey():
    for decorrelate in (True, False):
        p = mei.FourierImage(2, (S, S + 3), generator=torch.Generator().manual_seed(0), decorrelate=decorrelate)
        assert p.spectrum.abs().sum() > 0  # random init ...
        with torch.no_grad():
            p.spectrum.zero_()  # ... but a zero spectrum is exactly grey
            x = p()
        assert x.shape == (2, 3, S, S + 3)
        assert torch.equal(x, torch.full_like(x, 0.5))


def test_one_over_f_scaling_and_colour_matrix_by_hand():
    h = w = 16
    p = mei.FourierImage(1, h, generator=torch.Generator().manual_seed(0), decorrelate=False)
    with torch.no_grad():
        p.spectrum.zero_()
        p.spectrum[0, 1, 0, 3, 0] = 0.2  # real coefficient at fx = 3/16 in the green channel
        logit = torch.logit(p().double())
    # irfft (ortho) of one coefficient a at 0 < k < W/2: (2a/sqrt(HW)) cos(2πkx/W); 1/f scale W/k; lucid's /4
    x = torch.arange(w, dtype=torch.float64)
    want = (16 / 3) * 2 * 0.2 / math.sqrt(h * w) * torch.cos(2 * math.pi * 3 * x / w) / 4
    assert torch.allclose(logit[0, 1], want.expand(h, w), atol=1e-5)
    assert torch.allclose(logit[0, [0, 2]], torch.zeros(2, h, w, dtype=torch.float64), atol=1e-6)
    # decorrelated: a DC coefficient in the first (luminance) channel gives colour C[:, 0] / max column norm
    p = mei.FourierImage(1, h, generator=torch.Generator().manual_seed(0), decorrelate=True)
    with torch.no_grad():
        p.spectrum.zero_()
        p.spectrum[0, 0, 0, 0, 0] = 0.1
        logit = torch.logit(p().double())[0, :, 0, 0]
    col0 = torch.tensor([0.26, 0.27, 0.27], dtype=torch.float64)
    dc = 0.1 * 16 / math.sqrt(h * w) / 4  # DC scale max(H, W)
    assert torch.allclose(logit, col0 / col0.norm() * dc, atol=1e-6)  # column 0 has the largest norm


def test_transforms_keep_grey_size_and_draw_jitter_in_range():
    g = torch.Generator().manual_seed(0)
    grey = torch.full((2, 3, S, S), 0.5)
    out = mei.transform(grey, mei.TRANSFORM_CHAINS["standard"], g)
    assert out.shape == grey.shape and torch.allclose(out, grey, atol=1e-6)  # every fill is grey

    delta = torch.full((1, 1, 21, 21), 0.5)
    delta[..., 10, 10] = 1.0
    for one_sided, allowed in ((False, range(-4, 5)), (True, range(0, 8))):
        shifts = set()
        for _ in range(200):
            y, x = divmod(int(mei.transform(delta, (("jitter", 8),), g, one_sided_jitter=one_sided).argmax()), 21)
            shifts.add((y - 10, x - 10))
        assert {s for pair in shifts for s in pair} == set(allowed)


def test_rotation_is_about_the_centre():
    x = torch.rand(1, 3, 9, 9)
    r = mei._rotate(x, 90.0)
    assert any(torch.allclose(r, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, -1))


def _run(seed, **kw):
    m = GaborNeuron()
    return mei.generate(mei.site_objective(m), image_size=S, n_images=2, steps=12, seed=seed, **kw)


def test_same_seed_bit_identical_other_seed_differs():
    torch.manual_seed(123)
    np.random.seed(123)
    a = _run(0)
    torch.manual_seed(999)  # the global RNGs play no part
    np.random.seed(999)
    torch.rand(7)
    b = _run(0)
    c = _run(1)
    assert torch.equal(a["images"], b["images"]) and a["objective_trace"] == b["objective_trace"]
    assert torch.equal(a["final_objective"], b["final_objective"])
    assert not torch.equal(a["images"], c["images"])
    assert (a["images"] - c["images"]).abs().max() > 0.01


def test_gabor_neuron_mei_recovers_the_filter_and_beats_natural_images():
    m = GaborNeuron()
    objective = mei.electrode_objective(m, [0])
    out = mei.generate(objective, image_size=S, n_images=2, steps=64, seed=0, contrast=0.1)
    z = m.preprocess(out["images"])  # what the model sees
    for img in z:
        for channel in img:  # per channel: ImageNet's per-channel means offset the channels differently
            assert float(metrics.corr(channel.reshape(-1, 1), m.g.reshape(-1, 1))[0]) > 0.8
    natural = synthetic.natural_images(200, S, channels=3, seed=0)
    best, where = mei.best_natural_response(objective, natural, batch_size=64)  # in batches, no gradients
    with torch.no_grad():
        direct = objective(natural)
    assert where == int(direct.argmax()) and best == pytest.approx(float(direct.max()), rel=1e-6)
    assert out["final_objective"].min() > best
    trace = out["objective_trace"]
    assert len(trace) == 64 and np.mean(trace[-8:]) > 2 * trace[0]  # the objective increases over steps


def test_lucid_default_also_beats_natural_images_within_the_rf_envelope():
    # Without a contrast constraint lucid's sigmoid saturates the image into the filter's sign pattern,
    # which still excites the unit far more than any natural image; the RF envelope keeps it local.
    m = GaborNeuron()
    mask = F.avg_pool2d(m.g.abs()[None, None], 4)[0, 0]  # a 16 × 16 "readout mask"
    env = mei.fit_rf_envelope(mask, S)
    out = mei.generate(mei.site_objective(m), image_size=S, n_images=2, steps=32, seed=0, rf_envelope=env)
    far = env < 1e-3
    assert torch.allclose(out["images"][:, :, far], torch.tensor(0.5), atol=1e-3)
    with torch.no_grad():
        natural = m(synthetic.natural_images(200, S, channels=3, seed=0))[:, 0]
    assert out["final_objective"].min() > natural.max()


def test_fit_rf_envelope_recovers_planted_centre():
    h, w, cy, cx = 14, 12, 4.3, 7.6
    yy, xx = np.mgrid[:h, :w]
    dy, dx, rho = (yy - cy) / 1.5, (xx - cx) / 2.0, 0.3
    gauss = np.exp(-0.5 * (dy * dy - 2 * rho * dy * dx + dx * dx) / (1 - rho * rho))
    rng = np.random.default_rng(0)
    mask = gauss * rng.choice([-1.0, 1.0], (h, w)) + rng.normal(0, 0.03, (h, w))  # |mask| is what is fitted
    fit = mei.fit_gaussian_2d(torch.tensor(mask))
    assert abs(fit["cy"] - cy) < 0.15 and abs(fit["cx"] - cx) < 0.15
    assert abs(fit["sy"] - 1.5) < 0.2 and abs(fit["sx"] - 2.0) < 0.2
    env = mei.fit_rf_envelope(torch.tensor(mask), 84)  # 6 and 7 image px per mask cell
    assert env.shape == (84, 84) and 0 <= float(env.min()) and float(env.max()) <= 1
    py, px = divmod(int(env.argmax()), 84)
    assert abs(py - ((cy + 0.5) * 6 - 0.5)) <= 1.5 and abs(px - ((cx + 0.5) * 7 - 0.5)) <= 1.5
    with pytest.raises(UserError):
        mei.fit_rf_envelope(torch.zeros(5, 5), 32)


def test_electrode_objectives_by_hand():
    weight = torch.randn(5, 3 * 4 * 4, generator=torch.Generator().manual_seed(0))

    def response_fn(images):  # n × 5 electrodes
        return images.reshape(len(images), -1) @ weight.T

    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    r = response_fn(x)
    got = mei.electrode_objective(response_fn, [4, 0, 2], weights=[0.2, 0.5, 0.3])(x)
    want = torch.stack([(0.2 * r[i, 4] + 0.5 * r[i, 0] + 0.3 * r[i, 2]) / 1.0 for i in range(3)])
    assert torch.allclose(got, want, atol=1e-5)
    got = mei.electrode_objective(response_fn, [1, 3], weights=[2.0, 6.0])(x)
    assert torch.allclose(got, (2 * r[:, 1] + 6 * r[:, 3]) / 8, atol=1e-5)
    assert torch.allclose(mei.electrode_objective(response_fn, [1, 3])(x), (r[:, 1] + r[:, 3]) / 2, atol=1e-6)
    assert torch.allclose(mei.electrode_objective(response_fn, 2)(x), r[:, 2])
    assert torch.allclose(mei.site_objective(response_fn)(x), r.mean(1), atol=1e-6)
    with pytest.raises(UserError, match="electrode index 7"):
        mei.electrode_objective(response_fn, [0, 7])(x)
    with pytest.raises(UserError):
        mei.electrode_objective(response_fn, [0, 1], weights=[1.0])


def test_objective_builders_put_the_model_in_eval_mode_and_deterministic_restores():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten())
    net.train()
    mei.site_objective(net)
    assert not net.training and not net[1].training
    before = torch.are_deterministic_algorithms_enabled()
    with mei.deterministic():
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled() == before
