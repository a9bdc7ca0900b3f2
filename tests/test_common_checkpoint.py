"""common/checkpoint.py and common/runtime.py: atomic saves, safe loads, RNG, run directory, CLI errors."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from common import checkpoint as ck
from common.runtime import Progress, UserError, choose_device


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))


def test_round_trip_restores_identical_outputs(tmp_path):
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    y = net(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    y.sum().backward()
    opt.step()
    y = net(x)
    ck.save_checkpoint(tmp_path / "a.pt", ck.training_state(net, opt, epoch=3, step=7, best_metric=0.5, args={"lr": 0.1}))
    net2 = _net()
    net2(x)  # materialise the lazy layer
    state = ck.load_model_weights(net2, tmp_path / "a.pt")
    assert torch.equal(net2(x), y)
    assert state["epoch"] == 3 and state["step"] == 7 and state["args"] == {"lr": 0.1}
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(state["optimizer"])


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def crash(obj, f, *a, **k):
        f.write(b"PARTIAL")
        raise KeyboardInterrupt("power cut mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = ck.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Evil()}, path)
    with pytest.raises(UserError, match="refused"):
        ck.load_checkpoint(path)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UserError):
        ck.load_checkpoint(raw)


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt"):
        ck.load_checkpoint(tmp_path / "junk.pt")


def test_wrong_architecture_is_a_user_error(tmp_path):
    ck.save_checkpoint(tmp_path / "m.pt", {"model": torch.nn.Linear(3, 2).state_dict()})
    with pytest.raises(UserError, match="does not fit"):
        ck.load_model_weights(torch.nn.Linear(4, 2), tmp_path / "m.pt")


def test_unwrap_and_clean_prefixes():
    net = torch.nn.Linear(2, 2)
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = net
    assert ck.unwrap_model(compiled_like) is net
    sd = {"module._orig_mod.weight": 1, "bias": 2}
    assert ck.clean_state_dict(sd) == {"weight": 1, "bias": 2}


def test_run_dir_refuses_overwrite_and_resumes(tmp_path):
    out = tmp_path / "run"
    run = ck.RunDir(out, {"lr": 0.1})
    assert json.loads((out / "args.json").read_text()) == {"lr": 0.1}
    run.log({"epoch": 0, "loss": 1.0})
    run.log({"epoch": 1, "loss": 0.5, "acc": 0.7})  # a new column widens the csv header
    run.save("last.pt", {"epoch": 1})
    run.write_results({"acc": 0.7})
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,loss,acc" and lines[1] == "0,1.0," and len(lines) == 3
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1]
    with pytest.raises(UserError, match="--resume"):
        ck.RunDir(out, {"lr": 0.2})
    assert json.loads((out / "args.json").read_text()) == {"lr": 0.1}  # untouched
    resumed = ck.RunDir(out, {"lr": 0.2}, resume=True)
    assert resumed.resume_state()["epoch"] == 1
    resumed.truncate_metrics(lambda r: r["epoch"] < 1)
    assert [r["epoch"] for r in resumed.read_metrics()] == [0]
    (out / "synthetic").mkdir()
    ck.RunDir(out, {"lr": 0.3}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "synthetic"]
    with pytest.raises(UserError, match="no .*last.pt"):
        ck.RunDir(tmp_path / "fresh", {}, resume=True)


def test_non_main_rank_writes_nothing(tmp_path):
    run = ck.RunDir(tmp_path / "r", {"a": 1}, is_main=False)
    run.log({"x": 1})
    run.save("last.pt", {})
    assert not (tmp_path / "r").exists()


def test_run_cli_exit_code_2_without_traceback(tmp_path):
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from common.runtime import run_cli, UserError\n"
            "def main(argv): raise UserError('data_root /x/y is missing')\n"
            "run_cli(main)\n") % str(os.getcwd())
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 2
    assert p.stderr.strip() == "error: data_root /x/y is missing"


def test_choose_device_and_progress(capsys):
    assert choose_device("cpu").type == "cpu"
    with pytest.raises(UserError):
        choose_device("nonsense")
    p = Progress(total=4, log_every=2, unit="img", prefix="epoch 0")
    for _ in range(4):
        p.update(8, loss=0.5)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "step 2/4" in out[0] and "img/s" in out[0] and "eta" in out[0]
