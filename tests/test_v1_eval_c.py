"""--mode eval_c: aggregates against a scripted model (exact CE / mCE / relative mCE), shards that merge into the
unsharded result, missing units and data gaps, --compare — in-process on a hand-written Tiny-ImageNet(-C) tree."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common import shard
from common.datasets import CORRUPTIONS
from common.runtime import UserError
from v1_constrained import main as v1main
from v1_constrained import robustness

WNIDS = [f"n0000000{k}" for k in range(5)]
GREY = [30 + 45 * k for k in range(5)]          # class k = a flat image of grey level GREY[k]
PER_CLASS = 2                                   # 10 images per cell
CORR = ("snow", "fog")                          # unit order: CORRUPTIONS order (snow before fog)
SCRIPT = {"snow": [9, 7, 5, 3, 1], "fog": [10, 8, 8, 6, 2]}          # correct images of 10, per severity
BASE = {"snow": [0.9, 0.8, 0.6, 0.4, 0.2], "fog": [0.9, 0.9, 0.7, 0.5, 0.3]}
BASE_CLEAN = 0.8


class Decoder(torch.nn.Module):
    """Reads the class off the image's mean grey level: always right on flat class images."""

    def forward(self, x):
        g = (x.mean(dim=(1, 2, 3)) * 0.5 + 0.5) * 255
        return -(g[:, None] - torch.tensor(GREY, dtype=x.dtype)[None]).abs()


