"""`dip plan`: input checks, the arithmetic's invariants, the shipped high-resolution configs, the CLI."""
from __future__ import annotations

import os

import pytest

from cluster.planning.activations import activation_breakdown
from cluster.planning.memory import GiB, Hardware, count_parameters, make_plan, model_states, parse_size
from cluster.planning.report import format_plan
from models.registry import dip_config
from trainer.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {name: os.path.join(REPO, "configs", f"{name}.yaml") for name in ("dip_xl16_256", "dip_xl32_512", "dip_xl64_1024")}


@pytest.mark.parametrize("text, expected", [("80GB", 80 * GiB), ("80G", 80 * GiB), ("80GiB", 80 * GiB),
                                            ("141 GB", 141 * GiB), ("81920MB", 80 * GiB), ("0.5T", 512 * GiB),
                                            ("24", 24 * GiB)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["eighty", "80XB", "-1GB", "", "0GB"])
def test_parse_size_rejects_bad_sizes_naming_the_flag(text):
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_size(text)


def test_hardware_is_validated():
    with pytest.raises(ValueError, match="--gpus"):
        Hardware(gpus=0, gpu_memory=80 * GiB)
    with pytest.raises(ValueError, match="--reserve"):
        Hardware(gpus=8, gpu_memory=8 * GiB, reserve=9 * GiB)
    assert Hardware(gpus=8, gpu_memory=80 * GiB).usable == 78 * GiB


def test_parameter_counts_are_exact_for_the_published_sizes():
    # the spec's figures: DiP-XL/16 631,989,411 and DiP-XL/32 634,643,619 parameters
    trainable, denoiser, frozen, largest = count_parameters(load_config(CONFIGS["dip_xl16_256"]))
    assert (trainable, denoiser, frozen) == (631_989_411, 631_989_411, 0)
    assert 20_000_000 < largest < 30_000_000  # one XL block
    assert count_parameters(load_config(CONFIGS["dip_xl32_512"]))[0] == 634_643_619


def test_zero_stages_shard_what_they_promise():
    n, psi = 8, 600_000_000
    s0, s1, s2, s3 = (model_states(psi, psi, 0, "bf16", stage, n, 20_000_000) for stage in range(4))
    assert s0.optimizer == 12 * psi and s1.optimizer == s2.optimizer == s3.optimizer == 12 * psi // n
    assert s0.params == s1.params == s2.params == 2 * psi and s3.params == 2 * psi // n
    assert s0.grads == 2 * psi and s1.grads < s0.grads and s3.working > 0 == s2.working
    # the fp32 EMA: whole on rank 0 under ZeRO-0/1/2; partitioned like the weights under ZeRO-3, where rank 0
    # gathers it whole only for a sample grid, between steps
    assert s0.ema == s1.ema == s2.ema == 4 * psi and s3.ema == 4 * psi // n
    assert s3.step_transient == 4 * psi > s2.step_transient
    # more GPUs never need more memory per GPU
    assert model_states(psi, psi, 0, "bf16", 3, 16, 20_000_000).persistent < s3.persistent
    assert model_states(psi, psi, 0, "fp32", 0, n, 20_000_000).optimizer == 8 * psi  # no master copy in fp32


def test_activation_checkpointing_and_precision_move_the_estimate_the_right_way():
    cfg = dip_config("DiP-XL/16")
    bf16, fp32 = activation_breakdown(cfg, 256, "bf16"), activation_breakdown(cfg, 256, "fp32")
    assert bf16.peak(False) < fp32.peak(False)
    assert bf16.peak(True) < bf16.peak(False) / 3
    assert bf16.saved(True) < bf16.saved(False) / 20
    # 1024 px with 64-px patches: still 256 tokens, so the blocks cost the same; the head sees 16x the pixels
    xl64 = activation_breakdown(dip_config("DiP-XL/64"), 1024, "bf16")
    assert xl64.block == bf16.block
    assert xl64.head > 10 * bf16.head
    with pytest.raises(ValueError, match="multiple of the patch size"):
        activation_breakdown(cfg, 250, "bf16")
    with pytest.raises(ValueError, match="precision"):
        activation_breakdown(cfg, 256, "fp16")


def test_plan_of_the_256_config_on_8_x_80gb_fits_and_reports_every_stage():
    plan = make_plan(load_config(CONFIGS["dip_xl16_256"]), Hardware(gpus=8, gpu_memory=parse_size("80GB")))
    assert [s.zero_stage for s in plan.stages] == [0, 1, 2, 3]
    stage2 = plan.stage(2)
    assert stage2.fits and stage2.max_micro_batch >= plan.micro_batch
    assert stage2.max_micro_batch_other > stage2.max_micro_batch  # checkpointing (off in this config) helps
    # the largest micro-batch really fits, one more does not
    usable = plan.hardware.usable
    assert stage2.fixed + stage2.max_micro_batch * stage2.activation_per_image <= usable
    assert stage2.fixed + (stage2.max_micro_batch + 1) * stage2.activation_per_image > usable
    assert stage2.global_batch(8, 1) == 8 * stage2.max_micro_batch
    text = format_plan(plan)
    for row in ("parameters", "gradients", "optimizer", "EMA", "activations x micro-batch 32", "largest micro-batch",
                "global batch", "ZeRO-0", "ZeRO-3", "the config fits"):
        assert row in text
    assert "WARNING" not in text


def test_plan_warns_when_the_config_does_not_fit():
    cfg = load_config(CONFIGS["dip_xl16_256"], ["data.batch_size=64"])
    plan = make_plan(cfg, Hardware(gpus=8, gpu_memory=parse_size("24GB")))
    assert not plan.stage(2).fits
    text = format_plan(plan)
    assert "WARNING: the config will not fit: ZeRO-2 at micro-batch 64" in text
    assert "model.activation_checkpointing=true" in text
    tiny = make_plan(cfg, Hardware(gpus=1, gpu_memory=parse_size("8GB")))
    assert tiny.stage(0).max_micro_batch == 0
    assert "WARNING: ZeRO-0 does not fit even one image per GPU" in format_plan(tiny)


def test_1024_config_trains_with_checkpointing_on_8_gpus():
    plan = make_plan(load_config(CONFIGS["dip_xl64_1024"]), Hardware(gpus=8, gpu_memory=parse_size("80GB")))
    assert plan.checkpointing and plan.stage(3).fits
    assert plan.stage(3).max_micro_batch_other < plan.stage(3).max_micro_batch


def test_dip_plan_cli(capsys):
    from cluster.cli.main import main

    assert main(["plan", CONFIGS["dip_xl32_512"], "--gpus", "8", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "DiP-XL/32 at 512 px" in out and "634,643,619" in out
    assert main(["plan", CONFIGS["dip_xl32_512"], "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory='lots' is not a size" in capsys.readouterr().err
    assert main(["plan", CONFIGS["dip_xl32_512"], "train.zero_stage=5"]) == 2
    assert "train.zero_stage=5" in capsys.readouterr().err
