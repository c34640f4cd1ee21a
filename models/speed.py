"""Speed paths around DiP that change no numbers the spec fixes: compile with a safe fallback,
bf16 autocast (norms stay float32: RMSNorm upcasts itself, LayerNorm is on autocast's fp32 list),
channels-last for the head's convolutions (opt-in: only where measured to help), and a sampling
timer shared by `dip sample --benchmark` and benchmarks/gpu.py.

Pure torch, like the rest of models/.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

from .sampling import sample

# What a failed compilation raises: dynamo's base class covers BackendCompilerFailed (inductor and
# triton errors arrive wrapped in it), InvalidBackend, Unsupported (fullgraph) and TritonMissing.
COMPILE_ERRORS: tuple[type[BaseException], ...] = (torch._dynamo.exc.TorchDynamoException,)
PRECISION_CHOICES = ("fp32", "bf16")


class CompiledForward:
    """Replaces `model.forward` on the instance: the compiled forward until compilation fails once,
    then the eager forward for good, after one warning.

    Patching the instance (rather than wrapping the module as torch.compile does) keeps the
    model's type, attributes (`model.config`) and state-dict keys unchanged, so checkpoints,
    DeepSpeed and the EMA see the plain model.
    """

    def __init__(self, eager_forward: Callable, compiled_forward: Callable | None, reason: str | None = None):
        self.eager_forward = eager_forward
        self.compiled_forward = compiled_forward
        self.fallback_reason: str | None = None
        if compiled_forward is None:
            self._fall_back(reason or "torch.compile was not available")

    @property
    def compiled(self) -> bool:
        """True while the compiled path is in use (before any failure)."""
        return self.fallback_reason is None

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        self.compiled_forward = None
        warnings.warn(f"torch.compile failed; running the model eagerly from now on. Cause: {reason}",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, *args, **kwargs):
        if self.compiled_forward is None:
            return self.eager_forward(*args, **kwargs)
        try:
            return self.compiled_forward(*args, **kwargs)
        except COMPILE_ERRORS as err:
            # If eager fails too, the input is at fault, not the compiler: raise that error and keep
            # the compiled path for the next (valid) call.
            out = self.eager_forward(*args, **kwargs)
            self._fall_back(f"{type(err).__name__}: {str(err).strip().splitlines()[0]}")
            return out

    def __deepcopy__(self, memo):
        # A copy of a compiled model (the EMA) is an eager model: compile it separately if wanted.
        return copy.deepcopy(self.eager_forward, memo)


def maybe_compile(model: nn.Module, enabled: bool, **compile_kwargs) -> nn.Module:
    """torch.compile `model.forward` in place when enabled; eager (with one warning) if that fails.

    compile_kwargs go to torch.compile (backend, mode, dynamic, fullgraph). Returns the same
    module object. Compilation itself happens on the first call, so failures surface there; the
    fallback catches them then.
    """
    if not enabled:
        return model
    if isinstance(model.__dict__.get("forward"), CompiledForward):
        raise ValueError("maybe_compile: this model is already compiled (its forward is a CompiledForward)")
    eager_forward = model.forward
    try:
        compiled = torch.compile(eager_forward, **compile_kwargs)
        reason = None
    except COMPILE_ERRORS + (RuntimeError,) as err:  # e.g. an unknown backend name, raised right away
        compiled, reason = None, f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    model.forward = CompiledForward(eager_forward, compiled, reason)
    return model


def compile_state(model: nn.Module) -> str:
    """'eager', 'compiled', or 'fallback: <cause>' (for logs and benchmark output)."""
    forward = model.__dict__.get("forward")
    if not isinstance(forward, CompiledForward):
        return "eager"
    return "compiled" if forward.compiled else f"fallback: {forward.fallback_reason}"


def mixed_precision(device: torch.device | str, precision: str = "bf16", allow_cpu: bool = False):
    """Autocast context: bf16 on CUDA (and on CPU only if allow_cpu), a no-op for fp32.

    Norms stay float32 under it: the model's RMSNorm computes in float32 explicitly and
    layer_norm is on autocast's float32 list.
    """
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision={precision!r}: must be one of {PRECISION_CHOICES}")
    device_type = torch.device(device).type
    if precision == "fp32" or (device_type == "cpu" and not allow_cpu):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def _channels_last_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a
                 for a in args)


def set_head_channels_last(model: nn.Module, enabled: bool = True) -> bool:
    """Feed the Patch Detailer Head channels-last tensors (convolutions then keep that layout).

    Done with a forward pre-hook on the inputs, not by converting the weights: DeepSpeed flattens
    parameters into contiguous buffers, which would silently undo a weight layout. Returns whether
    a hook is installed (False for the linear head, which has no convolutions).
    """
    head = getattr(model, "local_decoder", None)
    handle = getattr(model, "_channels_last_hook", None)
    if handle is not None:
        handle.remove()
        model._channels_last_hook = None
    if not enabled or head is None:
        return False
    model._channels_last_hook = head.register_forward_pre_hook(_channels_last_inputs)
    return True


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_sampling(model: nn.Module, batch: int, steps: int, cfg: float, device: torch.device | str,
                  *, resolution: int = 256, cfg_interval: tuple[float, float] = (0.0, 1.0),
                  method: str = "euler", timeshift: float = 1.0, precision: str = "bf16", repeats: int = 1,
                  seed: int = 0) -> dict:
    """Seconds per image and images/s of `sample()` at one batch size, after one short warm-up.

    The warm-up runs 2 steps, which with any interval strictly inside (0, 1] covers both the
    unguided (batch B) and the guided (batch 2B) shapes, so compilation is not timed. With the
    default interval (0, 1) Euler guides every step but the first (t = 0 is not strictly inside).
    """
    if batch < 1 or steps < 1 or repeats < 1:
        raise ValueError(f"time_sampling: batch={batch}, steps={steps}, repeats={repeats} must all be >= 1")
    device = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    channels = model.config.in_channels
    noise = torch.randn(batch, channels, resolution, resolution, generator=generator).to(device)
    labels = torch.randint(0, model.config.num_classes, (batch,), generator=generator).to(device)

    def run(n_steps: int) -> torch.Tensor:
        with mixed_precision(device, precision):
            return sample(model, noise, labels, steps=n_steps, method=method, cfg_scale=cfg, cfg_interval=cfg_interval,
                          timeshift=timeshift)

    run(min(steps, 2))
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = run(steps)
    _synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    if not torch.isfinite(out.float()).all():
        raise RuntimeError("time_sampling: the sampler produced non-finite values")
    return {"seconds_per_image": seconds / batch, "images_per_s": batch / seconds, "seconds_per_batch": seconds,
            "batch": batch, "steps": steps, "cfg": cfg, "cfg_interval": list(cfg_interval), "method": method,
            "timeshift": timeshift, "precision": precision, "resolution": resolution, "device": str(device),
            "compile": compile_state(model)}
