"""One committed training checkpoint -> one file to sample with (what `dip export` writes).

The default is the EMA weights as {"model_config": ..., "state_dict": ...}, the format
trainer.model_io loads; `official=True` writes the authors' Lightning layout (raw weights under
"denoiser.", EMA under "ema_denoiser."); `weights="model"` the raw weights consolidated from the ZeRO
shards. Every export keeps "trained_with": {"resolution": N} from the run's config.
`resolve_step_dir` finds and verifies the committed step-N/ a path names."""
from __future__ import annotations

import os


def resolve_step_dir(path: str, reads: list[str] | None = None) -> tuple[str, int]:
    """(committed step-N directory, N) for a step dir or a checkpoints dir; refuses anything unmarked or
    incomplete. The files in `reads` (None: every file) must also match the checksums the marker
    recorded: an altered step-N/ named explicitly is refused; in a checkpoints dir it is skipped with a
    warning for the previous one."""
    from trainer.checkpoint.store import CheckpointStore

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} is not a directory (expected step-N/ or a checkpoints directory)")
    base = os.path.basename(path)
    checksummed = True if reads is None else reads  # every file's size is checked either way
    if base.startswith("step-") and base[5:].isdigit():
        store, step = CheckpointStore(os.path.dirname(path)), int(base[5:])
        verdict = store.verify(step, deep=checksummed)
        if not verdict.ok:
            raise ValueError(f"checkpoint {path} cannot be exported: {verdict.reason}")
        return path, step
    store = CheckpointStore(path)
    step = store.latest_committed(warn=True, deep=checksummed)
    if step is None:
        raise FileNotFoundError(f"{path} holds no committed step-N/ checkpoint")
    return store.step_path(step), step


def consolidated_model_weights(step_dir: str) -> dict:
    """The raw weights of the DiP (no EMA) from any ZeRO stage's shards, in float32."""
    from trainer.model_io import consolidated_weights

    state = consolidated_weights(step_dir)
    prefix = "denoiser."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def export(checkpoint: str, out: str, official: bool = False, weights: str = "ema") -> str:
    """Write `checkpoint`'s weights to `out` (see the module's docstring); returns the step dir exported."""
    import torch

    from trainer.checkpoint.store import EMA_FILE, TRAIN_STATE
    from trainer.model_io import TRAINED_WITH, trained_with

    # the EMA export reads ema.pt and train_state.pt; the raw weights come from every ZeRO shard
    reads = None if official or weights == "model" else [EMA_FILE, TRAIN_STATE]
    step_dir, step = resolve_step_dir(checkpoint, reads)
    payload = torch.load(os.path.join(step_dir, EMA_FILE), map_location="cpu", weights_only=True)
    state_dict = payload["state_dict"] if weights == "ema" else consolidated_model_weights(step_dir)
    if official:  # the authors' Lightning layout: raw weights under denoiser., EMA under ema_denoiser.
        from models import DiP, DiPConfig, export_official_state_dict

        config = DiPConfig(**payload["model_config"])
        raw_model, ema_model = DiP(config), DiP(config)
        raw_model.load_state_dict(consolidated_model_weights(step_dir), strict=True)
        ema_model.load_state_dict(payload["state_dict"], strict=True)
        result = export_official_state_dict(raw_model, ema_model)
    else:
        result = {"model_config": payload["model_config"], "state_dict": state_dict}
    result[TRAINED_WITH] = trained_with(step_dir)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(result, out)
    return step_dir
