"""Tiny-ImageNet-C robustness (`--mode eval_c`): the sweep's units, their folders, the merge and the comparison.

The release's eval script (eval/tiny_imagenet_c_eval.py) writes top-1 accuracy per (corruption, severity) to
`tinyimagenetc_results.csv` and computes no aggregate. Here the sweep is a fixed list of *units*:

    unit 0        clean: top-1 on the Tiny-ImageNet val set (--data_root) — for the relative mCE
    units 1..75   (corruption, severity) in the order of common.synthetic.CORRUPTIONS (gaussian_noise, shot_noise,
                  impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow, frost, fog, brightness,
                  contrast, elastic_transform, pixelate, jpeg_compression) × severities 1..5, severity fastest

(`--corruptions` / `--severities` shorten the list, keeping that order). Unit i belongs to shard i mod N
(`--shard K/N|slurm|sge`, common.shard). Each unit writes only `cells/<unit>/accuracy.json` and then its
completion marker, so shards on different machines can share one output folder. The merge — the unsharded run
or `--merge_only` — reads the complete units and writes the shared files: `tinyimagenetc_results.csv` (the
release's columns), `metrics.csv`/`.jsonl` (one row per unit), `results.json` (clean accuracy, mean over cells,
per-corruption means, CE / mCE / relative mCE against `--baseline_results`, missing units, data gaps) and
`figures/eval_c_heatmap.png`. Aggregates are common.metrics': CE_c = Σ_s E_{s,c} / Σ_s E^base_{s,c} and
mCE = mean_c CE_c (Hendrycks & Dietterich 2019, eq. 1), in percent; relative mCE subtracts each model's clean error.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from common import checkpoint, metrics, plots, shard
from common.datasets import CORRUPTIONS
from common.runtime import UserError

SEVERITIES = (1, 2, 3, 4, 5)
CSV_NAME = "tinyimagenetc_results.csv"
UNIT_KEYS = ("model_type", "model_path", "dog_form", "polar_variant", "tuned_center", "limit_val_batches")


def add_flags(parser) -> None:
    g = parser.add_argument_group("eval_c (Tiny-ImageNet-C)")
    g.add_argument("--c_root", default=None, help="Tiny-ImageNet-C root <corruption>/<1..5>/<wnid>/*.JPEG "
                   "(default without --data_root: an embedded synthetic one)")
    g.add_argument("--corruptions", nargs="+", default=None, choices=CORRUPTIONS, metavar="NAME",
                   help="only these corruptions (default: all 15, in the documented unit order)")
    g.add_argument("--severities", nargs="+", type=int, default=None, choices=SEVERITIES, metavar="S",
                   help="only these severities (default 1 2 3 4 5)")
    g.add_argument("--allow_partial", action="store_true", help="evaluate the cells present under --c_root and "
                   "list the missing corruption/severity folders in results.json (default: a missing one is an error)")
    g.add_argument("--baseline_results", default=None, help="another eval_c run's results.json (or its folder), "
                   "e.g. plain resnet50's: adds CE per corruption, mCE and relative mCE")
    g.add_argument("--merge_only", action="store_true", help="evaluate nothing: merge the complete units of "
                   "--output_root (after a sharded run) into the CSV, results.json and heatmap")


# ----------------------------------------------------------------------------- units


def plan(c_root: Path, corruptions=None, severities=None, allow_partial: bool = False):
    """(units, gaps): units = ["clean", "<corruption>/<severity>", ...] in the documented order, restricted to
    the cells whose folder exists; gaps = the requested cells whose folder is missing (an error unless
    allow_partial)."""
    c_root = Path(c_root)
    if not c_root.is_dir():
        raise UserError(f"--c_root {c_root} is not a folder (expected <corruption>/<severity>/<wnid>/*.JPEG)")
    wanted = [c for c in CORRUPTIONS if c in (corruptions or CORRUPTIONS)]
    sevs = sorted(set(severities or SEVERITIES))
    cells, gaps = [], []
    for c in wanted:
        for s in sevs:
            (cells if (c_root / c / str(s)).is_dir() else gaps).append(f"{c}/{s}")
    if gaps and not allow_partial:
        raise UserError(f"{c_root} lacks {len(gaps)} of {len(cells) + len(gaps)} corruption/severity folders: "
                        f"{', '.join(gaps[:20])}{' ...' if len(gaps) > 20 else ''} (pass --allow_partial to evaluate "
                        f"the rest, or --corruptions/--severities to choose)")
    if not cells:
        raise UserError(f"{c_root} holds none of the requested corruption/severity folders")
    return ["clean"] + cells, gaps


def unit_dir(output_root, unit: str) -> Path:
    return Path(output_root) / "cells" / unit.replace("/", "_s")


def split_unit(unit: str):
    """'fog/3' → ('fog', 3); 'clean' → (None, None)."""
    if unit == "clean":
        return None, None
    c, s = unit.split("/")
    return c, int(s)


def write_unit(output_root, unit: str, result: dict, args) -> None:
    """One unit's accuracy json, then its completion marker (common.shard)."""
    d = unit_dir(output_root, unit)
    c, s = split_unit(unit)
    info = {"unit": unit, "corruption_type": c, "difficulty": s, **result,
            **{k: getattr(args, k, None) for k in UNIT_KEYS}}
    checkpoint.write_json(d / "accuracy.json", info)
    shard.mark_complete(d, {"unit": unit})


