"""The typed configuration of a training run: a YAML file plus `key=value` overrides -> `TrainConfig`.

Every section is a dataclass validated in `__post_init__`. Loading is strict: an unknown key names
itself, the valid keys and the closest match; a value of the wrong type names the key, the value
and what is allowed. Overrides on the command line go through the very same checks.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from data.config import DataConfig

PRECISIONS = ("fp32", "bf16")
ZERO_STAGES = (0, 1, 2, 3)
RESUME_MODES = ("auto", "never")
INIT_WEIGHTS = ("ema", "raw")
SAMPLING_METHODS = ("euler", "heun")
MODEL_WEIGHTS = ("auto", "copy", "reference")
SYNTHETIC_REF = "synthetic"               # eval.ref_stats: held-out images of the synthetic set
SYNTHETIC_REF_START = 1_000_000           # their first index: far beyond any synthetic training set
REPA_OFF, REPA_TINY = "", "tiny"


def _require(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{key}={value!r} is not valid: {allowed}")


def _positive_int(key: str, value: Any, minimum: int = 1) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, key, value,
             f"expected an integer >= {minimum}")


def _number_in(key: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    lo_s, hi_s = ("(" if lo_open else "["), (")" if hi_open else "]")
    _require(ok, key, value, f"expected a number in {lo_s}{lo}, {hi}{hi_s}")


# ----------------------------------------------------------------------------------------------
#                                          Sections
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelSection:
    name: str = "DiP-T/16"                 # a models.registry size: DiP-T/16 ... DiP-XL/64, -linear variants
    num_classes: int = 1000                # labels 0..C-1; C is the null label
    activation_checkpointing: bool = False
    # "authors" (the published init) or "variance_preserving": an opt-in start that makes a small model
    # class-conditional within a few hundred steps (see models/dip.py initialize_weights)
    init: Literal["authors", "variance_preserving"] = "authors"

    def __post_init__(self):
        from models.dip import INIT_CHOICES
        from models.registry import DIP_SIZES  # torch-free at import of this module's callers is not needed

        if self.name not in DIP_SIZES:
            close = difflib.get_close_matches(self.name, DIP_SIZES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"model.name={self.name!r} is not valid{hint}: choose one of {list(DIP_SIZES)}")
        _positive_int("model.num_classes", self.num_classes)
        _require(self.init in INIT_CHOICES, "model.init", self.init, f"expected one of {list(INIT_CHOICES)}")

    def dip_config(self):
        from models.registry import dip_config

        return dip_config(self.name, num_classes=self.num_classes,
                          activation_checkpointing=self.activation_checkpointing, init=self.init)


@dataclass
class ObjectiveSection:
    label_dropout: float = 0.1             # to the null label, for classifier-free guidance
    t_mean: float = 0.0                    # logit-normal t = sigmoid(N(mean, std))
    t_std: float = 1.0
    repa_encoder: str = REPA_OFF           # "" = REPA off; a local DINOv2-B/14 weight file; "tiny" (tests)
    repa_block: int = 8                    # align the tokens after this block
    repa_weight: float = 0.5

    def __post_init__(self):
        _number_in("objective.label_dropout", self.label_dropout, 0.0, 1.0, hi_open=True)
        _number_in("objective.t_std", self.t_std, 0.0, float("inf"), lo_open=True)
        _number_in("objective.t_mean", self.t_mean, -10.0, 10.0)
        _positive_int("objective.repa_block", self.repa_block)
        _number_in("objective.repa_weight", self.repa_weight, 0.0, float("inf"))

    @property
    def repa_enabled(self) -> bool:
        return self.repa_encoder != REPA_OFF


@dataclass
class OptimSection:
    lr: float = 1e-4                       # AdamW, constant after warmup (the paper's recipe)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0                  # linear warmup from 0; 0 = constant from the start
    grad_clip: float = 0.0                 # global-norm clipping; 0 = off
    ema_decay: float = 0.9999              # EMA of the weights, updated every optimizer step

    def __post_init__(self):
        _number_in("optim.lr", self.lr, 0.0, 1.0, lo_open=True)
        for i, beta in enumerate(self.betas):
            _number_in(f"optim.betas[{i}]", beta, 0.0, 1.0, hi_open=True)
        _number_in("optim.eps", self.eps, 0.0, 1.0, lo_open=True)
        _number_in("optim.weight_decay", self.weight_decay, 0.0, 1.0)
        _positive_int("optim.warmup_steps", self.warmup_steps, minimum=0)
        _number_in("optim.grad_clip", self.grad_clip, 0.0, float("inf"))
        _number_in("optim.ema_decay", self.ema_decay, 0.0, 1.0)


@dataclass
class TrainSection:
    max_steps: int = 1000                  # optimizer steps
    seed: int = 0                          # model init, noise, label dropout (data order: data.seed)
    zero_stage: int = 2                    # DeepSpeed ZeRO stage 0, 1, 2 or 3
    precision: Literal["fp32", "bf16"] = "bf16"
    grad_accum: int = 1                    # micro-batches per optimizer step
    log_every: int = 10                    # metrics + one status line every N steps
    stop_check_every: int = 10             # poll for a stop request / preemption notice every N steps
    # a step whose loss (any micro-batch, any rank) or gradient norm is NaN/Inf is skipped on every rank
    # (no weight, optimizer, LR or EMA update; counted: MLflow `nonfinite_steps`). This many in a row
    # roll back to the last committed checkpoint and skip the data since it (trainer/loop/nonfinite.py)
    nonfinite_patience: int = 3
    max_rollbacks: int = 2                 # rollbacks per run; one more stops the run (FAILED, checkpoint kept)
    # start a new run from trained weights (trainer/checkpoint/init_from.py): a step-N/ dir, a checkpoints dir,
    # a `dip export` file or the authors' checkpoint; "" = from scratch. Ignored once the run has checkpoints
    init_from: str = ""
    init_weights: Literal["ema", "raw"] = "ema"   # raw: the trained (non-EMA) weights of the source

    def __post_init__(self):
        _positive_int("train.max_steps", self.max_steps)
        _positive_int("train.seed", self.seed, minimum=0)
        _require(self.zero_stage in ZERO_STAGES and not isinstance(self.zero_stage, bool), "train.zero_stage",
                 self.zero_stage, f"choose one of {list(ZERO_STAGES)}")
        _require(self.precision in PRECISIONS, "train.precision", self.precision, f"choose one of {list(PRECISIONS)}")
        _positive_int("train.grad_accum", self.grad_accum)
        _positive_int("train.log_every", self.log_every)
        _positive_int("train.stop_check_every", self.stop_check_every)
        _positive_int("train.nonfinite_patience", self.nonfinite_patience)
        _positive_int("train.max_rollbacks", self.max_rollbacks, minimum=0)
        _require(isinstance(self.init_from, str), "train.init_from", self.init_from, "expected a path string")
        _require(self.init_weights in INIT_WEIGHTS, "train.init_weights", self.init_weights,
                 f"choose one of {list(INIT_WEIGHTS)}")


@dataclass
class CheckpointSection:
    path: str = ""                         # "" = <output_dir>/<run_name>/checkpoints; else a local/shared dir
                                           # or s3://bucket/prefix (the run name is appended)
    every_steps: int = 1000                # also on a stop request / preemption notice, and at the end
    keep: int = 3                          # newest K committed checkpoints are kept
    async_save: bool = False               # block only for the copy to host memory; write in the background
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the newest committed checkpoint
    commit_timeout_s: float = 1800.0       # rank 0 waits this long for every rank's files before giving up

    def __post_init__(self):
        _require(isinstance(self.path, str), "checkpoint.path", self.path, "expected a string")
        _positive_int("checkpoint.every_steps", self.every_steps)
        _positive_int("checkpoint.keep", self.keep)
        _require(self.resume in RESUME_MODES, "checkpoint.resume", self.resume, f"choose one of {list(RESUME_MODES)}")
        _number_in("checkpoint.commit_timeout_s", self.commit_timeout_s, 0.0, float("inf"), lo_open=True)


@dataclass
class TrackingSection:
    uri: str = ""                          # "" = an embedded sqlite store inside the run directory
    experiment: str = "dip"
    flush_timeout_s: float = 10.0          # how long a checkpoint/exit waits for buffered metrics
    # MLflow's own system metrics (system/...: CPU, memory, disk, network; GPUs through nvidia-ml-py),
    # sampled by one monitor per node (metric names carry the node id on multi-node runs)
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    # the final EMA model as an MLflow LoggedModel (a FINISHED run only), loadable with
    # mlflow.pytorch.load_model; weights: "copy" into MLflow, "reference" the checkpoint's ema.pt, or
    # "auto": copy up to model_copy_max_mb, reference above
    log_model: bool = True
    model_weights: Literal["auto", "copy", "reference"] = "auto"
    model_copy_max_mb: float = 1024.0
    register_model: str = ""               # a registered model name to add the LoggedModel to ("" = none)

    def __post_init__(self):
        _require(isinstance(self.experiment, str) and self.experiment != "", "tracking.experiment",
                 self.experiment, "expected a non-empty name")
        _number_in("tracking.flush_timeout_s", self.flush_timeout_s, 0.0, float("inf"))
        _number_in("tracking.system_metrics_interval_s", self.system_metrics_interval_s, 0.0, 3600.0, lo_open=True)
        _require(self.model_weights in MODEL_WEIGHTS, "tracking.model_weights", self.model_weights,
                 f"choose one of {list(MODEL_WEIGHTS)}")
        _number_in("tracking.model_copy_max_mb", self.model_copy_max_mb, 0.0, float("inf"))
        # MLflow's rule for registered model names
        _require(isinstance(self.register_model, str) and self.register_model == self.register_model.strip()
                 and not any(c in self.register_model for c in "/:"), "tracking.register_model",
                 self.register_model, "expected \"\" (no registration) or a name without '/', ':' or outer spaces")


@dataclass
class SamplesSection:
    every_steps: int = 0                   # a sample grid every N steps (0 = only at the end)
    num_classes: int = 10                  # grid rows: the first N classes
    per_class: int = 8                     # grid columns
    steps: int = 25                        # Euler steps
    cfg_scale: float = 1.0
    seed: int = 0                          # fixed noise: grids are comparable across steps

    def __post_init__(self):
        _positive_int("samples.every_steps", self.every_steps, minimum=0)
        _positive_int("samples.num_classes", self.num_classes)
        _positive_int("samples.per_class", self.per_class)
        _positive_int("samples.steps", self.steps)
        _number_in("samples.cfg_scale", self.cfg_scale, 0.0, float("inf"))
        _positive_int("samples.seed", self.seed, minimum=0)


@dataclass
class EvalSection:
    """The FID eval pool owned by the driver (trainer.eval.pool); off by default."""
    enabled: bool = False
    every_steps: int = 10000
    num_samples: int = 50000
    steps: int = 100
    method: Literal["euler", "heun"] = "euler"
    cfg_scale: float = 2.9
    cfg_interval: tuple[float, float] = (0.11, 0.97)
    actors: int = 1
    # reference statistics file (required when enabled), or "synthetic" with synthetic data: held-out
    # synthetic images (indices from SYNTHETIC_REF_START up), computed by the pool in the background
    ref_stats: str = ""
    ref_samples: int = 500                 # images in the "synthetic" reference
    # how long the eval actors may take to be placed and start; then (e.g. no free GPU of that kind)
    # evals are switched off with a warning
    start_timeout_s: float = 600.0

    def __post_init__(self):
        _positive_int("eval.every_steps", self.every_steps)
        _positive_int("eval.num_samples", self.num_samples)
        _positive_int("eval.steps", self.steps)
        _require(self.method in SAMPLING_METHODS, "eval.method", self.method, f"choose one of {list(SAMPLING_METHODS)}")
        _positive_int("eval.actors", self.actors)
        _positive_int("eval.ref_samples", self.ref_samples)
        _number_in("eval.start_timeout_s", self.start_timeout_s, 0.0, float("inf"), lo_open=True)
        lo, hi = self.cfg_interval
        _require(0.0 <= lo <= hi <= 1.0, "eval.cfg_interval", self.cfg_interval, "expected 0 <= lo <= hi <= 1")
        _require(not self.enabled or self.ref_stats != "", "eval.ref_stats", self.ref_stats,
                 "a reference statistics file is required when eval.enabled is true")


@dataclass
class ClusterSection:
    address: str = ""                      # "" = start a local Ray cluster; "auto" / "ray://host:port" = attach
    # data-parallel ranks (one per GPU on GPU clusters): a number, or [min, max] for an elastic run that
    # shrinks when nodes are lost and grows back when they return (the global batch stays the same)
    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    num_cpus: int = 0                      # CPUs of a locally started cluster; 0 = all of this machine
    object_store_mb: int = 256             # object store of a locally started cluster
    # a locally started cluster serves Ray's dashboard on 127.0.0.1 (and with it the state API, which
    # Ray Train's placement-group cleaner polls every second, warning each time it is missing)
    dashboard: bool = True
    max_failures: int = 3                  # worker-group restarts (each resumes from the last checkpoint)
    # elastic runs: how often Ray checks whether lost capacity came back (a grow writes a checkpoint first)
    resize_check_s: float = 60.0

    def __post_init__(self):
        if isinstance(self.num_workers, tuple):
            low, high = self.num_workers
            _positive_int("cluster.num_workers[0]", low)
            _positive_int("cluster.num_workers[1]", high)
            _require(low <= high, "cluster.num_workers", list(self.num_workers), "expected [min, max] with min <= max")
            if low == high:
                self.num_workers = low  # [n, n] is a fixed size
        else:
            _positive_int("cluster.num_workers", self.num_workers)
        _number_in("cluster.resize_check_s", self.resize_check_s, 0.0, float("inf"), lo_open=True)
        _number_in("cluster.cpus_per_worker", self.cpus_per_worker, 0.0, 1024.0, lo_open=True)
        _positive_int("cluster.num_cpus", self.num_cpus, minimum=0)
        _positive_int("cluster.object_store_mb", self.object_store_mb, minimum=64)
        _require(isinstance(self.max_failures, int) and self.max_failures >= -1, "cluster.max_failures",
                 self.max_failures, "expected an integer >= -1 (-1 = retry forever)")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers

    def worker_counts(self) -> range:
        return range(self.min_workers, self.max_workers + 1)


@dataclass
class TrainConfig:
    run_name: str = "dip"                  # re-running with the same run name resumes it
    output_dir: str = "runs"               # run directory = <output_dir>/<run_name>
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    samples: SamplesSection = field(default_factory=SamplesSection)
    eval: EvalSection = field(default_factory=EvalSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)

    def __post_init__(self):
        _require(isinstance(self.run_name, str) and self.run_name != "" and "/" not in self.run_name
                 and not self.run_name.startswith("."), "run_name", self.run_name,
                 "expected a non-empty name without '/' that does not start with '.'")
        patch = self.model.dip_config().patch_size
        _require(self.data.resolution % patch == 0, "data.resolution", self.data.resolution,
                 f"must be a multiple of the patch size {patch} of {self.model.name}")
        if self.data.is_synthetic:
            _require(self.data.synthetic_classes <= self.model.num_classes, "data.synthetic_classes",
                     self.data.synthetic_classes, f"must be <= model.num_classes={self.model.num_classes}")
        _require(self.samples.num_classes <= self.model.num_classes, "samples.num_classes", self.samples.num_classes,
                 f"must be <= model.num_classes={self.model.num_classes}")
        if self.eval.enabled:  # evals run on committed checkpoints only: any other schedule would skip some
            _require(self.eval.every_steps % self.checkpoint.every_steps == 0, "eval.every_steps",
                     self.eval.every_steps, f"must be a multiple of checkpoint.every_steps="
                     f"{self.checkpoint.every_steps} (evals score committed checkpoints)")
        if self.objective.repa_enabled:
            depth = self.model.dip_config().depth
            _require(self.objective.repa_block <= depth, "objective.repa_block", self.objective.repa_block,
                     f"must be <= the depth {depth} of {self.model.name}")
        ends = sorted({self.cluster.min_workers, self.cluster.max_workers})
        impossible = [w for w in ends if solve_batch_split(self.global_batch, self.data.batch_size, w) is None]
        if impossible:
            raise ValueError(f"cluster.num_workers={_show_workers(self.cluster.num_workers)}: the global batch "
                             f"{self.global_batch} (data.batch_size x {self.cluster.max_workers} workers x "
                             f"train.grad_accum) cannot be split evenly over {impossible[0]} workers; choose a "
                             f"minimum that divides {self.global_batch}")

    # -- derived facts -------------------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        return os.path.abspath(os.path.join(self.output_dir, self.run_name))

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, the same at every world size: stated at the largest one."""
        return self.data.batch_size * self.cluster.max_workers * self.train.grad_accum

    def batch_split(self, world_size: int) -> "BatchSplit":
        """How `world_size` workers make up the global batch (re-solved at every (re)start)."""
        split = solve_batch_split(self.global_batch, self.data.batch_size, world_size)
        if split is None:
            raise ValueError(f"{world_size} workers cannot keep the global batch {self.global_batch} (data.batch_size="
                             f"{self.data.batch_size} x {self.cluster.max_workers} workers x train.grad_accum="
                             f"{self.train.grad_accum}): it is not a multiple of {world_size}; refusing to train "
                             f"on another global batch")
        return split

    def batch_arithmetic(self) -> str:
        top = self.batch_split(self.cluster.max_workers)
        if not self.cluster.elastic:
            return top.describe()
        low = self.batch_split(self.cluster.min_workers)
        text = f"{top.describe()} at {top.world_size} workers; {low.describe()} at {low.world_size}"
        skipped = self.unusable_worker_counts()
        if skipped:
            text += (f"; {', '.join(map(str, skipped))} workers cannot keep it: a restart Ray makes with that many "
                     "is refused and retried (cluster.max_failures)")
        return text

    def unusable_worker_counts(self) -> list[int]:
        """World sizes inside an elastic range that cannot split the global batch evenly."""
        return [w for w in self.cluster.worker_counts()
                if solve_batch_split(self.global_batch, self.data.batch_size, w) is None]


