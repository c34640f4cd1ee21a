"""The last phase: what the driver tells the user (its lines, the end-of-run summary) and the run's
model card."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from trainer.checkpoint.store import step_name
from trainer.config import TrainConfig, config_hash


def echo(text: str) -> None:
    print(text, flush=True)


@dataclass
class RunSummary:
    run_name: str
    status: str                      # FINISHED | STOPPED | FAILED
    steps: int
    seconds: float
    checkpoint_dir: str
    last_checkpoint: str | None
    tracking_uri: str
    mlflow_run_id: str
    sample_grid: str | None
    metrics: dict = field(default_factory=dict)


def write_model_card(cfg: TrainConfig, paths, run_id: str, latest: int | None, result, tracker) -> None:
    """MODEL_CARD.md in the run directory (`paths`: cluster.driver.prepare.RunPaths), also logged to MLflow."""
    metrics = dict(result.return_value or {}) if result is not None else {}
    card = os.path.join(paths.run_dir, "MODEL_CARD.md")
    params = metrics.get("num_params")
    lines = [f"# {cfg.model.name}: run {cfg.run_name}", "",
             "Pixel-space diffusion (DiP: DiT backbone on big patches + Patch Detailer Head), flow matching.", "",
             f"- parameters: {params:,}" if isinstance(params, int) else "- parameters: unknown",
             f"- classes: {cfg.model.num_classes}, resolution: {cfg.data.resolution} px",
             f"- steps: {metrics.get('step', 'unknown')}, {cfg.batch_arithmetic()}",
             f"- optimizer: AdamW lr {cfg.optim.lr}, EMA decay {cfg.optim.ema_decay}, "
             f"ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}",
             f"- final loss (last logging interval): {metrics.get('last_loss', 'unknown')}",
             f"- checkpoint: {paths.checkpoint_uri}/{step_name(latest) if latest is not None else '(none)'} "
             "(ema.pt is the sampling model)",
             f"- data: {cfg.data.path}", f"- config hash: {config_hash(cfg)}", f"- MLflow run: {run_id}"]
    if cfg.train.init_from:
        lines.append(f"- initialised from: {cfg.train.init_from} ({cfg.train.init_weights} weights)")
    lines.append("")
    with open(card, "w") as f:
        f.write("\n".join(lines))
    tracker.log_artifact(card)


def format_summary(s: RunSummary) -> str:
    ui = (f"mlflow ui --backend-store-uri {s.tracking_uri} --host 127.0.0.1 --port 5000"
          if s.tracking_uri.startswith("sqlite") else s.tracking_uri)
    lines = [f"=== dip train: run {s.run_name!r} {s.status.lower()} after {s.steps} steps in {s.seconds:.0f} s ===",
             f"checkpoints : {s.checkpoint_dir}",
             f"newest      : {s.last_checkpoint or '(none committed)'}",
             f"mlflow run  : {s.mlflow_run_id} in {s.tracking_uri}",
             f"mlflow ui   : {ui}",
             f"sample grid : {s.sample_grid or '(none)'}"]
    if s.metrics.get("last_loss") is not None:
        lines.append(f"final loss  : {s.metrics['last_loss']:.4f}")
    if s.metrics.get("goodput_breakdown"):  # the workers' closing ledger (trainer/tracking/goodput.py)
        lines.append(f"goodput     : {s.metrics['goodput_breakdown'].removeprefix('goodput ')}")
    if s.status == "STOPPED":
        lines.append("stopped on request: run the same command again to resume")
    return "\n".join(lines)

