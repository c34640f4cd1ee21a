"""The sections of a run's config, as strict pydantic models, and `TrainConfig` that holds them.

Each field declares its type and range (`IntAtLeast(1)`, `NumberIn(gt=0.0, le=1.0)`, `Literal[...]`);
`data.config_model` turns a refusal into one line naming the key, the value and what is allowed. Rules
that tie fields together (a resolution the patch size divides, an elastic range that can keep the global
batch) are model validators whose messages are written out in full.
"""
from __future__ import annotations

import difflib
import os
from typing import Annotated, ClassVar, Literal, Union

from pydantic import AfterValidator, Discriminator, Field, Tag, field_validator, model_validator

from data.config import DataConfig
from data.config_model import ConfigModel, Flag, IntAtLeast, IntChoice, NumberIn, Text, invalid
from trainer.config.batch import BatchSplit, batch_arithmetic, batch_split, global_batch, solve_batch_split, \
    unusable_worker_counts

PRECISIONS = ("fp32", "bf16")
ZERO_STAGES = (0, 1, 2, 3)
RESUME_MODES = ("auto", "never")
INIT_WEIGHTS = ("ema", "raw")
SAMPLING_METHODS = ("euler", "heun")
MODEL_WEIGHTS = ("auto", "copy", "reference")
SYNTHETIC_REF = "synthetic"               # eval.ref_stats: held-out images of the synthetic set
SYNTHETIC_REF_START = 1_000_000           # their first index: far beyond any synthetic training set
REPA_OFF, REPA_TINY = "", "tiny"

Fraction = NumberIn(ge=0.0, lt=1.0)       # [0, 1): a probability that must leave something, an Adam beta
NonNegative = NumberIn(ge=0.0)
Positive = NumberIn(gt=0.0)


class ModelSection(ConfigModel):
    section: ClassVar[str] = "model"

    name: Text = "DiP-T/16"                # a models.registry size: DiP-T/16 ... DiP-XL/64, -linear variants
    num_classes: IntAtLeast(1) = 1000      # labels 0..C-1; C is the null label
    activation_checkpointing: Flag = False
    # "authors" (the published init) or "variance_preserving": an opt-in start that makes a small model
    # class-conditional within a few hundred steps (see models/dip.py initialize_weights)
    init: Literal["authors", "variance_preserving"] = "authors"

    @field_validator("name")
    @classmethod
    def _known_size(cls, name: str) -> str:
        from models.registry import DIP_SIZES

        if name not in DIP_SIZES:
            close = difflib.get_close_matches(name, DIP_SIZES, n=1)
            raise invalid(name, f"choose one of {list(DIP_SIZES)}",
                          hint=f" (did you mean {close[0]!r}?)" if close else "")
        return name

    def dip_config(self):
        from models.registry import dip_config

        return dip_config(self.name, num_classes=self.num_classes,
                          activation_checkpointing=self.activation_checkpointing, init=self.init)


class ObjectiveSection(ConfigModel):
    section: ClassVar[str] = "objective"

    label_dropout: Fraction = 0.1          # to the null label, for classifier-free guidance
    t_mean: NumberIn(ge=-10.0, le=10.0) = 0.0  # logit-normal t = sigmoid(N(mean, std))
    t_std: Positive = 1.0
    repa_encoder: Text = REPA_OFF          # "" = REPA off; a local DINOv2-B/14 weight file; "tiny" (tests)
    repa_block: IntAtLeast(1) = 8          # align the tokens after this block
    repa_weight: NonNegative = 0.5

    @property
    def repa_enabled(self) -> bool:
        return self.repa_encoder != REPA_OFF


