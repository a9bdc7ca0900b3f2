"""Embedded default data: generated images, corruptions and simulated neurons with known ground truth.

Nothing can be downloaded at run time, so every study can run on data made here, written in the
study's *real* on-disk format (the real readers are exercised, not bypassed).

- `natural_images`: 1/f ("pink") noise plus a few occluding discs (a cheap dead-leaves model): the
  second-order statistics of natural scenes, enough to drive Gabor-like units.
- `make_class_images` / `write_tiny_imagenet`: images whose class is an object's shape × colour ×
  orientation over a 1/f background, written as a genuine Tiny-ImageNet tree (JPEGs, wnids.txt,
  train/<wnid>/images/, val/images/ + val_annotations.txt).
- `corrupt` / `write_tiny_imagenet_c`: the 15 ImageNet-C corruptions at severities 1-5, implemented
  with numpy/scipy/PIL. Severity parameters follow Hendrycks & Dietterich's Tiny-ImageNet-C settings
  where those are simple formulas; **snow, frost and fog are procedural approximations** (the originals
  blend photographs of frost and a plasma fractal): noise textures with the same blending rules.
- `SimulatedPopulation`: Gabor LN ("simple") and energy-model ("complex") units, or a deeper layer of
  nonlinear "feature" units, with Poisson trial noise. The true rates are known, hence the true noise
  ceiling and the true model.
"""
from __future__ import annotations

import io
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from common.datasets import CORRUPTIONS, TinyImageNet
from common.runtime import UserError

# ----------------------------------------------------------------------------- the cache


def ensure_synthetic(cache_root, name: str, writer) -> Path:
    """Write a synthetic dataset once into `cache_root/synthetic/<name>` and return its path.

    `writer(path)` fills a fresh folder; it is written under a temporary name and renamed when complete,
    so an interrupted write is never mistaken for a dataset. Safe when several torchrun ranks race.
    """
    final = Path(cache_root) / "synthetic" / name
    if (final / ".complete").exists():
        return final
    # `final` only ever appears through the atomic rename below, complete. No deletion here: with several
    # processes starting at once (torchrun ranks, job-array shards), one may rename its copy into place between
    # another's checks.
    tmp = final.parent / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"no --data_root given: writing embedded synthetic data ({name}) to {final}", flush=True)
    writer(tmp)
    (tmp / ".complete").write_text("ok\n")
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first (or a foreign folder is in the way)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / ".complete").exists():
            raise UserError(f"{final} exists but is not a complete synthetic dataset (no .complete marker); "
                            f"remove it and run again") from None
    return final


# ----------------------------------------------------------------------------- natural-ish images


