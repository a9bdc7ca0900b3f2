"""Figures for the run directory (`figures/*.png`) drawn with PIL: matplotlib is not a run-time dependency.

`line_plot`: curves over epochs/steps with optional shaded bands (e.g. 10th–90th percentile over seeds)
and dashed horizontal reference lines (e.g. a noise ceiling or chance level)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values (1, 2 or 5 × 10^k apart) within [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(n + 2) if first + i * step <= hi + 1e-12]


def line_plot(path, series, title="", xlabel="epoch", ylabel="", hlines=(), size=(720, 440)) -> Path:
    """series: list of dicts {label, x, y, lo (optional), hi (optional)}; hlines: [(y, label)]. Writes a PNG."""
    W, H = size
    left, right, top, bottom = 64, 190, 34, 46
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [v for s in series for v in s["x"]]
    ys = [v for s in series for key in ("y", "lo", "hi") for v in (s.get(key) or [])] + [y for y, _ in hlines]
    if not xs or not ys:
        xs, ys = [0, 1], [0, 1]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda x: left + (x - x0) / (x1 - x0) * (W - left - right)  # noqa: E731
    py = lambda y: H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom)  # noqa: E731
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in _ticks(y0, y1):
        d.line([left - 4, py(t), left, py(t)], fill="black")
        d.line([left, py(t), W - right, py(t)], fill=(235, 235, 235))
        d.text((4, py(t) - 6), f"{t:.3g}", fill="black", font=font)
    for t in _ticks(x0, x1):
        d.line([px(t), H - bottom, px(t), H - bottom + 4], fill="black")
        d.text((px(t) - 12, H - bottom + 8), f"{t:g}", fill="black", font=font)
    d.text((left, 10), title, fill="black", font=font)
    d.text(((W - right + left) // 2 - 20, H - 18), xlabel, fill="black", font=font)
    d.text((4, 10 if not title else 22), ylabel, fill="black", font=font)
    for i, s in enumerate(series):
        c = COLORS[i % len(COLORS)]
        pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"])]
        if s.get("lo") and s.get("hi"):
            band = [(px(x), py(y)) for x, y in zip(s["x"], s["hi"])] + \
                   [(px(x), py(y)) for x, y in reversed(list(zip(s["x"], s["lo"])))]
            if len(band) > 2:
                light = tuple(int(v + (255 - v) * 0.75) for v in c)
                d.polygon(band, fill=light)
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        elif pts:
            d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=c)
        d.line([W - right + 10, top + 14 * i + 6, W - right + 28, top + 14 * i + 6], fill=c, width=3)
        d.text((W - right + 32, top + 14 * i), str(s.get("label", ""))[:26], fill="black", font=font)
    for j, (y, label) in enumerate(hlines):
        if y0 <= y <= y1:
            yy = py(y)
            for xx in range(left, W - right, 8):  # dashed
                d.line([xx, yy, min(xx + 4, W - right), yy], fill=(90, 90, 90))
            d.text((left + 4, yy - 12), label, fill=(90, 90, 90), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
