"""Shared pytest set-up: the repo root on sys.path (so `import common` works), and CPU-only threads."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the suite is a CPU suite, even on a GPU machine


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