def pink_noise(n: int, size: int, channels: int = 1, rng=None, exponent: float = 1.0) -> np.ndarray:
    """n × channels × size × size noise with amplitude spectrum 1/f^exponent, scaled to [0, 1] per image."""
    rng = np.random.default_rng(rng)
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    f[0, 0] = 1.0
    spec = (rng.standard_normal((n, channels, size, size)) + 1j * rng.standard_normal((n, channels, size, size))) / f**exponent
    spec[..., 0, 0] = 0
    x = np.fft.ifft2(spec).real
    lo = x.min(axis=(-3, -2, -1), keepdims=True)
    hi = x.max(axis=(-3, -2, -1), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def natural_images(n: int, size: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Float tensor n × channels × size × size in [0, 1]: 1/f noise with a few occluding discs."""
    rng = np.random.default_rng(seed)
    x = pink_noise(n, size, channels, rng)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            r = rng.uniform(0.08, 0.3) * size
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            x[i][:, disc] = rng.uniform(0, 1, (channels, 1))
    return torch.from_numpy(x.astype(np.float32))


# ----------------------------------------------------------------------------- classes of images

_SHAPES_ORIENTED = ("bar", "triangle", "ell", "square", "cross", "tee")
_SHAPES_ROUND = ("disk", "ring")
_COLOURS = ((230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40),
            (230, 60, 220), (40, 220, 230), (245, 245, 245), (250, 140, 30))
_ORIENTATIONS = (0.0, 22.5, 45.0, 67.5)


def class_specs() -> list[tuple[str, int, float]]:
    """(shape, colour index, orientation°) per class: 208 distinct classes, the most distinct first."""
    shapes = _SHAPES_ORIENTED + _SHAPES_ROUND
    # j = 8a + b → shape b, colour (a + b) mod 8: the first 8 classes differ in both shape and colour, and
    # the 64 classes at orientation 0 cover every shape × colour pair.
    specs = [(shapes[j % 8], (j // 8 + j % 8) % len(_COLOURS), 0.0) for j in range(8 * len(_COLOURS))]
    specs += [(s, c, o) for o in _ORIENTATIONS[1:] for c in range(len(_COLOURS)) for s in _SHAPES_ORIENTED]
    return specs


def _shape_polygons(shape: str, cx: float, cy: float, r: float, angle_deg: float) -> list[list[tuple[float, float]]]:
    """Polygons (in image coordinates) of a shape of radius r rotated by angle_deg."""
    t = math.radians(angle_deg)
    ct, st = math.cos(t), math.sin(t)

    def rot(pts):
        return [(cx + r * (x * ct - y * st), cy + r * (x * st + y * ct)) for x, y in pts]

    if shape == "bar":
        return [rot([(-1, -0.25), (1, -0.25), (1, 0.25), (-1, 0.25)])]
    if shape == "triangle":
        return [rot([(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])]
    if shape == "square":
        return [rot([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)])]
    if shape == "ell":
        return [rot([(-0.8, -1), (-0.3, -1), (-0.3, 0.5), (0.8, 0.5), (0.8, 1), (-0.8, 1)])]
    if shape == "cross":
        return [rot([(-1, -0.22), (1, -0.22), (1, 0.22), (-1, 0.22)]), rot([(-0.22, -1), (0.22, -1), (0.22, 1), (-0.22, 1)])]
    if shape == "tee":
        return [rot([(-1, -1), (1, -1), (1, -0.55), (-1, -0.55)]), rot([(-0.22, -0.55), (0.22, -0.55), (0.22, 1), (-0.22, 1)])]
    raise ValueError(shape)


def _draw_object(img: Image.Image, shape: str, colour, angle: float, rng) -> tuple[int, int, int, int]:
    size = img.size[0]
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(r, size - r, 2)
    draw = ImageDraw.Draw(img)
    if shape == "disk":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(0.45 * r)))
    else:
        for poly in _shape_polygons(shape, cx, cy, r, angle):
            draw.polygon(poly, fill=colour)
    return int(cx - r), int(cy - r), int(cx + r), int(cy + r)


def make_class_images(n_per_class: int, n_classes: int, size: int = 64, seed: int = 0):
    """Learnable image classes: (uint8 N × size × size × 3, labels, boxes).

    Class k is an object of a fixed shape, colour and orientation (see `class_specs`) at a random
    position and scale, with colour and orientation jitter, over a coloured 1/f-noise background.
    """
    specs = class_specs()
    if not 1 <= n_classes <= len(specs):
        raise ValueError(f"n_classes must be in 1..{len(specs)}")
    rng = np.random.default_rng(seed)
    n = n_per_class * n_classes
    bg = pink_noise(n, size, 3, rng)  # n × 3 × H × W in [0, 1]
    images, labels, boxes = np.empty((n, size, size, 3), np.uint8), np.empty(n, np.int64), []
    for i in range(n):
        k = i % n_classes
        shape, colour_idx, angle = specs[k]
        base = 0.35 + 0.3 * rng.uniform(0, 1, 3)  # background tint
        canvas = np.clip((0.6 * (bg[i].transpose(1, 2, 0) - 0.5) + base) * 255, 0, 255).astype(np.uint8)
        img = Image.fromarray(canvas)
        colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in _COLOURS[colour_idx])
        boxes.append(_draw_object(img, shape, colour, angle + rng.normal(0, 4), rng))
        images[i], labels[i] = np.asarray(img), k
    return images, labels, boxes


def synthetic_wnids(n_classes: int) -> list[str]:
    """WordNet-style ids for synthetic classes, sorted in class order (so class index = sorted position)."""
    return [f"n{90000000 + 17 * k:08d}" for k in range(n_classes)]


def write_tiny_imagenet(root, n_classes: int = 10, n_train_per_class: int = 50, n_val_per_class: int = 10,
                        size: int = 64, seed: int = 0, reorganised_val: bool = False) -> Path:
    """Write a genuine Tiny-ImageNet tree of generated images and return its root.

    root/wnids.txt, root/words.txt, root/train/<wnid>/images/<wnid>_<i>.JPEG + <wnid>_boxes.txt,
    root/val/images/val_<i>.JPEG + root/val/val_annotations.txt (or, with `reorganised_val`,
    root/val/<wnid>/images/val_<i>.JPEG as after the usual re-layout).
    """
    root = Path(root)
    wnids = synthetic_wnids(n_classes)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    specs = class_specs()
    (root / "words.txt").write_text("".join(f"{w}\t{specs[k][0]} colour{specs[k][1]} {specs[k][2]:g}deg\n"
                                            for k, w in enumerate(wnids)))
    x, y, boxes = make_class_images(n_train_per_class, n_classes, size, seed)
    counters = [0] * n_classes
    box_lines: dict[int, list[str]] = {k: [] for k in range(n_classes)}
    for img, k, b in zip(x, y, boxes):
        d = root / "train" / wnids[k] / "images"
        d.mkdir(parents=True, exist_ok=True)
        name = f"{wnids[k]}_{counters[k]}.JPEG"
        Image.fromarray(img).save(d / name, quality=95)
        box_lines[k].append(f"{name}\t{b[0]}\t{b[1]}\t{b[2]}\t{b[3]}\n")
        counters[k] += 1
    for k in range(n_classes):
        (root / "train" / wnids[k] / f"{wnids[k]}_boxes.txt").write_text("".join(box_lines[k]))
    xv, yv, bv = make_class_images(n_val_per_class, n_classes, size, seed + 1)
    ann = []
    for i, (img, k, b) in enumerate(zip(xv, yv, bv)):
        name = f"val_{i}.JPEG"
        d = root / "val" / wnids[k] / "images" if reorganised_val else root / "val" / "images"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / name, quality=95)
        ann.append(f"{name}\t{wnids[k]}\t{b[0]}\t{b[1]}\t{b[2]}\t{b[3]}\n")
    if not reorganised_val:
        (root / "val" / "val_annotations.txt").write_text("".join(ann))
    return root


# ----------------------------------------------------------------------------- corruptions (ImageNet-C)


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    r = max(radius, 0.5)
    L = np.arange(-math.ceil(r), math.ceil(r) + 1)
    X, Y = np.meshgrid(L, L)
    k = ((X**2 + Y**2) <= r**2).astype(np.float64)
    k /= k.sum()
    return ndimage.gaussian_filter(k, alias_blur)


def _convolve_rgb(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.convolve(x[..., c], k, mode="reflect") for c in range(3)], -1)


def _gauss_rgb(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")


def _zoom_center(x: np.ndarray, z: float) -> np.ndarray:
    """Zoom an H × H × 3 image by z about its centre, keeping H × H."""
    h = x.shape[0]
    ch = int(math.ceil(h / z))
    top = (h - ch) // 2
    zoomed = ndimage.zoom(x[top:top + ch, top:top + ch], (z, z, 1), order=1)
    off = (zoomed.shape[0] - h) // 2
    return zoomed[off:off + h, off:off + h]


def _texture(size: int, rng, exponent: float) -> np.ndarray:
    """A size × size texture in [0, 1] (1/f^exponent noise), the base of the procedural fog/frost/snow."""
    return pink_noise(1, size, 1, rng, exponent)[0, 0]


def corrupt(img: np.ndarray, name: str, severity: int, rng=None) -> np.ndarray:
    """Apply ImageNet-C corruption `name` at `severity` (1-5) to an H × W × 3 uint8 image."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError("severity must be 1..5")
    rng = np.random.default_rng(rng)
    s = severity - 1
    x = img.astype(np.float64) / 255.0
    h = x.shape[0]
    if name == "gaussian_noise":
        x = x + rng.normal(0, (0.04, 0.08, 0.12, 0.15, 0.18)[s], x.shape)
    elif name == "shot_noise":
        c = (250, 100, 50, 30, 15)[s]
        x = rng.poisson(x * c) / c
    elif name == "impulse_noise":
        amount = (0.01, 0.02, 0.05, 0.08, 0.14)[s]
        u = rng.uniform(size=x.shape)
        x = np.where(u < amount / 2, 0.0, np.where(u > 1 - amount / 2, 1.0, x))
    elif name == "defocus_blur":
        r, ab = ((0.5, 0.6), (1, 0.1), (1.5, 0.1), (2, 0.5), (3, 0.5))[s]
        x = _convolve_rgb(x, _disk_kernel(r, ab))
    elif name == "glass_blur":
        sigma, delta, iters = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))[s]
        x = _gauss_rgb(x, sigma)
        yy, xx = np.mgrid[:h, :h]
        for _ in range(iters):  # local pixel shuffling: every pixel takes a neighbour's value
            dy, dx = rng.integers(-delta, delta + 1, (2, h, h))
            x = x[np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, h - 1)]
        x = _gauss_rgb(x, sigma)
    elif name == "motion_blur":
        length = (3, 5, 7, 9, 11)[s]
        k = np.zeros((length, length))
        k[length // 2, :] = 1.0
        k = ndimage.rotate(k, rng.uniform(-45, 45), reshape=False, order=1)
        x = _convolve_rgb(x, k / max(k.sum(), 1e-12))
    elif name == "zoom_blur":
        zooms = (np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.02),
                 np.arange(1, 1.21, 0.02), np.arange(1, 1.26, 0.03))[s]
        x = (x + sum(_zoom_center(x, z) for z in zooms)) / (len(zooms) + 1)
    elif name == "snow":  # procedural approximation: sparse bright flakes, motion-blurred, over a whitened image
        density, blur, blend = ((0.02, 2, 0.8), (0.04, 3, 0.75), (0.06, 4, 0.7), (0.08, 5, 0.65), (0.10, 6, 0.6))[s]
        flakes = (rng.uniform(size=(h, h)) < density).astype(np.float64)
        flakes = ndimage.gaussian_filter(flakes, 0.5)
        line = np.zeros((2 * blur + 1, 2 * blur + 1))
        line[:, blur] = 1.0
        line = ndimage.rotate(line, rng.uniform(-30, 30), reshape=False, order=1)
        flakes = np.clip(ndimage.convolve(flakes, line / line.sum(), mode="wrap") * 4, 0, 1)
        grey = x.mean(-1, keepdims=True) * 1.5 + 0.5
        x = blend * x + (1 - blend) * np.maximum(x, grey)
        x = x + flakes[..., None] + np.rot90(flakes, 2)[..., None] * 0.5
    elif name == "frost":  # procedural approximation: a crystalline high-frequency texture blended in
        a, b = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))[s]
        t = _texture(h, rng, 0.6)
        frost = np.clip((t - 0.35) * 2.0, 0, 1)[..., None] * np.array([0.85, 0.92, 1.0])
        x = a * x + b * frost
    elif name == "fog":  # procedural approximation of the plasma fractal: smooth 1/f^2 clouds
        c0, c1 = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))[s]
        max_val = x.max()
        x = x + c0 * _texture(h, rng, 1.0 + 0.5 * c1 / 3.0)[..., None]
        x = x * max_val / (max_val + c0)
    elif name == "brightness":  # +c on the HSV value channel (hue and saturation kept)
        c = (0.1, 0.2, 0.3, 0.4, 0.5)[s]
        v = x.max(-1, keepdims=True)
        x = np.where(v > 0, x * np.minimum(v + c, 1.0) / np.maximum(v, 1e-12), c)
    elif name == "contrast":
        c = (0.4, 0.3, 0.2, 0.1, 0.05)[s]
        m = x.mean(axis=(0, 1), keepdims=True)
        x = (x - m) * c + m
    elif name == "elastic_transform":
        alpha, sigma = ((h * 0.5, h * 0.07), (h * 0.75, h * 0.07), (h * 1.0, h * 0.07),
                        (h * 1.25, h * 0.07), (h * 1.5, h * 0.07))[s]
        dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, h)), sigma, mode="reflect") * alpha
        dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, h)), sigma, mode="reflect") * alpha
        yy, xx = np.mgrid[:h, :h]
        coords = [np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, h - 1)]
        x = np.stack([ndimage.map_coordinates(x[..., c], coords, order=1, mode="reflect") for c in range(3)], -1)
    elif name == "pixelate":
        c = (0.9, 0.8, 0.7, 0.6, 0.5)[s]
        pil = Image.fromarray(img)
        small = pil.resize((max(1, int(h * c)),) * 2, Image.BOX)
        return np.asarray(small.resize((h, h), Image.NEAREST)).copy()
    elif name == "jpeg_compression":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=(65, 58, 50, 40, 25)[s])
        return np.asarray(Image.open(buf).convert("RGB")).copy()
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_tiny_imagenet_c(root, tiny_root, corruptions=CORRUPTIONS, severities=(1, 2, 3, 4, 5),
                          max_per_class: int | None = None, seed: int = 0) -> Path:
    """Corrupt the val split of the Tiny-ImageNet tree at `tiny_root` into root/<corruption>/<severity>/<wnid>/."""
    root = Path(root)
    val = TinyImageNet(tiny_root, "val")
    per_class: dict[int, int] = {}
    picked = []
    for path, label in val.samples:
        if max_per_class is None or per_class.get(label, 0) < max_per_class:
            per_class[label] = per_class.get(label, 0) + 1
            picked.append((path, label))
    images = [np.asarray(Image.open(p).convert("RGB")) for p, _ in picked]
    for ci, c in enumerate(corruptions):
        for sev in severities:
            rng = np.random.default_rng([seed, ci, sev])
            for (path, label), img in zip(picked, images):
                d = root / c / str(sev) / val.classes[label]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(corrupt(img, c, sev, rng)).save(d / Path(path).name, quality=95)
    return root