class OptimSection(ConfigModel):
    section: ClassVar[str] = "optim"

    lr: NumberIn(gt=0.0, le=1.0) = 1e-4    # AdamW, constant after warmup (the paper's recipe)
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    eps: NumberIn(gt=0.0, le=1.0) = 1e-8
    weight_decay: NumberIn(ge=0.0, le=1.0) = 0.0
    warmup_steps: IntAtLeast(0) = 0        # linear warmup from 0; 0 = constant from the start
    grad_clip: NonNegative = 0.0           # global-norm clipping; 0 = off
    ema_decay: NumberIn(ge=0.0, le=1.0) = 0.9999  # EMA of the weights, updated every optimizer step


class TrainSection(ConfigModel):
    section: ClassVar[str] = "train"

    max_steps: IntAtLeast(1) = 1000        # optimizer steps
    seed: IntAtLeast(0) = 0                # model init, noise, label dropout (data order: data.seed)
    zero_stage: IntChoice(ZERO_STAGES) = 2  # DeepSpeed ZeRO stage 0, 1, 2 or 3
    precision: Literal["fp32", "bf16"] = "bf16"
    grad_accum: IntAtLeast(1) = 1          # micro-batches per optimizer step
    log_every: IntAtLeast(1) = 10          # metrics + one status line every N steps
    stop_check_every: IntAtLeast(1) = 10   # poll for a stop request / preemption notice every N steps
    # a step whose loss (any micro-batch, any rank) or gradient norm is NaN/Inf is skipped on every rank
    # (no weight, optimizer, LR or EMA update; counted: MLflow `nonfinite_steps`). This many in a row
    # roll back to the last committed checkpoint and skip the data since it (trainer/loop/nonfinite.py)
    nonfinite_patience: IntAtLeast(1) = 3
    # rollbacks per `dip train` invocation (a Ray restart of the workers keeps the count, a re-run of the command
    # starts afresh); one more stops the run (FAILED, checkpoint kept)
    max_rollbacks: IntAtLeast(0) = 2
    # start a new run from trained weights (trainer/checkpoint/init_from.py): a step-N/ dir, a checkpoints dir,
    # a `dip export` file or the authors' checkpoint; "" = from scratch. Ignored once the run has checkpoints
    init_from: Text = ""
    init_weights: Literal["ema", "raw"] = "ema"   # raw: the trained (non-EMA) weights of the source


class CheckpointSection(ConfigModel):
    section: ClassVar[str] = "checkpoint"

    path: Text = ""                        # "" = <output_dir>/<run_name>/checkpoints; else a local/shared dir
                                           # or s3://bucket/prefix (the run name is appended)
    every_steps: IntAtLeast(1) = 1000      # also on a stop request / preemption notice, and at the end
    keep: IntAtLeast(1) = 3                # newest K committed checkpoints are kept
    async_save: Flag = False               # block only for the copy to host memory; write in the background
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the newest committed checkpoint
    commit_timeout_s: Positive = 1800.0    # rank 0 waits this long for every rank's files before giving up


def _registered_model_name(name: str) -> str:
    if name != name.strip() or any(c in name for c in "/:"):  # MLflow's rule for registered model names
        raise invalid(name, "expected \"\" (no registration) or a name without '/', ':' or outer spaces")
    return name


def _non_empty(name: str) -> str:
    if name == "":
        raise invalid(name, "expected a non-empty name")
    return name


class TrackingSection(ConfigModel):
    section: ClassVar[str] = "tracking"

    uri: Text = ""                         # "" = an embedded sqlite store inside the run directory
    experiment: Annotated[Text, AfterValidator(_non_empty)] = "dip"
    flush_timeout_s: NonNegative = 10.0    # how long a checkpoint/exit waits for buffered metrics
    # MLflow's own system metrics (system/...: CPU, memory, disk, network; GPUs through nvidia-ml-py),
    # sampled by one monitor per node (metric names carry the node id on multi-node runs)
    system_metrics: Flag = True
    system_metrics_interval_s: NumberIn(gt=0.0, le=3600.0) = 10.0
    # the final EMA model as an MLflow LoggedModel (a FINISHED run only), loadable with
    # mlflow.pytorch.load_model; weights: "copy" into MLflow, "reference" the checkpoint's ema.pt, or
    # "auto": copy up to model_copy_max_mb, reference above
    log_model: Flag = True
    model_weights: Literal["auto", "copy", "reference"] = "auto"
    model_copy_max_mb: NonNegative = 1024.0
    # a registered model name to add the LoggedModel to ("" = none)
    register_model: Annotated[Text, AfterValidator(_registered_model_name)] = ""


