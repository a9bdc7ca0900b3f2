"""The HSM of Antolík et al. 2016 and the DNN variants of the NDN3 thesis, with R random seeds in one model.

Every layer holds its parameters with a leading seed dimension R (shape (R, ...)) and runs all seeds in one
batched op (matmul / grouped conv). Seed s's initial values are drawn from its own torch.Generator(seed=s) in
the same order as a one-seed model would draw them, so a model of seeds [0..49] equals 50 one-seed models
stacked. The loss summed over seeds keeps the seeds' gradients apart, and Adam is elementwise, so training
the stack is training each seed alone (tests/test_ndn_models.py checks it), at a fraction of the cost.

Layer inputs are either shared by all seeds, (B, ...), or per seed, (R, B, ...); outputs are (R, B, ...).

The HSM (Antolík et al. 2016, PLOS Comput Biol 12(6): e1004927, Fig. 1 and Methods):
    image 31×31 → DoG(9 filters, linear) → Linear(int(0.2·N)) softplus → Linear(N) softplus
with the DoG filter k over pixel grid x (column), y (row) = 0..30:
    G(a, s)(x, y) = a · exp(−((x−ux)² + (y−uy)²) / (2s)) / (2πs)     (s acts as a variance, as in the Theano
    filter_k = G(α1, σ1) − G(α2, σ1 + σ2)                             HSM's TheanoVisionModel.py and NDN3's
                                                                      layer.py DoG layer; concentric centres)
Bounds are enforced by clamping in the forward pass (NDN3's way): α ≥ eps, σ ∈ [1, int(0.82·31) = 25],
centres ∈ [2, 29]. A clamped parameter gets zero gradient (the original HSM used a bounded optimiser).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ndn_baselines import experiments
from ndn_baselines.losses import penalty

ALPHA_EPS = float(np.finfo(float).eps)  # NDN3: lower bound of α is float64 eps
ACTS = {"lin": lambda x: x, "softplus": F.softplus}


# ----------------------------------------------------------------------------- per-seed initialisation


def make_generators(seeds) -> list[torch.Generator]:
    """One CPU generator per seed. It draws that seed's initial weights, then its minibatch order and dropout
    masks, so every random number of seed s is the same whether it trains alone or in a stack."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _stack(gens, draw) -> torch.Tensor:
    """Stack one float64 draw per seed: (R, *shape)."""
    return torch.stack([draw(g) for g in gens])


def normal_init(gens, shape, std=0.1) -> torch.Tensor:
    return _stack(gens, lambda g: torch.randn(shape, generator=g, dtype=torch.float64) * std)


def bias_init(gens, n, kind: str) -> torch.Tensor:
    """'zeros' (bl1, bl2); 'normal' = N(0, 0.1²), what NDN3 runs for 'trunc_normal' biases (bl3, bl4: the code
    does NOT take abs, slug trunc-normal-bias); 'abs_normal' = |N(0, 0.1²)|, what the thesis text describes."""
    if kind == "zeros":
        return torch.zeros(len(gens), n, dtype=torch.float64)
    if kind == "normal":
        return normal_init(gens, (n,))
    if kind == "abs_normal":
        return normal_init(gens, (n,)).abs()
    raise ValueError(f"unknown bias_init {kind!r}; expected zeros|normal|abs_normal")