# ----------------------------------------------------------------------------- simulated neurons


def gabor(size: int, cx, cy, sigma, theta, freq, phase) -> np.ndarray:
    """Gabor filters (one per parameter entry) on a size × size grid: k × size × size."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    cx, cy, sigma, theta, freq, phase = (np.asarray(v, np.float64)[:, None, None] for v in (cx, cy, sigma, theta, freq, phase))
    xr = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    env = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    g = env * np.cos(2 * np.pi * freq * xr + phase)
    g -= g.mean(axis=(1, 2), keepdims=True) * env / env.mean(axis=(1, 2), keepdims=True)  # zero DC
    return g / np.linalg.norm(g.reshape(len(g), -1), axis=1)[:, None, None]


class SimulatedPopulation:
    """A population of model neurons with Poisson trial noise and known ground truth.

    kind="v1": each neuron is a Gabor LN unit (simple cell: softplus of a linear filter) or an energy
    unit (complex cell: quadrature-pair energy), half each, at random positions, orientations, spatial
    frequencies and sizes.
    kind="deep": each neuron reads out, through a softplus, a sparse random combination of a bank of
    rectified and energy V1 feature maps pooled over a local region — not linear in the pixels, so a
    pixel-space LN model underfits it and a hierarchical model can do better.

    Colour images are reduced to luminance. Rates are calibrated on `natural_images` so the mean rate
    over images is ≈ `mean_rate` (spikes per trial) for every neuron.
    """

    def __init__(self, n_neurons: int, image_size: int, channels: int = 1, kind: str = "v1", seed: int = 0,
                 mean_rate: float = 2.0, n_features: int = 16):
        if kind not in ("v1", "deep"):
            raise ValueError(f"kind must be 'v1' or 'deep', got {kind!r}")
        self.n_neurons, self.size, self.channels, self.kind, self.mean_rate = n_neurons, image_size, channels, kind, mean_rate
        rng = np.random.default_rng(seed)
        s = image_size
        if kind == "v1":
            k = n_neurons
            c = rng.uniform(0.3 * s, 0.7 * s, (2, k))
            sigma = rng.uniform(0.06, 0.14, k) * s
            freq = rng.uniform(0.6, 1.4, k) / (4 * sigma)  # about one to two cycles per envelope
            theta, phase = rng.uniform(0, np.pi, k), rng.uniform(0, 2 * np.pi, k)
            self.filters = torch.from_numpy(gabor(s, c[0], c[1], sigma, theta, freq, phase))
            self.quadrature = torch.from_numpy(gabor(s, c[0], c[1], sigma, theta, freq, phase + np.pi / 2))
            self.complex = torch.from_numpy(rng.uniform(size=k) < 0.5)
        else:
            f = n_features
            theta = np.repeat(np.linspace(0, np.pi, f // 2, endpoint=False), 2)
            freq = np.full(f, 0.18)
            sig = np.full(f, 1.6)
            ph = np.tile([0.0, np.pi / 2], f // 2)
            self.bank = torch.from_numpy(gabor(9, np.full(f, 4.0), np.full(f, 4.0), sig, theta, freq, ph))[:, None]
            # readout: a Gaussian spatial pool at a random position × sparse random feature weights
            yy, xx = np.mgrid[:s, :s]
            c = rng.uniform(0.3 * s, 0.7 * s, (2, n_neurons))
            w = rng.uniform(0.08, 0.15, n_neurons) * s
            pool = np.exp(-((xx[None] - c[0][:, None, None]) ** 2 + (yy[None] - c[1][:, None, None]) ** 2)
                          / (2 * w[:, None, None] ** 2))
            self.pool = torch.from_numpy(pool / pool.sum(axis=(1, 2), keepdims=True))
            fw = rng.normal(0, 1, (n_neurons, 2 * f)) * (rng.uniform(size=(n_neurons, 2 * f)) < 0.3)
            fw[np.arange(n_neurons), rng.integers(0, 2 * f, n_neurons)] += 2.0  # at least one strong feature
            self.feature_weights = torch.from_numpy(fw)
        calib = natural_images(256, image_size, channels, seed=10_000 + seed)
        drive = self._drive(calib)
        self.mu, self.sd = drive.mean(0), drive.std(0).clamp_min(1e-12)
        self.scale = mean_rate / torch.nn.functional.softplus(1.5 * (drive - self.mu) / self.sd - 0.5).mean(0)

    def _drive(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(images, dtype=torch.float64)
        if x.ndim != 4 or x.shape[-1] != self.size or x.shape[-2] != self.size:
            raise ValueError(f"images must be N × C × {self.size} × {self.size}, got {tuple(x.shape)}")
        x = x.mean(1) - 0.5  # luminance, zero-centred
        if self.kind == "v1":
            flat = x.reshape(len(x), -1)
            lin = flat @ self.filters.reshape(self.n_neurons, -1).T
            quad = flat @ self.quadrature.reshape(self.n_neurons, -1).T
            return torch.where(self.complex, torch.sqrt(lin**2 + quad**2 + 1e-12), lin)
        resp = torch.nn.functional.conv2d(x[:, None], self.bank, padding=4)  # N × F × H × W
        energy = torch.sqrt(resp[:, 0::2] ** 2 + resp[:, 1::2] ** 2 + 1e-12)
        feats = torch.cat([torch.relu(resp[:, 0::2]), energy], 1)  # N × 2F' × H × W (2F' = F)
        feats = torch.cat([feats, torch.relu(-resp[:, 0::2]), torch.relu(resp[:, 1::2])], 1)
        pooled = torch.einsum("nfhw,khw->nkf", feats, self.pool)  # N × neurons × 2F
        return (pooled * self.feature_weights[None]).sum(-1)

    def rates(self, images: torch.Tensor) -> torch.Tensor:
        """Noise-free expected spike counts per trial, N × neurons (float64)."""
        d = (self._drive(images) - self.mu) / self.sd
        return torch.nn.functional.softplus(1.5 * d - 0.5) * self.scale

    def sample(self, images: torch.Tensor, n_repeats: int, seed: int = 0) -> torch.Tensor:
        """Poisson spike counts, n_repeats × N × neurons (float64)."""
        r = self.rates(images)
        g = torch.Generator().manual_seed(seed)
        return torch.poisson(r.expand(n_repeats, *r.shape).contiguous(), generator=g)

    @staticmethod
    def true_explainable_fraction(rates: torch.Tensor) -> np.ndarray:
        """Var_signal / (Var_signal + mean Poisson noise variance), per neuron: the FEV's true value."""
        r = torch.as_tensor(rates, dtype=torch.float64)
        vs, vn = r.var(0, unbiased=False), r.mean(0)
        return (vs / (vs + vn)).numpy()

    @staticmethod
    def true_ceiling(rates: torch.Tensor, n_repeats: int) -> np.ndarray:
        """Expected correlation between the true rate and the average of n_repeats Poisson trials, per neuron:
        sqrt(Var_signal / (Var_signal + mean rate / n_repeats))."""
        r = torch.as_tensor(rates, dtype=torch.float64)
        vs, vn = r.var(0, unbiased=False), r.mean(0)
        return torch.sqrt(vs / (vs + vn / n_repeats)).numpy()
