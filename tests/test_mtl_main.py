"""mtl_cotraining/main.py end to end: the embedded default `--task mtl --mode train` as a subprocess, with both tasks
learning; evaluate, predict_targets, the neural task and benchmark as subprocesses on its outputs or tiny schedules;
exact resume; the mCE against a known baseline; the co-training targets read back; and bad input → exit 2."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_cotraining import data
from mtl_cotraining import main as mtl_main

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "mtl_cotraining" / "main.py")
SMALL = ["--epochs", 1, "--limit_train_batches", 2, "--limit_eval_batches", 1, "--log_every", 1, "--device", "cpu"]


def run(args, check=True, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, MAIN, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mtl_cache")


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """The embedded default, exactly as a user runs it (only the folders are redirected)."""
    out = tmp_path_factory.mktemp("mtl_train") / "run"
    p = run(["--task", "mtl", "--mode", "train", "--cache_root", cache, "--output_root", out, "--device", "cpu"])
    return out, p


def test_embedded_default_learns_both_tasks(trained):
    out, p = trained
    assert "writing embedded synthetic data" in p.stdout and "settings:" in p.stdout
    for f in ("args.json", "metrics.csv", "metrics.jsonl", "last.pt", "best.pt", "results.json",
              "figures/learning_curves.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "mtl" and res["params_shared_core"] == 556_608 and res["n_classes"] == 5
    # both tasks learn: the classifier's training loss falls and its held-out accuracy is above chance (5 classes,
    # 50 test images: chance 0.20 ± 0.057); the neural readouts' held-out correlation is above 0.2.
    # Measured (seed 0, 2 threads): train CE 2.30 → 1.55, test accuracy 0.34, test correlation 0.485.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 46  # 180 train images / batch 8, per epoch
    assert rows[1]["train_ce"] < rows[0]["train_ce"], rows
    assert res["test_acc"] > res["chance_acc"] + 0.05, res
    assert res["neural_test"]["corr"] > 0.2, res["neural_test"]
    ck = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert set(ck["loss_weighting"]) == {"s.img_classification", "s.v1"}  # the learned weights are checkpointed
    assert ck["model_meta"]["sessions"] == {"sim1": 24, "sim2": 24}
    args = json.loads((out / "args.json").read_text())
    assert args["settings_source"]["lr"] == "embedded" and args["settings_source"]["momentum"] == "paper"


def test_resume_is_exact_and_overwrite_refused(cache, tmp_path, cli):
    """The single-task V1 model (--task neural: preset v1, monitor validation correlation, no classifier), in-process
    on a tiny schedule with the learned weighting on (so the NB loss and its s are checkpointed): 1 epoch, then
    --resume to 2, gives the weights of a straight 2-epoch run. Its checkpoints are 40× smaller than MTL's; the
    resume code is the same for every task."""
    small = ["--task", "neural", "--loss_weighting", "on", "--cache_root", cache, *SMALL]
    assert cli(mtl_main.main, ["--output_root", tmp_path / "straight", *small, "--epochs", 2]).returncode == 0
    assert cli(mtl_main.main, ["--output_root", tmp_path / "cut", *small]).returncode == 0
    p = cli(mtl_main.main, ["--output_root", tmp_path / "cut", *small])
    assert p.returncode == 2 and "--resume" in p.stderr and "Traceback" not in p.stderr
    assert cli(mtl_main.main, ["--output_root", tmp_path / "cut", *small, "--epochs", 2, "--resume"]).returncode == 0
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["step"] == 2
    a, b = (torch.load(tmp_path / d / "last.pt", map_location="cpu", weights_only=True) for d in ("straight", "cut"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert all(torch.equal(v, b["loss_weighting"][k]) for k, v in a["loss_weighting"].items())
    res = json.loads((tmp_path / "straight" / "results.json").read_text())
    args = json.loads((tmp_path / "straight" / "args.json").read_text())
    assert res["monitor"] == "valid_corr" and "test_acc" not in res and "corr" in res["neural_test"]
    assert args["neural_loss"] == "poisson" and args["scale_loss"] == "on" and args["preset"] == "v1"
    assert set(a["loss_weighting"]) == {"s.v1"} and args["settings_source"]["loss_weighting"] == "flag"


@pytest.fixture(scope="module")
def evaluated(trained, cache, tmp_path_factory):
    """One evaluate run against a hand-made baseline that gets every corrupted image wrong (error 1 per cell), so
    CE_c = 100 · (1 − mean accuracy of corruption c) and mCE = 100 · (1 − mean corrupted accuracy)."""
    tmp = tmp_path_factory.mktemp("mtl_eval")
    base = {"clean_acc": 0.5, "c_table": {c: {"1": 0.0, "5": 0.0} for c in ("gaussian_noise", "contrast")},
            "noise_levels": [0.0, 0.5], "noise_acc": [0.5, 0.2]}
    (tmp / "base.json").write_text(json.dumps(base))
    run(["--mode", "evaluate", "--checkpoint", trained[0] / "best.pt", "--cache_root", cache, "--output_root",
         tmp / "run", "--corruptions", "gaussian_noise", "contrast", "--severities", 1, 5, "--noise_levels", 0, 0.5,
         "--limit_eval_batches", 1, "--device", "cpu", "--baseline_results", tmp / "base.json"])
    return tmp / "run"


def test_evaluate(evaluated):
    res = json.loads((evaluated / "results.json").read_text())
    assert set(res["c_table"]) == {"gaussian_noise", "contrast"} and set(res["c_table"]["contrast"]) == {"1", "5"}
    cells = [a for v in res["c_table"].values() for a in v.values()]
    assert res["mean_corrupted_acc"] == pytest.approx(np.mean(cells))
    assert len(res["noise_acc"]) == 2 and res["noise_acc"][0] == pytest.approx(res["clean_acc"])  # std 0 = clean
    assert -1 <= res["neural_test"]["corr"] <= 1
    for c, sev in res["c_table"].items():
        assert res["corruption_errors"][c] == pytest.approx(100 * (1 - np.mean(list(sev.values()))))
    assert res["mce"] == pytest.approx(100 * (1 - res["mean_corrupted_acc"]))
    for f in ("corruption_accuracy.png", "noise_robustness.png"):
        assert (evaluated / "figures" / f).is_file()


def test_predict_targets_read_back(trained, cache, tmp_path):
    out = tmp_path / "targets"
    run(["--mode", "predict_targets", "--checkpoint", trained[0] / "best.pt", "--cache_root", cache,
         "--output_root", out, "--limit_images", 6, "--device", "cpu"])
    sets = data.read_sessions(out, split_seed=1000)
    assert sorted(sets) == ["sim1", "sim2"]
    s = sets["sim1"]
    assert s["train"].n_images + s["validation"].n_images == 6 and s["test"].n_images == 6
    from mtl_cotraining.main import build_parser, model_from_checkpoint
    model, _ = model_from_checkpoint(trained[0] / "best.pt", build_parser().parse_args([]))
    model.eval()
    with torch.no_grad():
        pred = model(data.to_input(s["test"].images), task="neural", session="sim1")
    assert torch.allclose(pred, s["test"].responses, rtol=1e-4, atol=1e-5)  # the targets are the predictions


def test_benchmark_json_line():
    p = run(["--mode", "benchmark", "--bench_iters", 1, "--bench_batch_size", 2, "--device", "cpu"])
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["mtl_images_per_s"] > 0 and res["image_images_per_s"] > 0
    assert res["mtl_vs_image_throughput_ratio"] == pytest.approx(res["mtl_images_per_s"] / res["image_images_per_s"],
                                                                 rel=0.01)


def test_bad_input_exits_2(tmp_path, cache, cli):
    """One subprocess proves the exit status end to end; the rest run in-process through run_cli (the same error
    path: exit 2, one line, no traceback), sparing an interpreter start each."""
    p = run(["--task", "image", "--mode", "train", "--data_root", tmp_path / "nope", "--output_root", tmp_path / "o"],
            check=False)
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr
    p = cli(mtl_main.main, ["--mode", "train", "--ratio", "abc", "--output_root", tmp_path / "o"])
    assert p.returncode == 2 and "--ratio" in p.stderr
    p = cli(mtl_main.main, ["--mode", "train", "--readout_lr", 0, "--output_root", tmp_path / "o"])
    assert p.returncode == 2 and "--readout_lr" in p.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    p = cli(mtl_main.main, ["--mode", "evaluate", "--checkpoint", junk, "--cache_root", cache, "--output_root", tmp_path / "e"])
    assert p.returncode == 2 and "junk.pt" in p.stderr
    evil = tmp_path / "evil"
    (evil / "neuronal_data").mkdir(parents=True)
    (evil / "neuronal_data" / "s.pickle").write_bytes(pickle.dumps({"training_responses": Path("x")}))
    p = cli(mtl_main.main, ["--task", "neural", "--mode", "train", "--neural_root", evil, "--output_root", tmp_path / "n"])
    assert p.returncode == 2 and "not allowed" in p.stderr and not (tmp_path / "n").exists()
