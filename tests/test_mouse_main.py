"""mouse_vision/main.py: the embedded default, exact resume, a 2-process torchrun of IR and SimCLR, the benchmark,
settings/presets, LARS and the schedules, and bad input."""
import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from common import synthetic
from common.runtime import UserError
from mouse_vision import main as mvmain
from mouse_vision.models import build_model

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "mouse_vision" / "main.py")


def run(args, check=True, timeout=600, torchrun=False, threads="1"):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else [sys.executable]
    p = subprocess.run([*head, MAIN, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return synthetic.write_tiny_imagenet(tmp_path_factory.mktemp("mvdata") / "tiny", n_classes=4, n_train_per_class=4,
                                         n_val_per_class=2, seed=5)


def fast(tree, *extra):
    return ["--data_root", tree, "--arch", "dual_stream", "--batch_size", 4, "--limit_train_batches", 2, "--crop_size", 64,
            "--num_workers", 0, "--device", "cpu", "--threads", 1, "--monitor_images", 16, "--log_every", 1,
            "--n_noise", 8, "--lr", 0.01, "--limit_val_batches", 1, *extra]


def test_embedded_default_trains_ir_above_chance(tmp_path):
    out = tmp_path / "run"
    # one thread saves CPU (thread overhead); the per-epoch numbers were the same with 1 and 2 threads (README)
    p = run(["--mode", "train", "--output_root", out])
    assert "no --data_root given" in p.stdout and "settings: arch 'alexnet_bn'" in p.stdout
    assert "lr 1e-05 [embedded]" in p.stdout  # the embedded IR schedule (slug ir-embedded-lr) is printed as such
    res = json.loads((out / "results.json").read_text())
    assert res["arch"] == "alexnet_bn" and res["loss"] == "ir" and res["embedded_data"]
    assert res["final_monitor_acc"] > res["chance_acc"] == 0.1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4] and all("monitor_bank_acc" in r for r in rows)
    # IR learns on the embedded data: the NCE value falls by a wide margin (≈ 12 → 6 measured) and the held-out kNN
    # monitor stays far above chance (at the release's lr 0.003 the loss climbed 15.9 → 272 and the monitor fell to
    # 0.65: README). Its epoch-to-epoch change over 16 held-out images (±1 image) is too small to assert on.
    assert rows[-1]["train_loss"] < 0.75 * rows[0]["train_loss"]
    assert min(r["monitor_acc"] for r in rows) > 3 * res["chance_acc"]
    last = load(out / "last.pt")
    assert last["epoch"] == 5 and last["loss_state"]["bank"].shape == (200, 128)
    assert "features.0.weight" in last["model"] and (out / "best.pt").is_file()
    assert (out / "figures" / "monitor.png").is_file()
    args = json.loads((out / "args.json").read_text())
    assert args["settings_source"]["epochs"] == "embedded" and args["settings_source"]["loss"] == "paper"


def test_resume_equals_uninterrupted(tree, tmp_path):
    # in-process (the code path a subprocess runs; the subprocess CLI is covered by the embedded default)
    a, b = tmp_path / "a", tmp_path / "b"
    train = lambda out, *extra: mvmain.main(["--mode", "train", "--output_root", str(out), *map(str, fast(tree)), *extra])  # noqa: E731
    train(a, "--epochs", "2")
    train(b, "--epochs", "1")
    train(b, "--epochs", "2", "--resume")
    sa, sb = load(a / "last.pt"), load(b / "last.pt")
    assert sa["epoch"] == sb["epoch"] == 2 and sa["step"] == sb["step"] == 4
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert torch.equal(sa["loss_state"]["bank"], sb["loss_state"]["bank"])  # the IR memory bank resumes too
    ra = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    # an existing run is not overwritten (the CLI's exit 2 without traceback: test_bad_input_is_a_user_error)
    before = (a / "last.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        train(a, "--epochs", "1")
    assert (a / "last.pt").read_bytes() == before


@pytest.mark.parametrize("loss", ["ir", "simclr"])
def test_torchrun_two_processes(tree, tmp_path, loss):
    out = tmp_path / loss
    p = run(["--mode", "train", "--output_root", out, "--epochs", 1, "--loss", loss, "--head_dim", 32,
             *fast(tree, "--batch_size", 2)], torchrun=True)
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and math.isfinite(res["final_train_loss"]), p.stdout[-2000:]
    assert 0 <= res["final_monitor_acc"] <= 1


def test_benchmark_json_line():
    p = run(["--mode", "benchmark", "--arch", "dual_stream", "--loss", "ir", "--bench_batch_size", 4, "--bench_iters", 1,
             "--device", "cpu", "--threads", 1])
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["arch"] == "dual_stream" and res["loss"] == "ir" and res["baseline"] == "alexnet_bn x supervised"
    assert res["throughput_ratio"] == pytest.approx(res["train_images_per_s"] / res["baseline_train_images_per_s"], rel=0.01)


# ----------------------------------------------------------------------------- in-process


def resolved(argv):
    args = mvmain.parse_args(argv)
    mvmain.resolve_training(args)
    return args


def test_presets_and_flags():
    a = resolved(["--config", "six_stream_simclr", "--data_root", "/data/imagenet"])
    assert (a.arch, a.loss, a.optimizer, a.lr, a.batch_size, a.schedule, a.warmup_epochs) == \
        ("six_stream", "simclr", "lars", 4.8, 4096, "warmup_cosine", 10)
    assert a.settings_source["lr"] == "paper"
    a = resolved(["--config", "dual_stream_ir", "--data_root", "/d", "--lr", "0.5"])
    assert a.lr == 0.5 and a.settings_source["lr"] == "flag" and a.milestones == [120, 160] and a.epochs == 200
    assert resolved(["--config", "alexnet_bn_ir", "--data_root", "/d"]).lr == 0.003
    assert resolved(["--config", "shi_mousenet_vispor5_ir", "--data_root", "/d"]).arch == "shi_mousenet_vispor5"
    a = resolved(["--arch", "shi_mousenet", "--loss", "rotnet", "--data_root", "/d"])
    assert a.nesterov and a.batch_size == 192 and a.milestones == [15, 30, 45, 50]


def test_schedules():
    a = Namespace(lr=1.0, epochs=10, warmup_epochs=2, gamma=0.1, milestones=[4, 8], schedule="steps", cosine_offset="kit")
    assert [round(mvmain.lr_at(a, e), 6) for e in (0, 3, 4, 8)] == [1.0, 1.0, 0.1, 0.01]
    a.schedule = "cosine"
    assert mvmain.lr_at(a, 0) == 1.0 and mvmain.lr_at(a, 5) == pytest.approx(0.5)
    a.cosine_offset = "release"  # slug cosine-last-epoch-zero: (e+1)/E, the last epoch at lr 0
    assert mvmain.lr_at(a, 9) == pytest.approx(0.0, abs=1e-12)
    a.schedule, a.cosine_offset = "warmup_cosine", "kit"
    assert mvmain.lr_at(a, 0) == pytest.approx(1e-4) and mvmain.lr_at(a, 1) == pytest.approx(1e-4 + (1 - 1e-4) / 2)
    assert mvmain.lr_at(a, 2) == 1.0 and mvmain.lr_at(a, 6) == pytest.approx(0.5)


def test_lars_exclusion_and_update():
    from mouse_vision.losses import build_objective

    bb = build_model("dual_stream")
    trainee = mvmain.Trainee(bb, build_objective("simclr", bb, 10, 10, hidden=16))
    args = Namespace(optimizer="lars", lr=1.0, momentum=0.9, weight_decay=1e-6, lars_eta=1e-3, lars_exclude="bn_and_bias")
    opt = mvmain.make_optimizer(trainee, args)
    bn_w = bb.model_layers["input_VISp"][1].weight
    assert any(p is bn_w for p in opt.param_groups[1]["params"])  # backbone BN weights skip LARS and decay
    args.lars_exclude = "release_names"  # slug lars-bn-exclusion: only the neck's bn0/bn1 and biases
    opt = mvmain.make_optimizer(trainee, args)
    assert any(p is bn_w for p in opt.param_groups[0]["params"])
    assert any(p is trainee.objective.neck.bn0.weight for p in opt.param_groups[1]["params"])
    # one LARS step by hand: update = lr · η‖w‖/(‖g‖ + wd‖w‖) · (g + wd·w)
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.6, 0.8])
    mvmain.LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.01).step()
    trust = 0.01 * 5 / (1 + 0.1 * 5)
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.5 * trust * (torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([3.0, 4.0])))


