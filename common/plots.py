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


def _viridis(t: float) -> tuple[int, int, int]:
    """A 5-stop approximation of matplotlib's viridis (perceptually ordered, colour-blind safe)."""
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    return tuple(int(round(a + (b - a) * f)) for a, b in zip(stops[i], stops[i + 1]))


def heatmap(path, values, row_labels, col_labels, title="", marks=(), fmt="{:.2f}", vmin=None, vmax=None,
            cell=(46, 22)) -> Path:
    """A table of coloured cells (viridis) with the value printed in each; `values` rows × cols (None/NaN: grey,
    'n/a'); `marks`: (row, col) cells outlined in red (e.g. the best layer of each site). Writes a PNG."""
    rows = [[None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in r] for r in values]
    finite = [v for r in rows for v in r if v is not None]
    lo = min(finite) if vmin is None and finite else (vmin if vmin is not None else 0.0)
    hi = max(finite) if vmax is None and finite else (vmax if vmax is not None else 1.0)
    cw, ch = cell
    left = 12 + 6 * max([len(str(r)) for r in row_labels] + [1])
    top = 40 + 6 * max([len(str(c)) for c in col_labels] + [1])
    W, H = left + cw * len(col_labels) + 70, top + ch * len(row_labels) + 20
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((8, 6), title, fill="black", font=font)
    for j, c in enumerate(col_labels):  # column labels drawn rotated by 90°
        label = Image.new("RGB", (6 * len(str(c)) + 4, 12), "white")
        ImageDraw.Draw(label).text((1, 0), str(c), fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (left + j * cw + cw // 2 - 6, top - label.size[1] - 4))
    for i, r in enumerate(row_labels):
        d.text((6, top + i * ch + ch // 2 - 6), str(r), fill="black", font=font)
    for i, r in enumerate(rows):
        for j, v in enumerate(r):
            box = [left + j * cw, top + i * ch, left + (j + 1) * cw - 1, top + (i + 1) * ch - 1]
            if v is None:
                d.rectangle(box, fill=(200, 200, 200))
                d.text((box[0] + 4, box[1] + 5), "n/a", fill="black", font=font)
                continue
            colour = _viridis((v - lo) / (hi - lo) if hi > lo else 0.5)
            d.rectangle(box, fill=colour)
            ink = "black" if sum(colour) > 380 else "white"
            d.text((box[0] + 3, box[1] + 5), fmt.format(v), fill=ink, font=font)
    for i, j in marks:
        box = [left + j * cw, top + i * ch, left + (j + 1) * cw - 1, top + (i + 1) * ch - 1]
        d.rectangle(box, outline=(230, 30, 30), width=3)
    for k in range(ch * len(row_labels)):  # colour bar
        t = 1 - k / max(ch * len(row_labels) - 1, 1)
        d.line([W - 52, top + k, W - 40, top + k], fill=_viridis(t))
    d.text((W - 36, top - 4), f"{hi:.3g}", fill="black", font=font)
    d.text((W - 36, top + ch * len(row_labels) - 8), f"{lo:.3g}", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def bar_chart(path, categories, series, title="", ylabel="", hlines=(), size=None) -> Path:
    """Grouped bars: `series` is a list of {label, values} with one value per category (None: no bar);
    `hlines` [(y, label)] dashed reference lines. Writes a PNG."""
    n_cat, n_ser = len(categories), max(len(series), 1)
    W, H = size or (max(480, 90 + n_cat * (10 + 12 * n_ser) + 190), 420)
    left, right, top, bottom = 64, 190, 34, 110
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    vals = [v for s in series for v in s["values"] if v is not None] + [y for y, _ in hlines]
    y0, y1 = min(vals + [0.0]), max(vals + [0.0]) or 1.0
    y1 += 0.05 * (y1 - y0 or 1.0)
    py = lambda y: H - bottom - (y - y0) / ((y1 - y0) or 1.0) * (H - top - bottom)  # noqa: E731
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for t in _ticks(y0, y1):
        d.line([left - 4, py(t), left, py(t)], fill="black")
        d.line([left, py(t), W - right, py(t)], fill=(235, 235, 235))
        d.text((4, py(t) - 6), f"{t:.3g}", fill="black", font=font)
    d.text((left, 10), title, fill="black", font=font)
    d.text((4, 22), ylabel, fill="black", font=font)
    group = (W - left - right) / max(n_cat, 1)
    bw = max(2.0, (group - 8) / n_ser)
    for c, name in enumerate(categories):
        gx = left + c * group + 4
        for s_i, s in enumerate(series):
            v = s["values"][c]
            if v is None:
                continue
            x0 = gx + s_i * bw
            d.rectangle([x0, min(py(v), py(0)), x0 + bw - 1, max(py(v), py(0))], fill=COLORS[s_i % len(COLORS)])
        label = Image.new("RGB", (6 * len(str(name)) + 4, 12), "white")
        ImageDraw.Draw(label).text((1, 0), str(name), fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (int(gx + group / 2 - 8), H - bottom + 4))
    for i, s in enumerate(series):
        c = COLORS[i % len(COLORS)]
        d.rectangle([W - right + 10, top + 14 * i + 2, W - right + 24, top + 14 * i + 10], fill=c)
        d.text((W - right + 30, top + 14 * i), str(s.get("label", ""))[:26], fill="black", font=font)
    for y, label in hlines:
        yy = py(y)
        for xx in range(left, W - right, 8):
            d.line([xx, yy, min(xx + 4, W - right), yy], fill=(90, 90, 90))
        d.text((left + 4, yy - 12), label, fill=(90, 90, 90), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
