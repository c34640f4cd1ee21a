"""Live MFU: the figures every log interval records (trainer/loop/step_metrics.py) from the run's own counted
training FLOPs, measured images/s and the device kind's peak (trainer/tracking/mfu.py)."""
import pytest
import torch

from trainer.config import config_from_dict

TINY_MODEL = {"model": {"name": "DiP-T/16", "num_classes": 4}, "data": {"resolution": 16, "synthetic_classes": 4},
              "samples": {"num_classes": 2}}


def _meter(seconds_ago: float, steps: int):
    from trainer.loop.step_metrics import IntervalMeter

    meter = IntervalMeter()
    meter.started -= seconds_ago
    for _ in range(steps):
        meter.add(data_wait_s=0.0)
    return meter


def test_the_run_counts_its_own_model_at_its_own_resolution():
    from models.flops import dip_flops
    from trainer.loop.step_metrics import flops_per_image

    cfg = config_from_dict(TINY_MODEL)
    assert flops_per_image(cfg) == dip_flops("DiP-T/16", 16).training
    bigger = config_from_dict({**TINY_MODEL, "data": {"resolution": 32, "synthetic_classes": 4}})
    assert flops_per_image(bigger) > 3 * flops_per_image(cfg)  # 4x the tokens, more than linear in attention


def test_repa_adds_the_encoder_forward_and_the_projector_forward_and_backward():
    from trainer.loop.step_metrics import flops_per_image

    plain = flops_per_image(config_from_dict(TINY_MODEL))
    repa = {"repa_encoder": "tiny", "repa_block": 1}
    with_repa = flops_per_image(config_from_dict({**TINY_MODEL, "objective": repa}))
    # 16 px, DiP-T/16: 1 token of width 64. TinyEncoder: an 8x8 stride-8 conv 3 -> 32 on 2x2 positions,
    # forward only (frozen). Projector 64 -> 64 -> 64 -> 32 on 1 token, forward + backward (3x).
    encoder = 2 * (2 * 2) * 32 * (3 * 8 * 8)
    projector = 3 * 2 * (64 * 64 + 64 * 64 + 64 * 32)
    assert with_repa - plain == encoder + projector == 110592


def test_achieved_tflops_are_counted_flops_times_measured_images_per_second_per_device():
    from trainer.loop.step_metrics import flops_per_image

    flops = flops_per_image(config_from_dict(TINY_MODEL))
    figures = _meter(seconds_ago=2.0, steps=4).figures(images_per_step=8, flops_per_img=flops, device_name="cpu",
                                                       world_size=2)
    assert figures["images_per_s"] == pytest.approx(16, rel=0.05)
    assert figures["tflops_per_s"] == pytest.approx(figures["images_per_s"] * flops / 2 / 1e12, rel=1e-12)
    assert "mfu" not in figures and "mfu_practical" not in figures  # a CPU has no peak: absent, not 0


@pytest.mark.parametrize("name, peak, practical", [
    ("NVIDIA H100 80GB HBM3", 989.0, 800.0),
    ("NVIDIA A100-SXM4-80GB", 312.0, None),
    ("NVIDIA L40S", 362.0, None),
    ("Tesla V100-SXM2-32GB", None, None),  # a kind without a known bf16 peak: no MFU
])
def test_a_cuda_device_name_picks_its_peak(monkeypatch, name, peak, practical):
    """The worker's path on a GPU: trainer.tracking.mfu.device_name(engine.device) -> the name -> the peak. The
    CUDA runtime is faked here (no GPU on CI); the name is all the lookup reads."""
    from trainer.tracking.mfu import device_name

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    seen = device_name(torch.device("cuda", 0))
    assert seen == name
    figures = _meter(seconds_ago=1.0, steps=10).figures(images_per_step=100, flops_per_img=1e12, device_name=seen,
                                                        world_size=4)
    achieved = figures["images_per_s"] * 1e12 / 4 / 1e12
    assert figures["tflops_per_s"] == pytest.approx(achieved, rel=1e-12)
    if peak is None:
        assert "mfu" not in figures
    else:
        assert figures["mfu"] == pytest.approx(achieved / peak, rel=1e-12)
    if practical is None:
        assert "mfu_practical" not in figures
    else:
        assert figures["mfu_practical"] == pytest.approx(achieved / practical, rel=1e-12)