def test_bad_input_is_a_user_error(tree, tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        mvmain.main(["--mode", "train", "--data_root", str(tmp_path / "nope"), "--output_root", str(tmp_path / "o")])
    with pytest.raises(UserError, match="no .*last.pt"):
        mvmain.main(["--mode", "train", "--resume", "--output_root", str(tmp_path / "o2"), *map(str, fast(tree))])
    torch.save({"model_state_dict": build_model("dual_stream").state_dict()}, tmp_path / "dual.pt")
    with pytest.raises(UserError, match="does not fit"):
        mvmain.main(["--mode", "train", "--output_root", str(tmp_path / "o3"), *map(str, fast(tree)),
                     "--arch", "six_stream", "--model_path", str(tmp_path / "dual.pt")])
    with pytest.raises(UserError, match="--lr must be > 0"):
        resolved(["--lr", "-1"])
    # the CLI path (main.py's entry point): one line on stderr, exit 2
    from common import runtime
    with pytest.raises(SystemExit) as e:
        runtime.run_cli(mvmain.main, ["--mode", "train", "--data_root", str(tmp_path / "missing"),
                                      "--output_root", str(tmp_path / "o4")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and "missing" in err and "Traceback" not in err


def test_pipelines_and_depth_pairs(tmp_path):
    from PIL import Image

    from mouse_vision import data as mvdata
    from mouse_vision.losses import LOSSES

    img = Image.fromarray((torch.rand(80, 96, 3) * 255).byte().numpy())
    for loss in LOSSES:
        if loss == "depth":
            continue
        views = [t(img) for t in mvdata.pipelines(mvdata.PIPELINE_OF[loss], crop=64)]
        # every pipeline ends at 64 px here: relloc keeps its crop (64), the others resize to 64
        assert len(views) == (2 if loss in ("simclr", "simsiam", "mocov2", "barlow", "vicreg") else 1), loss
        assert all(v.shape == (3, 64, 64) for v in views), loss
    assert mvdata.eval_transform(224)(img).shape == (3, 64, 64)
    root = mvdata.write_depth_pairs(tmp_path / "depth", n_train=3, n_val=2, size=32)
    train, val = mvdata.DepthPairs(root, "train", train=True, crop=32), mvdata.DepthPairs(root, "val", train=False)
    (x,), d, i = val[1]
    assert x.shape == (3, 64, 64) and d.shape == (1, 64, 64) and i == 1 and len(train) == 3
    assert 0.3 - 1e-3 <= d.min() and d.max() <= 1.0 + 1e-3 and d[0, 0].mean() > d[0, -1].mean()  # far at the top
    (root / "train" / "depth" / "00001.png").unlink()
    with pytest.raises(UserError, match="has no depth map"):
        mvdata.DepthPairs(root, "train", train=True)
