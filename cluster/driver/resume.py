"""Resume planning: before any worker starts, does this run continue a committed checkpoint, and is
that allowed (same model shape, ZeRO stage and global batch)? Refused here, with one clear line."""
from __future__ import annotations

from dataclasses import dataclass, field

from trainer.checkpoint.store import CheckpointStore
from trainer.config import TrainConfig, config_hash, resume_incompatibilities


@dataclass
class ResumePlan:
    step: int | None = None
    mlflow_run_id: str | None = None
    notes: list[str] = field(default_factory=list)


def plan_resume(cfg: TrainConfig, store: CheckpointStore) -> ResumePlan:
    """Decide, before any worker starts, whether this run continues a checkpoint, and refuse clearly
    when it cannot (a different model shape, ZeRO stage or global batch). Another world size is fine:
    the workers re-partition the ZeRO state and the data (trainer.checkpoint.manager)."""
    from trainer.checkpoint.manager import load_train_state

    # the marker (sizes) and the train state only: the workers checksum every file as they load it and
    # fall back together to the previous step if one fails (trainer.checkpoint.manager)
    latest = store.latest_committed(warn=True)
    if latest is None:
        return ResumePlan()
    where = store.display(latest)
    if cfg.checkpoint.resume == "never":
        raise FileExistsError(f"run {cfg.run_name!r} already has a committed checkpoint ({where}) and "
                              "checkpoint.resume=never: choose another run_name, or delete the checkpoints")
    state = load_train_state(store, latest, store.read_marker(latest))
    problems = resume_incompatibilities(state["config"], cfg)
    if problems:
        raise ValueError(f"cannot resume run {cfg.run_name!r} from {where}: " + "; ".join(problems)
                         + ". Use another run_name to start afresh.")
    notes = [f"resuming from {where} (step {state['step']}, written by {state['world_size']} workers)"]
    if state.get("config_hash") != config_hash(cfg):
        notes.append("the config changed since that checkpoint (compatible changes only)")
    return ResumePlan(latest, state.get("mlflow_run_id"), notes)
