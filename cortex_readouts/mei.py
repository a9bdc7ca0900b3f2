"""Most exciting images (MEIs): feature visualisation as lucid/lucent does it, in plain PyTorch and reproducible.

The Roelfsema-lab project made its MEIs with lucent (`lucent/optvis/render.py`, `param/spatial.py`,
`param/color.py`, `transform.py`), a PyTorch port of lucid. Its images could not be reproduced even with a
seed: lucent's `set_seed` seeds torch and Python's `random`, but every transformation draws its value from
numpy's global generator, and the MEI scripts (`GENERATE_IMAGES___*.py`) never seed at all. Here the same
algorithm draws *everything* — the initial spectrum and all six transformation values per step — from one
seeded `torch.Generator` that lives on the CPU, so one seed gives one result whatever else the process does.

Algorithm (lucid's `lucid/optvis/param/spatial.py::fft_image`, `param/color.py`, `transform.py`):

1. Parametrisation. Per image and colour channel a complex half-spectrum (real and imaginary parts,
   n × 3 × H × (W//2+1) × 2) initialised N(0, 0.01²). Each frequency is scaled by 1/max(f, 1/max(H, W))
   (the 1/f amplitude spectrum of natural images, so that Adam's equal-sized steps on the parameters
   give equal power per octave), then `irfft2(norm="ortho") / 4` (lucid's "magic" 4; its unnormalised
   irfft times sqrt(H·W) is exactly the orthonormal transform).
2. Colour decorrelation: the three channels are mixed by the square root of ImageNet's colour correlation
   matrix, C = [[.26,.09,.02],[.27,0,-.05],[.27,-.09,.03]] divided by its largest column norm
   (`lucid/optvis/param/color.py::color_correlation_svd_sqrt`), then a sigmoid maps to [0, 1]. A zero
   spectrum is therefore uniform grey (0.5).
3. Optional receptive-field envelope E (H × W in [0, 1]): image = 0.5 + E · (image − 0.5), so only the
   deviation from grey inside the fitted receptive field can excite the unit (`fit_rf_envelope`).
   Optional `contrast` c (not in lucid): the deviation from grey is rescaled to RMS contrast c per image (a
   norm constraint; values clamped to [0, 1]). Without it the sigmoid's box is the only bound, and a unit
   that grows without limit (a linear filter) saturates the image into its filter's sign pattern, far
   beyond the receptive field: on the planted Gabor unit of tests/test_cortex_mei.py (64 px, 64 steps) the
   MEI correlates 0.41 with the Gabor without a constraint, 0.65 inside its fitted RF envelope, 0.97 with
   contrast=0.1 (minimum over colour channels, after ImageNet normalisation).
4. Transformation robustness, lucid's `standard_transforms`: pad 12 (grey), jitter 8, random scale from
   {0.90, 0.92, …, 1.10}, random rotation from {−10…10}° (0° weighted 6/26), jitter 4; then a centre crop
   back to H × W (lucid's `crop_or_pad_to`), so the objective always sees the parametrised size — needed for
   readouts with a fixed spatial mask. One draw per step for the whole batch (as lucid and lucent).
   `transforms="lab"` is what the lab's MEI sweep actually ran (`jitter(10)` only).
5. Adam on the spectrum (lucent's `render_vis` default lr 5e-2; the lab used 1e-2 with weight decay 1e-4:
   `PRESETS`), maximising the sum over the batch of `objective_fn(images)`; the gradient is taken with
   `torch.autograd.grad` w.r.t. the spectrum only, so no model parameter accumulates a `.grad`.

Differences from lucent, each deliberate:
- `one-sided-jitter`: lucent's `jitter(d)` shifts by 0…d−1 pixels, never negatively (a port of lucid's
  random *crop*, which moves the content by −d/2…d/2). Here the shift is symmetric, −d//2…d − d//2, as in
  lucid; `one_sided_jitter=True` reproduces lucent. With a fixed spatial readout the one-sided shift moves
  the MEI up-left of the receptive field by ~5 px on average.
- Every fill (pad, jitter, scale, rotation) is grey 0.5 (lucent fills scale and rotation borders with black),
  and scaling keeps the image centre fixed (half-pixel-centred bilinear).
- All randomness from one `torch.Generator` (see above); the model is put in eval mode by the objective
  builders (the lab notebook notes that adding `eval()` "changed everything": BN in train mode makes the
  response of one image depend on the rest of the batch).

Reproducibility:
- CPU: the same seed, image size, settings and torch version give bit-identical images (tested), whatever
  the global RNG state. Results may differ across torch versions, CPU types and `torch.set_num_threads`
  settings (the order of floating-point reductions in the model can change).
- GPU: wrap the call in `with deterministic():`. It sets `torch.use_deterministic_algorithms(True,
  warn_only=True)`, cuDNN deterministic (no benchmark autotuning) and `CUBLAS_WORKSPACE_CONFIG=:4096:8`
  (cuBLAS reads it only when it creates its workspace: set it in the environment before the first CUDA
  matmul of the process to be safe). Inside it, `generate` resamples its own scale and rotation on the
  CPU (their CUDA backward passes, `upsample_bilinear2d` and `grid_sample`, accumulate with atomics and have
  no deterministic implementation). What remains nondeterministic on GPU: any op *in the caller's model or
  preprocessing* without a deterministic CUDA kernel — notably the backward of bilinear/bicubic
  `interpolate` (e.g. a Resize(224) inside `objective_fn`), `grid_sample`, `AdaptiveAvgPool2d`/`AvgPool3d`
  and `index_add`/`scatter_add`-based ops; torch warns once for each such op it meets (warn_only), and
  nothing is promised for them. GPU results never equal CPU results bit for bit (different kernels,
  TF32/bf16 if enabled), nor results on another GPU model or CUDA/cuDNN version. (No GPU was available when
  this was written: the GPU statements follow PyTorch's documentation of `use_deterministic_algorithms` and
  are not measured here.)
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize

from common.runtime import UserError

# lucid/optvis/param/color.py: square root of ImageNet's colour correlation matrix, normalised by its largest
# column norm so the mixed channels keep unit scale.
COLOR_CORRELATION_SVD_SQRT = ((0.26, 0.09, 0.02),
                              (0.27, 0.00, -0.05),
                              (0.27, -0.09, 0.03))

# lucid/optvis/transform.py::standard_transforms (as (name, argument) pairs applied by `transform`).
STANDARD_SCALES = tuple(1 + (i - 5) / 50.0 for i in range(11))  # 0.90 … 1.10
STANDARD_ANGLES = tuple(range(-10, 11)) + (0,) * 5  # whole degrees, 0° six times in 26
TRANSFORM_CHAINS = {
    "standard": (("pad", 12), ("jitter", 8), ("scale", STANDARD_SCALES), ("rotate", STANDARD_ANGLES), ("jitter", 4)),
    "lab": (("jitter", 10),),  # GENERATE_IMAGES___*.py: transforms=[jitter(10)]
    "none": (),
}

# Recipes for `generate(**PRESETS[name])`. "lucent" (the default of this module) is lucent's `render_vis`
# with the standard chain; "lab" is the Roelfsema-lab sweep (GENERATE_IMAGES___*.py): param.image(128, fft,
# decorrelate, batch=5), Adam(lr 1e-2, weight_decay 1e-4), jitter(10), 512 steps (the caller upsamples to 224).
PRESETS = {
    "lucent": dict(image_size=224, n_images=4, steps=512, lr=5e-2, weight_decay=0.0, transforms="standard"),
    "lab": dict(image_size=128, n_images=5, steps=512, lr=1e-2, weight_decay=1e-4, transforms="lab"),
}


# ----------------------------------------------------------------------------- determinism


@contextlib.contextmanager
def deterministic(warn_only: bool = True):
    """Deterministic kernels where PyTorch has them (see the module docstring for what remains).

    Sets `torch.use_deterministic_algorithms(True, warn_only=warn_only)`, cuDNN deterministic without
    autotuning, and CUBLAS_WORKSPACE_CONFIG (if unset); restores the previous settings on exit.
    `warn_only=False` makes torch raise on the first op without a deterministic implementation instead.
    """
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


# ----------------------------------------------------------------------------- the image parametrisation


def _hw(image_size) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h < 2 or w < 2:
        raise ValueError(f"image_size must be at least 2 px, got {image_size!r}")
    return int(h), int(w)


class FourierImage(torch.nn.Module):
    """n RGB images parametrised by their 1/f-scaled, colour-decorrelated spectrum (lucid's `fft_image`).

    `forward()` returns the images in [0, 1] (n × 3 × H × W); `spectrum` is the only parameter.
    """

    def __init__(self, n: int, image_size, *, generator: torch.Generator | None = None, sd: float = 0.01,
                 decay_power: float = 1.0, decorrelate: bool = True, device=None):
        super().__init__()
        self.h, self.w = _hw(image_size)
        self.decorrelate = decorrelate
        fy = torch.fft.fftfreq(self.h, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(self.w, dtype=torch.float64)[None, :]  # = lucid's rfft2d_freqs for even and odd W
        freqs = torch.sqrt(fx * fx + fy * fy)
        scale = 1.0 / torch.clamp(freqs, min=1.0 / max(self.h, self.w)) ** decay_power
        self.register_buffer("scale", scale.float()[..., None].to(device))  # H × (W//2+1) × 1, over (re, im)
        c = torch.tensor(COLOR_CORRELATION_SVD_SQRT, dtype=torch.float64)
        self.register_buffer("color", (c / c.norm(dim=0).max()).float().to(device))
        init = torch.randn((n, 3, self.h, self.w // 2 + 1, 2), generator=generator, dtype=torch.float32) * sd
        self.spectrum = torch.nn.Parameter(init.to(device))

    def forward(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spectrum * self.scale)
        x = torch.fft.irfftn(spec, s=(self.h, self.w), dim=(-2, -1), norm="ortho") / 4.0  # lucid's magic 4
        if self.decorrelate:
            x = torch.einsum("dc,nchw->ndhw", self.color, x)  # lucid: pixels(·, 3) @ Cᵀ
        return torch.sigmoid(x)


# ----------------------------------------------------------------------------- transformation robustness


def _draw(g: torch.Generator, n: int) -> int:
    """A uniform integer in 0..n-1 from the seeded generator (the only source of randomness)."""
    return int(torch.randint(n, (), generator=g))


def _shift(d: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Integer translation with zero fill (content moves down/right for positive dy/dx), size kept."""
    h, w = d.shape[-2:]
    p = F.pad(d, (abs(dx), abs(dx), abs(dy), abs(dy)))
    y0, x0 = abs(dy) - dy, abs(dx) - dx
    return p[..., y0:y0 + h, x0:x0 + w]


def _crop_or_pad(d: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Centre crop or zero-pad to hw (lucid's `crop_or_pad_to`)."""
    for dim, target in ((-2, hw[0]), (-1, hw[1])):
        size = d.shape[dim]
        if size > target:
            d = d.narrow(dim, (size - target) // 2, target)
        elif size < target:
            before = (target - size) // 2
            pad = [0, 0, 0, 0]
            pad[0 if dim == -1 else 2], pad[1 if dim == -1 else 3] = before, target - size - before
            d = F.pad(d, pad)
    return d


def _rotate(d: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate about the image centre, size kept, zero fill (bilinear)."""
    h, w = d.shape[-2:]
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    # affine_grid works in coordinates normalised by each side: rescale the off-diagonal for non-square images
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=d.dtype, device=d.device)
    grid = F.affine_grid(theta.expand(d.shape[0], 2, 3), list(d.shape), align_corners=False)
    return F.grid_sample(d, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def resolve_chain(transforms) -> tuple:
    """True → "standard", False/None → none, a name of TRANSFORM_CHAINS, or a sequence of (name, arg) pairs."""
    if transforms is True:
        return TRANSFORM_CHAINS["standard"]
    if transforms is False or transforms is None:
        return ()
    if isinstance(transforms, str):
        if transforms not in TRANSFORM_CHAINS:
            raise UserError(f"transforms {transforms!r} unknown: expected one of {sorted(TRANSFORM_CHAINS)}")
        return TRANSFORM_CHAINS[transforms]
    chain = tuple((str(name), arg) for name, arg in transforms)
    for name, _ in chain:
        if name not in ("pad", "jitter", "scale", "rotate"):
            raise UserError(f"transform {name!r} unknown: expected pad, jitter, scale or rotate")
    return chain


def transform(images: torch.Tensor, chain, g: torch.Generator, *, one_sided_jitter: bool = False,
              resample_device=None) -> torch.Tensor:
    """Apply a transformation chain to images in [0, 1], drawing every value from `g`; output size = input size.

    Works on the deviation from grey, so every fill (pad, shifts, scale and rotation borders) is grey 0.5.
    `resample_device`: where scale and rotation are computed (the CPU for bit-reproducible CUDA runs).
    """
    hw = tuple(images.shape[-2:])
    d = images - 0.5
    dev = d.device if resample_device is None else torch.device(resample_device)
    for name, arg in chain:
        if name == "pad":
            d = F.pad(d, (arg, arg, arg, arg))
        elif name == "jitter":
            if one_sided_jitter:  # lucent: np.random.choice(d) for dx and dy → 0…d−1
                dy, dx = _draw(g, arg), _draw(g, arg)
            else:  # lucid's random crop of size S−d: offset 0…d, i.e. a shift of −d//2 … d−d//2
                dy, dx = _draw(g, arg + 1) - arg // 2, _draw(g, arg + 1) - arg // 2
            d = _shift(d, dy, dx)
        elif name == "scale":
            s = float(arg[_draw(g, len(arg))])
            if s != 1.0:
                size = [max(1, round(s * n)) for n in d.shape[-2:]]
                d = F.interpolate(d.to(dev), size=size, mode="bilinear", align_corners=False).to(d.device)
        elif name == "rotate":
            a = float(arg[_draw(g, len(arg))])
            if a != 0.0:
                d = _rotate(d.to(dev), a).to(d.device)
    return _crop_or_pad(d, hw) + 0.5


# ----------------------------------------------------------------------------- generation


def generate(objective_fn: Callable[[torch.Tensor], torch.Tensor], *, image_size=224, n_images: int = 4,
             steps: int = 512, lr: float = 5e-2, seed: int = 0, device=None, decorrelate: bool = True,
             transforms=True, rf_envelope: torch.Tensor | None = None, weight_decay: float = 0.0,
             sd: float = 0.01, decay_power: float = 1.0, one_sided_jitter: bool = False,
             contrast: float | None = None, resample_on_cpu: bool | None = None, log_every: int = 0,
             log_prefix: str = "mei") -> dict:
    """Optimise a batch of `n_images` images to maximise `objective_fn`; see the module docstring.

    objective_fn(images) -> Tensor[n]: images are n × 3 × H × W in [0, 1]; higher = more exciting; the
    objective applies the model's own preprocessing (normalisation, resizing) itself.
    device: where the images live (default: `objective_fn.device` if the builders below set it, else cuda if
    available, else cpu). resample_on_cpu: default True on CUDA inside `deterministic()`, else False.
    contrast: fix each image's RMS deviation from grey (None: lucid's sigmoid bound only). weight_decay: Adam's
    L2 on the spectrum (the lab's 1e-4). one_sided_jitter: lucent's quirk (see `one-sided-jitter` above).
    Returns dict(images=Tensor[n,3,H,W] in [0,1] (CPU), objective_trace=list[float] (mean over the batch of
    the objective on the transformed images, before each step), final_objective=Tensor[n] (CPU, on the
    final untransformed images)).
    """
    h, w = _hw(image_size)
    if n_images < 1 or steps < 0:
        raise ValueError(f"need n_images >= 1 and steps >= 0, got {n_images}, {steps}")
    if device is None:
        device = getattr(objective_fn, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    chain = resolve_chain(transforms)
    if resample_on_cpu is None:
        resample_on_cpu = device.type == "cuda" and torch.are_deterministic_algorithms_enabled()
    envelope = None
    if rf_envelope is not None:
        envelope = torch.as_tensor(rf_envelope, dtype=torch.float32)
        if tuple(envelope.shape) != (h, w):
            raise ValueError(f"rf_envelope must be {h}×{w} (the image size), got {tuple(envelope.shape)}")
        if not (torch.isfinite(envelope).all() and envelope.min() >= 0 and envelope.max() <= 1):
            raise ValueError("rf_envelope values must lie in [0, 1]")
        envelope = envelope.to(device)

    g = torch.Generator().manual_seed(int(seed))  # CPU generator: same draws on every device
    param = FourierImage(n_images, (h, w), generator=g, sd=sd, decay_power=decay_power,
                         decorrelate=decorrelate, device=device)
    opt = torch.optim.Adam([param.spectrum], lr=lr, weight_decay=weight_decay)

    def images_now() -> torch.Tensor:
        d = param() - 0.5
        if envelope is not None:
            d = envelope * d
        if contrast is not None:  # fixed RMS contrast (a norm constraint)
            d = d * (contrast / d.square().mean((1, 2, 3), keepdim=True).add(1e-12).sqrt())
            return (0.5 + d).clamp(0, 1)
        return 0.5 + d

    def objective(x: torch.Tensor) -> torch.Tensor:
        out = objective_fn(x)
        if out.numel() != n_images:
            raise ValueError(f"objective_fn must return one value per image ({n_images}), got shape {tuple(out.shape)}")
        return out.reshape(n_images).float()

    trace, t0 = [], time.perf_counter()
    for step in range(steps):
        with torch.enable_grad():  # also when the caller runs under torch.no_grad()
            x = images_now()
            if chain:
                x = transform(x, chain, g, one_sided_jitter=one_sided_jitter,
                              resample_device="cpu" if resample_on_cpu else None)
            obj = objective(x)
            (grad,) = torch.autograd.grad(-obj.sum(), [param.spectrum])  # ascend; model parameters get no .grad
        param.spectrum.grad = grad
        opt.step()
        trace.append(obj.detach().mean())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            el = time.perf_counter() - t0
            print(f"{log_prefix} step {step + 1}/{steps} objective {float(trace[-1]):.4g} "
                  f"{(step + 1) / el:.2f} steps/s eta {el / (step + 1) * (steps - step - 1):.0f}s", flush=True)
    with torch.no_grad():
        images = images_now()
        final = objective(images)
    return dict(images=images.detach().float().cpu(),
                objective_trace=[float(v) for v in torch.stack(trace).cpu()] if trace else [],
                final_objective=final.detach().cpu())


# ----------------------------------------------------------------------------- objectives


def _prepare(response_fn):
    """Eval mode for a module (BN/dropout in train mode make an image's response depend on its batch)."""
    device = None
    if isinstance(response_fn, torch.nn.Module):
        response_fn.eval()
        tensor = next(iter(response_fn.parameters()), None)
        if tensor is None:
            tensor = next(iter(response_fn.buffers()), None)
        device = None if tensor is None else tensor.device
    return device


def _responses(response_fn, images: torch.Tensor) -> torch.Tensor:
    r = response_fn(images)
    return r.reshape(r.shape[0], -1)  # n × electrodes (a Bashivan readout returns n × N × 1 × 1)


def electrode_objective(response_fn, electrodes, weights=None):
    """Objective: mean response of the chosen electrode indices, or their weighted mean Σ wᵢrᵢ / Σ wᵢ.

    response_fn(images) -> Tensor[n, n_electrodes]; a `torch.nn.Module` is put in eval mode.
    """
    idx = torch.as_tensor([electrodes] if isinstance(electrodes, int) else list(electrodes), dtype=torch.long)
    if idx.ndim != 1 or idx.numel() == 0:
        raise UserError(f"electrodes must be one index or a non-empty list of indices, got {electrodes!r}")
    w = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if w.numel() != idx.numel():
            raise UserError(f"{w.numel()} weights given for {idx.numel()} electrodes")
        if float(w.sum()) == 0.0:
            raise UserError("electrode weights sum to 0: a weighted mean is undefined")
    device = _prepare(response_fn)

    def objective(images: torch.Tensor) -> torch.Tensor:
        r = _responses(response_fn, images)
        if int(idx.max()) >= r.shape[1] or int(idx.min()) < -r.shape[1]:
            raise UserError(f"electrode index {int(idx.max()) if int(idx.max()) >= r.shape[1] else int(idx.min())} "
                            f"is not in a model of {r.shape[1]} electrodes")
        sel = r[:, idx.to(r.device)]
        if w is None:
            return sel.mean(1)
        wd = w.to(r.device, r.dtype)
        return (sel * wd).sum(1) / wd.sum()

    objective.device = device
    return objective


def site_objective(response_fn):
    """Objective: mean response over all electrodes of the site (the lab's `channel('output', all N)`)."""
    device = _prepare(response_fn)

    def objective(images: torch.Tensor) -> torch.Tensor:
        return _responses(response_fn, images).mean(1)

    objective.device = device
    return objective


def best_natural_response(objective_fn, images, *, batch_size: int = 256, device=None) -> tuple[float, int]:
    """(highest objective value, its index) over a set of images n × C × H × W in [0, 1], without gradients.

    The yardstick of an MEI: its final objective divided by this is the ratio the lab's question asks for
    (does the MEI excite the unit more than any natural image?). Single-channel images are repeated to RGB.
    """
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise UserError(f"natural images must be n × 1|3 × H × W, got shape {tuple(images.shape)}")
    if device is None:
        device = getattr(objective_fn, "device", None) or "cpu"
    best, where = -math.inf, -1
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device, torch.float32)
            out = objective_fn(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).float().reshape(len(x))
            v, j = out.max(0)
            if float(v) > best:
                best, where = float(v), i + int(j)
    return best, where


# ----------------------------------------------------------------------------- receptive-field envelope


def fit_gaussian_2d(mask) -> dict:
    """Least-squares 2-D Gaussian (full covariance) + offset fitted to |mask| (h × w), started from moments.

    Returns cy, cx (mask pixels, 0 = centre of the first pixel), sy, sx, rho, amplitude, offset.
    """
    a = np.abs(np.asarray(torch.as_tensor(mask).detach().cpu().double()))
    if a.ndim != 2 or not np.isfinite(a).all():
        raise UserError(f"a spatial mask must be a finite h × w array, got shape {a.shape}")
    if a.max() <= 0:
        raise UserError("the spatial mask is all zero: no receptive field to fit")
    h, w = a.shape
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    base = float(np.median(a))
    p = np.clip(a - base, 0, None)
    if p.sum() <= 0:
        p = a
    p = p / p.sum()
    cy, cx = float((p * yy).sum()), float((p * xx).sum())
    sy = max(float(np.sqrt((p * (yy - cy) ** 2).sum())), 0.5)
    sx = max(float(np.sqrt((p * (xx - cx) ** 2).sum())), 0.5)

    def model(q):
        cy_, cx_, sy_, sx_, rho, amp, off = q
        dy, dx = (yy - cy_) / sy_, (xx - cx_) / sx_
        quad = (dy * dy - 2 * rho * dy * dx + dx * dx) / (1 - rho * rho)
        return amp * np.exp(-0.5 * quad) + off

    q0 = np.array([cy, cx, sy, sx, 0.0, a.max() - base, base])
    lo = [-0.5, -0.5, 0.3, 0.3, -0.95, 0.0, -np.inf]
    hi = [h - 0.5, w - 0.5, 2.0 * max(h, w), 2.0 * max(h, w), 0.95, np.inf, np.inf]
    q0 = np.clip(q0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
    try:
        q = optimize.least_squares(lambda q: (model(q) - a).ravel(), q0, bounds=(lo, hi)).x
    except (ValueError, np.linalg.LinAlgError):  # keep the moment estimate
        q = q0
    return dict(zip(("cy", "cx", "sy", "sx", "rho", "amplitude", "offset"), map(float, q)))


def fit_rf_envelope(spatial_mask, image_size, *, sigma_scale: float = 1.0) -> torch.Tensor:
    """Gaussian envelope (peak 1) on the image from a 2-D Gaussian fitted to |spatial_mask| (h × w).

    The mask is a Bashivan-style readout's spatial weights on the feature map; a feature-map cell i covers
    the image evenly, so its centre sits at image pixel (i + 0.5) · image_size / h − 0.5. `sigma_scale`
    widens the envelope (deep units see beyond their own cell). Returns image_size × image_size float32.
    """
    fit = fit_gaussian_2d(spatial_mask)
    mh, mw = torch.as_tensor(spatial_mask).shape
    h, w = _hw(image_size)
    ky, kx = h / mh, w / mw
    cy, cx = (fit["cy"] + 0.5) * ky - 0.5, (fit["cx"] + 0.5) * kx - 0.5
    sy, sx, rho = fit["sy"] * ky * sigma_scale, fit["sx"] * kx * sigma_scale, fit["rho"]
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    dy, dx = (yy - cy) / sy, (xx - cx) / sx
    env = np.exp(-0.5 * (dy * dy - 2 * rho * dy * dx + dx * dx) / (1 - rho * rho))
    return torch.from_numpy(env.astype(np.float32))
