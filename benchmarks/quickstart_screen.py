"""Screen quickstart recipes cheaply: the quickstart's model, objective, optimizer and EMA in one process.

No Ray, no DeepSpeed: batch `data.batch_size x 2` (the quickstart's 2 workers' global batch) from
`reference_images(synthetic_images, 32, 10, seed=data.seed)`, AdamW + warm-up + clipping + EMA as the
trainer builds them, and the sample grid (trainer.loop.sample_grid) judged by benchmarks/grid_classes.py
at the steps asked. `--draws keyed` draws t, noise and label dropout per sample as the trainer does
(trainer.loop.rng.keyed_draws); `--draws batch` as the trainer did before (one generator per rank,
t then noise then dropout for the whole batch).

    python benchmarks/quickstart_screen.py --seed 0 --draws keyed --grid-at 400 600 [--set key=value ...]

Knobs that need no second training run are screened in the same run: `--ema-decays` keeps one EMA per
decay (the config's first), `--cfg-scales` samples each grid at each guidance weight (the config's
samples.cfg_scale by default), and `--judge-seeds` judges every grid with judges trained on the synthetic
images of each generation seed (grid_classes.train_classifier's seed; 11 is the judge of grid_classes.py),
so a score's spread over judges shows next to it. One line per (step, decay, cfg): the judges' scores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart_cpu.yaml")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="train.seed")
    parser.add_argument("--draws", choices=("keyed", "batch"), default="keyed")
    parser.add_argument("--grid-at", type=int, nargs="+", default=[600])
    parser.add_argument("--set", action="append", default=[], help="a config override, as dip train --set")
    parser.add_argument("--ema-decays", type=float, nargs="+", default=None, help="default: optim.ema_decay")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=None, help="default: samples.cfg_scale")
    parser.add_argument("--judge-seeds", type=int, nargs="+", default=[11])
    parser.add_argument("--save-ema", action="store_true", help="keep each grid step's EMA weights in --cache")
    parser.add_argument("--judge-ema", nargs="+", default=[], metavar="PT",
                        help="no training: judge the grids of EMA weights kept by --save-ema, at --cfg-scales")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="/tmp/quickstart_screen", help="where the trained judge is kept")
    args = parser.parse_args()

    import numpy as np
    import torch

    from benchmarks.grid_classes import judge_tiles
    from data.records import to_pm1
    from data.synthetic import reference_images
    from models.ema import EMA
    from trainer.config import load_config
    from trainer.loop.engine import build_objective_module, build_optimizer
    from trainer.loop.rng import keyed_draws
    from trainer.loop.sample_grid import sample_grid, save_grid

    torch.set_num_threads(args.threads)
    cfg = load_config(QUICKSTART, [f"train.seed={args.seed}", *args.set])
    judges = {seed: cached_judge(args.cache, seed) for seed in args.judge_seeds}
    scales = args.cfg_scales or [cfg.samples.cfg_scale]
    rows = torch.arange(cfg.samples.num_classes).repeat_interleave(cfg.samples.per_class)
    if args.judge_ema:
        denoiser = build_objective_module(cfg).denoiser.eval()
        for path in args.judge_ema:
            denoiser.load_state_dict(torch.load(path, weights_only=True))
            for scale in scales:
                tiles = sample_grid(denoiser, cfg.samples.replace(cfg_scale=scale), 32, torch.device("cpu"))
                scores = [judge_tiles(judge, tiles, rows) / len(rows) for judge in judges.values()]
                print(f"{os.path.basename(path)} cfg {scale}: grid " + " ".join(f"{score:.3f}" for score in scores)
                      + f" (judges {' '.join(map(str, judges))}; {time.process_time():.0f} CPU-s)", flush=True)
        return 0
    images, labels = reference_images(cfg.data.synthetic_images, 32, 10, seed=cfg.data.seed)
    pixels_all = to_pm1(images)
    keys_all = [f"{int(y)}/{i}.png" for i, y in enumerate(labels)]
    module = build_objective_module(cfg)
    optimizer, scheduler = build_optimizer(module, cfg)
    decays = args.ema_decays or [cfg.optim.ema_decay]
    emas = {decay: EMA(module.denoiser, decay) for decay in decays}
    generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003)
    order = np.random.default_rng(cfg.train.seed)
    batch = cfg.data.batch_size * 2
    perm, cursor, start, losses = order.permutation(len(labels)), 0, time.perf_counter(), []
    for step in range(1, max(args.grid_at) + 1):
        if cursor + batch > len(perm):
            perm, cursor = order.permutation(len(labels)), 0
        index = perm[cursor:cursor + batch]
        cursor += batch
        x, y = pixels_all[index], labels[index]
        if args.draws == "keyed":
            draws = keyed_draws(cfg.train.seed, step - 1, [keys_all[i] for i in index], tuple(x.shape[1:]), "cpu")
            loss, _ = module(x, y, draws)
        else:
            loss, _ = module.objective.loss(module.denoiser, x, y, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        for ema in emas.values():
            ema.update(module.denoiser)
        losses.append(loss.item())
        if step in args.grid_at:
            for decay, ema in emas.items():
                if args.save_ema:
                    torch.save(ema.module.state_dict(),
                               os.path.join(args.cache, f"ema_{args.draws}_seed{args.seed}_step{step}_ema{decay}.pt"))
                for scale in scales:
                    tiles = sample_grid(ema.module, cfg.samples.replace(cfg_scale=scale), 32, torch.device("cpu"))
                    scores = [judge_tiles(judge, tiles, rows) / len(rows) for judge in judges.values()]
                    save_grid(tiles, cfg.samples.num_classes, os.path.join(
                        args.cache, f"grid_{args.draws}_seed{args.seed}_step{step}_ema{decay}_cfg{scale}.png"))
                    print(f"seed {args.seed} draws {args.draws} {' '.join(args.set)} step {step} ema {decay} "
                          f"cfg {scale}: loss(last 100) {np.mean(losses[-100:]):.4f} grid "
                          + " ".join(f"{score:.3f}" for score in scores)
                          + f" (judges {' '.join(map(str, judges))}; {time.perf_counter() - start:.0f} s, "
                          f"{time.process_time():.0f} CPU-s)", flush=True)
    return 0


def cached_judge(cache: str, seed: int):
    """grid_classes' judge of generation seed `seed`, trained once (deterministic) and kept in `cache`."""
    import torch

    from benchmarks.grid_classes import classifier, train_classifier

    path = os.path.join(cache, "judge.pt" if seed == 11 else f"judge_seed{seed}.pt")
    if os.path.exists(path):
        judge = classifier(10)
        judge.load_state_dict(torch.load(path, weights_only=True))
        judge.eval()
        return judge
    judge, _ = train_classifier(32, 10, 4000, 6, seed=seed)
    os.makedirs(cache, exist_ok=True)
    torch.save(judge.state_dict(), path)
    return judge


if __name__ == "__main__":
    sys.exit(main())
