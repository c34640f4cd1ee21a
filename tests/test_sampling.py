"""Sampler semantics: grid, timeshift, CFG with a doubled batch, interval edges, Heun's last step."""
import pytest
import torch

from models.registry import dip_config
from models.dip import DiP
from models.sampling import sample, time_grid, to_uint8


class RecordingVelocity(torch.nn.Module):
    """Pure-logic stand-in: v = a * x + b * t + c * label, and it records every call."""

    class config:  # noqa: N801 - mimics DiP.config
        num_classes = 5

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((t[0].item(), x.shape[0], y.clone()))
        return 0.5 * x + t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1).float()


def _tiny():
    torch.manual_seed(0)
    return DiP(dip_config("DiP-T/16", num_classes=5)).eval()


def test_grid_ends_at_one_and_applies_timeshift():
    grid = time_grid(4)
    torch.testing.assert_close(grid, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    shifted = time_grid(4, timeshift=3.0)
    torch.testing.assert_close(shifted, grid / (grid + (1 - grid) * 3.0))
    assert shifted[0] == 0 and shifted[-1] == 1


def test_one_euler_step_is_x_plus_v():
    model = _tiny()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    out = sample(model, x, y, steps=1, method="euler")
    torch.testing.assert_close(out, x + model(x, torch.zeros(2), y))


def test_one_heun_step_is_a_plain_euler_step():
    model = _tiny()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    torch.testing.assert_close(sample(model, x, y, steps=1, method="heun"), x + model(x, torch.zeros(2), y))


def test_guidance_one_equals_the_conditional_model_alone():
    model = _tiny()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    expected = x.clone()
    for k in range(3):
        t0, t1 = time_grid(3)[k], time_grid(3)[k + 1]
        expected = expected + model(expected, t0.expand(2), y) * (t1 - t0)
    torch.testing.assert_close(sample(model, x, y, steps=3, cfg_scale=1.0, cfg_interval=(0.0, 1.0)), expected)


def test_cfg_combines_null_and_conditional_in_one_doubled_batch():
    model = RecordingVelocity()
    x, y = torch.randn(2, 1, 2, 2), torch.tensor([1, 3])
    out = sample(model, x, y, steps=1, cfg_scale=3.0, cfg_interval=(-1.0, 2.0))
    t, batch, labels = model.calls[0]
    assert batch == 4 and labels.tolist() == [5, 5, 1, 3]  # null labels first, one forward
    v_null = 0.5 * x + 0.1 * 5
    v_cond = 0.5 * x + 0.1 * y.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, x + v_null + 3.0 * (v_cond - v_null))


def _guided_times(method, interval):
    model = RecordingVelocity()
    sample(model, torch.zeros(1, 1, 2, 2), torch.tensor([1]), steps=4, method=method, cfg_scale=2.0,
           cfg_interval=interval)
    return [(t, batch == 2) for t, batch, _ in model.calls]


def test_euler_interval_is_strict_on_both_ends():
    calls = _guided_times("euler", (0.25, 0.75))
    assert calls == [(0.0, False), (0.25, False), (0.5, True), (0.75, False)]


def test_heun_interval_includes_hi_and_uses_the_step_start_for_both_evaluations():
    calls = _guided_times("heun", (0.25, 0.75))
    # steps start at 0, .25, .5, .75; each non-final step evaluates at its start and its end
    assert calls == [(0.0, False), (0.25, False),   # step 0
                     (0.25, False), (0.5, False),   # step 1: start 0.25 is not > lo
                     (0.5, True), (0.75, True),     # step 2: guided, also at its end t = 0.75
                     (0.75, True)]                  # last step: plain Euler, start 0.75 <= hi


def test_heun_matches_hand_computed_trapezoid():
    model = RecordingVelocity()
    x, y = torch.randn(1, 1, 2, 2), torch.tensor([2])
    out = sample(model, x, y, steps=2, method="heun")
    v = lambda z, t: 0.5 * z + t + 0.2  # noqa: E731
    x_pred = x + v(x, 0.0) * 0.5
    x1 = x + (v(x, 0.0) + v(x_pred, 0.5)) / 2 * 0.5
    torch.testing.assert_close(out, x1 + v(x1, 0.5) * 0.5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="method"):
        sample(RecordingVelocity(), torch.zeros(1, 1, 2, 2), torch.tensor([1]), method="rk4")
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)


def test_to_uint8_clamps_only_at_the_end():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255]
