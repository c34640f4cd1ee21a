"""Why a tiny DiP learns the class label late at the authors' init, and what model.init changes.

The label reaches the output only through the tokens, and the tokens reach the output only through
the Patch Detailer Head's bottleneck, nine conv layers (PyTorch-default init, SiLU) away from its
output, while the head's shallow skip path (enc1 -> dec1 -> out) carries the noisy patch straight
through. At init the deep path is attenuated by ~1e-4 or more, so:

1. at init, for model.init=authors and =variance_preserving (He-normal head convs, N(0, 1) label
   table; the quickstart's choice): the label's effect on the output, |f(x, t, y=0) - f(x, t, y=5)|,
   and the gradient that one training batch gives each part of the network (at the authors' init
   the backbone's gradients sit far below the head's, and below AdamW's eps = 1e-8);
2. `--steps N [--init ...]`: the same training, identical batches, noise and t, on 1 process and on
   2 DeepSpeed ZeRO-2 ranks over gloo (no Ray): the label effect every 25 steps. Equal curves mean
   the slow start is the model's learning dynamics, not the distributed trainer.

    python benchmarks/conditioning.py [--steps 300] [--init authors]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart_cpu.yaml")


def _probe_images():
    from data.records import to_pm1
    from data.synthetic import reference_images

    images, _ = reference_images(16, 32, 10, seed=5)  # not training images (another seed)
    return to_pm1(images)


def label_effect(model, images) -> float:
    import torch

    with torch.no_grad():
        t = torch.full((images.shape[0],), 0.3)
        y0 = torch.zeros(images.shape[0], dtype=torch.long)
        return (model(images, t, y0) - model(images, t, y0 + 5)).abs().mean().item()


def init_report(init: str) -> None:
    import torch

    from data.records import to_pm1
    from data.synthetic import reference_images
    from trainer.config import load_config
    from trainer.loop.engine import build_objective_module
    from trainer.loop.rng import keyed_draws

    cfg = load_config(QUICKSTART, [f"model.init={init}"])
    module = build_objective_module(cfg)
    probe = _probe_images()
    print(f"[model.init={init}]")
    print(f"label effect at init: {label_effect(module.denoiser, probe):.3e} "
          f"(output mean |v| {module.denoiser(probe, torch.full((16,), 0.3), torch.zeros(16, dtype=torch.long)).abs().mean().item():.3f})")
    images, labels = reference_images(16, 32, 10, seed=0)
    keys = [f"probe-{i}" for i in range(16)]  # the trainer's per-sample draws (trainer.loop.rng)
    loss, _ = module(to_pm1(images), labels, keyed_draws(0, 0, keys, tuple(images.shape[1:]), "cpu"))
    loss.backward()
    groups = {"label table": "y_embedder", "timestep MLP": "t_embedder", "adaLN modulation": "adaLN",
              "attention": ".attn.", "SwiGLU": ".mlp.w", "patch embedding": "s_embedder",
              "head bottleneck": "local_decoder.bottleneck", "head out_conv": "local_decoder.out_conv",
              "head enc1": "local_decoder.enc1"}
    print("mean |gradient| of one batch of 16 at init (AdamW eps = 1e-8):")
    for label, key in groups.items():
        grads = [p.grad.abs().mean().item() for n, p in module.denoiser.named_parameters() if key in n]
        print(f"  {label:18s} {max(grads):.2e}")


def _train(rank: int, world: int, steps: int, port: str, queue, init: str) -> None:
    import torch
    import torch.distributed as dist

    from data.records import to_pm1
    from data.synthetic import reference_images
    from trainer.config import load_config
    from trainer.loop.engine import build_engine, build_objective_module

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    per_rank = 16 // world
    cfg = load_config(QUICKSTART, [f"data.batch_size={per_rank}", "objective.label_dropout=0", f"model.init={init}"])
    module = build_objective_module(cfg)
    images, labels = reference_images(2000, 32, 10, seed=0)
    images = to_pm1(images)
    probe = _probe_images()
    engine = build_engine(cfg, module, cfg.batch_split(world))
    order = torch.randperm(2000, generator=torch.Generator().manual_seed(1))
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for step in range(1, steps + 1):
        g = torch.Generator().manual_seed(step)  # the same batch, t and noise for every world size
        index = order[(step * 16) % 1984:(step * 16) % 1984 + 16]
        t = torch.sigmoid(torch.randn(16, generator=g))
        noise = torch.randn(16, 3, 32, 32, generator=g)
        loss, _ = module.objective.loss(module.denoiser, images[index][mine], labels[index][mine], t=t[mine],
                                        noise=noise[mine])
        engine.backward(loss)
        engine.step()
        if rank == 0 and step % 25 == 0:
            queue.put((step, label_effect(module.denoiser, probe)))
    dist.destroy_process_group()


def compare_world_sizes(steps: int, init: str) -> None:
    import torch.multiprocessing as mp

    curves = {}
    for world, port in ((1, "29641"), (2, "29642")):
        start = time.monotonic()
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        mp.start_processes(_train, args=(world, steps, port, queue, init), nprocs=world, start_method="spawn")
        curves[world] = dict(queue.get() for _ in range(steps // 25))
        print(f"{world} rank(s): {steps} steps in {time.monotonic() - start:.0f} s")
    print("step | label effect, 1 process | 2 ZeRO-2 ranks")
    for step in sorted(curves[1]):
        print(f"{step:4d} | {curves[1][step]:.2e} | {curves[2][step]:.2e}")


def main() -> int:
    from models.dip import INIT_CHOICES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=0, help="also train 1 vs 2 ranks this many steps")
    parser.add_argument("--init", default="authors", choices=INIT_CHOICES,
                        help="model.init of the --steps comparison (the report at init shows both)")
    args = parser.parse_args()
    for init in INIT_CHOICES:
        init_report(init)
    if args.steps:
        compare_world_sizes(args.steps, args.init)
    return 0


if __name__ == "__main__":
    sys.exit(main())
