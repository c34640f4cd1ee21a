"""The real trainer with the FID eval pool busy vs idle, and the FID curve of that run.

Two runs of the quickstart recipe (DiP-T/16, 32 px synthetic MDS shards, Ray Train + DeepSpeed
ZeRO-2), the same seed and steps: one with `eval.enabled=false`, one with an eval every
`--every` steps on one eval actor. The machine's cores are split: `--workers` training workers of
1 CPU each plus 1 CPU for the actor (`cluster.num_cpus` = workers + 1), so on a 2-core machine
that is 1 training worker + the actor. Prints the median step time of each run (the trainer's own
`step_time_s` metric, first interval dropped), their ratio (target <= 1.10), and the run's
`eval/fid` curve against held-out synthetic reference statistics.

    python benchmarks/trainer_eval.py [--steps 600] [--every 150] [--samples 150] [--workers 1] [--curve-only]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_stats(path: str, samples: int) -> None:
    """Held-out synthetic images (indices from 100,000; training uses 0..1999), class-balanced."""
    dip = os.path.join(os.path.dirname(sys.executable), "dip")
    subprocess.run([dip, "eval", "ref-stats", "--data", "synthetic", "--num-samples", str(samples), "--image-size", "32",
                    "--num-classes", "10", "--start", "100000", "--out", path], check=True, cwd=REPO)


def run(root: str, name: str, args, overrides: list[str]):
    from cluster.driver.launch import launch
    from trainer.config import load_config

    common = [f"run_name={name}", f"output_dir={os.path.join(root, 'runs')}", f"train.max_steps={args.steps}",
              f"cluster.num_workers={args.workers}", f"data.batch_size={16 // args.workers}",
              f"cluster.num_cpus={args.workers + 1}", f"checkpoint.every_steps={args.every}", "checkpoint.keep=10",
              "samples.per_class=2"]
    return launch(load_config(os.path.join(REPO, "configs", "quickstart_cpu.yaml"), common + overrides),
                  echo=lambda text: None)


def main() -> int:
    from benchmarks.trainer import history  # a run's metric, read back from its MLflow store

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=150, help="checkpoint and eval interval (steps)")
    parser.add_argument("--samples", type=int, default=150, help="samples per eval")
    parser.add_argument("--eval-steps", type=int, default=10, help="sampler steps per eval")
    parser.add_argument("--ref-samples", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1, help="training workers (1 CPU each)")
    parser.add_argument("--curve-only", action="store_true", help="only the eval-on run: its FID curve")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dip-bench-trainer-eval-") as root:
        ref = os.path.join(root, "ref.npz")
        reference_stats(ref, args.ref_samples)
        alone = None if args.curve_only else run(root, "alone", args, ["eval.enabled=false"])
        busy = run(root, "with-eval", args, ["eval.enabled=true", f"eval.every_steps={args.every}",
                                             f"eval.num_samples={args.samples}", f"eval.steps={args.eval_steps}",
                                             "eval.actors=1", f"eval.ref_stats={ref}"])
        medians = {}
        for label, summary in (("eval off", alone), ("eval on", busy)):
            if summary is None:
                continue
            intervals = [v for _, v in history(summary, "step_time_s")[1:]]
            medians[label] = statistics.median(intervals)
            print(f"{label}: {summary.status}, {summary.steps} steps in {summary.seconds:.0f} s wall, median step "
                  f"{medians[label] * 1000:.0f} ms over {len(intervals)} intervals")
        if alone is not None:
            print(f"step time with the pool busy / without: {medians['eval on'] / medians['eval off']:.3f} "
                  f"(target <= 1.10)")
        curve = history(busy, "eval/fid")
        print("FID curve (step: FID, " f"{args.samples} samples vs {args.ref_samples} held-out reference images): "
              + ", ".join(f"{step}: {fid:.1f}" for step, fid in curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
