"""The V1-component ResNet50 zoo of Pogoncheff, Granley & Beyeler (NeurIPS 2023),
"Explaining V1 Properties with a Biologically Constrained Deep Learning Architecture".

Five components, each reimplemented from the maths of the paper and its release (github.com/gpogoncheff/
explaining_v1, utils/*.py and models/*.py) with the release's parameter layouts, names and initialisation, so
parameter counts and init distributions match the original:

  DoGConv2d / DoGLayer      center-surround antagonism: 5x5 difference-of-Gaussians conv on the first
                            16 of 64 channels (the rest pass through)
  LocallyConnected2d        local receptive fields: unshared 3x3 weights per output position
  TunedNorm                 tuned ("opponent channel") divisive normalization across channels
  StdDivNorm                standard divisive normalization (Cirincione et al. 2022)
  PolarTransform            cortical magnification: mask average-pooling onto a polar grid

and `build_model(model_type, num_classes)` for the 13 model types of the original CLI, all on
torchvision's ResNet50 (v1.5, [3, 4, 6, 3]); every input is 64x64, so layer1 runs at 16x16.

Speed: the original computes LocallyConnected2d and PolarTransform as broadcast products with
~1.2e9-element intermediates at batch 128; here they are one batched matmul each (F.unfold + bmm, and
(N*C, 1024) @ (1024, 540)). The naive broadcast forms are kept (`lc_broadcast`, `polar_broadcast`) as
test references and for the benchmark.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck, ResNet, conv1x1

DOG_FORMS = ("textbook", "original")
POLAR_VARIANTS = ("release", "brainscore")
TUNED_CENTERS = ("opposite", "self")


# ----------------------------------------------------------------------------- center-surround (DoG)


class DoGConv2d(nn.Module):
    """Difference-of-Gaussians convolution, one learnable kernel per (out, in) channel pair.

    Parameter layout of the original `DoGConv2D` (per kernel: s1, s2, a; shapes (out*in, 1, 1)):
      sigma1 ~ U(0,1) + k/2, sigma2_scale ~ U(0,1) + k/2, total_scale ~ 2 N(0,1),
      kernel_dists: squared distance to the kernel centre (frozen Parameter, counted in totals),
      bias: zeros (frozen Parameter when bias=False, as in the original).
    σ1 = max(s1, 0.1), σ2 = σ1 · max(s2, 1 + 1e-4).

    form="textbook" (default, the paper's intent):  K = a [ e^{-d²/σ1}/(πσ1) − e^{-d²/σ2}/(πσ2) ],
        two unit-mass Gaussians (∫ e^{-r²/σ} = πσ): positive centre, negative surround for a > 0.
    form="original": K = a [ (σ1/π) e^{-d²/σ1} − (σ2/π) e^{-d²/σ2} ]  — the released code writes
        `1/torch.pi*sigma`, i.e. σ/π; the bracket is then negative everywhere (single-signed blob).
    Both forms then L2-normalise across all kernels at each of the (2k+1)² pixels, as the release does.
    """

    def __init__(self, channels: int, k: int = 2, padding: int = 2, form: str = "textbook"):
        super().__init__()
        if form not in DOG_FORMS:
            raise ValueError(f"dog form {form!r} not in {DOG_FORMS}")
        self.channels, self.k, self.padding, self.form = channels, int(k), padding, form
        self.kernel_size = 2 * self.k + 1
        r = torch.arange(self.kernel_size, dtype=torch.float32) - self.k
        self.kernel_dists = nn.Parameter(r[None, :] ** 2 + r[:, None] ** 2, requires_grad=False)
        n = channels * channels
        self.sigma1 = nn.Parameter(torch.rand(n, 1, 1) + self.k / 2)
        self.sigma2_scale = nn.Parameter(torch.rand(n, 1, 1) + self.k / 2)
        self.total_scale = nn.Parameter(torch.randn(n, 1, 1) * 2.0)
        self.bias = nn.Parameter(torch.zeros(channels), requires_grad=False)

    def kernels(self) -> torch.Tensor:
        """The (out, in, 2k+1, 2k+1) conv weight."""
        s1 = self.sigma1.clamp(min=0.1)
        s2 = s1 * self.sigma2_scale.clamp(min=1 + 1e-4)
        d2 = self.kernel_dists
        if self.form == "textbook":
            g1, g2 = torch.exp(-d2 / s1) / (math.pi * s1), torch.exp(-d2 / s2) / (math.pi * s2)
        else:  # dog-sigma-precedence: the release's utils/DoG.py writes 1/torch.pi*sigma = sigma/pi
            g1, g2 = (s1 / math.pi) * torch.exp(-d2 / s1), (s2 / math.pi) * torch.exp(-d2 / s2.clamp(min=1e-6))
        kern = F.normalize((g1 - g2) * self.total_scale, dim=0)
        return kern.view(self.channels, self.channels, self.kernel_size, self.kernel_size)

    def forward(self, x):
        w = self.kernels().to(x.dtype)
        return F.conv2d(x, w, self.bias.to(x.dtype), padding=self.padding)


class DoGLayer(nn.Module):
    """DoG on the first `dog_channels` channels; the remaining channels pass through unchanged."""

    def __init__(self, dog_channels: int = 16, k: int = 2, form: str = "textbook"):
        super().__init__()
        self.dog_channels = dog_channels
        self.dog_conv = DoGConv2d(dog_channels, k=k, padding=k, form=form)

    def forward(self, x):
        return torch.cat([self.dog_conv(x[:, : self.dog_channels]), x[:, self.dog_channels:]], dim=1)


class ConvDoG(nn.Module):
    """Composite models' conv2: 3x3 conv then DoG (keys `conv.*`, `dog.dog_conv.*` as in the release)."""

    def __init__(self, planes: int, form: str = "textbook"):
        super().__init__()
        self.conv = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.dog = DoGLayer(dog_channels=planes // 4, k=2, form=form)

    def forward(self, x):
        return self.dog(self.conv(x))


# ----------------------------------------------------------------------------- local receptive fields


class LocallyConnected2d(nn.Module):
    """Convolution without weight sharing: a separate k×k×in filter bank at every output position.

    weight: (1, out, in, H_out, W_out, k*k) with the patch index row-major over (kh, kw) and randn
    (std 1) init — the release's layout. Forward = F.unfold (im2col) + one batched matmul over the
    H_out*W_out positions: (L, N, in*k*k) @ (L, in*k*k, out). The release instead materialises an
    (N, out, in, H, W, k*k) broadcast product (1.2e9 elements at N=128); `lc_broadcast` keeps that form.
    """

    def __init__(self, in_channels, out_channels, output_size, kernel_size=3, stride=1, padding=1, bias=False):
        super().__init__()
        oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.in_channels, self.out_channels, self.output_size = in_channels, out_channels, (oh, ow)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, oh, ow, kernel_size ** 2))
        self.bias = nn.Parameter(torch.randn(1, out_channels, oh, ow)) if bias else None

    def forward(self, x):
        n, c, h, w = x.shape
        oh, ow = self.output_size
        k, s, p = self.kernel_size, self.stride, self.padding
        if c != self.in_channels or (h + 2 * p - k) // s + 1 != oh or (w + 2 * p - k) // s + 1 != ow:
            raise ValueError(f"LocallyConnected2d built for {self.in_channels} channels -> {oh}x{ow} outputs, "
                             f"got input {tuple(x.shape)}")
        cols = F.unfold(x, k, padding=p, stride=s)                        # (N, in*k*k, L), index c*k*k + kh*k + kw
        # (1, out, in, H, W, k*k) → (H*W, in*k*k, out); cast first so the copy moves half the bytes under bf16
        wt = self.weight.view(self.weight.shape[1:]).to(cols.dtype).permute(2, 3, 1, 4, 0)
        wt = wt.reshape(oh * ow, c * k * k, self.out_channels)
        out = torch.bmm(cols.permute(2, 0, 1).contiguous(), wt)            # (L, N, out)
        out = out.view(oh, ow, n, self.out_channels).permute(2, 3, 0, 1)  # (N, out, H, W), strided
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and c > 1 \
            else torch.contiguous_format
        out = out.contiguous(memory_format=fmt)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out


