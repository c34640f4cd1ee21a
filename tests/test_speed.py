"""Speed paths (models/speed.py): compile fallback, bf16 autocast with fp32 norms, channels-last head,
cached RoPE, and the sampling timer. CPU only; compilation uses dynamo's cheap 'eager' backend or a
backend forced to fail (inductor on 2 CPU cores takes minutes)."""
import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.dip import rope_2d_frequencies
from models.registry import create_model
from models.speed import compile_state, maybe_compile, mixed_precision, set_head_channels_last, time_sampling


@pytest.fixture
def tiny():
    torch._dynamo.reset()  # fresh compile caches: other tests' compilations must not count toward limits
    torch.manual_seed(0)
    model = create_model("DiP-T/16", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0.3, 0.8])
    y = torch.tensor([1, 2])
    return model, (x, t, y)


def _failing_backend(calls: list):
    def backend(graph_module, example_inputs):
        calls.append(len(example_inputs))
        raise RuntimeError("forced compiler failure")
    return backend


def _compile_warnings(caught) -> list:
    return [w for w in caught if "torch.compile failed" in str(w.message)]


def test_compile_failure_falls_back_to_eager_with_one_warning(tiny):
    model, inputs = tiny
    expected = model(*inputs)
    calls = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maybe_compile(model, True, backend=_failing_backend(calls))
        first = model(*inputs)
        second = model(*inputs)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert len(_compile_warnings(caught)) == 1
    assert len(calls) == 1                                   # never retried after the failure
    assert compile_state(model).startswith("fallback: BackendCompilerFailed")


def test_missing_backend_falls_back_at_once(tiny):
    model, inputs = tiny
    expected = model(*inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maybe_compile(model, True, backend="no_such_backend")
        out = model(*inputs)
    assert torch.equal(out, expected)
    assert len(_compile_warnings(caught)) == 1
    assert "InvalidBackend" in compile_state(model)


def test_bad_input_raises_its_own_error_and_keeps_the_compiled_path(tiny):
    # Fake tensors do not check embedding indices, so the (failing) backend is reached; eager then
    # raises the real IndexError, which must surface without giving up on compilation.
    model, (x, t, y) = tiny
    calls = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maybe_compile(model, True, backend=_failing_backend(calls))
        with pytest.raises(IndexError):
            model(x, t, torch.tensor([99, 99]))
        assert compile_state(model) == "compiled" and not _compile_warnings(caught)
        model(x, t, y)
    assert len(_compile_warnings(caught)) == 1 and len(calls) == 2


def test_compiled_model_matches_eager_forward_and_backward(tiny):
    model, inputs = tiny
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maybe_compile(model, True, backend="eager")
        out = model(*inputs)
        out.square().mean().backward()
    assert compile_state(model) == "compiled" and not _compile_warnings(caught)
    expected = reference(*inputs)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(model.s_embedder.proj.weight.grad, reference.s_embedder.proj.weight.grad)


def test_compiled_model_keeps_type_keys_and_copies_as_eager(tiny):
    model, inputs = tiny
    expected = model(*inputs)
    keys = list(model.state_dict())
    calls = []
    same = maybe_compile(model, True, backend=_failing_backend(calls))
    assert same is model and list(model.state_dict()) == keys and model.config.patch_size == 16
    ema_copy = copy.deepcopy(model)                          # what models.ema.EMA does
    assert compile_state(ema_copy) == "eager" and ema_copy.forward.__self__ is ema_copy
    assert torch.equal(ema_copy(*inputs), expected) and calls == []   # the copy never compiles
    with pytest.raises(ValueError, match="already compiled"):
        maybe_compile(model, True)


def test_disabled_compile_leaves_the_model_alone(tiny):
    model, _ = tiny
    assert maybe_compile(model, False) is model
    assert "forward" not in model.__dict__ and compile_state(model) == "eager"


def test_rope_is_cached_per_grid_and_equals_a_recomputation(tiny):
    model, (x, t, y) = tiny
    first = model.rope(2, 2, x.device)
    assert model.rope(2, 2, x.device) is first               # computed once
    torch.testing.assert_close(first, rope_2d_frequencies(model.config.head_dim, 2, 2), rtol=0, atol=0)
    other = model.rope(4, 2, x.device)
    assert other.shape == (8, model.config.head_dim // 2) and not torch.equal(other[:4], first)
    cached_out = model(x, t, y)
    model._rope_cache.clear()
    torch.testing.assert_close(model(x, t, y), cached_out, rtol=0, atol=0)


class _DtypeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if isinstance(out, torch.Tensor):
            self.seen.setdefault(name, set()).add(out.dtype)
        return out


def test_bf16_autocast_keeps_the_norms_in_float32(tiny):
    model, inputs = tiny
    log = _DtypeLog()
    with mixed_precision("cpu", "bf16", allow_cpu=True), log:
        out = model(*inputs)
    assert log.seen["mm"] == {torch.bfloat16}                  # the matmuls run in bf16
    assert log.seen["rsqrt"] == {torch.float32}                # RMSNorm statistics in float32
    torch.testing.assert_close(out.float(), model(*inputs), atol=0.1, rtol=0.1)


def test_mixed_precision_is_a_no_op_where_it_should_be():
    with mixed_precision("cpu", "bf16"):                       # CPU bf16 is opt-in (slow without AMX)
        assert not torch.is_autocast_enabled("cpu")
    with mixed_precision("cuda", "fp32"):
        assert not torch.is_autocast_enabled("cuda")
    with pytest.raises(ValueError, match=r"precision='fp16'.*\('fp32', 'bf16'\)"):
        mixed_precision("cpu", "fp16")


def test_channels_last_head_gives_the_same_velocity(tiny):
    model, inputs = tiny
    expected = model(*inputs)
    layouts = []
    model.local_decoder.enc1.register_forward_hook(
        lambda mod, args, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
    assert set_head_channels_last(model, True)
    torch.testing.assert_close(model(*inputs), expected, atol=1e-5, rtol=1e-5)
    assert layouts == [True]
    set_head_channels_last(model, False)
    model(*inputs)
    assert layouts == [True, False]
    assert not set_head_channels_last(create_model("DiP-T/16-linear", num_classes=10), True)


def test_time_sampling_times_the_doubled_cfg_batch(tiny):
    model, _ = tiny
    batches = []
    model.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    result = time_sampling(model, batch=2, steps=3, cfg=2.0, device="cpu", resolution=32, precision="fp32")
    # warm-up (2 steps): t=0 unguided, t=0.5 guided; timed (3 steps): t=0 unguided, 1/3 and 2/3 guided
    assert batches == [2, 4, 2, 4, 4]
    assert result["seconds_per_image"] > 0 and result["images_per_s"] > 0
    assert result["images_per_s"] * result["seconds_per_image"] == pytest.approx(1.0)
    assert result["seconds_per_batch"] == pytest.approx(2 * result["seconds_per_image"])
    assert result["compile"] == "eager" and result["steps"] == 3
    with pytest.raises(ValueError, match="batch=0"):
        time_sampling(model, batch=0, steps=3, cfg=2.0, device="cpu", resolution=32)
