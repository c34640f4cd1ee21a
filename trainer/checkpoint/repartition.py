"""Topology-free ZeRO state: read a step-N/ written by W ranks, put it into an engine of W' ranks.

DeepSpeed refuses optimizer shards of another data-parallel world size; its way out (universal
checkpoints) is an offline conversion pass that writes the whole state a second time and loads with
weights_only=False. A ZeRO checkpoint already holds everything a resize needs: per rank, the flat fp32
master partition and AdamW's moments in the same layout, plus every parameter's shape in order. This
module maps those flat partitions back to parameters (`ZeroCheckpoint`, weights_only; each file's zip
directory and pickle are read with torch.load(map_location="meta"), then only the byte ranges of the
slices asked for, from a local directory or straight from the store: trainer.checkpoint.reader) and
writes each new rank's slices straight into the engine's partitions (`load_resharded`): the weights, the fp32 master, exp_avg, exp_avg_sq and the step count come back
exactly (copies, no arithmetic), for ZeRO-1, 2 and 3.

Layouts (DeepSpeed 0.19, as its zero_to_fp32 reads them):
* ZeRO-1/2: per parameter group, the ranks' partitions concatenated are one flat vector holding the
  group's parameters in order, each followed by its alignment padding.
* ZeRO-3: every parameter is split on its own into W pieces of ceil(numel / W) (the last padded); a
  rank's flat group is its piece of each parameter, in order.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from trainer.checkpoint.lazy_files import LoadedTensor, LocalStepFiles, RangedTensor, open_lazily, read_whole
from trainer.checkpoint.pins import require

if TYPE_CHECKING:
    from trainer.checkpoint.reader import RangedReader

FP32 = "fp32"
MOMENTS = ("exp_avg", "exp_avg_sq")
KINDS = (FP32, *MOMENTS)
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
@dataclass(frozen=True)
class _Place:
    group: int       # parameter group (ZeRO-1/2) / 0 (ZeRO-3: offsets run over all sub-groups)
    offset: int      # ZeRO-1/2: start in the group's global flat vector; ZeRO-3: start in each rank's flat
    shape: torch.Size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class ZeroCheckpoint:
    """One committed DeepSpeed step directory, read as per-parameter tensors of any world size."""

    def __init__(self, step_dir):
        require("ZeRO checkpoint re-partitioning")  # DeepSpeed's partition layout, read as it was tested
        """step_dir: a local directory, or a LocalStepFiles / StoreStepFiles."""
        self.files = LocalStepFiles(step_dir) if isinstance(step_dir, str) else step_dir
        self.step_dir = self.files.where
        names = self.files.names()
        optim_files = sorted((n for n in names if n.endswith("_optim_states.pt")),
                             key=lambda f: int(_RANK.search(f).group(1)) if _RANK.search(f) else -1)
        model_files = sorted(n for n in names if n.endswith("model_states.pt"))
        if not model_files:
            raise FileNotFoundError(f"{self.step_dir}: no DeepSpeed model states file")
        self._model_reader = self.files.open(model_files[0])
        self.model_state = open_lazily(self._model_reader, lazy_keys=("module",))  # read by range if needed
        self.param_shapes: list[dict[str, torch.Size]] = self.model_state["param_shapes"]
        readers = [self.files.open(f) for f in optim_files]
        self.shards = [open_lazily(reader)["optimizer_state_dict"] for reader in readers]
        self._readers = readers
        self.stage = int(self.shards[0]["zero_stage"]) if self.shards else 0
        self.world_size = len(self.shards) if self.shards else int(self.model_state.get("dp_world_size", 1))
        if self.stage:
            counts = self.shards[0]["partition_count"]
            expected = max(counts) if isinstance(counts, list) else int(counts)
            if expected != len(self.shards):
                raise ValueError(f"{self.step_dir}: {len(self.shards)} optimizer shard files, but they were written by "
                                 f"{expected} ranks: the checkpoint is incomplete")
        self._flats = {kind: [self._rank_flats(shard, kind, reader) for shard, reader in zip(self.shards, readers)]
                       for kind in KINDS} if self.stage else {}
        self._places = self._layout() if self.stage else {}
        if self.stage:
            self._check_partition_sizes(optim_files)

    def close(self) -> None:
        for reader in [self._model_reader, *self._readers]:
            reader.close()

    # -- what the files hold ---------------------------------------------------------------------
    def names(self) -> list[str]:
        return [name for shapes in self.param_shapes for name in shapes]

    @property
    def optimizer_step(self) -> int:
        """AdamW's step count (the same in every group and rank)."""
        if not self.stage:
            return int(self.model_state["global_steps"])
        steps = {float(group["step"]) for group in self._base_states(self.shards[0]) if "step" in group}
        if len(steps) != 1:
            raise ValueError(f"{self.step_dir}: optimizer groups disagree on the step count: {sorted(steps)}")
        return int(steps.pop())

    def _base_states(self, shard: dict) -> list[dict]:
        """AdamW's state per flat group: rigid {'state': {i: ...}} or elastic [...] layouts."""
        base = shard["base_optimizer_state"] if self.stage_of(shard) <= 2 else shard["optimizer_state_dict"]
        if isinstance(base, dict):
            return [base["state"][i] for i in sorted(base["state"])]
        return list(base)

    def param_groups(self) -> list[dict]:
        """The optimizer's hyperparameters per group as saved (the scheduled lr among them)."""
        shard = self.shards[0]
        base = shard["base_optimizer_state"] if self.stage <= 2 else shard["optimizer_state_dict"]
        return [{k: v for k, v in group.items() if k != "params"} for group in base["param_groups"]]

    @staticmethod
    def stage_of(shard: dict) -> int:
        return int(shard["zero_stage"])

    def _rank_flats(self, shard: dict, kind: str, reader: RangedReader) -> list:
        if kind == FP32:
            key = "single_partition_of_fp32_groups" if self.stage_of(shard) <= 2 else "fp32_flat_groups"
            flats = list(shard[key])
        else:
            flats = [state[kind] for state in self._base_states(shard)]
        return [RangedTensor(flat, reader) if flat.is_meta else LoadedTensor(flat) for flat in flats]

    def _layout(self) -> dict[str, _Place]:
        places: dict[str, _Place] = {}
        if self.stage <= 2:
            paddings = self.shards[0].get("param_alignment_paddings")
            for group, shapes in enumerate(self.param_shapes):
                offset = 0
                for index, (name, shape) in enumerate(shapes.items()):
                    places[name] = _Place(group, offset, torch.Size(shape))
                    offset += math.prod(shape) + (paddings[group][index] if paddings else 0)
            return places
        offset = 0
        for shapes in self.param_shapes:
            for name, shape in shapes.items():
                places[name] = _Place(0, offset, torch.Size(shape))
                offset += math.ceil(math.prod(shape) / self.world_size)
        return places

    def _check_partition_sizes(self, optim_files: list[str]) -> None:
        """Every rank's saved flat partitions hold exactly the elements the layout gives them: a truncated or
        altered partition tensor would otherwise be read as other parameters' numbers (ZeRO-3) or fail far
        from its cause."""
        paths = [f"{str(self.step_dir).rstrip('/')}/{name}" for name in optim_files]  # the file a user can find
        for kind in KINDS:
            for rank, flats in enumerate(self._flats[kind]):
                if self.stage >= 3:  # one flat: the sub-groups concatenated, ceil(numel / W) of every parameter
                    expected = sum(math.ceil(place.numel / self.world_size) for place in self._places.values())
                    check_partition_numel(paths[rank], kind, sum(f.numel() for f in flats), expected)
                    continue
                for group, flat in enumerate(flats):
                    lean, padded = self._zero12_partition_numels(rank, group)
                    check_partition_numel(paths[rank], f"{kind} group {group}", flat.numel(), lean, padded)

    def _zero12_partition_numels(self, rank: int, group: int) -> tuple[int, int]:
        """ZeRO-1/2: a group (its parameters and their alignment paddings) padded to W equal partitions of
        P elements; DeepSpeed saves a rank's fp32 partition without the group padding that falls in it
        (`group_paddings`, so P - padding), its Adam moments with or without it. Returns (P - padding, P)."""
        end = max(place.offset + place.numel for place in self._places.values() if place.group == group)
        paddings = [int((shard.get("group_paddings") or [0] * (group + 1))[group]) for shard in self.shards]
        partition = (end + sum(paddings)) // self.world_size
        return partition - paddings[rank], partition

    # -- reading ---------------------------------------------------------------------------------
    def read(self, name: str, kind: str = FP32, start: int = 0, numel: int | None = None) -> torch.Tensor:
        """Elements [start, start + numel) of parameter `name`'s flattened `kind` tensor (a copy).
        Only the bytes of those elements are read (ranged reads of the files)."""
        if not self.stage:
            if kind != FP32:
                raise ValueError(f"{self.step_dir}: a ZeRO-0 checkpoint keeps optimizer state whole, not per shard")
            weights = self.model_state["module"][name]
            flat = (read_whole(weights, self._model_reader) if weights.is_meta else weights).flatten().float()
            return flat[start:flat.numel() if numel is None else start + numel].clone()
        place = self._places[name]
        numel = place.numel - start if numel is None else numel
        if start < 0 or numel < 0 or start + numel > place.numel:
            raise IndexError(f"{name}: [{start}, {start + numel}) is outside its {place.numel} elements")
        if self.stage <= 2:
            return self._read_zero12(place, kind, start, numel)
        return self._read_zero3(place, kind, start, numel)

    def module_weights(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Parameter `name` as the engine's module holds it: the saved module's tensor when it has that
        dtype (read by range), else the fp32 master cast."""
        weights = (self.model_state.get("module") or {}).get(name)
        if weights is None or weights.dtype != dtype:
            return self.full(name).to(dtype)
        if not weights.is_meta:
            return weights.clone()
        return RangedTensor(weights.view(-1), self._model_reader).slice(0, weights.numel()).clone()

    def full(self, name: str, kind: str = FP32) -> torch.Tensor:
        shape = self._places[name].shape if self.stage else self.model_state["module"][name].shape
        return self.read(name, kind).view(shape)

    def _read_zero12(self, place: _Place, kind: str, start: int, numel: int) -> torch.Tensor:
        pieces, lo, hi = [], place.offset + start, place.offset + start + numel
        rank_start = 0
        for flats in self._flats[kind]:
            flat = flats[place.group]
            rank_end = rank_start + flat.numel()
            a, b = max(lo, rank_start), min(hi, rank_end)
            if a < b:
                pieces.append(flat.slice(a - rank_start, b - rank_start))
            rank_start = rank_end
        out = torch.cat(pieces) if pieces else torch.empty(0)
        if out.numel() != numel:
            raise ValueError(f"{self.step_dir}: the ZeRO partitions hold {out.numel()} of {numel} elements asked for")
        return out.float().clone()

    def _read_zero3(self, place: _Place, kind: str, start: int, numel: int) -> torch.Tensor:
        piece = math.ceil(place.numel / self.world_size)
        pieces = []
        for rank, flats in enumerate(self._flats[kind]):
            a, b = max(start, rank * piece), min(start + numel, (rank + 1) * piece)
            if a >= b:
                continue
            local = a - rank * piece + place.offset
            pieces.append(_slice_groups(flats, local, b - a))
        out = torch.cat(pieces) if pieces else torch.empty(0)
        if out.numel() != numel:
            raise ValueError(f"{self.step_dir}: the ZeRO partitions hold {out.numel()} of {numel} elements asked for")
        return out.float().clone()


def check_partition_numel(path: str, what: str, found: int, expected: int, padded: int | None = None) -> None:
    """A saved flat partition holds the element count its checkpoint's layout gives it (`expected`, or
    `padded` with DeepSpeed's padding), or a clear error naming the file and both counts."""
    if found not in (expected, expected if padded is None else padded):
        also = f" ({padded} with its padding)" if padded not in (None, expected) else ""
        raise ValueError(f"{path}: its {what} partition holds {found} elements, but the checkpoint's layout "
                         f"gives it {expected}{also}: the file is truncated or altered")


def _slice_groups(flats: list, start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of the concatenation of `flats` (ZeRO-3 sub-groups)."""
    pieces, base = [], 0
    for flat in flats:
        a, b = max(start, base), min(start + numel, base + flat.numel())
        if a < b:
            pieces.append(flat.slice(a - base, b - base))
        base += flat.numel()
    return torch.cat(pieces) if pieces else torch.empty(0)  # nothing there: the caller's count check says so


# ------------------------------------------------------------------------------------------------
#                                     into a live engine
# ------------------------------------------------------------------------------------------------

def load_resharded(engine, step_dir) -> ZeroCheckpoint:
    """Restore weights, fp32 master, AdamW moments and step, LR schedule and step counters from a
    ZeRO checkpoint written at any world size into `engine` (every rank calls it; no collective).
    step_dir: a local directory or a StoreStepFiles (ranged reads from the store, chunk-checked)."""
    ckpt = ZeroCheckpoint(step_dir)
    try:
        _load_into(engine, ckpt)
    finally:
        ckpt.close()
    return ckpt


def _load_into(engine, ckpt: ZeroCheckpoint) -> None:
    step_dir = ckpt.step_dir
    stage = int(engine.zero_optimization_stage())
    if ckpt.stage != stage:
        raise ValueError(f"{step_dir} holds ZeRO-{ckpt.stage} state; this engine runs ZeRO-{stage}")
    named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    missing = sorted(set(ckpt.names()) ^ {name for name, _ in named})
    if missing:
        raise ValueError(f"{step_dir}: parameters differ from the model's: {missing[:5]}")
    with torch.no_grad():
        if stage in (1, 2):
            _into_zero12(engine.optimizer, named, ckpt)
        elif stage == 3:
            _into_zero3(engine.optimizer, named, ckpt)
        else:
            raise ValueError("ZeRO-0 checkpoints load on any world size through DeepSpeed itself")
    # the learning rate lives in the optimizer's groups: the scheduler only writes it at its next step
    for group, saved in zip(engine.optimizer.optimizer.param_groups, ckpt.param_groups(), strict=True):
        group.update(saved)
    if engine.lr_scheduler is not None and ckpt.model_state.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(ckpt.model_state["lr_scheduler"])
    engine.global_steps = int(ckpt.model_state["global_steps"])
    engine.global_samples = int(ckpt.model_state.get("global_samples", 0))
    engine.skipped_steps = int(ckpt.model_state.get("skipped_steps", 0))


def _moment_states(optimizer, flat: torch.Tensor, step: int) -> dict:
    """AdamW's state for one flat fp32 partition, created (zeros) if no step has run yet."""
    state = optimizer.state[flat]
    for key in MOMENTS:
        if key not in state:
            state[key] = torch.zeros_like(flat)
    previous = state.get("step")
    dtype = previous.dtype if torch.is_tensor(previous) else torch.float32
    device = previous.device if torch.is_tensor(previous) else flat.device
    state["step"] = torch.tensor(float(step), dtype=dtype, device=device)
    return state


def _into_zero12(zero_optimizer, named, ckpt: ZeroCheckpoint) -> None:
    states = [_moment_states(zero_optimizer.optimizer, flat, ckpt.optimizer_step)
              for flat in zero_optimizer.single_partition_of_fp32_groups]
    named = sorted(named, key=lambda item: (ckpt._places[item[0]].group, ckpt._places[item[0]].offset))
    for name, param in named:
        # every rank holds the whole low-precision model. Under bf16/fp16 the saved module's weights are
        # those (the fp32 master cast), half the bytes of the master, and the rank reads its share of the
        # master besides; under fp32 the master is the model: read once, the share sliced from it
        master = ckpt.full(name) if param.dtype == torch.float32 else None
        param.data.copy_((master if master is not None else ckpt.module_weights(name, param.dtype)).view_as(param))
        mapping = param._hp_mapping
        if mapping is None:  # no part of this parameter lies in this rank's partition
            continue
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        mapping.hp_fragment.data.copy_(master.flatten()[lp.start:lp.start + lp.numel] if master is not None
                                       else ckpt.read(name, FP32, lp.start, lp.numel))
        state = states[mapping.param_group_index]
        for key in MOMENTS:
            state[key].narrow(0, hp.start, hp.numel).copy_(ckpt.read(name, key, lp.start, lp.numel))
    zero_optimizer._hp_optimizer_states_linked = False  # DeepSpeed re-links its views of the new state
    zero_optimizer._lazy_init_hp_params_optimizer_state()


def _into_zero3(zero_optimizer, named, ckpt: ZeroCheckpoint) -> None:
    named = sorted(named, key=lambda item: ckpt._places[item[0]].offset)
    states = [_moment_states(zero_optimizer.optimizer, flat, ckpt.optimizer_step)
              for flat in zero_optimizer.fp32_partitioned_groups_flat]
    # one kind at a time, parameters in their saved order: each saved flat is then read front to back,
    # and a chunk the ranged reader fetched for one piece is still cached for the next
    pieces = []  # (name, param, group, offset in the group's flat, count, start in the flattened parameter)
    for name, param in named:
        group, offset, count = zero_optimizer.grad_position[zero_optimizer.get_param_id(param)]
        start = param.ds_tensor.ds_numel * zero_optimizer._get_param_partition_rank(param)  # this rank's piece
        pieces.append((name, param, group, offset, count, start))
    for kind in (FP32, *MOMENTS):
        for name, param, group, offset, count, start in pieces:
            piece = _padded_read(ckpt, name, kind, start, count)
            if kind == FP32:
                param.ds_tensor.data.copy_(piece.to(param.ds_tensor.dtype).view_as(param.ds_tensor))
                zero_optimizer.fp32_partitioned_groups_flat[group].narrow(0, offset, count).copy_(piece)
            else:
                states[group][kind].narrow(0, offset, count).copy_(piece)


def _padded_read(ckpt: ZeroCheckpoint, name: str, kind: str, start: int, count: int) -> torch.Tensor:
    """`count` elements from `start`, zero past the parameter's end (ZeRO-3's last piece is padded)."""
    numel = ckpt._places[name].numel
    real = max(0, min(count, numel - start))
    out = torch.zeros(count)
    if real:
        out[:real] = ckpt.read(name, kind, start, real)
    return out


def consolidated_engine_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {fp32, exp_avg, exp_avg_sq}} of a live ZeRO engine, gathered through DeepSpeed's own
    accessors (a collective: every rank calls it). For checking a restore against its checkpoint."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None and engine.optimizer.optimizer.state:  # ZeRO-1/2 link their views at the first step
        link()
    out = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        out[name] = {FP32: safe_get_full_fp32_param(param).detach().cpu().clone()}
        for key in MOMENTS:
            out[name][key] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
    return out