def lc_broadcast(x, weight, kernel_size=3, stride=1, padding=1, bias=None):
    """The release's LocallyConnected2d forward (reference only: memory O(N·out·in·H·W·k²))."""
    x = F.pad(x, (padding,) * 4)
    x = x.unfold(2, kernel_size, stride).unfold(3, kernel_size, stride)   # (N, in, H, W, k, k)
    x = x.contiguous().view(*x.shape[:-2], -1)
    out = (x.unsqueeze(1) * weight).sum([2, -1])
    return out + bias if bias is not None else out


# ----------------------------------------------------------------------------- divisive normalization


class TunedNorm(nn.Module):
    """Tuned normalization (the release's `OpponentChannelInhibition`): y_i = x_i / (1 + Σ_j G_ij x_j).

    q_j = |j − n//2|, D_ij = q[(j − i) mod n] (circulant, frozen Parameter `channel_distances`),
    σ_j ~ U(0,1) + n/8 per input channel (clamped ≥ 0.5), G_ij ∝ N(D_ij; 0, σ_j) with every column
    normalised to sum 1. With the release's D, D_ii = n/2 is the largest distance and D = 0 at
    j = i + n/2: each channel is inhibited mostly by the channel opposite it on the ring
    (tuned-norm-opposite; center="opposite", default — this is the scored model). center="self" uses the circular distance
    min(|i−j|, n−|i−j|) instead, so a channel is inhibited most by itself and its neighbours.
    """

    def __init__(self, n_channels: int, center: str = "opposite"):
        super().__init__()
        if center not in TUNED_CENTERS:
            raise ValueError(f"tuned-norm center {center!r} not in {TUNED_CENTERS}")
        n = n_channels
        self.n_channels, self.center = n, center
        i = torch.arange(n)
        off = (i[None, :] - i[:, None]) % n                    # (j - i) mod n
        if center == "opposite":
            dist = (off - n // 2).abs().float()
        else:
            dist = torch.minimum(off, n - off).float()
        self.channel_distances = nn.Parameter(dist, requires_grad=False)
        self.sigmas = nn.Parameter(torch.rand(n) + n / 8)

    def matrix(self) -> torch.Tensor:
        """G (n, n): G[i, j] is the weight of input channel j in the pool of output channel i."""
        s = self.sigmas.clamp(min=0.5)
        g = torch.exp(-self.channel_distances ** 2 / (2 * s ** 2)) / (math.sqrt(2 * math.pi) * s)
        return g / g.sum(dim=0, keepdim=True)

    def forward(self, x):
        g = self.matrix().to(x.dtype).view(self.n_channels, self.n_channels, 1, 1)
        return x / (F.conv2d(x, g) + 1)


class StdDivNorm(nn.Module):
    """Standard divisive normalization (Cirincione et al. 2022): y = x / (conv(x, G) + |b|).

    Per (out, in) pair an oriented Gaussian on a k×k grid with coordinates 1..k (the release's layout,
    six (C, C, 1, 1) Parameters + a scalar bias = 6·C² + 1 parameters):
      G = |A / max(2πρσ, 0.1)| · exp(−½[(x′−v)²/max(ρ², 0.1) + (y′−w)²/max(σ², 0.1)]),
      x′ = x cosθ + y sinθ, y′ = −x sinθ + y cosθ;
      A ~ U(0,1), ρ, σ ~ U(0,1)+1, θ ~ U(0,2π), v, w ~ N(0,1) + k//2, b ~ U(0,1)+1.
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        coords = torch.arange(1, kernel_size + 1, dtype=torch.float32)
        self.register_buffer("x_coords", coords.repeat(kernel_size, 1))
        self.register_buffer("y_coords", coords.view(-1, 1).repeat(1, kernel_size))
        shape = (channels, channels, 1, 1)
        self.A = nn.Parameter(torch.rand(shape))
        self.rho = nn.Parameter(torch.rand(shape) + 1.0)
        self.sigma = nn.Parameter(torch.rand(shape) + 1.0)
        self.theta = nn.Parameter(torch.rand(shape) * 2 * math.pi)
        self.v = nn.Parameter(torch.randn(shape) + kernel_size // 2)
        self.w = nn.Parameter(torch.randn(shape) + kernel_size // 2)
        self.bias = nn.Parameter(torch.rand(1) + 1.0)

    def kernels(self) -> torch.Tensor:
        c, s = torch.cos(self.theta), torch.sin(self.theta)
        xr = self.x_coords * c + self.y_coords * s
        yr = -self.x_coords * s + self.y_coords * c
        q = (xr - self.v) ** 2 / (self.rho ** 2).clamp(min=0.1) + (yr - self.w) ** 2 / (self.sigma ** 2).clamp(min=0.1)
        amp = (self.A / (2 * math.pi * self.rho * self.sigma).clamp(min=0.1)).abs()
        return amp * torch.exp(-0.5 * q)

    def forward(self, x):
        pool = F.conv2d(x, self.kernels().to(x.dtype), padding=self.kernel_size // 2)
        return x / (pool + self.bias.abs().to(x.dtype))


# ----------------------------------------------------------------------------- cortical magnification


# The release's polar grid for a 32x32 map: radius edges 0..11 then 12, 13, 14, 16, 18, 20, 23 (18 rings),
# angle edges linspace(0, 2π, 31) (30 sectors).
POLAR_RADIUS_EDGES = tuple(range(12)) + (12, 13, 14, 16, 18, 20, 23)
POLAR_N_ANGLES = 30


def polar_masks(size: int = 32, radius_edges=POLAR_RADIUS_EDGES, n_angles: int = POLAR_N_ANGLES,
                interpolate: bool = True, dtype=torch.float64):
    """Pooling masks (rings * sectors, size, size) and the number of non-empty sectors per ring (pre-interp.).

    Pixel (row, col) has x = col − size/2, y = size/2 − row, angle = atan2(y, x) in [0, 2π). A ring whose
    inner edge is ≤ size/2 has its non-empty sector masks linearly resampled (align_corners=False) to
    `n_angles` along the angle axis: the 1/8/16/20/24-pixel foveal rings are spread over 30 bins, which is
    the magnification of the fovea. The outer rings keep their empty sectors (count clamped to 1 → 0 out).
    The interpolation weights are computed in `dtype` (float64 by default: exact to double precision).
    """
    c = size // 2
    xs = (torch.arange(size) - c).float().repeat(size, 1)
    ys = (c - torch.arange(size)).float().view(-1, 1).repeat(1, size)
    dist = torch.sqrt(xs ** 2 + ys ** 2).flatten()
    ang = torch.atan2(ys, xs)
    ang = torch.where(ys < 0, ang + 2 * math.pi, ang).flatten()
    r_edges = torch.tensor(radius_edges, dtype=torch.float32)
    a_edges = torch.linspace(0, 2 * math.pi, n_angles + 1, dtype=torch.float64).float()
    in_ring = (dist[None] >= r_edges[:-1, None]) & (dist[None] < r_edges[1:, None])      # (R, P)
    in_sector = (ang[None] >= a_edges[:-1, None]) & (ang[None] < a_edges[1:, None])     # (A, P)
    masks = (in_ring[:, None] & in_sector[None]).to(dtype)                                # (R, A, P)
    nonempty = (masks.sum(-1) > 0).sum(-1)
    if interpolate:
        for r in range(len(radius_edges) - 1):
            if radius_edges[r] > c:
                continue
            keep = masks[r][masks[r].sum(-1) > 0]                                           # (k, P)
            masks[r] = F.interpolate(keep.t()[None], size=n_angles, mode="linear", align_corners=False)[0].t()
    return masks.reshape(-1, size, size), nonempty


class PolarTransform(nn.Module):
    """Cortical magnification: average-pool a 32x32 map onto 18 rings x 30 sectors, then resize to 16x16.

    out[n, c, r, a] = Σ_p x[n, c, p] m_ra[p] / max(Σ_p m_ra[p], 1), computed as one matmul
    (N·C, 1024) @ (1024, 540). Then the angle axis is reflect-padded by 1 (variant "release"; the
    Brain-Score copy `LPP49`, variant "brainscore", also reflect-pads the radius axis) and the map is
    resized bilinearly without antialiasing (torchvision's 2023 tensor default the release relied on).
    Buffers `pooling_masks` (540, 32, 32) and `pooling_mask_counts` (540,) keep the release's names; the
    release stores them in fp16, here fp32 (loading an fp16 checkpoint casts on copy). The forward uses
    `pool_weights`, the (1024, 540) averaging matrix built in float64 from the same grid (not saved: a constant)
    and cast to the input's dtype, so a float64 forward is float64-exact and a float32 one correctly rounded.
    """

    def __init__(self, input_size: int = 32, output_size: int = 16, variant: str = "release"):
        super().__init__()
        if variant not in POLAR_VARIANTS:
            raise ValueError(f"polar variant {variant!r} not in {POLAR_VARIANTS}")
        self.input_size, self.output_size, self.variant = input_size, output_size, variant
        masks, nonempty = polar_masks(input_size, dtype=torch.float64)
        self.n_radii, self.n_angles = len(POLAR_RADIUS_EDGES) - 1, POLAR_N_ANGLES
        self.nonempty_per_ring = nonempty.tolist()
        counts = masks.sum(dim=(1, 2))
        counts = torch.where(counts == 0, torch.ones_like(counts), counts)
        self.register_buffer("pooling_masks", masks.float())
        self.register_buffer("pooling_mask_counts", counts.float())
        self.register_buffer("pool_weights", (masks.flatten(1) / counts[:, None]).t().contiguous(), persistent=False)

    def pool_matrix(self, dtype=None) -> torch.Tensor:
        """(H*W, rings*sectors): the average-pooling weights in `dtype` (default: torch's default dtype)."""
        return self.pool_weights.to(dtype or torch.get_default_dtype())

    def finish(self, polar: torch.Tensor) -> torch.Tensor:
        """(N, C, rings, sectors) → padded and resized (N, C, out, out)."""
        if self.variant == "brainscore":
            polar = F.pad(polar, (0, 0, 1, 1), mode="reflect")
        polar = F.pad(polar, (1, 1, 0, 0), mode="reflect")
        return F.interpolate(polar, size=(self.output_size, self.output_size), mode="bilinear",
                             align_corners=False, antialias=False)

    def forward(self, x):
        n, c, h, w = x.shape
        if h != self.input_size or w != self.input_size:
            raise ValueError(f"PolarTransform built for {self.input_size}x{self.input_size} maps, got {h}x{w} "
                             f"(inputs must be 64x64 images)")
        polar = (x.reshape(n * c, h * w) @ self.pool_matrix(x.dtype)).view(n, c, self.n_radii, self.n_angles)
        out = self.finish(polar)
        return out.contiguous(memory_format=torch.channels_last) \
            if x.is_contiguous(memory_format=torch.channels_last) else out


def polar_broadcast(module: PolarTransform, x: torch.Tensor) -> torch.Tensor:
    """The release's form (reference only): broadcast x (N, C, 1, H, W) against all 540 masks, rebuilt in x's
    precision from the grid (independent of the module's pooling matrix)."""
    n, c = x.shape[:2]
    m = polar_masks(module.input_size, dtype=torch.float64)[0].to(x.dtype)
    polar = (x.unsqueeze(2) * m).sum(dim=(-1, -2)) / m.sum(dim=(-1, -2)).clamp(min=1)
    return module.finish(polar.view(n, c, module.n_radii, module.n_angles))


# ----------------------------------------------------------------------------- the ResNet50 zoo


class V1Bottleneck(Bottleneck):
    """torchvision's Bottleneck plus an optional normalization after the residual ReLU (`dn`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dn = nn.Identity()

    def forward(self, x):
        return self.dn(super().forward(x))


@dataclass(frozen=True)
class Spec:
    """Per-instance architecture flags (the release keeps these as mutable class attributes:
    class-attribute-flags, so building composite_d then composite_a gave an `a` without polar transform)."""
    dog_blocks: tuple = ()        # layer1 blocks whose conv2 gains a DoG stage
    dog_style: str = "composite"  # "sequential": conv2 = Sequential(conv, DoGLayer) (torchvision-based model)
    lc_block: int | None = None   # layer1 block whose conv2 becomes LocallyConnected2d
    lc_dropout: bool = False      # resnet50_local_rf puts Dropout2d(0.5) before the LC layer
    norm: str | None = None       # "tuned" | "div" after every layer1 block
    polar: bool = False           # PolarTransform instead of maxpool
    build_polar: bool = False     # composites always build the polar module (its buffers are in the state_dict)


_COMPOSITE = dict(build_polar=True)
SPECS = {
    "resnet50": Spec(),
    "resnet50_center_surround": Spec(dog_blocks=(0, 1, 2), dog_style="sequential"),
    "resnet50_local_rf": Spec(lc_block=2, lc_dropout=True),
    "resnet50_cortical_magnification": Spec(polar=True, build_polar=True),
    "resnet50_tuned_norm": Spec(norm="tuned", **_COMPOSITE),
    "resnet50_div_norm": Spec(norm="div", **_COMPOSITE),
    # a: all four components (the Brain-Score-scored model); b..g drop one or two.
    "resnet50_composite_a": Spec(dog_blocks=(0, 1), lc_block=2, norm="tuned", polar=True, **_COMPOSITE),
    "resnet50_composite_b": Spec(lc_block=2, norm="tuned", polar=True, **_COMPOSITE),
    "resnet50_composite_c": Spec(dog_blocks=(0, 1), lc_block=2, polar=True, **_COMPOSITE),
    "resnet50_composite_d": Spec(dog_blocks=(0, 1), lc_block=2, norm="tuned", **_COMPOSITE),
    "resnet50_composite_e": Spec(norm="tuned", polar=True, **_COMPOSITE),
    "resnet50_composite_f": Spec(lc_block=2, polar=True, **_COMPOSITE),
    "resnet50_composite_g": Spec(lc_block=2, norm="tuned", **_COMPOSITE),
}
MODEL_TYPES = tuple(SPECS)


class V1ResNet50(ResNet):
    """torchvision ResNet50 with the V1 components in the stem and layer1 (all at 16x16 for 64x64 input).

    Every model type has the same top-level attributes (conv1, bn1, relu, maxpool, [lpp], layer1-4,
    avgpool, fc), so swapping the head is always `model.fc = nn.Linear(2048, n)` — the release's
    cortical-magnification model is an nn.Sequential, where that line appends a layer (sequential-fc-append).
    """

    def __init__(self, model_type: str, num_classes: int = 1000, dog_form: str = "textbook",
                 polar_variant: str = "release", tuned_center: str = "opposite"):
        super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
        spec = SPECS[model_type]
        self.model_type, self.spec = model_type, spec
        self.use_polar = spec.polar
        self.lpp = PolarTransform(32, 16, variant=polar_variant) if spec.build_polar else None
        # layer1 rebuilt with V1Bottleneck (same keys as torchvision's Bottleneck, plus `dn` when used)
        down = nn.Sequential(conv1x1(64, 256), nn.BatchNorm2d(256))
        blocks = [V1Bottleneck(64, 64, downsample=down), V1Bottleneck(256, 64), V1Bottleneck(256, 64)]
        for i, blk in enumerate(blocks):
            if i in spec.dog_blocks and spec.dog_style == "composite":
                blk.conv2 = ConvDoG(64, form=dog_form)
            if spec.lc_block == i:
                lc = LocallyConnected2d(64, 64, output_size=16, kernel_size=3, stride=1, padding=1)
                blk.conv2 = nn.Sequential(nn.Dropout2d(0.5), lc) if spec.lc_dropout else lc
            if spec.norm == "tuned":
                blk.dn = TunedNorm(256, center=tuned_center)
            elif spec.norm == "div":
                blk.dn = StdDivNorm(256, 3)
        self.layer1 = nn.Sequential(*blocks)
        # torchvision's init loop (kaiming-normal fan_out) over the rebuilt convs, as the release's ResNetComposite
        # runs it over its own layer1 — the composites' ConvDoG conv included (models/composite.py).
        for m in self.layer1.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if spec.dog_style == "sequential":
            # resnet50_center_surround (models/center_surround.py) swaps conv2 for Sequential(Conv2d, DoG) *after*
            # torchvision's resnet50() has run its init loop, so this 3x3 conv keeps PyTorch's default Conv2d init
            # (kaiming-uniform, a=√5: U(±1/√fan_in), std ≈ 0.024) — built here after the loop for the same reason.
            for i in spec.dog_blocks:
                self.layer1[i].conv2 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False),
                                                     DoGLayer(16, k=2, form=dog_form))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also accepts the release's Sequential cortical-magnification keys (remapped, see remap_release_keys)."""
        return super().load_state_dict(remap_release_keys(state_dict), strict=strict, assign=assign)

    def stem(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.lpp(x) if self.use_polar else self.maxpool(x)

    def forward_features(self, x, upto: str = "layer4"):
        """Features after `upto` (layer1: the Brain-Score V1 layer, (N, 256, 16, 16)); "pool": (N, 2048)."""
        x = self.stem(x)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            if name == upto:
                return x
        return torch.flatten(self.avgpool(x), 1)

    def _forward_impl(self, x):
        return self.fc(self.forward_features(x, upto="pool"))


def build_model(model_type: str, num_classes: int = 1000, dog_form: str = "textbook",
                polar_variant: str = "release", tuned_center: str = "opposite") -> V1ResNet50:
    """One of the 13 model types of the original CLI (see MODEL_TYPES)."""
    if model_type not in SPECS:
        raise KeyError(f"unknown model_type {model_type!r}; expected one of: {', '.join(MODEL_TYPES)}")
    return V1ResNet50(model_type, num_classes, dog_form=dog_form, polar_variant=polar_variant,
                      tuned_center=tuned_center)


def replace_head(model: V1ResNet50, num_classes: int) -> nn.Linear:
    """Swap in a fresh `num_classes`-way linear head (fine-tuning on Tiny-ImageNet: 200)."""
    model.fc = nn.Linear(model.fc.in_features, num_classes).to(model.fc.weight.device)
    return model.fc


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total incl. frozen Parameters, trainable). Buffers (polar masks, BN statistics) are not counted."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# The release's resnet50_cortical_magnification is nn.Sequential(conv1, bn1, relu, lpp, layer1..4, avgpool,
# Flatten, fc): its checkpoints carry index keys.
_SEQUENTIAL_KEYS = {"0": "conv1", "1": "bn1", "3": "lpp", "4": "layer1", "5": "layer2", "6": "layer3",
                    "7": "layer4", "10": "fc"}


def remap_release_keys(state_dict: dict) -> dict:
    """Map a release checkpoint of the Sequential cortical-magnification model onto V1ResNet50 keys."""
    if not any(k.split(".", 1)[0].isdigit() for k in state_dict):
        return state_dict
    out = {}
    for k, v in state_dict.items():
        head, _, rest = k.partition(".")
        out[f"{_SEQUENTIAL_KEYS.get(head, head)}.{rest}"] = v
    return out