# ----------------------------------------------------------------------------- merge


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def load_results(path) -> dict:
    """An eval_c results.json (or the run folder holding one), with integer severities in its table."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    try:
        res = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: not a readable eval_c results.json ({type(e).__name__})") from None
    if not isinstance(res, dict) or not isinstance(res.get("table"), dict):
        raise UserError(f"{p} has no 'table' of corruption → severity → accuracy (is it an eval_c results.json?)")
    res["table"] = {c: {int(s): float(a) for s, a in sev.items()} for c, sev in res["table"].items()}
    res["_path"] = str(p)
    return res


def baseline_scores(table: dict, clean_acc, baseline_path) -> dict:
    """CE per corruption, mCE and relative mCE (percent) of `table` against a baseline run's results.json."""
    base = load_results(baseline_path)
    lacking = [f"{c}/{s}" for c, sev in table.items() for s in sev if s not in base["table"].get(c, {})]
    if lacking:
        raise UserError(f"--baseline_results {base['_path']} lacks cells {', '.join(lacking[:10])}: the baseline "
                        f"must cover every cell of this run")
    out = {"baseline_results": base["_path"], "baseline_model_type": base.get("model_type"),
           "ce": metrics.corruption_errors(table, base["table"]), "mce": metrics.mce(table, base["table"])}
    if clean_acc is not None and base.get("clean_acc") is not None:
        out["relative_mce"] = metrics.relative_mce(table, clean_acc, base["table"], base["clean_acc"])
    else:
        out["relative_mce"] = None  # needs both clean accuracies
    return out


