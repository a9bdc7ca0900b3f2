"""common.settings (shared flags, one resolution order, explicit argv), common.shard (job-array units, markers),
the heatmap / bar chart figures, best.pt links and file permissions."""
import argparse
import os
import stat

import numpy as np
import pytest
from PIL import Image

from common import checkpoint, plots, settings, shard
from common.runtime import UserError


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="train")
    settings.add_shared_flags(p, help={"epochs": "paper 100"}, aliases={"epochs": ["--num_epochs"]})
    p.add_argument("--reg", action="append", default=None)
    p.add_argument("--milestones", type=int, nargs="+", default=None)
    return p


def test_shared_flags_and_alias():
    p = _parser()
    a = p.parse_args(["--num_epochs", "7", "--amp", "off", "--compile"])
    assert a.epochs == 7 and a.amp == "off" and a.compile and not a.resume and a.seed == 0 and a.threads == 0
    assert a.lr is None and a.batch_size is None and a.data_root is None and a.output_root is None
    assert "paper 100" in p.format_help()
    with pytest.raises(SystemExit):
        p.parse_args(["--amp", "fp8"])


def test_resolve_order_and_sources():
    a = _parser().parse_args(["--lr", "0.5"])
    out = settings.resolve(a, dict(lr=0.1, epochs=100, batch_size=128, momentum=0.9),
                           ("paper", dict(epochs=90, batch_size=256)), ("embedded", dict(epochs=3)))
    assert out == dict(lr=0.5, epochs=3, batch_size=256, momentum=0.9)
    assert a.settings_source == dict(lr="flag", epochs="embedded", batch_size="paper", momentum="default")
    assert a.momentum == 0.9  # a key without a flag is set on args too
    line = settings.settings_line(a, ["lr", "epochs"])
    assert line == "settings: lr 0.5 [flag], epochs 3 [embedded]"


def test_default_output_root_is_under_the_repo_whatever_the_cwd(tmp_path, monkeypatch, repo_root):
    monkeypatch.chdir(tmp_path)
    assert settings.default_output_root("ndn_baselines", "train") == str(repo_root / "runs" / "ndn_baselines" / "train")


def test_check_positive():
    a = argparse.Namespace(epochs=0, lr=None)
    with pytest.raises(UserError, match="--epochs must be ≥ 1, got 0"):
        settings.check_positive(a, "epochs", "lr")


