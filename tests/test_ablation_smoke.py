"""benchmarks/ablation.py --smoke: the head-vs-linear comparison runs end to end on real photos.

A few steps of each model through the real `dip data shard`, `dip eval ref-stats` and `dip train` (Ray +
DeepSpeed, eval pool), on crops of the photos shipped in the venv, so it needs no Debian package. The FID
values are not judged (4 steps); that every eval step has one in each run's MLflow, and the outputs, are.
"""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ablation_smoke_trains_both_heads_and_reports_full_fid_curves(tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    out = tmp_path / "smoke"
    env = dict(os.environ, PYTHONPATH=REPO, DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "ablation.py"), "--smoke",
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((tmp_path / "smoke.json").read_text())
    detailer, linear = report["runs"]
    assert (detailer["model"], linear["model"]) == ("DiP-T/16", "DiP-T/16-linear")
    assert detailer["parameters"] > 20 * linear["parameters"]  # the head is most of DiP-T/16
    for run in (detailer, linear):
        assert run["steps"] == 4 and run["wall_s"] > 0
        # every eval step has an FID in the run's own MLflow, whether the pool or the fill-in scored it
        curve = MlflowClient(tracking_uri=run["tracking_uri"]).get_metric_history(run["mlflow_run_id"], "eval/fid")
        assert sorted(m.step for m in curve) == [2, 4]
        assert all(math.isfinite(m.value) and m.value > 0 for m in curve)
        assert [p["step"] for p in run["fid"]] == [2, 4]
        assert run["final_fid"] == pytest.approx(max(curve, key=lambda m: m.step).value)
        assert set(run["filled_steps"]) == {p["step"] for p in run["fid"] if p["scored"] == "after"}
        assert Image.open(run["sample_grid"]).size[0] > 0
        assert f"| {run['model']} | {run['parameters']:,} | 4 |" in proc.stdout  # its row of the table

    plot = tmp_path / "smoke.png"
    assert 0 < plot.stat().st_size < 1 << 20
    width, height = Image.open(plot).size
    assert width > 2 * height  # the curves and two grids side by side
