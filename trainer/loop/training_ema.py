"""The training run's EMA of the denoiser, kept where the weights are.

One interface for every ZeRO stage; every rank holds one object and calls the same methods:

* `update(denoiser)` after each optimizer step: local, never a collective;
* `full_state_dict()` (collective): rank 0 gets the whole EMA as a CPU fp32 state dict (ema.pt);
* `sampling_module()` (collective): rank 0 gets the EMA network on its device (sample grids);
* `load_full_state_dict(state_dict, num_updates)` (collective): rank 0 passes the whole EMA of a
  checkpoint (written at any world size), the others None; each rank keeps its part.

ZeRO-0/1/2 (`RankZeroEMA`): every rank holds the whole model, so rank 0 keeps a whole fp32 copy
(models.ema.EMA) and the other ranks keep nothing.

ZeRO-3 (`ShardedEMA`): each rank holds a 1/W piece of every parameter (`param.ds_tensor`: elements
[r * ceil(n / W), (r + 1) * ceil(n / W)) of the flattened parameter, the last piece padded). Each
rank keeps the fp32 EMA of exactly its piece and lerps it against `ds_tensor` after each step: no
collective and 4 bytes per parameter / W per rank, where gathering the whole denoiser every step
for a rank-0 EMA moved the whole model over the network and kept a whole fp32 copy on rank 0.
The source is the same tensor the gathered path lerped against (the gathered parameter is the
concatenation of the ranks' `ds_tensor`s, which DeepSpeed refreshes from the fp32 master after each
step), and lerp is elementwise, so the EMA is bit-identical to the gathered one
(tests/test_sharded_ema.py). The EMA starts from the fp32 weights before DeepSpeed casts them, as
the gathered one did.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.checkpoint.pins import require


def build_training_ema(model: nn.Module, decay: float, zero_stage: int, rank: int, world_size: int):
    """The EMA for `model` (the denoiser, before DeepSpeed partitions or casts it) at this ZeRO stage."""
    if zero_stage == 3:
        return ShardedEMA(model, decay, rank, world_size)
    return RankZeroEMA(model, decay, rank)


def _host_copy(state_dict: dict) -> dict:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state_dict.items()}


class RankZeroEMA:
    """ZeRO-0/1/2: rank 0 keeps the whole fp32 EMA; the other ranks only count the updates."""

    def __init__(self, model: nn.Module, decay: float, rank: int):
        from models.ema import EMA

        self.rank = rank
        self.ema = EMA(model, decay) if rank == 0 else None
        self.decay = decay
        self.num_updates = 0

    def to(self, device) -> "RankZeroEMA":
        if self.ema is not None:
            self.ema.module.to(device)
        return self

    def update(self, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model)
        self.num_updates += 1

    def full_state_dict(self) -> dict | None:
        return _host_copy(self.ema.module.state_dict()) if self.ema is not None else None

    def sampling_module(self) -> nn.Module | None:
        return self.ema.module if self.ema is not None else None

    def load_full_state_dict(self, state_dict: dict | None, num_updates: int) -> None:
        self.num_updates = int(num_updates)
        if self.ema is not None:
            self.ema.load_state_dict({"decay": self.decay, "num_updates": num_updates, "weights": state_dict})


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s structure on the meta device: no weight bytes (deepcopy's memo maps every
    parameter and buffer to a meta tensor instead of copying it)."""
    memo: dict = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=False) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