def tf_clip(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """tf.clip_by_value semantics, max(min(x, hi), lo): with lo > hi it returns lo (the frozen-σ bug relies on it).
    Outside [lo, hi] the gradient is zero."""
    return torch.clamp(torch.clamp(x, max=hi), min=lo)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Flatten the per-example dims. Layer inputs are (B, D) or (B, C, H, W) when shared by all seeds and
    (R, B, D) or (R, B, C, H, W) per seed, so an even rank means shared: → (B, D); odd: → (R, B, D)."""
    return x.flatten(1) if x.dim() % 2 == 0 else x.flatten(2)


class _Project(torch.autograd.Function):
    """y = x · Fᵀ for filters F (R, K, D) and inputs x (B, D) shared or (R, B, D) per seed → (R, B, K).

    The same maths as torch.matmul(x, F.transpose(1, 2)); written out so that both passes use the operand
    layouts MKL's batched GEMM is fast at: forward (F·xᵀ)ᵀ, backward dF = dyᵀ·x (autograd's default,
    (xᵀ·dy)ᵀ, was ~5× slower on CPU and was the largest single cost with 50 seeds).
    """

    @staticmethod
    def forward(ctx, x, f):
        ctx.save_for_backward(x, f)
        R, K, D = f.shape
        if x.dim() == 2:  # shared input: one GEMM against all seeds' filters
            return (x @ f.reshape(R * K, D).t()).reshape(len(x), R, K).transpose(0, 1)
        return torch.bmm(f, x.transpose(1, 2)).transpose(1, 2)  # (F·xᵀ)ᵀ: ~2× faster than x·Fᵀ in MKL

    @staticmethod
    def backward(ctx, dy):
        x, f = ctx.saved_tensors
        R, K, D = f.shape
        dx = df = None
        if x.dim() == 2:
            dy2 = dy.transpose(0, 1).reshape(len(x), R * K)
            if ctx.needs_input_grad[1]:
                df = (dy2.t() @ x).reshape(R, K, D)
            if ctx.needs_input_grad[0]:
                dx = dy2 @ f.reshape(R * K, D)
        else:
            if ctx.needs_input_grad[1]:
                df = torch.bmm(dy.transpose(1, 2).contiguous(), x)
            if ctx.needs_input_grad[0]:
                dx = torch.bmm(dy, f)
        return dx, df


# ----------------------------------------------------------------------------- DoG filters


class DoGBank(nn.Module):
    """R×K difference-of-Gaussians filters on a size×size grid, 6 effective parameters per filter.

    NDN3 stores 8 values per filter (α, σ, ux, uy for both Gaussians) of which ux2, uy2 are never used (the
    Gaussians are concentric); `count_parameters(layout="ndn3")` counts those too. The Gaussians are separable,
    so a filter is an outer product of two 1-D profiles: 4·size exps per filter instead of 2·size².

    Options reproducing the original's quirks (defaults = the paper's intent; README "Original quirks"):
    - sigma_bug (slug dog-sigma-bounds): from NDN3 commit 60c4fa2 (petrroll/NDN3 layer.py, 2020-10-24, pinned by
      msc-neuro) the DoG layer computes its σ bounds from the 8-values-per-filter shape as (1, 0), and
      tf.clip_by_value then returns 1: both widths frozen at σ1 = 1, surround 1 + 1 = 2. The thesis' bl1–bl4
      runs (Jul–Sep 2020) predate it and used (1, 25).
    - uy_init_bug (slug dog-uy-init): NDN3's layer.py initialises uy as U(2, 29) + 2, so ~7% of the filters start
      clamped at 29, with zero gradient.
    - degenerate_bounds_bug (slug convdog-degenerate-bounds): for a kernel of size 3 the centre bounds are (2, 1);
      TF clips every centre to 2, an edge pixel. By default such bounds collapse to the kernel centre instead.
    """

    def __init__(self, gens, n_filters: int, size: int, sigma_bug=False, uy_init_bug=False, degenerate_bounds_bug=False):
        super().__init__()
        self.size, self.n_filters = size, n_filters
        self.sigma_bounds = (1.0, 0.0) if sigma_bug else (1.0, float(int(0.82 * size)))
        lo, hi = 2.0, float(size - 2)
        if lo > hi and not degenerate_bounds_bug:
            lo = hi = (size - 1) / 2
        self.centre_bounds = (lo, hi)
        K, (s_lo, s_hi) = n_filters, self.sigma_bounds

        def draw(g):  # per seed, in NDN3's order: α, σ, ux, uy of the centre, then α, σ of the surround
            u = lambda a, b: a + (b - a) * torch.rand(K, generator=g, dtype=torch.float64)
            a1, s1, ux, uy = u(ALPHA_EPS, 10.0), u(s_lo, s_hi), u(lo, hi), u(lo, hi) + (2.0 if uy_init_bug else 0.0)
            a2, s2 = u(ALPHA_EPS, 10.0), u(s_lo, s_hi)
            return torch.stack([a1, s1, ux, uy, a2, s2])

        p = _stack(gens, draw)  # (R, 6, K)
        names = ["alpha1", "sigma1", "ux", "uy", "alpha2", "sigma2"]
        for i, name in enumerate(names):
            setattr(self, name, nn.Parameter(p[:, i].clone()))
        self.register_buffer("grid", torch.arange(size, dtype=torch.float64), persistent=False)

    def clamped(self):
        """The parameters as the filter sees them (bounds applied)."""
        s_lo, s_hi = self.sigma_bounds
        c_lo, c_hi = self.centre_bounds
        a1 = torch.clamp(self.alpha1, min=ALPHA_EPS)  # no upper bound on α (NDN3)
        a2 = torch.clamp(self.alpha2, min=ALPHA_EPS)
        s1 = tf_clip(self.sigma1, s_lo, s_hi)
        s2 = s1 + tf_clip(self.sigma2, s_lo, s_hi)  # the surround is always the wider one
        return a1, s1, tf_clip(self.ux, c_lo, c_hi), tf_clip(self.uy, c_lo, c_hi), a2, s2

    def filters(self) -> torch.Tensor:
        """(R, K, size, size), indexed [.., y (row), x (column)]."""
        a1, s1, ux, uy, a2, s2 = self.clamped()
        g = self.grid.to(a1.dtype)
        dx2 = (g - ux[..., None]) ** 2  # (R, K, size)
        dy2 = (g - uy[..., None]) ** 2

        # Each Gaussian is an outer product of a row and a column profile, so the DoG is a rank-2 matrix:
        # filter = [gy1 gy2] @ [c1·gx1 ; −c2·gx2], one small batched matmul instead of several full-size
        # elementwise passes (forward and backward), which dominated the cost with 50 seeds.
        s = torch.stack([s1, s2], -1)[..., None]  # (R, K, 2, 1)
        gy = torch.exp(-dy2[..., None, :] / (2 * s))  # (R, K, 2, size)
        gx = torch.exp(-dx2[..., None, :] / (2 * s))
        c = torch.stack([a1, -a2], -1) / (2 * math.pi * s[..., 0])  # (R, K, 2): +centre, −surround
        return torch.matmul(gy.transpose(-1, -2), c[..., None] * gx)


class DoG(nn.Module):
    """The HSM's first layer: K DoG filters over the whole image + bias, linear by default (bs4_exp3: softplus).
    NDN3's DoG layers ignore regularization."""

    def __init__(self, gens, in_shape, n_filters, act="lin", bias="zeros", **dog_flags):
        super().__init__()
        C, H, W = in_shape
        if C != 1 or H != W:
            raise ValueError(f"DoG layer expects a square one-channel image, got input shape {in_shape}")
        self.bank = DoGBank(gens, n_filters, H, **dog_flags)
        self.bias = nn.Parameter(bias_init(gens, n_filters, bias))
        self.act, self.out_shape = act, (n_filters, 1, 1)

    def forward(self, x):
        R, K = self.bias.shape
        f = self.bank.filters().reshape(R, K, -1)  # (R, K, 961)
        x = _flat(x)  # images arrive as (B, 1, 31, 31) or (R, B, 1, 31, 31)
        return ACTS[self.act](_Project.apply(x, f) + self.bias[:, None, :])

    def penalty(self):
        return self.bias.new_zeros(self.bias.shape[0])