def merge(args, units: list, gaps: list, c_root, data_root) -> dict:
    """Read the complete units of --output_root and write the shared files (see the module docstring)."""
    out = Path(args.output_root)
    done, missing = shard.collect({u: unit_dir(out, u) for u in units})
    shard.report_missing(missing, len(units), args.require_complete, what="eval_c units")
    infos = {u: json.loads((unit_dir(out, u) / "accuracy.json").read_text()) for u in done}
    for u, info in infos.items():  # shards of one sweep must have evaluated the same model the same way
        for k in UNIT_KEYS:
            if k in info and info[k] != getattr(args, k, None):
                raise UserError(f"{unit_dir(out, u)}/accuracy.json was computed with {k}={info[k]!r} but this merge "
                                f"has {k}={getattr(args, k, None)!r}; merge with the sweep's flags or --overwrite it")
    cells = [u for u in done if u != "clean"]
    if not cells:
        raise UserError(f"{out}: no complete corruption cell to merge ({len(missing)} units missing)")
    rows = [(infos[u]["corruption_type"], infos[u]["difficulty"], infos[u]["valid_acc"]) for u in cells]
    table = metrics.corruption_table(rows)
    clean = infos["clean"]["valid_acc"] if "clean" in infos else None
    res = {"mode": "eval_c", "model_type": args.model_type, "model_path": args.model_path, "c_root": str(c_root),
           "data_root": str(data_root), "clean_acc": clean,
           "mean_corrupted_acc": metrics.mean_corrupted_accuracy(table),
           "per_corruption_mean": {c: sum(sev.values()) / len(sev) for c, sev in table.items()},
           "table": table, "n_cells": len(cells), "units_expected": len(units), "missing_units": missing,
           "gaps": gaps, "partial": bool(missing or gaps), "unit_order": "clean, then common.synthetic.CORRUPTIONS "
           "x severities 1..5 (severity fastest); unit i runs in shard i mod N"}
    if args.baseline_results:
        res.update(baseline_scores(table, clean, args.baseline_results))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["corruption_type", "difficulty", "valid_acc"])  # the release's file, complete cells in unit order
    w.writerows(rows)
    _write_text(out / CSV_NAME, buf.getvalue())
    keys = ("unit", "corruption_type", "difficulty", "valid_acc", "valid_top5", "valid_loss", "n_valid")
    _write_text(out / "metrics.jsonl", "".join(json.dumps({k: infos[u].get(k) for k in keys}) + "\n" for u in done))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows({k: infos[u].get(k) for k in keys} for u in done)
    _write_text(out / "metrics.csv", buf.getvalue())
    corr = [c for c in CORRUPTIONS if c in table] + [c for c in table if c not in CORRUPTIONS]
    sevs = sorted({s for sev in table.values() for s in sev})
    values = [[table[c].get(s) for s in sevs] + [res["per_corruption_mean"][c]] for c in corr]
    title = f"{args.model_type}: top-1 per corruption x severity" + (f" (clean {clean:.3f})" if clean is not None else "")
    plots.heatmap(out / "figures" / "eval_c_heatmap.png", values, corr, [f"severity {s}" for s in sevs] + ["mean"],
                  title=title, vmin=0.0, vmax=1.0)
    checkpoint.write_json(out / "results.json", res)
    summary = {k: res[k] for k in ("clean_acc", "mean_corrupted_acc", "n_cells", "units_expected")}
    if "mce" in res:
        summary.update(mce=res["mce"], relative_mce=res["relative_mce"])
    print(json.dumps(summary), flush=True)
    return res


# ----------------------------------------------------------------------------- --compare


def compare(args, runs: list) -> dict:
    """Several eval_c runs side by side: a table (stdout, compare.csv, compare.md, results.json) and a bar chart
    of per-corruption accuracy (figures/eval_c_compare.png). With --baseline_results, each run's mCE too."""
    results = [load_results(r) for r in runs]
    labels = [Path(r["_path"]).parent.name or r.get("model_type", "?") for r in results]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    corr = [c for c in CORRUPTIONS if any(c in r["table"] for r in results)]
    rows = [("model_type", [r.get("model_type") for r in results]),
            ("clean_acc", [r.get("clean_acc") for r in results]),
            ("mean_corrupted_acc", [metrics.mean_corrupted_accuracy(r["table"]) for r in results])]
    if args.baseline_results:
        scores = [baseline_scores(r["table"], r.get("clean_acc"), args.baseline_results) for r in results]
        rows += [("mce", [s["mce"] for s in scores]), ("relative_mce", [s["relative_mce"] for s in scores])]
    per = {c: [(sum(r["table"][c].values()) / len(r["table"][c])) if c in r["table"] else None for r in results]
           for c in corr}
    rows += [(c, per[c]) for c in corr]
    rd = checkpoint.RunDir(args.output_root, vars(args), resume=False, overwrite=args.overwrite)
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric", *labels])
    w.writerows([name, *map(fmt, vals)] for name, vals in rows)
    _write_text(rd.path / "compare.csv", buf.getvalue())
    md = ["| metric | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    md += ["| " + name + " | " + " | ".join(map(fmt, vals)) + " |" for name, vals in rows]
    _write_text(rd.path / "compare.md", "\n".join(md) + "\n")
    plots.bar_chart(rd.figure_path("eval_c_compare.png"), corr,
                    [{"label": lab, "values": [per[c][i] for c in corr]} for i, lab in enumerate(labels)],
                    title="Tiny-ImageNet-C: mean top-1 over severities", ylabel="top-1")
    res = {"mode": "eval_c_compare", "runs": [r["_path"] for r in results], "labels": labels,
           "table": {name: dict(zip(labels, vals)) for name, vals in rows}}
    rd.write_results(res)
    print("\n".join(md), flush=True)
    return res
