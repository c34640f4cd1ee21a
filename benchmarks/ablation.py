"""DiP against its linear-head ablation on real images, trained end to end with `dip train`.

The paper's ablation: the same backbone with a plain linear output layer instead of the Patch Detailer
Head (ImageNet 256, 160 epochs): FID 5.28 against 2.16. Here, small and on a CPU:

1. data: real labelled images as an ImageFolder (benchmarks/ablation_data.py): Fashion-MNIST from
   Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`), 28 px gray
   padded to 32 px RGB; or `--source photos` (crops of the photos shipped in the venv);
2. `dip data shard` the training split (MDS, npy records); `dip eval ref-stats` on held-out test images;
3. `dip train` (Ray + DeepSpeed ZeRO-2, 2 workers, the quickstart recipe configs/quickstart_cpu.yaml with
   the data, model and eval keys overridden) once for MODEL and once for MODEL-linear, everything else
   equal, with FID evals on the eval pool every --eval-every steps against that reference;
4. the eval hook and pool skip a checkpoint when a newer one is due before its eval starts (they never
   hold up training), so a fast run can miss points: each missing step is scored afterwards from its kept
   checkpoint with the same sampling spec and logged to the same MLflow run (marked `*`);
5. prints a table (parameters, steps, wall time, FID at each eval) and writes a JSON and a PNG: both
   FID curves and the two final sample grids side by side.

    apt-get install dataset-fashion-mnist            # once (Debian/Ubuntu): the default data
    nice -n 15 python benchmarks/ablation.py [--model DiP-T/16] [--resolution 32] [--steps 1500]
        [--eval-every 300] [--eval-samples 250] [--ref-samples 1000] [--set KEY=VALUE] [--out PATH]
    python benchmarks/ablation.py --smoke            # a few steps on the shipped photos (the test)

`make ablation` runs the defaults (niced). Data and runs go under --work (runs/ablation); a second call
reuses the folders, shards and reference, and trains both models afresh.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# `dip` subprocesses and their Ray workers import this checkout
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)

from benchmarks.ablation_data import FASHION_MNIST_INSTALL, SOURCES, image_folders  # noqa: E402
from benchmarks.trainer import history  # noqa: E402  (a run's metric history from its MLflow store)

RECIPE = os.path.join(REPO, "configs", "quickstart_cpu.yaml")
DIP = os.path.join(os.path.dirname(sys.executable), "dip")
SMOKE = dict(source="photos", train_images=48, test_images=24, steps=4, eval_every=2, eval_samples=12,
             eval_steps=2, ref_samples=24, grid_per_class=2)


def dip(*args: str, log: str | None = None) -> None:
    """One `dip` command, as a user types it (printed first); its output into `log` when given."""
    print("$ dip " + " ".join(args) + (f"  > {log}" if log else ""), flush=True)
    began = time.monotonic()
    if log is None:
        subprocess.run([DIP, *args], cwd=REPO, check=True)
    else:
        with open(log, "w") as out:
            code = subprocess.run([DIP, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
        if code:
            with open(log) as f:
                tail = f.readlines()[-30:]
            raise RuntimeError(f"dip {args[0]} exited with {code}; the end of {log}:\n" + "".join(tail))
    print(f"  ({time.monotonic() - began:.0f} s)", flush=True)


def prepare_data(args) -> tuple[str, str, int]:
    """(shard dir, reference statistics file, classes); each reused when already built with these settings."""
    data_dir = os.path.join(args.work, "data")
    train_root, test_root, classes = image_folders(args.source, data_dir, args.train_images, args.test_images)
    tag = os.path.basename(os.path.dirname(train_root))
    shards = os.path.join(data_dir, f"{tag}-shards-{args.resolution}")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        dip("data", "shard", "--src", train_root, "--out", shards, "--format", "mds", "--resolution",
            str(args.resolution), "--encoding", "npy", "--workers", "2", "--no-progress", "--overwrite")
    ref = os.path.join(data_dir, f"{tag}-ref-{args.resolution}px-{args.ref_samples}.npz")
    if not os.path.exists(ref):
        dip("eval", "ref-stats", "--data", test_root, "--num-samples", str(args.ref_samples), "--image-size",
            str(args.resolution), "--out", ref)
    return shards, ref, classes


def overrides(args, model: str, shards: str, ref: str, classes: int) -> list[str]:
    """The quickstart recipe with this comparison's data, model and evals; the two runs differ in model.name only."""
    slug = model.replace("DiP-", "").replace("/", "")
    return [f"run_name=ablation-{args.resolution}px-{slug}", f"output_dir={os.path.join(args.work, 'runs')}",
            f"model.name={model}", f"model.num_classes={classes}", f"model.init={args.init}",
            f"data.path={shards}", f"data.resolution={args.resolution}", f"train.max_steps={args.steps}",
            f"checkpoint.every_steps={args.eval_every}", f"checkpoint.keep={args.steps // args.eval_every + 1}",
            f"eval.every_steps={args.eval_every}", f"eval.num_samples={args.eval_samples}",
            f"eval.steps={args.eval_steps}", f"eval.ref_stats={ref}", f"samples.num_classes={classes}",
            f"samples.per_class={args.grid_per_class}",
            "cluster.dashboard=false",  # its processes would take CPU from the runs on a small machine
            *args.set]


