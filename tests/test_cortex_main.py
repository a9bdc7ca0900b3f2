"""cortex_readouts/main.py end to end on the embedded synthetic TVSD dataset: sweep (one embedded run, a layer
subset), shards that merge to the unsharded numbers, the merge listing missing units, train, benchmark, mei, and
bad input (exit 2, one line)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import runtime
from cortex_readouts import main as crmain

REPO = Path(__file__).resolve().parents[1]
MAIN = str(REPO / "cortex_readouts" / "main.py")
LAYERS = ["features.0", "features.5", "features.10"]  # shallow: the net runs only up to features.10


def run(args, check=True, timeout=600, env_extra=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    p = subprocess.run([sys.executable, MAIN, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def in_process(argv, capsys=None):
    """main.main through runtime.run_cli, as the command line runs it; returns (exit status, stderr)."""
    torch.set_num_threads(1)
    try:
        runtime.run_cli(crmain.main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err if capsys else ""
    return code, err


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """THE embedded-default subprocess run of the main mode (sweep), on three layers to fit the test budget."""
    tmp = tmp_path_factory.mktemp("crsweep")
    out, cache = tmp / "sweep", tmp / "cache"
    p = run(["--mode", "sweep", "--output_root", out, "--cache_root", cache, "--threads", 1, "--layer", *LAYERS])
    return out, cache, p


def test_embedded_sweep_writes_tables_and_heatmaps(sweep):
    out, cache, p = sweep
    assert "RANDOM weights" in p.stdout and "no --data_root given" in p.stdout
    rows = json.loads((out / "table.json").read_text())
    assert {(r["readout"], r["layer"]) for r in rows} == {(r, x) for r in ("cadena", "bashivan", "ridge") for x in LAYERS}
    sites = {r["site"] for r in rows}
    assert {"V1", "V4", "IT", "array1_V1", "array16_IT"} <= sites
    v1 = [r for r in rows if r["site"] == "V1"]
    assert all(0.1 < r["test_corr"] <= 1 and r["feve"] is not None and r["noise_corrected_corr"] is not None for r in v1)
    for r in ("cadena", "bashivan", "ridge"):
        for metric in ("test_corr", "feve"):
            assert (out / "figures" / f"heatmap_vgg19_{r}_{metric}.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    assert res["units_complete"] == 9 and not res["missing"]
    assert set(res["best_layer"]["vgg19/ridge"]["V1"]) == {"layer", "val_corr", "test_corr"}
    ck = torch.load(out / "units/vgg19/bashivan/features.5/best.pt", weights_only=True)
    assert ck["layer"] == "features.5" and ck["readout_config"]["kind"] == "bashivan"
    assert ck["max_natural_response"].shape == (64,)


def test_shards_run_concurrently_and_merge_to_the_unsharded_numbers(sweep, tmp_path):
    out, cache, _ = sweep
    root = tmp_path / "sharded"
    common = ["--mode", "sweep", "--output_root", root, "--cache_root", cache, "--threads", 1,
              "--layer", "features.0", "features.5", "--readout", "ridge", "cadena"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, MAIN, *map(str, common), "--shard", f"{k}/2"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    for pr in procs:
        o, e = pr.communicate(timeout=600)
        assert pr.returncode == 0, e[-2000:]
        assert "merge when every shard is done" in o
    assert not (root / "table.json").exists()  # shards never write the shared files
    code, _ = in_process(["--mode", "heatmap", "--output_root", root, "--layer", "features.0", "features.5",
                          "--readout", "ridge", "cadena", "--require_complete"])
    assert code in (0, None)
    merged = {(r["readout"], r["layer"], r["site"]): r for r in json.loads((root / "table.json").read_text())}
    single = {(r["readout"], r["layer"], r["site"]): r for r in json.loads((out / "table.json").read_text())}
    assert len(merged) == 4 * 19
    for k, r in merged.items():
        for metric in ("val_corr", "test_corr", "feve", "noise_corrected_corr"):
            assert r[metric] == pytest.approx(single[k][metric], abs=1e-6), (k, metric)


def test_merge_lists_missing_units_and_rerun_skips_complete_ones(sweep, tmp_path, capsys):
    out, cache, _ = sweep
    root = tmp_path / "partial"
    args = ["--output_root", root, "--cache_root", cache, "--threads", 1, "--layer", "features.0", "features.5",
            "--readout", "ridge"]
    assert in_process(["--mode", "sweep", "--shard", "0/2", *args])[0] in (0, None)
    capsys.readouterr()
    code, err = in_process(["--mode", "heatmap", *args, "--require_complete"], capsys)
    assert code == 2 and "1 of 2 units missing" in err and "vgg19/ridge/features.5" in err
    assert in_process(["--mode", "heatmap", *args])[0] in (0, None)
    assert "missing or incomplete: vgg19/ridge/features.5" in capsys.readouterr().out
    assert in_process(["--mode", "sweep", "--shard", "0/2", *args])[0] in (0, None)  # rerun: nothing to redo
    assert "features.0: complete, skipped" in capsys.readouterr().out
    (root / "units/vgg19/ridge/features.5").mkdir(parents=True)  # an interrupted unit (no marker)
    (root / "units/vgg19/ridge/features.5/best.pt").write_bytes(b"partial")
    code, err = in_process(["--mode", "sweep", "--shard", "1/2", *args], capsys)
    assert code == 2 and "interrupted unit" in err
    assert in_process(["--mode", "sweep", "--shard", "1/2", "--resume", *args])[0] in (0, None)
    assert (root / "units/vgg19/ridge/features.5/.complete").is_file()


def test_train_mode_subprocess(sweep, tmp_path, capsys):
    _, cache, _ = sweep
    out = tmp_path / "train"
    p = run(["--mode", "train", "--output_root", out, "--cache_root", cache, "--threads", 1, "--layer", "features.5",
             "--readout", "bashivan", "--epochs", 2, "--sites", "areas", "array3"])
    res = json.loads((out / "results.json").read_text())
    assert set(res["sites"]) == {"V1", "V4", "IT", "array3_V1"} and res["steps"] == 2 * (288 // 32)
    assert (out / "best.pt").is_file() and (out / "metrics.csv").is_file() and (out / "args.json").is_file()
    assert json.loads(p.stdout.strip().splitlines()[-1])["readout"] == "bashivan"
    code, err = in_process(["--mode", "train", "--output_root", out, "--cache_root", cache, "--layer", "features.0"],
                           capsys)
    assert code == 2 and "already holds a run" in err  # never overwritten without --overwrite


def test_benchmark_mode_subprocess(tmp_path):
    p = run(["--mode", "benchmark", "--threads", 1, "--bench_images", 24, "--bench_electrodes", 32, "--epochs", 1,
             "--readout", "ridge", "bashivan", "--layer", "features.10", "--output_root", tmp_path])
    res = json.loads(p.stdout.strip().splitlines()[-1])
    row = res["layers"]["features.10"]
    assert row["extract_s"] > 0 and row["ridge_fit_s"] > 0 and row["bashivan_fit_over_extract"] > 0
    assert res["electrodes"] == 32 and row["feature_shape"] == [256, 6, 6]


def test_mei_mode_subprocess(sweep, tmp_path):
    out, cache, _ = sweep
    mei_out = tmp_path / "mei"
    run(["--mode", "mei", "--sweep_root", out, "--cache_root", cache, "--output_root", mei_out, "--threads", 1,
         "--layer", "features.5", "--readout", "ridge", "--sites", "V1", "array9", "--mei_steps", 3,
         "--mei_images", 2])
    recs = json.loads((mei_out / "meis.json").read_text())
    assert [r["site"] for r in recs] == ["V1", "array9_V4"] and {r["readout"] for r in recs} == {"ridge"}
    for r in recs:
        assert len(r["predicted_response"]) == 2 and r["best_natural_response"] is not None
        assert r["ratio"] == pytest.approx(r["predicted_response_max"] / r["best_natural_response"])
        imgs = np.load(mei_out / r["npy"])
        assert imgs.shape == (2, 3, 64, 64) and 0 <= imgs.min() and imgs.max() <= 1
        assert (mei_out / r["png"]).stat().st_size > 100


def test_bad_input_exit_2_one_line(sweep, tmp_path, capsys):
    out, cache, _ = sweep
    cases = [
        (["--mode", "mei", "--sweep_root", tmp_path / "nothing", "--output_root", tmp_path / "m1"], "no trained model"),
        (["--mode", "mei", "--sweep_root", out, "--cache_root", cache, "--output_root", tmp_path / "m2",
          "--layer", "features.5", "--readout", "ridge", "--sites", "V2"], "not a site of the model"),
        (["--mode", "mei", "--sweep_root", out, "--output_root", tmp_path / "m3", "--layer", "features.7",
          "--readout", "ridge"], "no trained model at"),
        (["--mode", "mei", "--sweep_root", out, "--output_root", tmp_path / "m4", "--layer", "features.5",
          "--readout", "ridge", "--electrodes", 3, 64], "has electrodes 0..63"),
        (["--mode", "train", "--data_root", tmp_path / "missing"], "is not a folder"),
        (["--mode", "sweep", "--layer", "conv9", "--output_root", tmp_path / "s"], "not layers of vgg19"),
        (["--mode", "sweep", "--shard", "3/2", "--output_root", tmp_path / "s"], "0 ≤ K < N"),
        (["--mode", "train", "--loss", "poisson", "--output_root", tmp_path / "t"], "--output elu"),
    ]
    for argv, msg in cases:
        code, err = in_process(argv, capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_response_fn_of_a_unit_matches_the_feature_cache(sweep):
    """The MEI's response_fn (images → backbone → pooling → readout) gives the predictions the sweep computed from
    the fp16 feature cache, so 'MEI response / best natural response' compares like with like."""
    from cortex_readouts import backbones, data, models

    out, cache, _ = sweep
    torch.set_num_threads(1)
    ck = torch.load(out / "units/vgg19/cadena/features.5/best.pt", weights_only=True)
    model = crmain.response_model(ck, torch.device("cpu"))
    d = data.load_dataset(cache / "synthetic" / crmain.SYNTHETIC_NAME, "N", array_size=4)
    images = torch.stack([data.ImageFiles(d["train_images"], 64)[i] for i in range(4)])
    folder = backbones.cache_dir(cache, backbones.dataset_tag(d["source"], 400), model.backbone, "random-seed0", 6)
    feats = torch.from_numpy(np.array(backbones.load_features(folder, "features.5")[:4]))
    with torch.no_grad():
        direct = model(images)
    torch.testing.assert_close(direct, models.predict(model.readout, feats), atol=2e-2, rtol=2e-2)
    assert torch.equal(ck["max_natural_response"] >= direct.max(0).values - 2e-2, torch.ones(64, dtype=torch.bool))


def test_mei_of_chosen_electrodes(sweep, tmp_path, capsys):
    out, cache, _ = sweep
    code, _ = in_process(["--mode", "mei", "--sweep_root", out, "--cache_root", cache, "--output_root", tmp_path / "e",
                          "--layer", "features.0", "--readout", "bashivan", "--electrodes", 0, 5, "--mei_steps", 2,
                          "--mei_images", 1, "--rf_envelope"], capsys)
    assert code in (0, None)
    (rec,) = json.loads((tmp_path / "e" / "meis.json").read_text())
    assert rec["site"] == "electrodes0-5" and rec["electrodes"] == [0, 5] and rec["rf_envelope"]