class SamplesSection(ConfigModel):
    section: ClassVar[str] = "samples"

    every_steps: IntAtLeast(0) = 0         # a sample grid every N steps (0 = only at the end)
    num_classes: IntAtLeast(1) = 10        # grid rows: the first N classes
    per_class: IntAtLeast(1) = 8           # grid columns
    steps: IntAtLeast(1) = 25              # Euler steps
    cfg_scale: NonNegative = 1.0
    seed: IntAtLeast(0) = 0                # fixed noise: grids are comparable across steps


def _ordered_interval(interval: tuple[float, float]) -> tuple[float, float]:
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise invalid(interval, "expected 0 <= lo <= hi <= 1")
    return interval


class EvalSection(ConfigModel):
    """The FID eval pool owned by the driver (trainer.eval.pool); off by default."""

    section: ClassVar[str] = "eval"

    enabled: Flag = False
    every_steps: IntAtLeast(1) = 10000
    num_samples: IntAtLeast(1) = 50000
    steps: IntAtLeast(1) = 100
    method: Literal["euler", "heun"] = "euler"
    cfg_scale: NumberIn() = 2.9
    cfg_interval: Annotated[tuple[NumberIn(), NumberIn()], AfterValidator(_ordered_interval)] = (0.11, 0.97)
    actors: IntAtLeast(1) = 1
    # reference statistics file (required when enabled), or "synthetic" with synthetic data: held-out
    # synthetic images (indices from SYNTHETIC_REF_START up), computed by the pool in the background
    ref_stats: Text = ""
    ref_samples: IntAtLeast(1) = 500       # images in the "synthetic" reference
    # how long the eval actors may take to be placed and start; then (e.g. no free GPU of that kind)
    # evals are switched off with a warning
    start_timeout_s: Positive = 600.0

    @model_validator(mode="after")
    def _reference_when_enabled(self) -> "EvalSection":
        if self.enabled and self.ref_stats == "":
            raise ValueError(f"eval.ref_stats={self.ref_stats!r} is not valid: a reference statistics file is "
                             "required when eval.enabled is true")
        return self


def _fixed_or_range(value) -> str:
    return "range" if isinstance(value, (list, tuple)) else "count"


def _ordered_range(workers: int | tuple[int, int]) -> int | tuple[int, int]:
    if isinstance(workers, tuple):
        low, high = workers
        if low > high:
            raise invalid(list(workers), "expected [min, max] with min <= max")
        if low == high:
            return low  # [n, n] is a fixed size
    return workers


# a number, or [min, max] for an elastic run; the tag picks which is checked, so an error names one shape
WorkerCount = Annotated[
    Union[Annotated[IntAtLeast(1), Tag("count")],
          Annotated[tuple[IntAtLeast(1), IntAtLeast(1)], Tag("range")]],
    Discriminator(_fixed_or_range), AfterValidator(_ordered_range)]


class ClusterSection(ConfigModel):
    section: ClassVar[str] = "cluster"

    address: Text = ""                     # "" = start a local Ray cluster; "auto" / "ray://host:port" = attach
    # data-parallel ranks (one per GPU on GPU clusters): a number, or [min, max] for an elastic run that
    # shrinks when nodes are lost and grows back when they return (the global batch stays the same)
    num_workers: WorkerCount = 1
    use_gpu: Flag = False
    cpus_per_worker: NumberIn(gt=0.0, le=1024.0) = 1.0
    num_cpus: IntAtLeast(0) = 0            # CPUs of a locally started cluster; 0 = all of this machine
    object_store_mb: IntAtLeast(64) = 256  # object store of a locally started cluster
    # a locally started cluster serves Ray's dashboard on 127.0.0.1 (and with it the state API, which
    # Ray Train's placement-group cleaner polls every second, warning each time it is missing)
    dashboard: Flag = True
    # worker-group restarts (each resumes from the last checkpoint)
    max_failures: IntAtLeast(-1) = Field(3, description="-1 = retry forever")
    # elastic runs: how often Ray checks whether lost capacity came back (a grow writes a checkpoint first)
    resize_check_s: Positive = 60.0

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


