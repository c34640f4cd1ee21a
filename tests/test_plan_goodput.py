"""cluster.planning.goodput: Daly's interval is the goodput optimum of Daly's own wall-time model, the
limits behave, and bad input is one clear line."""
import math

import pytest

from cluster.planning.goodput import (GoodputPlan, expected_goodput, format_goodput_plan, job_mtbf_s,
                                      optimal_interval_s, step_time_s)


def test_the_job_mtbf_is_the_per_gpu_mtbf_over_the_gpus():
    assert job_mtbf_s(50_000, 1000) == pytest.approx(50 * 3600)
    with pytest.raises(ValueError, match=r"--mtbf-hours=0 is not valid"):
        job_mtbf_s(0, 8)


def test_young_daly_interval_follows_the_formula_and_its_two_regimes():
    c, m = 30.0, 10 * 3600.0
    young = math.sqrt(2 * c * m)
    tau = optimal_interval_s(c, m)
    ratio = c / (2 * m)
    assert tau == pytest.approx(young * (1 + math.sqrt(ratio) / 3 + ratio / 9) - c)
    assert young - c < tau < young                       # the higher-order terms are a small correction
    assert optimal_interval_s(3 * m, m) == m             # checkpoints dearer than 2 MTBFs: one per MTBF
    with pytest.raises(ValueError, match="--checkpoint-cost-s=0"):
        optimal_interval_s(0.0, m)


@pytest.mark.parametrize("c,m,r", [(30.0, 10 * 3600.0, 300.0), (5.0, 3600.0, 60.0), (120.0, 2 * 3600.0, 600.0)])
def test_the_interval_maximises_the_expected_goodput(c, m, r):
    tau = optimal_interval_s(c, m)
    best = expected_goodput(tau, c, r, m)
    grid = [tau * f for f in (0.25, 0.5, 0.8, 0.9, 1.1, 1.25, 2.0, 4.0)]
    assert all(expected_goodput(t, c, r, m) <= best + 1e-6 for t in grid)
    assert 0 < best < 1


def test_without_failures_goodput_is_the_checkpoint_overhead_only():
    assert expected_goodput(100.0, 10.0, 300.0, 1e12) == pytest.approx(100 / 110, rel=1e-6)


def test_the_step_time_is_flops_over_peak_times_mfu():
    # 256 images x 1 TFLOP over 8 GPUs x 1000 TFLOP/s x 0.5 = 0.064 s
    assert step_time_s(256, 1e12, 8, 1000.0, 0.5) == pytest.approx(0.064)
    with pytest.raises(ValueError, match=r"--mfu=1.5 is not valid"):
        step_time_s(256, 1e12, 8, 1000.0, 1.5)


def test_the_report_prints_every_assumption_beside_its_number():
    plan = GoodputPlan(gpus=64, per_gpu_mtbf_hours=50_000, checkpoint_s=20.0, restart_s=180.0,
                       checkpoint_s_given=True, restart_s_given=False, gpu_kind="H100 SXM", peak_tflops=989.0,
                       mfu=0.4, steps=400_000, global_batch=256, flops_per_image=2.0e12, config_every_steps=1000)
    text = format_goodput_plan(plan)
    assert "781.2 h   = 50,000 h per GPU (--mtbf-hours) / 64 GPUs" in text   # the job MTBF, and how
    assert "20.0 s   given" in text and "180.0 s   assumed" in text
    assert "MFU 0.40 (--mfu)" in text and "H100 SXM 989 TFLOP/s" in text
    assert f"checkpoint.every_steps={plan.interval_steps}" in text
    assert plan.goodput_every(plan.interval_steps) >= plan.goodput_every(plan.config_every_steps)
    assert plan.goodput_every(plan.interval_steps) >= plan.goodput_every(10 * plan.interval_steps)


def test_dip_plan_prints_the_goodput_plan_with_its_assumptions(capsys):
    from cluster.cli.main import main
    from tests.test_plan import CONFIGS

    assert main(["plan", CONFIGS["dip_xl16_256"], "--gpus", "64", "--mtbf-hours", "50000",
                 "--checkpoint-cost-s", "20"]) == 0
    out = capsys.readouterr().out
    assert "goodput plan" in out and "781.2 h   = 50,000 h per GPU (--mtbf-hours) / 64 GPUs" in out
    assert "20.0 s   given" in out and "180.0 s   assumed" in out and "MFU 0.40 (--mfu)" in out
    assert "best interval" in out and "time to train" in out
    assert main(["plan", CONFIGS["dip_xl16_256"], "--gpus", "8"]) == 0
    assert "goodput plan" not in capsys.readouterr().out   # only with a failure rate
    assert main(["plan", CONFIGS["dip_xl16_256"], "--mtbf-hours", "5000", "--gpu-kind", "TPU"]) == 2
    assert "--gpu-kind='TPU' is not a known GPU: use one of H100 PCIe" in capsys.readouterr().err
    assert main(["plan", CONFIGS["dip_xl16_256"], "--mtbf-hours", "5000", "--mfu", "0"]) == 2
    assert "--mfu=0.0 is not valid" in capsys.readouterr().err