# ----------------------------------------------------------------------------- dense layers


class Linear(nn.Module):
    """Dense layer y = act(x·W + b), W ~ N(0, 0.1²), with NDN3's per-layer regularizers and optional dropout.

    Dropout (thesis bs3_exp11; slug dropout-keep-prob) is a DROP probability here; NDN3's 'dropout' value is the
    KEEP probability (msc-neuro's first bs3_exp11 runner passed drop-probabilities, so its 0 meant "drop
    everything"; bs3_exp11_2 passed 1−p).
    As in NDN3 it acts on the layer's outputs with one mask per minibatch (noise_shape [1, units]) and scales
    the kept units by 1/(1−p); each seed draws its mask from its own generator.
    """

    def __init__(self, gens, in_shape, units, act="softplus", bias="zeros", reg=None, dropout=0.0):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), (units, 1, 1)
        n_in = int(np.prod(in_shape))
        # stored (R, units, inputs): each unit's weights contiguous (see _Project); drawn as NDN3's (inputs, units)
        self.weight = nn.Parameter(normal_init(gens, (n_in, units)).transpose(1, 2).contiguous())
        self.bias = nn.Parameter(bias_init(gens, units, bias))
        self.act, self.reg, self.dropout = act, dict(reg or {}), float(dropout)
        self.gens = gens  # shared with the training loop (not module state; saved separately)

    def forward(self, x):
        y = ACTS[self.act](_Project.apply(_flat(x), self.weight) + self.bias[:, None, :])
        if self.training and self.dropout > 0:
            keep = _stack(self.gens, lambda g: torch.rand(1, y.shape[-1], generator=g, dtype=torch.float64))
            y = y * (keep >= self.dropout).to(y) / (1.0 - self.dropout)
        return y

    def filter_view(self):
        R, units, _ = self.weight.shape
        return self.weight.reshape(R, units, *self.in_shape)

    def penalty(self):
        return penalty(self.filter_view(), self.reg)


