"""mouse_vision --mode convert / neural_fit / benchmark --bench neural_fit through mouse_vision/main.py: the embedded
default once as a subprocess, tiny runs for the rest; job-array shards merge to the unsharded numbers."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.runtime import UserError
from mouse_vision import neural_data as nd

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "mouse_vision" / "main.py"
pytestmark = pytest.mark.skipif(not MAIN.exists(), reason="mouse_vision/main.py not written yet")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*argv, check=True):
    p = subprocess.run([sys.executable, str(MAIN), *argv], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def test_neural_fit_embedded_default(tmp_path, capsys):
    out = tmp_path / "nf"
    p = run("--mode", "neural_fit", "--output_root", str(out), "--threads", "1")
    assert "writing embedded synthetic data" in p.stdout
    res = json.loads((out / "neural_fit.json").read_text())
    m = res["models"]["alexnet_bn"]
    assert m["layers"][0] == "features.3" and len(m["layers"]) == 7
    assert set(m["best_layer"]) == set(nd.AREAS) and res["missing_units"] == []
    for area in nd.AREAS:
        ceiling = res["interanimal_ceiling"][area]["median"]
        # synthetic units share each area's features across animals: a high ceiling; a random network is below it
        assert 0.6 < ceiling <= 1.05
        assert m["best_layer"][area]["median"] < ceiling
    z = np.load(out / "per_unit_scores.npz")
    assert z["alexnet_bn/features.3/VISp"].shape == z["unit_id/VISp"].shape == (54,)
    assert (out / "figures" / "alexnet_bn_VISp.png").stat().st_size > 0
    # a rerun skips every complete unit and merges the same table (in-process: one interpreter start is enough)
    assert _main("--mode", "neural_fit", "--output_root", str(out), "--threads", "1")["models"] == res["models"]
    assert "8 unit(s) already complete" in capsys.readouterr().out


def _main(*argv):
    from mouse_vision import main as mv_main

    return mv_main.main([*argv])


def test_shards_merge_to_the_unsharded_result(tmp_path, capsys):
    data = nd.write_synthetic(tmp_path / "tiny.h5", areas=("VISp", "VISl"), animals_per_area=2, units_per_animal=5,
                              n_trials=6, image_hw=(24, 30), latents={a: np.random.default_rng(0).normal(size=(118, 4))
                                                                      for a in ("VISp", "VISl")})
    common = ["--mode", "neural_fit", "--data", str(data), "--layers", "features.3", "features.17", "--n_splits", "1",
              "--n_halves", "2", "--n_components", "5", "--threads", "1"]
    one = _main(*common, "--output_root", str(tmp_path / "one"))
    sharded = tmp_path / "sharded"
    assert _main(*common, "--output_root", str(sharded), "--shard", "0/2") is None  # features.3 and the ceiling
    assert not (sharded / "neural_fit.json").exists()  # shards never write the shared files
    with pytest.raises(UserError, match="1 of 3 units missing.*features.17"):
        _main(*common, "--output_root", str(sharded), "--merge_only", "--require_complete")
    partial = _main(*common, "--output_root", str(sharded), "--merge_only")
    assert partial["missing_units"] == ["alexnet_bn/features.17"]
    _main(*common, "--output_root", str(sharded), "--shard", "1/2")
    merged = _main(*common, "--output_root", str(sharded), "--merge_only", "--require_complete")
    assert merged["models"] == one["models"] and merged["interanimal_ceiling"] == one["interanimal_ceiling"]
    a, b = np.load(tmp_path / "one" / "per_unit_scores.npz"), np.load(sharded / "per_unit_scores.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    # a complete unit computed with other settings is not mixed in
    with pytest.raises(UserError, match="n_halves=2.*n_halves=3"):
        _main(*common, "--output_root", str(sharded), "--n_halves", "3")
    # an interrupted unit (no completion marker) is refused without --resume/--overwrite, redone with --resume
    (sharded / "units" / "alexnet_bn__features.17" / ".complete").unlink()
    with pytest.raises(UserError, match="interrupted unit"):
        _main(*common, "--output_root", str(sharded), "--shard", "1/2")
    capsys.readouterr()
    _main(*common, "--output_root", str(sharded), "--shard", "1/2", "--resume")
    assert "alexnet_bn features.17" in capsys.readouterr().out


def _payload():
    rng = np.random.default_rng(0)
    r = np.full((3, 4), 0.6)  # time × units: every unit reliable
    return {"stimuli": rng.integers(0, 255, (8, 12, 16), dtype=np.uint8),
            "neural_data": {"values": rng.normal(size=(4, 8, 3, 4)), "dims": ("trials", "frame_id", "time_bins", "units"),
                            "coords": {"unit_id": np.arange(4), "specimen_id": np.array([1, 1, 2, 2]),
                                       "visual_area": np.array(["VISp"] * 4), "run_pval_ns": np.full(4, 0.5),
                                       "splithalf_r_mean": r}}}


def test_convert_subprocess(tmp_path):
    src = tmp_path / "mouse_neuropixels_visual_data_with_reliabilities.pkl"
    src.write_bytes(pickle.dumps(_payload()))
    out = tmp_path / "neural.h5"
    with pytest.raises(UserError, match="--trust_pickle"):
        _main("--mode", "convert", "--source", str(src), "--data", str(out))
    assert not out.exists()
    p = run("--mode", "convert", "--source", str(src), "--data", str(out), "--trust_pickle")
    assert "neuropixels VISp: 2 animals, 4 units" in p.stdout
    stim, dataset, animals, info = nd.read_neural(out)
    assert dataset == "neuropixels" and stim.shape == (8, 12, 16)
    assert info["sources"][0]["sha256"] == nd.sha256(src)
    with pytest.raises(UserError, match="--overwrite"):
        _main("--mode", "convert", "--source", str(src), "--data", str(out), "--trust_pickle")


def test_benchmark_subprocess(tmp_path):
    p = run("--mode", "benchmark", "--bench", "neural_fit", "--output_root", str(tmp_path), "--threads", "1",
            "--bench_units", "48", "--bench_trials", "6", "--n_splits", "1", "--n_halves", "2", "--n_components", "5",
            "--bench_ref_fits", "1", "--layers", "features.17")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["bench"] == "neural_fit" and res["pls_fast_fits"] == 4 and res["full_units"] == 48
    assert res["pls_max_abs_diff_vs_converged_nipals"] < 1e-5
    assert res["pls_speedup"] > 0 and res["full_eval_s"] > 0