class LoadSampler:
    """The 1-minute load average every 5 s while a run lasts: how much the cores were shared."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(5.0):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def train(args, model: str, shards: str, ref: str, classes: int) -> dict:
    """One fresh `dip train` run; its figures, read back from its MLflow run."""
    from cluster.driver.prepare import run_paths
    from trainer.config import load_config

    extra = overrides(args, model, shards, ref, classes)
    cfg = load_config(RECIPE, extra)
    if os.path.exists(cfg.run_dir):  # a re-run of `dip train` would resume the old run, not time a new one
        print(f"removing the previous run {cfg.run_dir}", flush=True)
        shutil.rmtree(cfg.run_dir)
    os.makedirs(cfg.run_dir)
    began = time.monotonic()
    with LoadSampler() as load:
        dip("train", os.path.relpath(RECIPE, REPO), *extra, log=os.path.join(cfg.run_dir, "train.log"))
    wall = time.monotonic() - began
    paths = run_paths(cfg)
    run_id = mlflow_run_id(paths.tracking_uri, cfg.tracking.experiment)
    run = types.SimpleNamespace(tracking_uri=paths.tracking_uri, mlflow_run_id=run_id)
    pool_steps = {step for step, _ in history(run, "eval/fid")}
    filled = fill_missing_evals(cfg, paths, run_id, pool_steps)
    step_times = [v for _, v in history(run, "step_time_s")[1:]]  # the first interval holds start-up
    curve = history(run, "eval/fid")
    final = {key: dict(history(run, f"eval/{key}")).get(args.steps) for key in ("fid", "precision", "recall")}
    losses = history(run, "loss")
    return dict(model=model, parameters=parameter_count(model, classes), steps=args.steps, wall_s=round(wall, 1),
                median_step_s=round(statistics.median(step_times), 4) if step_times else None,
                load_avg=round(statistics.mean(load.samples), 2) if load.samples else None,
                final_loss=round(losses[-1][1], 4) if losses else None, final_fid=final["fid"],
                final_precision=final["precision"], final_recall=final["recall"],
                fid=[dict(step=s, fid=round(v, 2), scored="pool" if s in pool_steps else "after") for s, v in curve],
                filled_steps=filled, run_dir=cfg.run_dir, tracking_uri=paths.tracking_uri, mlflow_run_id=run_id,
                sample_grid=os.path.join(cfg.run_dir, "samples", "final.png"), overrides=extra)


def mlflow_run_id(tracking_uri: str, experiment: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    if len(runs) != 1:
        raise RuntimeError(f"{tracking_uri}: expected one MLflow run of a fresh run directory, found {len(runs)}")
    return runs[0].info.run_id


def fill_missing_evals(cfg, paths, run_id: str, scored: set[int]) -> list[int]:
    """Score each eval step that got no FID during training from its kept checkpoint, with the pool's spec and FID
    method, and log it to the run's MLflow at that step. Returns the steps filled."""
    from mlflow.tracking import MlflowClient

    from trainer.checkpoint.store import CheckpointStore
    from trainer.eval.local import evaluate_locally
    from trainer.eval.reference import ReferenceStats
    from trainer.eval.tracking import log_eval_result
    from trainer.eval.hook import sampling_spec

    store = CheckpointStore(paths.checkpoint_uri)
    missing = [s for s in store.committed_steps() if s % cfg.eval.every_steps == 0 and s not in scored]
    if not missing:
        return []
    reference = ReferenceStats.load(cfg.eval.ref_stats).prepare("eigh")
    client = MlflowClient(tracking_uri=paths.tracking_uri)
    for step in missing:
        print(f"{cfg.run_name}: step {step} got no eval during training (a newer checkpoint was due before it "
              "started); scoring its checkpoint now", flush=True)
        result = evaluate_locally(store.step_path(step), sampling_spec(cfg), reference, step=step, fid_method="eigh")
        log_eval_result(result, run_id, client=client)
        print(f"  step {step}: FID {result.fid:.2f} ({result.seconds:.0f} s)", flush=True)
    return missing


def parameter_count(model: str, classes: int) -> int:
    from models.registry import create_model

    return sum(p.numel() for p in create_model(model, num_classes=classes).parameters())


