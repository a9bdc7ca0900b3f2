"""One kit, one dialect: every study's CLI has the shared flags, and the code cites only what ships or can be opened.

The shared flags and their meaning are listed in README.md ("Conventions"); `common/settings.py` defines them.
"""
import importlib
import re

import pytest

from common.settings import SHARED_FLAGS, SHARED_SWITCHES

STUDIES = ["v1_constrained", "ndn_baselines", "mtl_cotraining", "mouse_vision", "cortex_readouts"]
SHARED = [f"--{k}" for k in [*SHARED_FLAGS, *SHARED_SWITCHES, "amp", "mode"]]
# The originals' own CLI names, kept as aliases of the kit's names.
ALIASES = {"v1_constrained": {"--num_epochs": "--epochs", "--iteration_verbosity": "--log_every"}}


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_has_the_shared_flags(study, monkeypatch):
    """The text `python <study>/main.py --help` prints (its parser's format_help, in-process: no interpreter start)."""
    monkeypatch.setenv("COLUMNS", "200")
    text = importlib.import_module(f"{study}.main").build_parser().format_help()
    opts = set(re.findall(r"(?<![\w-])(--\w[\w-]*)", text))
    missing = [f for f in SHARED if f not in opts]
    assert not missing, f"{study}/main.py --help lacks {missing}"
    amp = re.search(r"--amp \{([\w,]+)\}", text)
    assert amp and set(amp.group(1).split(",")) == {"bf16", "fp16", "off"}, f"{study}: --amp must take bf16|fp16|off"
    for alias, name in ALIASES.get(study, {}).items():
        line = next((ln for ln in text.splitlines() if alias in ln), "")
        assert name in line, f"{study}: {alias} must be an alias of {name} (same line in --help)"


def test_code_and_docs_cite_only_what_a_user_can_open(repo_root):
    """No reference to documents that do not ship with the kit (the developers' design notes)."""
    banned = re.compile(r"research note|KIT_DESIGN|\.\./shared|shared/research|note §", re.I)
    hits = []
    for path in sorted(repo_root.rglob("*")):
        if path.suffix not in (".py", ".md") or any(part in (".git", "runs", ".venv") for part in path.parts):
            continue
        if path.name == "test_conventions.py":
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if banned.search(line):
                hits.append(f"{path.relative_to(repo_root)}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_one_import_path_setup_per_entry_point(repo_root):
    """main.py puts the repo root on sys.path once; tests rely on tests/conftest.py; other modules never do it."""
    for path in sorted(repo_root.rglob("*.py")):
        if any(part in (".git", "runs", ".venv") for part in path.parts) or path.name == "test_conventions.py":
            continue
        n = path.read_text().count("sys.path.insert")
        expected = 1 if path.name in ("main.py", "conftest.py") else 0
        if path.parent.name == "tests" and path.name in ("test_common_checkpoint.py", "test_mouse_losses.py"):
            expected = n  # they write a child interpreter's source code, which needs its own path line
        assert n == expected, f"{path.relative_to(repo_root)} has {n} sys.path.insert line(s), expected {expected}"