@dataclass(frozen=True)
class BatchSplit:
    """micro-batch x workers x accumulation = the global batch, for one world size."""
    micro_batch: int
    world_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world_size * self.grad_accum

    def describe(self) -> str:
        return (f"micro-batch {self.micro_batch} x {self.world_size} workers x {self.grad_accum} accumulation "
                f"= {self.global_batch} images per step")


def solve_batch_split(global_batch: int, max_micro_batch: int, world_size: int) -> BatchSplit | None:
    """The split of `global_batch` over `world_size` workers with the largest micro-batch <= the
    configured one (memory is sized for it), hence the fewest accumulation steps; None if none exists."""
    if global_batch % world_size:
        return None
    per_worker = global_batch // world_size
    for micro in range(min(max_micro_batch, per_worker), 0, -1):
        if per_worker % micro == 0:
            return BatchSplit(micro, world_size, per_worker // micro)
    return None


def _show_workers(value) -> str:
    return f"[{value[0]}, {value[1]}]" if isinstance(value, tuple) else str(value)


# ----------------------------------------------------------------------------------------------
#                                   Typed construction from dicts
# ----------------------------------------------------------------------------------------------

def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {len(typing.get_args(hint))} numbers"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the field's type, or raise naming the key, the value and the type."""
    origin = typing.get_origin(hint)
    bad = ValueError(f"{key}={value!r} is not valid: expected {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping of keys to values, got {value!r}")
        return build_dataclass(hint, value, key)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise bad
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if hint is str:
        if isinstance(value, str):
            return value
        raise bad
    return value


def _unknown_key(key: str, where: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    full = f"{where}.{key}" if where else key
    return ValueError(f"unknown key {full!r}{hint}; valid keys{' of ' + where if where else ''}: {', '.join(valid)}")


def build_dataclass(cls: type, data: dict, where: str = ""):
    """cls(**data) with every key checked against cls's fields and every value against its type."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise _unknown_key(str(key), where, valid)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without a default
        raise ValueError(f"{where or cls.__name__}: {err}") from None


def _field_hint(path: list[str]) -> Any:
    """The declared type of a dotted key, raising the unknown-key error for a bad segment."""
    cls: Any = TrainConfig
    where = ""
    for i, part in enumerate(path):
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{where} is a single value, it has no key {part!r}")
        valid = [f.name for f in dataclasses.fields(cls) if f.init]
        if part not in valid:
            raise _unknown_key(part, where, valid)
        cls = typing.get_type_hints(cls)[part]
        where = f"{where}.{part}" if where else part
    return cls


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], typed value). Strings need no quotes."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"override {text!r} is not valid: expected key=value, e.g. optim.lr=3e-4")
    path = key.split(".")
    hint = _field_hint(path)
    if dataclasses.is_dataclass(hint):
        raise ValueError(f"override {key!r} names a whole section: set one of its keys, e.g. {key}.<key>=value")
    if hint is str or (typing.get_origin(hint) is Literal and all(isinstance(a, str) for a in typing.get_args(hint))):
        value: Any = raw  # strings are taken literally: run_name=007 stays "007"
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"override {text!r}: cannot parse the value ({err})") from None
    return path, value


def _apply(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    raw = json.loads(json.dumps(raw or {}, default=list))  # a deep copy we may edit
    if not isinstance(raw, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    for text in overrides:
        path, value = parse_override(text)
        _apply(raw, path, value)
    return build_dataclass(TrainConfig, raw)


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config, apply `key=value` overrides, validate everything."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return config_from_dict(raw, overrides)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------------------------
#                                 Serialisation, hashing, resume checks
# ----------------------------------------------------------------------------------------------

def to_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists: plain YAML/JSON types


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def flatten(cfg: TrainConfig) -> dict[str, str]:
    """{"optim.lr": "0.0001", ...}: MLflow params."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        else:
            flat[prefix] = json.dumps(node) if isinstance(node, list) else str(node)

    walk(to_dict(cfg), "")
    return flat


def shape_signature(cfg: TrainConfig) -> dict:
    """What a checkpoint's tensors depend on: a resume with a different signature cannot load."""
    model = dataclasses.asdict(cfg.model.dip_config())
    model.pop("activation_checkpointing")  # recomputation changes no shape
    model.pop("init")  # nor do the starting weights
    return {"model": model, "repa": cfg.objective.repa_encoder if cfg.objective.repa_enabled else None}


def resume_incompatibilities(saved: dict, cfg: TrainConfig) -> list[str]:
    """Why a checkpoint saved with config dict `saved` cannot resume under `cfg` ([] = it can)."""
    old = config_from_dict(saved)
    problems = []
    old_sig, new_sig = shape_signature(old), shape_signature(cfg)
    for key in sorted(set(old_sig["model"]) | set(new_sig["model"])):
        a, b = old_sig["model"].get(key), new_sig["model"].get(key)
        if a != b:
            problems.append(f"model shape differs: {key} was {a!r}, now {b!r}")
    if old_sig["repa"] != new_sig["repa"]:
        problems.append(f"REPA projector differs: objective.repa_encoder was {old_sig['repa']!r}, "
                        f"now {new_sig['repa']!r}")
    if old.train.zero_stage != cfg.train.zero_stage:
        problems.append(f"train.zero_stage was {old.train.zero_stage}, now {cfg.train.zero_stage}: "
                        "DeepSpeed shards of one ZeRO stage do not load into another")
    if old.global_batch != cfg.global_batch:
        problems.append(f"the global batch was {old.global_batch} ({old.batch_arithmetic()}), now {cfg.global_batch} "
                        f"({cfg.batch_arithmetic()}): the learning-rate schedule and the data position count in "
                        f"global batches; to keep it, {_keep_global_batch(old.global_batch, cfg)}")
    return problems


def _keep_global_batch(target: int, cfg: TrainConfig) -> str:
    """The one-key changes that give `cfg` the global batch `target` (for the resume refusal)."""
    workers, micro, accum = cfg.cluster.max_workers, cfg.data.batch_size, cfg.train.grad_accum
    options = []
    if target % (micro * workers) == 0:
        options.append(f"train.grad_accum={target // (micro * workers)}")
    if target % (workers * accum) == 0:
        options.append(f"data.batch_size={target // (workers * accum)}")
    if target % (micro * accum) == 0:
        options.append(f"cluster.num_workers={target // (micro * accum)}")
    return "set " + " or ".join(options) if options else \
        f"choose data.batch_size x cluster.num_workers x train.grad_accum = {target}"