def flat(path, level):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), level, np.uint8)).save(path, quality=95)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalc")
    tiny = root / "tiny"
    (tiny / "val").mkdir(parents=True)
    (tiny / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for k, w in enumerate(WNIDS):
        for i in range(PER_CLASS):
            flat(tiny / "val" / w / f"val_{k}_{i}.JPEG", GREY[k])
    c_root = root / "c"
    for c in CORRUPTIONS:   # the scripted two; the other 13 always right
        for s in range(1, 6):
            n_right = SCRIPT[c][s - 1] if c in SCRIPT else 10
            for j in range(len(WNIDS) * PER_CLASS):   # image j of class j % 5: right for the first n_right
                k = j % len(WNIDS)
                shown = k if j < n_right else (k + 1) % len(WNIDS)
                flat(c_root / c / str(s) / WNIDS[k] / f"{j}.JPEG", GREY[shown])
    base = root / "baseline.json"
    base.write_text(json.dumps({"model_type": "resnet50", "clean_acc": BASE_CLEAN,
                                "table": {c: {str(s + 1): a for s, a in enumerate(v)} for c, v in BASE.items()}}))
    return tiny, c_root, base


@pytest.fixture(autouse=True)
def scripted_model(monkeypatch):
    monkeypatch.setattr(v1main, "model_to_evaluate", lambda args, n, root: Decoder())


def evalc(tiny, c_root, out, *extra, corruptions=CORR):
    chosen = ("--corruptions", *corruptions) if corruptions else ()
    return v1main.main([str(a) for a in ("--mode", "eval_c", "--data_root", tiny, "--c_root", c_root, "--output_root",
                                         out, "--device", "cpu", "--batch_size", 10, "--num_workers", 0, *chosen,
                                         *extra)])


def test_all_75_cells_in_the_release_csv(trees, tmp_path):
    tiny, c_root, _ = trees
    res = evalc(tiny, c_root, tmp_path / "all", corruptions=())   # no --corruptions: all 15
    rows = list(csv.reader(open(tmp_path / "all" / "tinyimagenetc_results.csv")))
    assert rows[0] == ["corruption_type", "difficulty", "valid_acc"] and len(rows) == 1 + 75
    assert [(r[0], int(r[1])) for r in rows[1:]] == [(c, s) for c in CORRUPTIONS for s in range(1, 6)]
    assert res["n_cells"] == 75 and res["units_expected"] == 76
    # 13 corruptions always right, snow 0.5 and fog 0.68 on average
    assert res["mean_corrupted_acc"] == pytest.approx((13 + 0.5 + 0.68) / 15)


def test_scripted_model_gives_the_scripted_mce(trees, tmp_path):
    tiny, c_root, base = trees
    res = evalc(tiny, c_root, tmp_path / "run", "--baseline_results", base)
    acc = {c: [n / 10 for n in SCRIPT[c]] for c in CORR}
    assert res["clean_acc"] == 1.0
    assert res["table"] == {c: {s + 1: a for s, a in enumerate(acc[c])} for c in CORR}
    # by hand: CE_c = 100 Σ_s (1 − a) / Σ_s (1 − b); mCE = mean_c; relative: errors minus the clean error
    ce = {c: 100 * sum(1 - a for a in acc[c]) / sum(1 - b for b in BASE[c]) for c in CORR}
    rel = {c: 100 * sum((1 - a) - 0.0 for a in acc[c]) / sum((1 - b) - (1 - BASE_CLEAN) for b in BASE[c]) for c in CORR}
    assert ce == {"snow": pytest.approx(100 * 2.5 / 2.1), "fog": pytest.approx(100 * 1.6 / 1.7)}
    assert res["ce"] == pytest.approx(ce)
    assert res["mce"] == pytest.approx((ce["snow"] + ce["fog"]) / 2)
    assert res["relative_mce"] == pytest.approx((rel["snow"] + rel["fog"]) / 2)
    assert res["mean_corrupted_acc"] == pytest.approx((sum(acc["snow"]) + sum(acc["fog"])) / 10)
    assert res["per_corruption_mean"] == pytest.approx({"snow": 0.5, "fog": 0.68})
    out = tmp_path / "run"
    rows = list(csv.reader(open(out / "tinyimagenetc_results.csv")))
    assert [(r[0], int(r[1]), float(r[2])) for r in rows[1:]] == [(c, s + 1, a) for c in CORR for s, a in enumerate(acc[c])]
    assert (out / "figures" / "eval_c_heatmap.png").is_file() and (out / "args.json").is_file()
    units = [json.loads(line)["unit"] for line in open(out / "metrics.jsonl")]
    assert units == ["clean"] + [f"{c}/{s}" for c in CORR for s in range(1, 6)]


def test_shards_merge_into_the_unsharded_result(trees, tmp_path):
    tiny, c_root, base = trees
    whole = evalc(tiny, c_root, tmp_path / "whole", "--baseline_results", base)
    out = tmp_path / "sharded"
    for k in range(3):
        evalc(tiny, c_root, out, "--shard", f"{k}/3")
    # a shard of N > 1 writes only its units' folders, never a shared file
    assert sorted(p.name for p in out.iterdir()) == ["cells"] and len(list((out / "cells").iterdir())) == 11
    merged = evalc(tiny, c_root, out, "--merge_only", "--baseline_results", base)
    for k in ("table", "clean_acc", "mean_corrupted_acc", "per_corruption_mean", "ce", "mce", "relative_mce"):
        assert merged[k] == whole[k], k
    assert (out / "tinyimagenetc_results.csv").read_text() == (tmp_path / "whole" / "tinyimagenetc_results.csv").read_text()
    # unit i ran in shard i mod 3: clean (unit 0) in shard 0, snow/1 (unit 1) in shard 1, ...
    units = ["clean"] + [f"{c}/{s}" for c in CORR for s in range(1, 6)]
    assert shard.my_units(units, (1, 3)) == ["snow/1", "snow/4", "fog/2", "fog/5"]


def test_missing_and_interrupted_units(trees, tmp_path, capsys):
    tiny, c_root, _ = trees
    out = tmp_path / "run"
    evalc(tiny, c_root, out, "--shard", "0/2")
    res = evalc(tiny, c_root, out, "--merge_only")             # shard 1 never ran: its units are listed
    assert res["missing_units"] == ["snow/1", "snow/3", "snow/5", "fog/2", "fog/4"] and res["partial"]
    assert "5 of 11 eval_c units missing" in capsys.readouterr().out
    with pytest.raises(UserError, match="require_complete"):
        evalc(tiny, c_root, out, "--merge_only", "--require_complete")
    # an interrupted unit (no completion marker) is not redone silently; --resume redoes only that one
    (robustness.unit_dir(out, "fog/1") / shard.MARKER).unlink()
    before = (robustness.unit_dir(out, "snow/2") / "accuracy.json").stat().st_mtime_ns
    with pytest.raises(UserError, match="interrupted"):
        evalc(tiny, c_root, out, "--shard", "0/2")
    evalc(tiny, c_root, out, "--shard", "0/2", "--resume")
    assert shard.is_complete(robustness.unit_dir(out, "fog/1"))
    assert (robustness.unit_dir(out, "snow/2") / "accuracy.json").stat().st_mtime_ns == before


def test_missing_severity_is_an_error_or_a_listed_gap(trees, tmp_path):
    tiny, c_root, _ = trees
    partial = tmp_path / "c"
    shutil.copytree(c_root, partial)
    shutil.rmtree(partial / "snow" / "3")
    with pytest.raises(UserError, match="snow/3"):
        evalc(tiny, partial, tmp_path / "a")
    res = evalc(tiny, partial, tmp_path / "b", "--allow_partial")
    assert res["gaps"] == ["snow/3"] and res["partial"] and sorted(res["table"]["snow"]) == [1, 2, 4, 5]


def test_compare_tabulates_runs_side_by_side(trees, tmp_path):
    tiny, c_root, base = trees
    evalc(tiny, c_root, tmp_path / "a")
    other = tmp_path / "b"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"model_type": "resnet50", "clean_acc": BASE_CLEAN,
                                                    "table": {c: {str(s + 1): b for s, b in enumerate(v)}
                                                              for c, v in BASE.items()}}))
    res = v1main.main([str(a) for a in ("--mode", "eval_c", "--compare", tmp_path / "a", other, "--baseline_results",
                                        base, "--output_root", tmp_path / "cmp")])
    assert res["labels"] == ["a", "b"]
    assert res["table"]["mce"]["b"] == pytest.approx(100.0)              # the baseline against itself
    assert res["table"]["snow"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.58)}
    assert (tmp_path / "cmp" / "figures" / "eval_c_compare.png").is_file()
    rows = list(csv.reader(open(tmp_path / "cmp" / "compare.csv")))
    assert rows[0] == ["metric", "a", "b"] and rows[1][0] == "model_type"
