"""v1_constrained/main.py: the training loop, checkpoints, resume, finetune, validate, eval_c, benchmark,
torchrun and bad input. Every mode runs as a subprocess (the embedded default, benchmark, v1_props, torchrun, one
train on a tiny synthetic Tiny-ImageNet tree); the other runs on that tree are in-process."""
import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common import checkpoint, synthetic
from common.runtime import UserError
from v1_constrained import main as v1main
from v1_constrained.models import MODEL_TYPES, build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]

MAIN = str(REPO / "v1_constrained" / "main.py")
N_CLASSES, N_VAL = 5, 15


def run(args, check=True, timeout=300):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, MAIN, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def inproc(args) -> str:
    """v1main.main in this process, its stdout returned: the small-tree runs below reach every mode's code without an
    interpreter start each (the embedded-default test runs train / finetune / validate / eval_c as subprocesses)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        v1main.main([str(a) for a in args])
    return buf.getvalue()


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A genuine Tiny-ImageNet tree (val as shipped: val/images + val_annotations.txt), 5 classes."""
    return synthetic.write_tiny_imagenet(tmp_path_factory.mktemp("v1data") / "tiny", n_classes=N_CLASSES,
                                         n_train_per_class=8, n_val_per_class=N_VAL // N_CLASSES, seed=3)


def fast(tree, *extra):
    return ["--data_root", tree, "--batch_size", 4, "--limit_train_batches", 2, "--log_every", 1,
            "--num_workers", 0, "--device", "cpu", "--lr", 0.01, *extra]


@pytest.fixture(scope="module")
def trained(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("v1train") / "run"
    p = run(["--mode", "train", "--model_type", "resnet50_composite_a", "--output_root", out, "--num_epochs", 3,
             "--save_freq", 2, *fast(tree)])   # --num_epochs: the release's name, an alias of --epochs
    return out, p


@pytest.fixture(scope="module")
def finetuned(tree, tmp_path_factory):
    """Finetune a (fresh) 1000-way cortical-magnification checkpoint on the 5-class tree."""
    tmp = tmp_path_factory.mktemp("v1ft")
    torch.manual_seed(0)
    src = build_model("resnet50_cortical_magnification", 1000)
    with torch.no_grad():  # non-trivial BN statistics, so "frozen" is visible
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    ck = tmp / "imagenet.pt"
    checkpoint.save_checkpoint(ck, {"model": src.state_dict(), "args": {"model_type": "resnet50_cortical_magnification"}})
    out = tmp / "ft"
    inproc(["--mode", "finetune", "--model_type", "resnet50_cortical_magnification", "--model_path", ck,
            "--output_root", out, "--epochs", 1, *fast(tree)])
    return ck, out


# ----------------------------------------------------------------------------- in-process units


def test_sgd_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_model("resnet50_composite_a", 10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8) % 10
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_save_load_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet50_composite_a", 7).eval()
    path = tmp_path / "m.pt"
    checkpoint.save_checkpoint(path, {"model": model.state_dict(), "args": {"model_type": "resnet50_composite_a"}})
    args = Namespace(model_type="resnet50_composite_a", dog_form="textbook", polar_variant="release",
                     tuned_center="opposite")
    loaded, _ = v1main.load_checkpoint_model(args, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))
    args.model_type = "resnet50_composite_d"
    with pytest.raises(UserError, match="is a resnet50_composite_a model"):
        v1main.load_checkpoint_model(args, path)


def test_linear_probe_freezes_all_but_head_for_every_model_type():
    for name in MODEL_TYPES:
        model = v1main.linear_probe(build_model(name, 1000), 200)
        assert count_parameters(model)[1] == 2048 * 200 + 200, name
        assert all(p.requires_grad == n.startswith("fc.") for n, p in model.named_parameters())


# ----------------------------------------------------------------------------- train / resume


def test_train_writes_run_directory(trained):
    out, p = trained
    assert "epoch 2 step 2/2" in p.stdout  # progress lines
    for name in ("args.json", "metrics.csv", "metrics.jsonl", "results.json", "last.pt", "best.pt",
                 "best_model_acc.pt", "epoch_1.pt", "figures/accuracy.png", "figures/loss.png"):
        assert (out / name).is_file(), name
    # epoch_{e}.pt when (e + 1) % save_freq == 0, e 0-indexed (the release's naming)
    assert sorted(f.name for f in out.glob("epoch_*.pt")) == ["epoch_1.pt"]
    assert os.path.samefile(out / "best.pt", out / "best_model_acc.pt")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2] and [int(r["step"]) for r in rows] == [2, 4, 6]
    last = state(out / "last.pt")
    assert last["epoch"] == 3 and last["args"]["model_type"] == "resnet50_composite_a"
    for key in ("model", "optimizer", "scheduler", "scaler", "valid_acc", "valid_loss"):
        assert key in last
    assert "current_epoch" not in last and "lr_scheduler" not in last   # each key named once
    assert state(out / "epoch_1.pt")["epoch"] == 2
    args = json.loads((out / "args.json").read_text())   # resolved settings and where each came from
    assert args["epochs"] == 3 and args["settings_source"]["epochs"] == "flag"
    assert args["momentum"] == 0.9 and args["settings_source"]["momentum"] == "default"
    assert args["lr_step_milestones"] == [60, 80] and args["settings_source"]["lr_step_milestones"] == "paper"
    assert "settings: epochs 3 [flag]" in p.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["params_total"] == 35_156_346 - 2048 * 995 - 995  # 5-way head
    assert int(rows[-1]["n_valid"]) == N_VAL