class LinScale(nn.Module):
    """y = w·x + b with scalar w = 1, b = 0 at init (thesis bs3_exp10 'lin_scale', NDN3 LinScale): lets the
    network learn the input scale, which matters only for unnormalised inputs."""

    def __init__(self, gens, in_shape):
        super().__init__()
        R = len(gens)
        self.weight = nn.Parameter(torch.ones(R, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(R, dtype=torch.float64))
        self.in_shape = self.out_shape = tuple(in_shape)

    def forward(self, x):
        shape = (-1,) + (1,) * (x.dim() if x.dim() % 2 == 0 else x.dim() - 1)  # shared inputs gain the R axis
        return x * self.weight.view(shape) + self.bias.view(shape)

    def penalty(self):
        return self.weight.new_zeros(self.weight.shape[0])


class SepLinear(nn.Module):
    """Separable readout (NDN3 'sep'): weight[c, pixel, unit] = space[pixel, unit] · chan[c, unit] / ‖chan[:, unit]‖.

    Regularizers: l1/l2 on the concatenated raw masks (NDN3), d2x and max on the spatial mask (NDN3's d2x and
    max_space), max_filt on the channel mask.
    """

    def __init__(self, gens, in_shape, units, act="softplus", bias="zeros", reg=None):
        super().__init__()
        C, H, W = in_shape
        self.in_shape, self.out_shape = tuple(in_shape), (units, 1, 1)
        self.chan = nn.Parameter(normal_init(gens, (C, units)))
        self.space = nn.Parameter(normal_init(gens, (H * W, units)))
        self.bias = nn.Parameter(bias_init(gens, units, bias))
        self.act, self.reg = act, dict(reg or {})

    def dense_weight(self):
        """(R, units, C·H·W): each unit's weights in the (C, H, W) flatten order of the input."""
        chan = self.chan / self.chan.norm(dim=1, keepdim=True).clamp_min(1e-12)
        R, C, U = chan.shape
        return (chan.transpose(1, 2)[:, :, :, None] * self.space.transpose(1, 2)[:, :, None, :]).reshape(R, U, -1)

    def forward(self, x):
        return ACTS[self.act](_Project.apply(_flat(x), self.dense_weight()) + self.bias[:, None, :])

    def penalty(self):
        R, C, U = self.chan.shape
        _, H, W = self.in_shape
        both = torch.cat([self.chan, self.space], dim=1).transpose(1, 2).reshape(R, U, -1, 1, 1)
        space = self.space.transpose(1, 2).reshape(R, U, 1, H, W)
        chan = self.chan.transpose(1, 2).reshape(R, U, C, 1, 1)
        reg = self.reg
        return (penalty(both, {k: reg[k] for k in ("l1", "l2") if k in reg})
                + penalty(space, {k: reg[k] for k in ("d2x", "max") if k in reg})
                + penalty(chan, {"max_filt": reg.get("max_filt", 0.0)}))


# ----------------------------------------------------------------------------- convolutions


def same_padding(size: int, k: int, stride: int):
    """TF 'SAME': out = ceil(size/stride), total pad = max((out−1)·stride + k − size, 0), the extra pixel AFTER
    (TensorFlow's conv2d padding='SAME'; PyTorch's symmetric padding would shift the grid by one pixel for even totals)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, total // 2, total - total // 2


def seed_conv(x, weight, bias, stride, size):
    """Conv of every seed's input with its own kernels in ONE grouped conv.

    x (B, C, H, W) shared or (R, B, C, H, W); weight (R, F, C, k, k); bias (R, F) → (R, B, F, H', W').
    """
    R, Fo, C, k, _ = weight.shape
    _, before, after = same_padding(size, k, stride)
    if x.dim() == 4:  # shared input: a plain conv with R·F output channels
        y = F.conv2d(F.pad(x, (before, after, before, after)), weight.reshape(R * Fo, C, k, k), stride=stride)
    else:  # per-seed inputs: seeds become conv groups
        B = x.shape[1]
        x = x.transpose(0, 1).reshape(B, R * C, *x.shape[-2:])
        y = F.conv2d(F.pad(x, (before, after, before, after)), weight.reshape(R * Fo, C, k, k), stride=stride, groups=R)
    y = y.reshape(y.shape[0], R, Fo, *y.shape[-2:]).transpose(0, 1)
    return y + bias[:, None, :, None, None]


class Conv(nn.Module):
    """Conv layer with TF-SAME padding, stride (k+1)//2 by default (thesis bs3_exp6/7, bs4_exp5), N(0, 0.1²) init."""

    def __init__(self, gens, in_shape, filters, k, stride=None, act="softplus", bias="zeros", reg=None):
        super().__init__()
        C, H, W = in_shape
        if H != W:
            raise ValueError(f"conv layers expect square inputs, got {in_shape}")
        self.k, self.stride, self.size = k, stride or (k + 1) // 2, H
        out, _, _ = same_padding(H, k, self.stride)
        self.in_shape, self.out_shape = tuple(in_shape), (filters, out, out)
        self.weight = nn.Parameter(normal_init(gens, (filters, C, k, k)))
        self.bias = nn.Parameter(bias_init(gens, filters, bias))
        self.act, self.reg = act, dict(reg or {})

    def forward(self, x):
        return ACTS[self.act](seed_conv(x, self.weight, self.bias, self.stride, self.size))

    def penalty(self):
        return penalty(self.weight, self.reg)


class ConvDoG(nn.Module):
    """Convolutional DoG (thesis bs4_exp9/10): K DoG kernels of size k (σ ≤ int(0.82k), centres in [2, k−2])
    slid over the image with stride (k+1)//2 and TF-SAME padding. Ignores regularization like NDN3's DoG."""

    def __init__(self, gens, in_shape, filters, k, stride=None, act="lin", bias="zeros", **dog_flags):
        super().__init__()
        C, H, W = in_shape
        if C != 1:
            raise ValueError(f"conv DoG expects a one-channel image, got {in_shape}")
        self.stride, self.size = stride or (k + 1) // 2, H
        out, _, _ = same_padding(H, k, self.stride)
        self.bank = DoGBank(gens, filters, k, **dog_flags)
        self.bias = nn.Parameter(bias_init(gens, filters, bias))
        self.in_shape, self.out_shape, self.act = tuple(in_shape), (filters, out, out), act

    def forward(self, x):
        w = self.bank.filters().unsqueeze(2)  # (R, K, 1, k, k)
        return ACTS[self.act](seed_conv(x, w, self.bias, self.stride, self.size))

    def penalty(self):
        return self.bias.new_zeros(self.bias.shape[0])


# ----------------------------------------------------------------------------- the network and its builder


class SeedNet(nn.Module):
    """A feed-forward stack with R seeds: forward (B, 1, 31, 31) or (R, B, 1, 31, 31) → (R, B, N) rates.
    `penalty()` is each seed's regularization, (R,)."""

    def __init__(self, layers, seeds, in_shape):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.seeds, self.in_shape = list(seeds), tuple(in_shape)

    @property
    def n_seeds(self):
        return len(self.seeds)

    def forward(self, x):
        if x.shape[-1] != self.in_shape[-1]:  # flat 961-pixel rows → images
            x = x.reshape(*x.shape[:-1], *self.in_shape)
        for layer in self.layers:
            x = layer(x)
        return x

    def penalty(self):
        return sum(layer.penalty() for layer in self.layers)


ARCHS = ("hsm", "conv", "conv_dog", "ln", "lnln", "whatwhere")

# The defaults of what a model reads: experiments.Settings, the one place where defaults live.
MODEL_DEFAULTS = {k: experiments.DEFAULTS[k] for k in experiments.MODEL_KEYS}


def hidden_units(ratio: float, n_neurons: int) -> int:
    """int(ratio·N) as in the thesis: 20/11/20 for N = 103/55/102 at ratio 0.2 (at least 1 unit)."""
    return max(1, int(ratio * n_neurons))


def build_model(cfg: dict, n_neurons: int, seeds, image_size: int = 31, gens=None) -> SeedNet:
    """Build the network named by cfg['arch'] for N neurons and the given seeds.

    Regularizers come from cfg['reg'] = {layer_name: {type: λ}} with layer names
      'conv' (every conv layer), 'hidden' (the hidden dense/sep layer; LNLN's first layer), 'out' (the output
      layer; the LN model's only layer; what/where's sep readout). DoG layers take none (as in NDN3).
    `gens` (one generator per seed, `make_generators(seeds)`) continue to drive the seed's data order and
    dropout after initialisation; made here if not given.
    """
    cfg = {**MODEL_DEFAULTS, **cfg}
    if isinstance(cfg["reg"], (list, tuple)):  # "LAYER.TYPE=λ" entries, as in the settings
        cfg["reg"] = experiments.parse_reg(cfg["reg"])
    gens = gens if gens is not None else make_generators(seeds)
    if len(gens) != len(seeds):
        raise ValueError("one generator per seed expected")
    reg = {k: dict(v) for k, v in (cfg["reg"] or {}).items()}
    unknown = set(reg) - {"conv", "hidden", "out"}
    if unknown:
        raise ValueError(f"unknown layer name(s) {sorted(unknown)} in reg; expected conv|hidden|out")
    if reg.get("dog") or (cfg["arch"] in ("hsm", "conv_dog") and any(reg.get("conv", {}).values())):
        raise ValueError("DoG layers take no regularization (NDN3 ignores it)")
    bias, arch = cfg["bias_init"], cfg["arch"]
    dog_flags = dict(sigma_bug=cfg["dog_sigma_bug"], uy_init_bug=cfg["dog_uy_init_bug"])
    shape, layers = (1, image_size, image_size), []

    def add(layer):
        nonlocal shape
        layers.append(layer)
        shape = layer.out_shape

    if cfg["lin_scale"]:
        add(LinScale(gens, shape))
    if arch == "hsm":
        add(DoG(gens, shape, cfg["n_dog"], act=cfg["dog_act"], bias=bias, **dog_flags))
    elif arch == "conv":
        for _ in range(cfg["conv_layers"]):
            add(Conv(gens, shape, cfg["conv_filters"], cfg["conv_size"], cfg["conv_stride"] or None,
                     act=cfg["conv_act"], bias=bias, reg=reg.get("conv")))
    elif arch == "conv_dog":
        add(ConvDoG(gens, shape, cfg["conv_filters"], cfg["conv_size"], cfg["conv_stride"] or None, act=cfg["conv_act"],
                    bias=bias, degenerate_bounds_bug=cfg["convdog_bounds_bug"], **dog_flags))
    elif arch == "whatwhere":
        # Klindt et al. 2017 without batch norm (thesis bs4_exp6-8): 3 conv layers of 48 maps, 13/3/3 px,
        # softplus, then a separable (what × where) readout per neuron.
        for k, stride in ((13, cfg["conv_stride"] or 2), (3, 1), (3, 1)):
            add(Conv(gens, shape, cfg["conv_filters"], k, stride, act=cfg["conv_act"], bias=bias, reg=reg.get("conv")))
        add(SepLinear(gens, shape, n_neurons, act="softplus", bias=bias, reg=reg.get("out")))
        return SeedNet(layers, seeds, (1, image_size, image_size))
    elif arch == "ln":
        add(Linear(gens, shape, n_neurons, act="softplus", bias=bias, reg=reg.get("out")))
        return SeedNet(layers, seeds, (1, image_size, image_size))
    elif arch != "lnln":
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    # the hidden layer (LNLN: directly on the image) and the softplus output layer
    units = hidden_units(cfg["hidden_ratio"], n_neurons)
    if cfg["hidden_type"] == "sep":
        add(SepLinear(gens, shape, units, act="softplus", bias=bias, reg=reg.get("hidden")))
    elif cfg["hidden_type"] == "normal":
        add(Linear(gens, shape, units, act="softplus", bias=bias, reg=reg.get("hidden"), dropout=cfg["dropout"]))
    else:
        raise ValueError(f"unknown hidden_type {cfg['hidden_type']!r}; expected normal|sep")
    add(Linear(gens, shape, n_neurons, act="softplus", bias=bias, reg=reg.get("out")))
    return SeedNet(layers, seeds, (1, image_size, image_size))


def count_parameters(model: SeedNet, layout: str = "effective") -> int:
    """Parameters of ONE seed. layout 'ndn3' adds the 2 unused centre values NDN3 stores per DoG filter
    (bl4 on region 1: 2,426 effective, 2,444 in NDN3's layout)."""
    R = model.n_seeds
    n = sum(p.numel() for p in model.parameters()) // R
    if layout == "ndn3":
        n += sum(2 * m.n_filters for m in model.modules() if isinstance(m, DoGBank))
    elif layout != "effective":
        raise ValueError("layout must be 'effective' or 'ndn3'")
    return n

