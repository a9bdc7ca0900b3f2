"""ndn_baselines: every main.py mode end to end on tiny synthetic data (subprocesses), resume, and bad input."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.runtime import UserError  # noqa: E402
from ndn_baselines import data  # noqa: E402
from ndn_baselines import main as ndn_main  # noqa: E402

MAIN = REPO / "ndn_baselines" / "main.py"
TINY = ["--epochs", "2", "--seeds", "2", "--eval_every", "1"]
SMALL = {r: dict(neurons=5 + r, train=48, val=10, reps=4) for r in (1, 2, 3)}


def run(args, cwd=REPO):
    return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return data.write_synthetic(tmp_path_factory.mktemp("ndn_small"), sizes=SMALL, seed=1)


def test_train_on_embedded_data_writes_the_run_folder(tmp_path):
    out = tmp_path / "runs"
    # from inside the study folder, with no --data_root: the embedded synthetic regions in the real format
    p = run(["--mode", "train", "--model", "bl4", "--output_root", str(out), *TINY], cwd=REPO / "ndn_baselines")
    assert p.returncode == 0, p.stderr
    assert "embedded synthetic data" in p.stdout
    rd = out / "bl4_region1"
    for name in ("args.json", "metrics.csv", "metrics.jsonl", "last.pt", "best.pt", "results.json", "figures/val_corr.png"):
        assert (rd / name).is_file(), name
    res = json.loads((rd / "results.json").read_text())
    assert res["n_params"] == 2426 and res["n_params_ndn3_layout"] == 2444
    assert res["curves"]["epochs"] == [0, 1, 2] and np.asarray(res["curves"]["val_corr"]).shape == (3, 2)
    assert res["final"]["p90"] >= res["final"]["p50"] >= res["final"]["p10"]
    assert 0 < res["noise_ceiling"] < res["avg_ceiling"] <= res["true_ceiling"] + 0.05
    rows = list(csv.DictReader(open(rd / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
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


def test_bad_input_is_one_clear_line(tmp_path, small_root):
    p = run(["--mode", "train", "--data_root", str(tmp_path / "missing"), "--output_root", str(tmp_path / "o")])
    assert p.returncode == 2 and p.stderr.startswith("error:") and "Traceback" not in p.stderr
    assert not (tmp_path / "o" / "bl4_region1").exists()
    with pytest.raises(UserError, match="unknown"):
        ndn_main.main(["--model", "bl9", "--data_root", str(small_root), "--output_root", str(tmp_path)])
    with pytest.raises(UserError, match="TYPE one of"):
        ndn_main.main(["--reg", "out.l3=1", "--data_root", str(small_root), "--output_root", str(tmp_path)])
    with pytest.raises(UserError, match="unknown"):
        ndn_main.main(["--mode", "sweep", "--experiment", "nope", "--output_root", str(tmp_path)])


def test_sweep_then_summarize(tmp_path, small_root):
    out = tmp_path / "sweeps"
    p = run(["--mode", "sweep", "--experiment", "tiny", "--jobs", "2", "--output_root", str(out),
             "--data_root", str(small_root)])
    assert p.returncode == 0, p.stderr + p.stdout
    for i in (0, 1):
        assert (out / "tiny" / f"tiny__{i}" / "results.json").is_file()
    assert "tiny__0: ok" in p.stdout and "ceiling: oracle / trial-avg" in p.stdout
    p2 = run(["--mode", "summarize", "--output_root", str(out)])
    assert p2.returncode == 0, p2.stderr
    rows = list(csv.DictReader(open(out / "summary" / "summary.csv")))
    assert sorted(r["run"] for r in rows) == ["tiny__0", "tiny__1"]
    assert {r["model"] for r in rows} == {"bl4", "ln"}
    assert all(float(r["final_p90"]) >= float(r["final_p50"]) >= float(r["final_p10"]) for r in rows)
    assert (out / "summary" / "tiny.png").is_file() and (out / "summary" / "summary.md").is_file()


def test_benchmark_prints_one_json_line(tmp_path, capsys):
    ndn_main.main(["--mode", "benchmark", "--bench_seeds", "6", "--bench_epochs", "1", "--output_root", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["sec_per_epoch_1_seeds"] > 0 and res["sec_per_epoch_6_seeds"] > 0
    assert res["ratio"] == pytest.approx(res["sec_per_epoch_6_seeds"] / res["sec_per_epoch_1_seeds"], rel=0.01)


def test_every_experiment_grid_parses_and_builds():
    """The first and last setting of every declared thesis grid resolve to valid flags and a working model."""
    from ndn_baselines import experiments, models

    parser = ndn_main.build_parser()
    for name, grid in experiments.EXPERIMENTS.items():
        assert grid, name
        for setting in (grid[0], grid[-1]):
            args = parser.parse_args(ndn_main._flags(setting) + ["--data_root", "unused"])
            s = ndn_main.resolve_settings(args, synthetic_data=False)
            for regions in data.region_list(s["region"]):
                n = sum(data.REGION_SIZES[r]["neurons"] for r in regions)
                net = models.build_model(ndn_main.model_cfg(s, args), n, [0])
                assert net(torch.zeros(2, 961, dtype=torch.float64)).shape == (1, 2, n), (name, setting)
                assert torch.isfinite(net.penalty()).all()
    assert experiments.PRESETS["bl4"]["epochs"] == 35_000 and len(experiments.EXPERIMENTS["multeval"]) == 15