def _run_name(name: str) -> str:
    if name == "" or "/" in name or name.startswith("."):
        raise invalid(name, "expected a non-empty name without '/' that does not start with '.'")
    return name


class TrainConfig(ConfigModel):
    run_name: Annotated[Text, AfterValidator(_run_name)] = "dip"  # the same run name again resumes it
    output_dir: Text = "runs"              # run directory = <output_dir>/<run_name>
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: ObjectiveSection = Field(default_factory=ObjectiveSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    samples: SamplesSection = Field(default_factory=SamplesSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)

    @model_validator(mode="after")
    def _sections_agree(self) -> "TrainConfig":
        model = self.model.dip_config()
        if self.data.resolution % model.patch_size:
            raise ValueError(f"data.resolution={self.data.resolution!r} is not valid: must be a multiple of the "
                             f"patch size {model.patch_size} of {self.model.name}")
        if self.data.is_synthetic and self.data.synthetic_classes > self.model.num_classes:
            raise ValueError(f"data.synthetic_classes={self.data.synthetic_classes!r} is not valid: must be <= "
                             f"model.num_classes={self.model.num_classes}")
        if self.samples.num_classes > self.model.num_classes:
            raise ValueError(f"samples.num_classes={self.samples.num_classes!r} is not valid: must be <= "
                             f"model.num_classes={self.model.num_classes}")
        # evals run on committed checkpoints only: any other schedule would skip some
        if self.eval.enabled and self.eval.every_steps % self.checkpoint.every_steps:
            raise ValueError(f"eval.every_steps={self.eval.every_steps!r} is not valid: must be a multiple of "
                             f"checkpoint.every_steps={self.checkpoint.every_steps} (evals score committed "
                             f"checkpoints)")
        if self.objective.repa_enabled and self.objective.repa_block > model.depth:
            raise ValueError(f"objective.repa_block={self.objective.repa_block!r} is not valid: must be <= the "
                             f"depth {model.depth} of {self.model.name}")
        ends = sorted({self.cluster.min_workers, self.cluster.max_workers})
        impossible = [w for w in ends if solve_batch_split(self.global_batch, self.data.batch_size, w) is None]
        if impossible:
            workers = self.cluster.num_workers
            shown = f"[{workers[0]}, {workers[1]}]" if isinstance(workers, tuple) else str(workers)
            raise ValueError(f"cluster.num_workers={shown}: the global batch {self.global_batch} (data.batch_size x "
                             f"{self.cluster.max_workers} workers x train.grad_accum) cannot be split evenly over "
                             f"{impossible[0]} workers; choose a minimum that divides {self.global_batch}")
        return self

    # -- derived facts (the batch arithmetic lives in trainer.config.batch) ---------------------
    @property
    def run_dir(self) -> str:
        return os.path.abspath(os.path.join(self.output_dir, self.run_name))

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, the same at every world size: stated at the largest one."""
        return global_batch(self)

    def batch_split(self, world_size: int) -> BatchSplit:
        """How `world_size` workers make up the global batch (re-solved at every (re)start)."""
        return batch_split(self, world_size)

    def batch_arithmetic(self) -> str:
        return batch_arithmetic(self)

    def unusable_worker_counts(self) -> list[int]:
        """World sizes inside an elastic range that cannot split the global batch evenly."""
        return unusable_worker_counts(self)
