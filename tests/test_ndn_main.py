"""ndn_baselines: every main.py mode end to end on tiny synthetic data, how settings are decided and recorded,
resume, sweeps as sharded job arrays and their merge, and bad input."""
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common import runtime
from common.runtime import UserError
from ndn_baselines import data, experiments, models
from ndn_baselines import main as ndn_main

TINY = ["--epochs", "2", "--seeds", "2", "--eval_every", "1"]
SMALL = {r: dict(neurons=5 + r, train=48, val=10, reps=4) for r in (1, 2, 3)}


def main_py(repo_root):
    return str(repo_root / "ndn_baselines" / "main.py")


def run(repo_root, args, cwd=None):
    return subprocess.run([sys.executable, main_py(repo_root), *args], cwd=cwd or repo_root, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return data.write_synthetic(tmp_path_factory.mktemp("ndn_small"), sizes=SMALL, seed=1)


# ----------------------------------------------------------------------------- settings


def resolved(argv):
    _, args = ndn_main.parse_args(argv)
    ndn_main.resolve_settings(args)
    return args


def test_settings_come_from_one_place_with_their_sources(repo_root, monkeypatch):
    real = resolved(["--data_root", "DATA"])  # the thesis protocol for bl4
    assert (real.lr, real.epochs, real.seeds, real.batch_size, real.reg) == (1e-3, 35_000, 50, 16, ["hidden.l2=0.0", "out.l2=0.1"])
    src = real.settings_source
    assert (src["lr"], src["epochs"], src["seeds"], src["model"]) == ("preset bl4", "preset bl4", "default", "default")
    emb = resolved(["--model", "ln"])  # no data: the embedded short schedule, per preset where needed
    assert (emb.epochs, emb.seeds, emb.eval_every, emb.reg) == (150, 4, 25, ["out.d2x=100"])
    assert (emb.settings_source["epochs"], emb.settings_source["seeds"]) == ("embedded ln", "embedded")
    flag = resolved(["--model", "bl2", "--lr", "0.5", "--reg", "out.l1=1", "--seed_offset", "7"])
    assert (flag.lr, flag.settings_source["lr"], flag.reg, flag.seed) == (0.5, "flag", ["out.l1=1"], 7)
    assert flag.bias_init == "zeros" and flag.settings_source["bias_init"] == "preset bl2"
    # a grid setting beats the preset and the embedded schedule; a flag beats the grid
    unit = resolved(["--experiment", "tiny", "--grid_index", "1", "--seeds", "3"])
    assert (unit.model, unit.epochs, unit.seeds, unit.log_every) == ("ln", 3, 3, 1)
    assert unit.settings_source["epochs"] == unit.settings_source["model"] == "experiment tiny #1"
    assert resolved(["--experiment", "bs2_exp1", "--grid_index", "0", "--data_root", "D"]).lr == 1e-5
    # the models' defaults are the settings' defaults (one place)
    assert all(models.MODEL_DEFAULTS[k] == experiments.DEFAULTS[k] for k in experiments.MODEL_KEYS)
    monkeypatch.chdir(repo_root / "ndn_baselines")  # the default output folder does not depend on the cwd
    assert ndn_main.parse_args([])[1].output_root == str(repo_root / "runs" / "ndn_baselines")


def test_percentiles_and_peak_known_answers():
    assert ndn_main.percentiles(np.arange(11.0)) == {"p50": 5.0, "p90": 9.0, "p10": 1.0}
    assert ndn_main.percentiles([0.0, 1.0]) == pytest.approx({"p50": 0.5, "p90": 0.9, "p10": 0.1})  # pandas quantile
    corr = [[0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [0.4, 0.4, 0.4]]  # (evals, seeds): the median peaks at eval 1
    s = ndn_main.curve_summary([0, 10, 20], corr)
    assert s["peak"] == pytest.approx({"epoch": 10, "p50": 0.6, "p90": 0.68, "p10": 0.52})
    assert s["final"] == pytest.approx({"epoch": 20, "p50": 0.4, "p90": 0.4, "p10": 0.4})


# ----------------------------------------------------------------------------- train


def test_train_on_embedded_data_writes_the_run_folder(tmp_path, repo_root):
    out = tmp_path / "runs"
    # from inside the study folder, with no --data_root: the embedded synthetic regions in the real format
    p = run(repo_root, ["--mode", "train", "--model", "bl4", "--output_root", str(out), *TINY, "--threads", "1"],
            cwd=repo_root / "ndn_baselines")
    assert p.returncode == 0, p.stderr
    assert "embedded synthetic data" in p.stdout
    assert "lr 0.001 [preset bl4]" in p.stdout and "epochs 2 [flag]" in p.stdout  # resolved settings at start
    rd = out / "bl4_region1"
    for name in ("args.json", "metrics.csv", "metrics.jsonl", "last.pt", "best.pt", "results.json", "figures/val_corr.png"):
        assert (rd / name).is_file(), name
    recorded = json.loads((rd / "args.json").read_text())
    assert (recorded["lr"], recorded["settings_source"]["lr"], recorded["amp"]) == (0.001, "preset bl4", "off")
    res = json.loads((rd / "results.json").read_text())
    assert res["n_params"] == 2426 and res["n_params_ndn3_layout"] == 2444
    assert res["curves"]["epochs"] == [0, 1, 2] and np.asarray(res["curves"]["val_corr"]).shape == (3, 2)
    assert 0 < res["noise_ceiling"] < res["avg_ceiling"] <= res["true_ceiling"] + 0.05
    rows = list(csv.DictReader(open(rd / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    last = torch.load(rd / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and len(last["generators"]) == 2  # next epoch to run; each seed's generator
    # the same command again must not touch the run (main.py turns the UserError into exit status 2)
    before = (rd / "results.json").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        ndn_main.main(["--mode", "train", "--model", "bl4", "--output_root", str(out), *TINY])
    assert (rd / "results.json").read_bytes() == before


def test_resume_continues_exactly(small_root, tmp_path):
    base = ["--mode", "train", "--model", "bl3", "--data_root", str(small_root), "--seeds", "2", "--eval_every", "1",
            "--dtype", "float64", "--dropout", "0.1"]
    full = ndn_main.main(base + ["--output_root", str(tmp_path / "a"), "--epochs", "4"])[0]
    ndn_main.main(base + ["--output_root", str(tmp_path / "b"), "--epochs", "2"])
    resumed = ndn_main.main(base + ["--output_root", str(tmp_path / "b"), "--epochs", "4", "--resume"])[0]
    np.testing.assert_allclose(resumed["curves"]["val_corr"], full["curves"]["val_corr"], rtol=1e-10, atol=1e-12)
    a = torch.load(tmp_path / "a" / "bl3_region1" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "bl3_region1" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-10, atol=1e-12) for k in a)
    rows = [json.loads(x) for x in open(tmp_path / "b" / "bl3_region1" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]


def test_regions_all_and_pooled(small_root, tmp_path):
    common = ["--mode", "train", "--model", "bl4", "--data_root", str(small_root), *TINY]
    res = ndn_main.main(common + ["--region", "all", "--output_root", str(tmp_path)])
    assert [r["regions"] for r in res] == [["region1"], ["region2"], ["region3"]]
    assert res[1]["n_params"] == 9 * 7 + 1 * 9 + 1 + 1 * 7 + 7  # region 2: 7 neurons → int(0.2·7) = 1 hidden unit
    pooled = ndn_main.main(common + ["--region", "pooled", "--output_root", str(tmp_path)])[0]
    assert pooled["regions"] == ["region1", "region2", "region3"]
    assert set(pooled["per_region"]) == {"region1", "region2", "region3"}


def test_bad_input_is_one_clear_line(tmp_path, small_root, capsys):
    with pytest.raises(SystemExit) as stop:  # main.py's entry point: one line on stderr, exit status 2
        runtime.run_cli(ndn_main.main, ["--mode", "train", "--data_root", str(tmp_path / "missing"),
                                        "--output_root", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: --data_root") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "bl4_region1").exists()
    d = ["--data_root", str(small_root), "--output_root", str(tmp_path)]
    for argv, message in ((["--model", "bl9"], "unknown"), (["--reg", "out.l3=1"], "TYPE one of"),
                          (["--amp", "fp16"], "couple the seeds"), (["--experiment", "tiny"], "needs --grid_index"),
                          (["--experiment", "tiny", "--grid_index", "2"], "settings 0..1"),
                          (["--mode", "sweep", "--experiment", "nope"], "unknown"),
                          (["--mode", "sweep", "--experiment", "tiny", "--model", "bl2"], "--model cannot apply"),
                          (["--mode", "sweep", "--experiment", "tiny", "--shard", "2/2"], "0 ≤ K < N"),
                          (["--mode", "summarize", "--experiment", "tiny", "--require_complete"], "tiny__0, tiny__1")):
        with pytest.raises(UserError, match=message):
            ndn_main.main(argv + d)


# ----------------------------------------------------------------------------- sweeps, shards, merge


def _metrics(unit_dir):
    """A unit's metrics rows without the wall-clock column."""
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in open(unit_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, small_root, repo_root):
    """`tiny` swept as two shards launched at the same time into one folder (B: subprocesses, each running its
    units in-process), and meanwhile on one machine with its two units as parallel subprocesses (A: --jobs 2).
    Flags the old sweep dropped (--lr, --batch_size, --amp, --scaling) are given to both."""
    base = tmp_path_factory.mktemp("ndn_sweeps")
    flags = ["--mode", "sweep", "--experiment", "tiny", "--threads", "1", "--data_root", str(small_root),
             "--lr", "0.005", "--batch_size", "8", "--amp", "bf16", "--scaling", "zscore"]
    shards = [subprocess.Popen([sys.executable, main_py(repo_root), *flags, "--output_root", str(base / "B"),
                                "--shard", f"{k}/2"], cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for k in (0, 1)]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        ndn_main.main([*flags, "--output_root", str(base / "A"), "--jobs", "2"])
    outs = [p.communicate(timeout=300) for p in shards]
    for p, (out, err) in zip(shards, outs):
        assert p.returncode == 0, err + out
    return base, log.getvalue(), [out for out, _ in outs]


def test_sweep_forwards_every_flag_to_every_run(sweeps):
    base, stdout, _ = sweeps
    for folder in ("A", "B"):
        for i, model in enumerate(("bl4", "ln")):
            rec = json.loads((base / folder / "tiny" / f"tiny__{i}" / "args.json").read_text())
            src = rec["settings_source"]
            assert (rec["lr"], rec["batch_size"], rec["amp"], rec["scaling"], rec["threads"]) == (0.005, 8, "bf16", "zscore", 1)
            assert src["lr"] == src["batch_size"] == src["scaling"] == "flag"
            assert (rec["model"], rec["epochs"], src["epochs"]) == (model, 3, f"experiment tiny #{i}")
    assert "forwarded to every run: " in stdout and "--lr 0.005" in stdout and "tiny__0: ok" in stdout


def test_two_concurrent_shards_equal_the_unsharded_sweep(sweeps, capsys):
    base, _, shard_outs = sweeps
    a, b = base / "A" / "tiny", base / "B" / "tiny"
    assert not (b / "summary").exists()  # a shard of N > 1 writes nothing shared...
    assert all("--mode summarize --experiment tiny" in out for out in shard_outs)  # ...and prints the merge command
    for name in ("tiny__0", "tiny__1"):
        assert (b / name / ".complete").is_file() and (b / "job_logs" / f"o_{name}.log").is_file()
        assert _metrics(b / name) == _metrics(a / name), name
    ndn_main.main(["--mode", "summarize", "--experiment", "tiny", "--output_root", str(base / "B"), "--require_complete"])
    merged = json.loads((b / "summary" / "summary.json").read_text())
    assert merged == json.loads((a / "summary" / "summary.json").read_text())
    assert [r["run"] for r in merged] == ["tiny__0", "tiny__1"] and {r["model"] for r in merged} == {"bl4", "ln"}
    assert (b / "summary" / "tiny.png").is_file() and "missing" not in capsys.readouterr().out


def test_killed_shard_reruns_only_the_missing_unit_and_merge_lists_it(tmp_path, small_root, repo_root, capsys):
    flags = ["--mode", "sweep", "--experiment", "tiny", "--threads", "1", "--data_root", str(small_root),
             "--epochs", "300", "--eval_every", "50", "--output_root", str(tmp_path)]
    root = tmp_path / "tiny"
    p = subprocess.Popen([sys.executable, main_py(repo_root), *flags], cwd=repo_root, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not ((root / "tiny__0" / ".complete").exists() and (root / "tiny__1" / "last.pt").exists()):
        assert p.poll() is None and time.time() < deadline, "the sweep ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)  # the shard, mid-unit (it runs its units in-process)
    p.wait()
    assert not (root / "tiny__1" / ".complete").exists()
    # the merge lists the missing unit (and fails with --require_complete)
    merge = ["--mode", "summarize", "--experiment", "tiny", "--output_root", str(tmp_path)]
    ndn_main.main(merge)
    assert "1 of 2 runs of tiny missing or incomplete: tiny__1" in capsys.readouterr().out
    assert [r["run"] for r in json.loads((root / "summary" / "summary.json").read_text())] == ["tiny__0"]
    with pytest.raises(UserError, match="tiny__1"):
        ndn_main.main(merge + ["--require_complete"])
    # without --resume an interrupted unit is an error; with it only the missing unit runs
    with pytest.raises(UserError, match="interrupted unit"):
        ndn_main.main(flags)
    done0 = (root / "tiny__0" / "results.json").stat().st_mtime_ns
    ndn_main.main([*flags, "--resume"])
    out = capsys.readouterr().out
    assert "tiny__0: complete, skipped" in out and "tiny__1: ok" in out
    assert (root / "tiny__0" / "results.json").stat().st_mtime_ns == done0
    assert (root / "tiny__1" / ".complete").is_file()
    assert [r["epoch"] for r in _metrics(root / "tiny__1")] == list(range(0, 301, 50))


# ----------------------------------------------------------------------------- benchmark, grids


def test_benchmark_prints_measurements_only(capsys):
    ndn_main.main(["--mode", "benchmark", "--bench_seeds", "3", "--bench_epochs", "1", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert (res["seeds"], res["train_images"], res["neurons"], res["batch_size"], res["threads"]) == (3, 1800, 103, 16, 1)
    assert not any("target" in k for k in res)
    assert all(res[k] > 0 for k in ("sec_per_epoch_1_seeds", "sec_per_epoch_3_seeds", "sec_per_epoch_1_seeds_shared_order",
                                    "sec_per_epoch_3_seeds_shared_order", "items_per_sec"))


def test_every_experiment_grid_resolves_and_builds():
    """The first and last setting of every declared thesis grid resolve to valid settings and a working model;
    a grid's reg list replaces the preset's (bs4_exp6: what/where with an L2 readout has no L1 term left)."""
    for name, grid in experiments.EXPERIMENTS.items():
        assert grid, name
        for i in (0, len(grid) - 1):
            args = resolved(["--experiment", name, "--grid_index", str(i), "--data_root", "unused"])
            assert args.settings_source["model"] == f"experiment {name} #{i}"
            for regions in data.region_list(args.region):
                n = sum(data.REGION_SIZES[r]["neurons"] for r in regions)
                net = models.build_model(ndn_main.model_cfg(args), n, [0])
                assert net(torch.zeros(2, 961, dtype=torch.float64)).shape == (1, 2, n), (name, i)
                assert torch.isfinite(net.penalty()).all()
    last = resolved(["--experiment", "bs4_exp6", "--grid_index", "7", "--data_root", "unused"])
    assert experiments.parse_reg(last.reg) == {"conv": {"d2x": 0.1, "max_filt": 0.01}, "out": {"l2": 0.1}}
    assert experiments.PRESETS["bl4"]["epochs"] == 35_000 and len(experiments.EXPERIMENTS["multeval"]) == 15