class ShardedEMA:
    """ZeRO-3: each rank's fp32 EMA of its own partition of every parameter (see the module doc)."""

    def __init__(self, model: nn.Module, decay: float, rank: int, world_size: int):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay={decay!r}: must be in [0, 1]")
        require("sharded EMA")  # ZeRO-3's ds_tensor partitions, as tested
        self.decay, self.rank, self.world_size = decay, rank, world_size
        self.num_updates = 0
        self._template = _meta_copy(model).float().eval().requires_grad_(False)  # rank 0 samples with it
        self.shapes = {name: p.shape for name, p in model.named_parameters()}
        # this rank's pieces: the same slices DeepSpeed's partitioning will take (partition_parameters.py)
        self.shards: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            start, count = self._range(name)
            self.shards[name] = param.detach().reshape(-1).narrow(0, start, count).float().clone()
        # buffers are not partitioned by ZeRO-3 and never averaged: whole, as the fp32 EMA copy keeps them
        self.buffers = {name: b.detach().clone().float() if b.is_floating_point() else b.detach().clone()
                        for name, b in model.named_buffers()}
        self._checked = False

    # -- layout ---------------------------------------------------------------------------------
    def piece_size(self, name: str) -> int:
        """ceil(numel / W): every rank's piece of parameter `name` (the last one padded)."""
        return math.ceil(math.prod(self.shapes[name]) / self.world_size)

    def _range(self, name: str) -> tuple[int, int]:
        """(start, count) of this rank's real (unpadded) elements of the flattened parameter."""
        numel, piece = math.prod(self.shapes[name]), self.piece_size(name)
        start = min(numel, self.rank * piece)
        return start, min(piece, numel - start)

    def _check_layout(self, model: nn.Module) -> None:
        """DeepSpeed partitioned the parameters as this EMA sliced them (checked once, at the first update)."""
        names = [name for name, _ in model.named_parameters()]
        if names != list(self.shards):
            raise ValueError(f"the ZeRO-3 model's parameters {names[:3]}... are not the EMA's "
                             f"{list(self.shards)[:3]}...")
        for name, param in model.named_parameters():
            piece = getattr(getattr(param, "ds_tensor", None), "ds_numel", None)
            if piece != self.piece_size(name):
                raise ValueError(f"{name}: DeepSpeed's ZeRO-3 partition holds {piece} elements, the sharded EMA "
                                 f"expects ceil({math.prod(self.shapes[name])} / {self.world_size}) = "
                                 f"{self.piece_size(name)}: is the model partitioned over {self.world_size} ranks?")
        self._checked = True

    # -- the interface ---------------------------------------------------------------------------
    def to(self, device) -> "ShardedEMA":
        self.shards = {name: t.to(device) for name, t in self.shards.items()}
        self.buffers = {name: t.to(device) for name, t in self.buffers.items()}
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.shards.values())).device

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * weights, for this rank's pieces (no collective)."""
        if not self._checked:
            self._check_layout(model)
        weight = 1.0 - self.decay
        for name, param in model.named_parameters():
            shard = self.shards[name]
            # .float(): what the gathered path lerped against (a no-op in fp32, bf16 -> fp32 in bf16)
            shard.lerp_(param.ds_tensor.narrow(0, 0, shard.numel()).float(), weight)
        self.num_updates += 1

    def _gathered(self):
        """(name, whole tensor on this device) on rank 0, (name, None) elsewhere: one gather per
        parameter, so at most one parameter's W pieces are in flight at a time."""
        for name, shard in self.shards.items():
            piece = self.piece_size(name)
            padded = torch.zeros(piece, dtype=shard.dtype, device=shard.device)
            padded[:shard.numel()] = shard
            pieces = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
            dist.gather(padded, pieces, dst=0)
            if self.rank == 0:
                yield name, torch.cat(pieces)[:math.prod(self.shapes[name])].view(self.shapes[name])
            else:
                yield name, None

    def full_state_dict(self) -> dict | None:
        """Collective. Rank 0: the whole EMA as a CPU fp32 state dict (keys in the module's order)."""
        # a compact host copy per parameter (the gathered tensor is a view of the padded pieces)
        gathered = {name: None if full is None else full.to("cpu", copy=True) for name, full in self._gathered()}
        if self.rank != 0:
            return None
        ordered = {}
        for key in self._template.state_dict():
            ordered[key] = gathered[key] if key in gathered else self.buffers[key].detach().to("cpu", copy=True)
        return ordered

    def sampling_module(self) -> nn.Module | None:
        """Collective. Rank 0: a whole fp32 EMA network on this device, built for this call (drop it
        after sampling: only the pieces stay between calls)."""
        module = copy.deepcopy(self._template).to_empty(device=self.device) if self.rank == 0 else None
        with torch.no_grad():
            for name, full in self._gathered():
                if module is not None:
                    module.get_parameter(name).copy_(full)
            if module is not None:
                for name, buffer in self.buffers.items():
                    module.get_buffer(name).copy_(buffer)
        return module

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: dict | None, num_updates: int) -> None:
        """Collective. Rank 0 passes the whole EMA (written at any world size); every rank keeps its
        pieces at this world size (one scatter per parameter)."""
        problem = [self._mismatch(state_dict) if self.rank == 0 else None]
        dist.broadcast_object_list(problem, src=0)  # every rank raises, or none: no one waits in a scatter
        if problem[0]:
            raise ValueError(f"the checkpoint's EMA does not fit this model: {problem[0]}")
        for name, shard in self.shards.items():
            piece = self.piece_size(name)
            received = torch.empty(piece, dtype=shard.dtype, device=shard.device)
            pieces = None
            if self.rank == 0:
                flat = torch.zeros(piece * self.world_size, dtype=shard.dtype, device=shard.device)
                flat[:math.prod(self.shapes[name])] = state_dict[name].reshape(-1)
                pieces = list(flat.chunk(self.world_size))
            dist.scatter(received, pieces, src=0)
            shard.copy_(received[:shard.numel()])
        buffers = [{k: state_dict[k] for k in self.buffers} if self.rank == 0 else None]
        dist.broadcast_object_list(buffers, src=0)
        for name, value in buffers[0].items():
            self.buffers[name].copy_(value)
        self.num_updates = int(num_updates)

    def _mismatch(self, state_dict: dict) -> str:
        expected = {**{n: torch.Size(s) for n, s in self.shapes.items()},
                    **{n: b.shape for n, b in self.buffers.items()}}
        missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            return f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        wrong = [f"{k} {tuple(state_dict[k].shape)} (model: {tuple(v)})" for k, v in expected.items()
                 if state_dict[k].shape != v]
        return f"shapes differ: {', '.join(wrong[:5])}" if wrong else ""


def gathered_update(ema, model: nn.Module) -> None:
    """The ZeRO-3 path ShardedEMA replaced, kept as the reference it is checked and measured against
    (tests/test_sharded_ema.py, benchmarks/ema.py): every rank gathers the whole model (a collective,
    every step) so that rank 0 can update a whole fp32 models.ema.EMA (`ema`; None on other ranks)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if ema is not None:
            ema.update(model)