def test_resume_equals_uninterrupted(trained, tree, tmp_path):
    full, _ = trained
    out = tmp_path / "resumed"
    common = ["--mode", "train", "--model_type", "resnet50_composite_a", "--output_root", out, "--save_freq", 2, *fast(tree)]
    # subprocesses, like the uninterrupted run: bit-equality needs the same thread count, which in-process runs of
    # other tests may have changed in this process
    run([*common, "--num_epochs", 2])                     # "interrupted" after epoch 1
    p = run([*common, "--num_epochs", 3, "--resume"])     # continues at epoch 2 with optimizer/scheduler state
    assert "resuming" in p.stdout
    a, b = state(full / "last.pt"), state(out / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    ra = [json.loads(line) for line in open(full / "metrics.jsonl")]
    rb = [json.loads(line) for line in open(out / "metrics.jsonl")]
    drop = ("images_per_s", "epoch_time_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rb]


def test_existing_run_is_not_overwritten(trained, tree):
    out, _ = trained
    before = (out / "last.pt").stat().st_mtime_ns
    with pytest.raises(UserError, match="--resume"):
        v1main.main(list(map(str, ["--mode", "train", "--model_type", "resnet50_composite_a", "--output_root", out,
                                   *fast(tree)])))
    assert (out / "last.pt").stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- finetune / validate / eval_c


def test_finetune_changes_only_the_head(finetuned):
    ck, out = finetuned
    src, ft = state(ck)["model"], state(out / "last.pt")["model"]
    assert set(src) == set(ft)
    assert ft["fc.weight"].shape == (N_CLASSES, 2048)
    for k in src:
        if not k.startswith("fc."):
            assert torch.equal(src[k], ft[k]), k   # weights *and* BN running statistics are untouched
    res = json.loads((out / "results.json").read_text())
    assert res["params_trainable"] == 2048 * N_CLASSES + N_CLASSES


def test_finetune_bn_drift_flag(finetuned, tree, tmp_path):
    ck, _ = finetuned
    out = tmp_path / "drift"
    v1main.main(list(map(str, ["--mode", "finetune", "--model_type", "resnet50_cortical_magnification",
                               "--model_path", ck, "--output_root", out, "--epochs", 1, "--finetune_bn_drift",
                               *fast(tree, "--limit_train_batches", 1, "--limit_val_batches", 1)])))
    src, ft = state(ck)["model"], state(out / "last.pt")["model"]
    assert not torch.equal(src["bn1.running_mean"], ft["bn1.running_mean"])  # the release's drifting BN
    assert torch.equal(src["conv1.weight"], ft["conv1.weight"])


def test_validate_loads_finetuned_checkpoint(finetuned, tree, tmp_path):
    _, ft = finetuned
    out = tmp_path / "val"
    stdout = inproc(["--mode", "validate", "--model_type", "resnet50_cortical_magnification", "--model_path",
                     ft / "best_model_acc.pt", "--output_root", out, *fast(tree)])
    res = json.loads((out / "results.json").read_text())
    assert res["n_valid"] == N_VAL
    assert res["valid_acc"] == pytest.approx(state(ft / "best_model_acc.pt")["valid_acc"])
    assert "top-1" in stdout


def test_eval_c_writes_release_csv_and_aggregates(finetuned, tree, tmp_path):
    _, ft = finetuned
    c_root = synthetic.write_tiny_imagenet_c(tmp_path / "c", tree, corruptions=("fog", "brightness"), max_per_class=1)
    out = tmp_path / "evalc"
    inproc(["--mode", "eval_c", "--model_type", "resnet50_cortical_magnification", "--model_path",
            ft / "best_model_acc.pt", "--c_root", c_root, "--output_root", out, "--corruptions", "fog", "brightness",
            *fast(tree)])
    rows = list(csv.reader(open(out / "tinyimagenetc_results.csv")))
    assert rows[0] == ["corruption_type", "difficulty", "valid_acc"]
    # the documented unit order: common.synthetic.CORRUPTIONS (fog before brightness), severity fastest
    assert [(r[0], int(r[1])) for r in rows[1:]] == [(c, s) for c in ("fog", "brightness") for s in range(1, 6)]
    res = json.loads((out / "results.json").read_text())
    assert res["mean_corrupted_acc"] == pytest.approx(sum(float(r[2]) for r in rows[1:]) / 10)
    assert res["per_corruption_mean"]["fog"] == pytest.approx(sum(float(r[2]) for r in rows[1:6]) / 5)
    assert res["clean_acc"] == pytest.approx(state(ft / "best_model_acc.pt")["valid_acc"])  # same val set, same model
    assert (out / "figures" / "eval_c_heatmap.png").is_file() and res["missing_units"] == [] and not res["partial"]


# ----------------------------------------------------------------------------- benchmark, torchrun, embedded


def test_benchmark_prints_one_json_line():
    p = run(["--mode", "benchmark", "--model_type", "resnet50_composite_a", "--device", "cpu",
             "--bench_batch_size", 2, "--bench_iters", 1])
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["model_type"] == "resnet50_composite_a" and res["baseline"] == "resnet50"
    # it timed the models it names: the release's parameter counts, and the batch / LC shape asked for
    assert (res["params_total"], res["baseline_params_total"]) == (35_156_346, 25_557_032)
    assert res["batch_size"] == 2 and res["lc_shape"] == [2, 64, 16, 16] and res["iters"] == 1
    # the two LocallyConnected2d forms it times compute the same function (fp32 rounding only)
    assert res["lc_max_abs_diff"] < 1e-3


def test_torchrun_two_cpu_processes(tree, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", MAIN, "--mode", "train",
           "--model_type", "resnet50_composite_a", "--output_root", str(out), "--num_epochs", "1",
           *map(str, fast(tree, "--batch_size", 2, "--limit_train_batches", 1))]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["n_valid"] == N_VAL   # exact distributed validation: 8 + 7 images, none padded or dropped
    assert not any(k.startswith("module.") for k in state(out / "last.pt")["model"])


def test_embedded_default_learns_above_chance_and_every_mode_runs_on_it(tmp_path):
    """The README's main job exactly as a user runs it (only the output folder differs): it writes a genuine
    Tiny-ImageNet tree, trains the default schedule (~2 min on 2 cores) and beats chance by a wide margin."""
    out = tmp_path / "emb"
    p = run(["--mode", "train", "--output_root", out], timeout=900)
    assert "no --data_root given" in p.stdout
    tiny = out / "synthetic" / "tiny_imagenet_v1"
    assert (tiny / "wnids.txt").is_file() and (tiny / "val" / "val_annotations.txt").is_file()
    res = json.loads((out / "results.json").read_text())
    assert res["chance_acc"] == pytest.approx(0.1)
    assert res["best_valid_acc"] > 0.3, res  # measured 0.705 (seed 0)
    for f in ("args.json", "metrics.csv", "metrics.jsonl", "last.pt", "best_model_acc.pt", "figures/accuracy.png"):
        assert (out / f).is_file(), f

    # The other modes on the same embedded data (no --data_root; --cache_root reuses the tree written above):
    # fine-tune the trained checkpoint, validate the fine-tuned one, then Tiny-ImageNet-C on two corruptions.
    emb = ["--cache_root", out, "--epochs", 1, "--limit_train_batches", 5]
    run(["--mode", "finetune", "--model_path", out / "best_model_acc.pt", "--output_root", tmp_path / "ft", *emb])
    ft = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert ft["mode"] == "finetune" and ft["params_trainable"] == 2048 * 10 + 10
    p = run(["--mode", "validate", "--model_path", tmp_path / "ft" / "best_model_acc.pt", "--output_root",
             tmp_path / "val", "--cache_root", out])
    val = json.loads((tmp_path / "val" / "results.json").read_text())
    assert val["n_valid"] == 200 and val["valid_acc"] == pytest.approx(ft["final_valid_acc"])
    run(["--mode", "eval_c", "--model_path", tmp_path / "ft" / "best_model_acc.pt", "--output_root", tmp_path / "c",
         "--cache_root", out, "--corruptions", "fog", "pixelate", "--limit_val_batches", 2])
    rows = list(csv.DictReader(open(tmp_path / "c" / "tinyimagenetc_results.csv")))
    assert [(r["corruption_type"], r["difficulty"]) for r in rows] == [(c, str(s)) for c in ("fog", "pixelate")
                                                                      for s in range(1, 6)]


# ----------------------------------------------------------------------------- v1_props


def test_v1_props_runs_and_compares(tmp_path):
    """v1_props as a user runs it (no data needed: the stimuli are generated), small: quick protocol, 8 units; then
    --compare of that run folder with another architecture side by side."""
    out = tmp_path / "props"
    p = run(["--mode", "v1_props", "--model_type", "resnet50", "--protocol", "quick", "--n_units", 8, "--device", "cpu",
             "--output_root", out])
    res = json.loads((out / "v1_props.json").read_text())
    assert res["layer"] == "layer1" and res["n_units"] == 8 and len(res["units"]["ssi"]) == 8
    assert res["summary"]["units_kept"]["orientation"] <= 8 and "preferred_orientation_histogram" in res["summary"]
    for f in ("v1_circular_variance.png", "v1_ssi.png", "v1_f1_f0.png", "v1_preferred_orientation.png"):
        assert (out / "figures" / f).is_file(), f
    assert "circular variance" in p.stdout
    cmp = v1main.main([str(a) for a in ("--mode", "v1_props", "--compare", out, "resnet50_center_surround",
                                        "--protocol", "quick", "--n_units", 8, "--device", "cpu",
                                        "--output_root", tmp_path / "cmp")])
    assert cmp["models"] == ["resnet50 (random init)", "resnet50_center_surround (random init)"]
    assert cmp["table"]["ssi median"]["resnet50 (random init)"] == res["summary"]["ssi"].get("median")
    assert (tmp_path / "cmp" / "compare.md").is_file() and (tmp_path / "cmp" / "figures" / "v1_ssi.png").is_file()


# ----------------------------------------------------------------------------- bad input


def test_bad_input_exits_2(tree, tmp_path, trained, cli):
    """One subprocess proves the exit status end to end; the other cases run in-process through run_cli (same
    error path: exit 2, one line, no traceback), sparing an interpreter start each."""
    p = run(["--mode", "train", "--model_type", "resnet50_nope", "--output_root", tmp_path / "x"], check=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    p = cli(v1main.main, ["--mode", "train", "--data_root", empty, "--dataset", "tinyimagenet", "--output_root", tmp_path / "y"])
    assert p.returncode == 2 and "wnids.txt" in p.stderr and "Traceback" not in p.stderr
    out, _ = trained
    p = cli(v1main.main, ["--mode", "validate", "--model_type", "resnet50_composite_d", "--model_path", out / "last.pt",
             "--output_root", tmp_path / "z", *fast(tree)])
    assert p.returncode == 2 and "is a resnet50_composite_a model" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "z").exists()
    p = cli(v1main.main, ["--mode", "eval_c", "--data_root", tree, "--c_root", tmp_path / "nope", "--output_root", tmp_path / "c"])
    assert p.returncode == 2 and "nope is not a folder" in p.stderr and "Traceback" not in p.stderr
    p = cli(v1main.main, ["--mode", "eval_c", "--data_root", tree, "--c_root", tree, "--shard", "slurm", "--output_root",
             tmp_path / "c"])
    assert p.returncode == 2 and "SLURM_ARRAY_TASK_ID" in p.stderr
    p = cli(v1main.main, ["--mode", "v1_props", "--unit_position", "99,0", "--model_type", "resnet50", "--device", "cpu",
             "--output_root", tmp_path / "v"])
    assert p.returncode == 2 and "outside layer1's 16x16 map" in p.stderr and "Traceback" not in p.stderr
