"""Shared pytest set-up: the repo root on sys.path (so `import common` works), and CPU-only threads."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the suite is a CPU suite, even on a GPU machine


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """An in-process CLI run with --threads N calls torch.set_num_threads(N) for the whole pytest process; restore
    the count after every test, so later tests neither slow down nor change their numerics."""
    import torch

    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


class CliResult:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def cli(capsys):
    """Run a main.py's CLI in-process: `cli(main_fn, argv)` → (.returncode, .stderr). runtime.run_cli turns a
    UserError into one stderr line and exit status 2, exactly as the script does; no interpreter start."""
    from common import runtime

    def call(main_fn, argv):
        capsys.readouterr()
        try:
            runtime.run_cli(main_fn, [str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
        return CliResult(code, capsys.readouterr().err)

    return call
