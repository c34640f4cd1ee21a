"""Load a DiP for sampling from any of the formats users hold.

- the authors' released Lightning checkpoint (EMA weights under "ema_denoiser."), config inferred
  from the tensor shapes;
- a `dip export` file: {"model_config": dict, "state_dict": EMA weights} (also what every
  committed checkpoint keeps as ema.pt);
- one of our committed checkpoint directories (step-N/, or a run's checkpoint root: the newest
  committed step is used).
Everything is read with torch.load(weights_only=True); a file of a committed step-N/ only after it
matched the checksum its COMMITTED marker recorded (an altered file is refused with the reason).

`checkpoint_facts` says, without building the model, what a checkpoint records about the run that
trained it (the model config, the training resolution): `dip sample` and `dip eval run` default to it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from models import DiP, DiPConfig, load_official_state_dict
from models.official import EMA_PREFIX, RAW_PREFIX

EMA_FILE = "ema.pt"
TRAINED_WITH = "trained_with"  # in a `dip export` file: {"resolution": the run's data.resolution}
DEFAULT_PATCHES = 16           # a side of this many patches when nothing records the resolution (256 px at /16)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def infer_config(state: dict[str, torch.Tensor]) -> DiPConfig:
    """DiPConfig from the shapes of a network state dict (no prefixes)."""
    try:
        hidden, patch_features = state["s_embedder.proj.weight"].shape
        head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
        mlp_hidden = state["blocks.0.mlp.w1.weight"].shape[0]
    except KeyError as missing:
        raise ValueError(f"not a DiP state dict: no {missing} key") from None
    head = "detailer" if any(k.startswith("local_decoder.") for k in state) else "linear"
    in_channels = state["local_decoder.out_conv.weight"].shape[0] if head == "detailer" else 3
    patch = round((patch_features / in_channels) ** 0.5)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    mlp_ratio = 4.0 if int(2 * int(hidden * 4.0) / 3) == mlp_hidden else 3 * mlp_hidden / (2 * hidden)
    return DiPConfig(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=hidden // head_dim,
                     num_classes=num_classes, in_channels=in_channels, head=head, mlp_ratio=mlp_ratio)


def committed_step(step_dir: str):
    """(CheckpointStore of its parent, N) when step_dir is a step-N/ with a COMMITTED marker, else None."""
    from trainer.checkpoint.store import MARKER, CheckpointStore  # the trainer decides what "committed" means

    match = _STEP_DIR.match(os.path.basename(os.path.normpath(step_dir)))
    if not match or not os.path.isfile(os.path.join(step_dir, MARKER)):
        return None
    return CheckpointStore(os.path.dirname(os.path.abspath(step_dir))), int(match.group(1))


def verify_committed(step_dir: str, names: list[str]) -> None:
    """Refuse (ValueError) to read any of `names` from a committed step-N/ when it no longer has the size
    and checksum its COMMITTED marker recorded: an altered file is never loaded. Files outside a
    committed step-N/ (a `dip export` output, the authors' file) carry no record to check."""
    found = committed_step(step_dir)
    if found is None:
        return
    store, step = found
    verdict = store.verify(step, deep=True, only=names)
    if not verdict.ok:
        raise ValueError(f"checkpoint {os.path.abspath(step_dir)} cannot be used: {verdict.reason}")


def resolve_checkpoint_path(path: str) -> str:
    """A file to read, checked once: the file itself or DIR/ema.pt (refused when it lies in a committed
    step-N/ and no longer matches its recorded checksum), or the newest committed step's ema.pt (a step
    whose ema.pt fails its checksum is skipped with a warning naming it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    file = path if os.path.isfile(path) else os.path.join(path, EMA_FILE)
    if os.path.isfile(file):
        verify_committed(os.path.dirname(file), [os.path.basename(file)])
        return file
    from trainer.checkpoint.store import CheckpointStore

    store = CheckpointStore(path)
    step = store.latest_committed(warn=True, deep=True, only=[EMA_FILE])
    if step is None:
        raise FileNotFoundError(f"{path!r} holds no committed step-N/ checkpoint with {EMA_FILE}")
    return os.path.join(store.step_path(step), EMA_FILE)


def read_checkpoint(file: str, mmap: bool = False) -> dict:
    """The checkpoint dict of `file`; with mmap, tensors stay on disk until touched (shapes only)."""
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated file, or a pickle that is more than weights
        if mmap:  # a legacy (pre-zip) file cannot be mapped: read it whole
            return read_checkpoint(file)
        raise ValueError(f"cannot read checkpoint {file!r} as weights: {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{file!r} is not a checkpoint dict")
    return checkpoint


def _authors_network(checkpoint: dict) -> tuple[dict, bool]:
    """The network weights of an authors'-layout (or bare) state dict, and whether they are the EMA."""
    state = checkpoint.get("state_dict", checkpoint)
    prefix = EMA_PREFIX if any(k.startswith(EMA_PREFIX) for k in state) else RAW_PREFIX
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or state, prefix == EMA_PREFIX


def _model_config(checkpoint: dict) -> DiPConfig:
    if "model_config" in checkpoint:  # ours: ema.pt, `dip export`
        return DiPConfig(**checkpoint["model_config"])
    return infer_config(_authors_network(checkpoint)[0])


def trained_with(step_dir: str) -> dict:
    """What a committed step's train_state.pt records about its run: {"resolution": N}, or {}."""
    from trainer.checkpoint.store import TRAIN_STATE  # the trainer owns the checkpoint layout

    path = os.path.join(step_dir, TRAIN_STATE)
    if not os.path.isfile(path):
        return {}
    verify_committed(step_dir, [TRAIN_STATE])
    data = (read_checkpoint(path, mmap=True).get("config") or {}).get("data") or {}
    return {"resolution": int(data["resolution"])} if data.get("resolution") else {}


def consolidated_weights(step_dir: str) -> dict[str, torch.Tensor]:
    """Every trained tensor of a committed step-N/ (the DiP under "denoiser.", a REPA projector under
    "repa_projector."), consolidated from any ZeRO stage's shards, in float32: the raw, non-EMA weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    step_dir = os.path.normpath(step_dir)
    return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(step_dir), tag=os.path.basename(step_dir))


def sampling_side(config: DiPConfig, requested: int | None, trained: int | None, flag: str) -> tuple[int, str]:
    """(image side, where it came from): the flag, else the training resolution, else DEFAULT_PATCHES
    patches a side. A side the model cannot cut into patches is refused, naming the nearest valid ones."""
    patch = config.patch_size
    if requested is not None:
        side, source = requested, flag
    elif trained is not None:
        side, source = trained, "the resolution its run trained at"
    else:
        side, source = DEFAULT_PATCHES * patch, f"{DEFAULT_PATCHES} patches a side; no training resolution recorded"
    if side < patch or side % patch:
        below = max(patch, side // patch * patch)
        raise ValueError(f"{flag} {side} is not a multiple of the model's patch size {patch}: "
                         f"use e.g. {below} or {below + patch}")
    return side, source


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint records: its model, and the run's training resolution (None: not recorded,
    e.g. the authors' file)."""
    file: str
    config: DiPConfig
    resolution: int | None

    def load_model(self, device: str | torch.device = "cpu") -> DiP:
        """The EMA network of `file` (verified when the facts were read), in eval mode."""
        return model_from_checkpoint(read_checkpoint(self.file)).to(device)

    def image_side(self, requested: int | None, flag: str) -> tuple[int, str]:
        return sampling_side(self.config, requested, self.resolution, flag)

    def check_num_classes(self, requested: int | None, flag: str) -> int:
        """The classes to sample: the model's, or fewer when asked; more than the model has is refused."""
        have = self.config.num_classes
        if requested is None:
            return have
        if not 1 <= requested <= have:
            raise ValueError(f"{flag} {requested}: the checkpoint's model has {have} classes (0..{have - 1}); "
                             f"choose 1..{have} or leave it out")
        return requested


def checkpoint_facts(path: str) -> CheckpointFacts:
    """CheckpointFacts of any supported checkpoint, read without loading its weights."""
    file = resolve_checkpoint_path(path)
    checkpoint = read_checkpoint(file, mmap=True)
    config = _model_config(checkpoint)
    recorded = checkpoint.get(TRAINED_WITH)
    if not isinstance(recorded, dict):  # ema.pt of a step-N/: its train_state.pt holds the run's config
        recorded = trained_with(os.path.dirname(file)) if os.path.basename(file) == EMA_FILE else {}
    return CheckpointFacts(file, config, recorded.get("resolution"))


def load_sampling_model(path: str, device: str | torch.device = "cpu") -> DiP:
    """The EMA network in eval mode, from any supported checkpoint format (a committed checkpoint's
    file only when it matches its recorded checksum)."""
    return model_from_checkpoint(read_checkpoint(resolve_checkpoint_path(path))).to(device)


def model_from_checkpoint(checkpoint: dict) -> DiP:
    """The EMA network in eval mode (on the CPU) from a loaded checkpoint dict of any supported format."""
    model = DiP(_model_config(checkpoint))
    if "model_config" in checkpoint:
        load_official_state_dict(model, checkpoint["state_dict"])
    else:
        load_official_state_dict(model, checkpoint, ema=_authors_network(checkpoint)[1])
    # Not frozen with requires_grad_(False): autocast caches its bf16 weight casts only for
    # leaves that require grad, and sampling already runs under no_grad.
    return model.eval()