def test_explicit_argv_round_trips_every_given_flag():
    p = _parser()
    argv = ["--num_epochs", "5", "--lr", "0.01", "--compile", "--reg", "out.l2=0.1", "--reg", "hidden.l1=1",
            "--milestones", "3", "4", "--amp", "off", "--seed", "3", "--mode", "sweep"]
    a = p.parse_args(argv)
    got = settings.explicit_argv(p, a, exclude=("mode",))
    assert "--mode" not in got and "--num_epochs" not in got  # the kit's name, not the alias
    b = p.parse_args(got)
    for k in ("epochs", "lr", "compile", "reg", "milestones", "amp", "seed"):
        assert getattr(b, k) == getattr(a, k), k
    assert settings.explicit_argv(p, p.parse_args([])) == []


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_partition_the_units_exactly_once(n):
    units = [f"u{i}" for i in range(17)]
    parts = [shard.my_units(units, (k, n)) for k in range(n)]
    assert sorted(sum(parts, [])) == sorted(units)
    assert all(len(p) in (17 // n, 17 // n + 1) for p in parts)
    assert parts[0][0] == "u0" and (n == 1 or parts[1][0] == "u1")  # unit i belongs to shard i mod N


def test_parse_shard_specs_and_scheduler_environments():
    assert shard.parse_shard("0/1") == (0, 1) and shard.parse_shard(" 2/5 ") == (2, 5)
    for bad in ("5/5", "-1/3", "1/0", "a/b", "3"):
        with pytest.raises(UserError, match="--shard"):
            shard.parse_shard(bad)
    slurm = dict(SLURM_ARRAY_TASK_ID="7", SLURM_ARRAY_TASK_MIN="4", SLURM_ARRAY_TASK_COUNT="6")
    assert shard.parse_shard("slurm", slurm) == (3, 6)
    with pytest.raises(UserError, match="SLURM_ARRAY_TASK_COUNT not set"):
        shard.parse_shard("slurm", dict(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_MIN="0"))
    with pytest.raises(UserError, match="not a job-array task"):
        shard.parse_shard("slurm", {})
    sge = dict(SGE_TASK_ID="3", SGE_TASK_FIRST="1", SGE_TASK_LAST="4", SGE_TASK_STEPSIZE="1")
    assert shard.parse_shard("sge", sge) == (2, 4)
    with pytest.raises(UserError, match="not integers"):
        shard.parse_shard("sge", dict(sge, SGE_TASK_ID="undefined"))
    with pytest.raises(UserError, match="STEPSIZE"):
        shard.parse_shard("sge", dict(sge, SGE_TASK_STEPSIZE="2"))
    with pytest.raises(UserError, match="SGE_TASK_ID"):
        shard.parse_shard("sge", {})


def test_unit_lifecycle_skip_resume_overwrite_and_merge(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert shard.prepare_unit(a) == "run"
    a.mkdir()
    checkpoint.write_json(a / "result.json", {"x": 1})
    shard.mark_complete(a, {"x": 1})
    assert shard.is_complete(a) and shard.prepare_unit(a) == "skip"
    b.mkdir()
    (b / "partial.json").write_text("{}")  # interrupted: no marker
    with pytest.raises(UserError, match="interrupted unit"):
        shard.prepare_unit(b)
    assert shard.prepare_unit(b, resume=True) == "resume" and (b / "partial.json").exists()
    assert shard.prepare_unit(a, overwrite=True) == "run" and not a.exists()  # --overwrite redoes it
    with pytest.raises(UserError, match="exclude"):
        shard.prepare_unit(b, resume=True, overwrite=True)
    done, missing = shard.collect({"a": a, "b": b, "c": c})
    assert done == [] and missing == ["a", "b", "c"]
    c.mkdir()
    shard.mark_complete(c)
    assert shard.collect({"a": a, "b": b, "c": c}) == (["c"], ["a", "b"])
    shard.report_missing(["a", "b"], 3, require_complete=False)
    with pytest.raises(UserError, match="2 of 3 units missing or incomplete: a, b"):
        shard.report_missing(["a", "b"], 3, require_complete=True)


def test_heatmap_and_bar_chart_draw_their_values(tmp_path):
    h = plots.heatmap(tmp_path / "h.png", [[0.0, 1.0], [0.5, float("nan")]], ["V1", "V4"], ["l0", "l1"],
                      title="t", marks=[(0, 1)])
    img = np.asarray(Image.open(h).convert("RGB")).astype(int)
    assert (np.abs(img - [253, 231, 37]).sum(-1) < 10).sum() > 200  # the maximum in viridis yellow
    assert (np.abs(img - [68, 1, 84]).sum(-1) < 10).sum() > 200  # the minimum in viridis purple
    assert (np.abs(img - [230, 30, 30]).sum(-1) < 10).sum() > 50  # the marked cell's outline
    assert (np.abs(img - [200, 200, 200]).sum(-1) < 3).sum() > 200  # the NaN cell in grey
    b = plots.bar_chart(tmp_path / "b.png", ["a", "b"], [dict(label="m", values=[0.2, 0.8])], hlines=[(0.5, "x")])
    img = np.asarray(Image.open(b).convert("RGB")).astype(int)
    blue = np.abs(img - list(plots.COLORS[0])).sum(-1) < 10
    blue[:, img.shape[1] - 190:] = False  # the legend's swatch
    cols = np.where(blue.any(0))[0]
    heights = [blue[:, cols[cols < cols.mean()]].sum(0).max(), blue[:, cols[cols > cols.mean()]].sum(0).max()]
    assert heights[1] / heights[0] == pytest.approx(4.0, rel=0.1)  # bar heights proportional to 0.2 and 0.8


def test_best_checkpoint_links_and_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run = checkpoint.RunDir(tmp_path / "r", {"lr": 0.1})
        run.save_best({"epoch": 1}, also=("best_model_acc.pt",))
        a, b = run.path / "best.pt", run.path / "best_model_acc.pt"
        assert os.path.samefile(a, b) and checkpoint.load_checkpoint(b)["epoch"] == 1
        run.save_best({"epoch": 2}, also=("best_model_acc.pt",))
        assert checkpoint.load_checkpoint(b)["epoch"] == 2 and os.path.samefile(a, b)
        for f in (a, run.path / "args.json"):  # readable by the lab group, as open() would create them
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o644, f
    finally:
        os.umask(old)