def table(runs: list[dict]) -> str:
    steps = sorted({p["step"] for r in runs for p in r["fid"]})
    head = ["model", "parameters", "steps", "wall", "median step", "load avg", "final loss", "final FID"] + \
        [f"FID@{s}" for s in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        at = {p["step"]: f"{p['fid']:.1f}" + ("*" if p["scored"] == "after" else "") for p in r["fid"]}
        final = f"{r['final_fid']:.1f}" if r["final_fid"] is not None else "n/a"
        step_s = f"{r['median_step_s'] * 1000:.0f} ms" if r["median_step_s"] else "n/a"
        cells = [r["model"], f"{r['parameters']:,}", str(r["steps"]), f"{r['wall_s'] / 60:.1f} min", step_s,
                 str(r["load_avg"]), f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "n/a", final] + \
            [at.get(s, "-") for s in steps]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], path: str, title: str) -> None:
    """FID curves (left) and the final sample grids (one row per class) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(4.5 + 3.2 * len(runs), 4.2),
                             gridspec_kw=dict(width_ratios=[1.4] + [1] * len(runs)))
    for r in runs:
        steps, fids = [p["step"] for p in r["fid"]], [p["fid"] for p in r["fid"]]
        axes[0].plot(steps, fids, marker="o", label=f"{r['model']} ({r['parameters'] / 1e6:.2f}M)")
    axes[0].set(xlabel="training step", ylabel="FID (lower is better)", title="FID during training")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    for ax, r in zip(axes[1:], runs):
        if os.path.exists(r["sample_grid"]):
            ax.imshow(Image.open(r["sample_grid"]).convert("RGB"), interpolation="nearest")
        ax.set_title(f"{r['model']}: final samples", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"data: `{FASHION_MNIST_INSTALL}` once, for the default --source")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps on the shipped photos with tiny evals (the test; overrides the sizes)")
    parser.add_argument("--source", default="fashion-mnist", choices=SOURCES)
    parser.add_argument("--model", default="DiP-T/16", help="the detailer model; its -linear ablation runs too")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--init", default="variance_preserving", choices=("authors", "variance_preserving"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=300, help="checkpoint and FID eval interval (steps)")
    parser.add_argument("--eval-samples", type=int, default=250, help="samples per FID eval")
    parser.add_argument("--eval-steps", type=int, default=10, help="Euler steps per eval sample")
    parser.add_argument("--ref-samples", type=int, default=1000, help="held-out test images in the FID reference")
    parser.add_argument("--train-images", type=int, default=0, help="0 = the whole training split")
    parser.add_argument("--test-images", type=int, default=0, help="0 = the whole test split")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one more config override for both runs, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("--grid-per-class", type=int, default=6, help="final sample grid columns")
    parser.add_argument("--work", default=os.path.join(REPO, "runs", "ablation"), help="data and run directories")
    parser.add_argument("--out", default=None, help="results path without extension (.json, .png)")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    from models.registry import DIP_SIZES

    if args.model not in DIP_SIZES or args.model.endswith("-linear"):
        parser.error(f"--model {args.model!r}: give a detailer size, one of "
                     f"{', '.join(m for m in DIP_SIZES if not m.endswith('-linear'))} (its -linear ablation runs too)")
    if args.steps % args.eval_every:
        parser.error(f"--steps {args.steps} must be a multiple of --eval-every {args.eval_every} (the final eval)")
    args.work = os.path.abspath(args.work)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    began = time.monotonic()
    shards, ref, classes = prepare_data(args)
    runs = [train(args, name, shards, ref, classes) for name in (args.model, f"{args.model}-linear")]
    date = datetime.date.today().isoformat()
    slug = args.model.replace("DiP-", "").replace("/", "").lower()
    out = args.out or os.path.join(args.work, f"ablation_{args.source}_{slug}_{args.resolution}px_{date}")
    title = (f"{args.source}, {args.resolution} px, {args.steps} steps x 16 images; FID of {args.eval_samples} "
             f"samples vs {args.ref_samples} held-out test images")
    plot(runs, out + ".png", title)
    report = dict(date=date, machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                  command=" ".join(["python", "benchmarks/ablation.py", *(argv if argv is not None else sys.argv[1:])]),
                  settings={k: v for k, v in vars(args).items() if k not in ("work", "out")},
                  total_wall_s=round(time.monotonic() - began, 1), runs=runs, plot=out + ".png")
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{title}\n{table(runs)}\n(* = skipped during training, scored from the kept "
          f"checkpoint afterwards; load avg = mean 1-min load average on {os.cpu_count()} CPUs during the run)")
    detailer, linear = runs
    if detailer["final_fid"] is not None and linear["final_fid"] is not None:
        verdict = "below" if detailer["final_fid"] < linear["final_fid"] else "NOT below"
        print(f"{detailer['model']} final FID {detailer['final_fid']:.2f} is {verdict} {linear['model']}'s "
              f"{linear['final_fid']:.2f} at {args.steps} steps")
    print(f"results: {out}.json, {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
