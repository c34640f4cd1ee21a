"""Eval benchmarks: Inception feature throughput, FID-10K time on the quickstart model, and the
training step time with the eval pool busy on its own cores.

    .venv/bin/python benchmarks/eval.py                      # features + FID-10K estimate
    .venv/bin/python benchmarks/eval.py --step-time          # + step time with / without a busy pool
    .venv/bin/python benchmarks/eval.py --full-fid10k        # run the whole 10K instead of extrapolating
    .venv/bin/python benchmarks/eval.py --fid-curve-only     # train the quickstart model in-process,
                                                             # evals on the pool -> MLflow FID curve

Figures are printed (and written with --json). On a shared machine CPU-seconds of the measuring
process are the honest per-core figure; wall-clock numbers are printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

QUICKSTART = dict(model="DiP-T/16", num_classes=10, resolution=32)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench_features(images: int, batch: int, resolution: int) -> dict:
    """Inception features (input stage included) per CPU core, and per GPU when there is one."""
    from trainer.eval.inception import InceptionFeatures

    extractor = InceptionFeatures()
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.integers(0, 256, size=(batch, 3, resolution, resolution), dtype=np.uint8))
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    extractor(data[:2])  # warm-up (oneDNN primitive creation)
    n = max(batch, images - images % batch)
    _, wall, cpu = timed(lambda: [extractor(data) for _ in range(n // batch)])
    results["cpu_1thread_img_per_cpu_s"] = n / cpu
    results["cpu_1thread_img_per_wall_s"] = n / wall
    torch.set_num_threads(threads)
    _, wall, cpu = timed(lambda: [extractor(data) for _ in range(n // batch)])
    results[f"cpu_{threads}threads_img_per_wall_s"] = n / wall
    print(f"features {resolution}px -> 299, batch {batch}, {n} images:")
    print(f"  CPU, 1 thread : {results['cpu_1thread_img_per_cpu_s']:.2f} img per CPU-second (per core), "
          f"{results['cpu_1thread_img_per_wall_s']:.2f} img/s wall")
    print(f"  CPU, {threads} threads: {n / wall:.2f} img/s wall")
    if torch.cuda.is_available():
        gpu = extractor.cuda()
        big = torch.from_numpy(rng.integers(0, 256, size=(100, 3, resolution, resolution), dtype=np.uint8)).cuda()
        gpu(big)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            gpu(big)
        torch.cuda.synchronize()
        results["gpu_img_per_s"] = 2000 / (time.perf_counter() - start)
        print(f"  GPU ({torch.cuda.get_device_name()}), batch 100, fp32 (no TF32): "
              f"{results['gpu_img_per_s']:.0f} img/s")
    else:
        print("  GPU: none on this machine")
    return results


def bench_scoring(num_samples: int) -> dict:
    """Each part of scoring num_samples features against a 10K reference, timed alone (features are
    random: the cost depends on the sizes only). CPU-seconds include every BLAS thread of this process."""
    from trainer.eval.metrics import GaussianStats, frechet_distance, manifold_radii, precision_recall
    from trainer.eval.reference import ReferenceStats

    rng = np.random.default_rng(1)
    ref_pool, ref_spatial = rng.random((10_000, 2048), np.float32), rng.random((10_000, 2023), np.float32)
    pool = rng.random((num_samples, 2048), np.float32)
    reference = ReferenceStats.from_features(ref_pool, ref_spatial)
    results = {}

    def part(name, fn):
        out, wall, cpu = timed(fn)
        results[name] = {"wall_s": wall, "cpu_s": cpu}
        print(f"  {name:<44} {wall:7.1f} s wall {cpu:7.1f} CPU-s")
        return out

    print(f"scoring {num_samples} samples vs a 10K reference (2048-d pool3; sFID costs the same again):")
    stats = part("mean + covariance (np.cov, float64)", lambda: GaussianStats.of(pool))
    part("once per pool: covariance root of the reference", lambda: reference.root("pool"))
    radii = part("once per pool: k-NN radii of the reference", lambda: manifold_radii(ref_pool))
    part("FID, fid_method=eigh (reusing the root)",
         lambda: frechet_distance(reference.pool, stats, method="eigh", a_root=reference.root("pool")))
    part("FID, fid_method=sqrtm (scipy.linalg.sqrtm)", lambda: frechet_distance(reference.pool, stats))
    part("precision/recall (k=3, float64)", lambda: precision_recall(ref_pool, pool, reference_radii=radii))
    return results


def quickstart_checkpoint(directory: Path) -> Path:
    import dataclasses

    from models.registry import create_model

    model = create_model(QUICKSTART["model"], num_classes=QUICKSTART["num_classes"])
    target = directory / "step-100"
    target.mkdir(parents=True)
    torch.save({"model_config": dataclasses.asdict(model.config), "state_dict": model.state_dict()}, target / "ema.pt")
    return target


def reference_file(directory: Path, count: int = 64) -> Path:
    from data.synthetic import reference_images

    from trainer.eval.inception import InceptionFeatures
    from trainer.eval.reference import ReferenceStats

    images, _ = reference_images(count, QUICKSTART["resolution"], QUICKSTART["num_classes"])
    pool, spatial = InceptionFeatures()(images)
    path = directory / "ref.npz"
    ReferenceStats.from_features(pool.numpy(), spatial.numpy()).save(path)
    return path


def sampling_spec(num_samples: int, steps: int):
    from trainer.eval.spec import SamplingSpec

    return SamplingSpec(steps=steps, method="euler", cfg_scale=2.9, cfg_interval=(0.11, 0.97), num_samples=num_samples,
                        batch_size=32, image_size=QUICKSTART["resolution"])


def bench_fid10k(measure_samples: int, steps: int, actors: int, full: bool, scoring_s: float) -> dict:
    """Seconds for an FID-10K of the quickstart model on the Ray pool (measured on `measure_samples`
    and extrapolated unless --full-fid10k)."""
    import ray

    from trainer.eval.pool import EvalPool

    with tempfile.TemporaryDirectory(prefix="dip-eval-bench-") as tmp:
        tmp = Path(tmp)
        checkpoint, reference = quickstart_checkpoint(tmp), reference_file(tmp)
        ray.init(num_cpus=max(actors, 1), include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False)
        try:
            with EvalPool(actors, {"num_cpus": 1}, reference) as pool:
                pool.evaluate(checkpoint, sampling_spec(32 * actors, 1))  # warm: actors up, model loaded
                n = 10_000 if full else measure_samples
                result = pool.evaluate(checkpoint, sampling_spec(n, steps))
        finally:
            ray.shutdown()
    per_sample = result.seconds / n  # includes this run's (small) scoring
    # Extrapolated: per-sample cost x 10K, plus the 10K scoring measured above (FID, sFID ~ FID, P/R).
    estimate = result.seconds if full else per_sample * 10_000 + scoring_s
    print(f"FID-10K, quickstart model ({QUICKSTART['model']} at {QUICKSTART['resolution']} px), {steps} Euler steps, "
          f"CFG 2.9, {actors} actor(s) x 1 CPU:")
    print(f"  measured {n} samples in {result.seconds:.1f} s wall ({per_sample * 1000:.0f} ms/sample: sampling + "
          f"features + scoring)")
    print(f"  FID-10K: {estimate / 60:.1f} min wall" + ("" if full else " (extrapolated + measured 10K scoring)"))
    return {"fid10k_measured_samples": n, "fid10k_seconds_per_sample": per_sample, "fid10k_total_s": estimate,
            "fid10k_extrapolated": not full, "actors": actors, "steps": steps}


def bench_step_time(steps: int, eval_samples: int) -> dict:
    """Median training step time of the quickstart model, alone and with the eval pool busy, each on its
    own cores (training pinned to the first half, the pool's actor to the second half)."""
    import ray

    from models.registry import create_model
    from models.transport import FlowMatching
    from trainer.eval.pool import EvalPool

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("step time: needs >= 2 cores (training and the pool each on their own); skipped")
        return {}
    train_cores, eval_cores = cores[: len(cores) // 2], cores[len(cores) // 2:]
    os.sched_setaffinity(0, train_cores)
    torch.set_num_threads(len(train_cores))
    torch.manual_seed(0)
    model = create_model(QUICKSTART["model"], num_classes=QUICKSTART["num_classes"])
    objective = FlowMatching(num_classes=QUICKSTART["num_classes"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.rand(16, 3, QUICKSTART["resolution"], QUICKSTART["resolution"]) * 2 - 1
    y = torch.arange(16) % QUICKSTART["num_classes"]

    def step_times(count):
        times = []
        for _ in range(count):
            start = time.perf_counter()
            loss, _ = objective.loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return times

    step_times(5)
    alone = step_times(steps)
    with tempfile.TemporaryDirectory(prefix="dip-eval-bench-") as tmp:
        tmp = Path(tmp)
        checkpoint, reference = quickstart_checkpoint(tmp), reference_file(tmp)
        ray.init(num_cpus=len(cores), include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False)
        try:
            with EvalPool(1, {"num_cpus": len(eval_cores)}, reference) as pool:
                for pid in pool.actor_pids():
                    os.sched_setaffinity(pid, eval_cores)
                spec = sampling_spec(eval_samples, 20)
                pool.submit(checkpoint, 0, spec)
                deadline = time.monotonic() + 120
                while not pool.busy and time.monotonic() < deadline:
                    time.sleep(0.1)
                busy = []
                while len(busy) < steps:  # keep the pool busy for every measured step
                    if not pool.busy:
                        pool.submit(checkpoint, len(busy), spec)
                    busy += step_times(1)
                evals_done = len(pool.poll())
        finally:
            ray.shutdown()
    ratio = statistics.median(busy) / statistics.median(alone)
    print(f"training step time ({QUICKSTART['model']}, batch 16, {len(train_cores)} core(s)); eval pool on "
          f"{len(eval_cores)} other core(s):")
    print(f"  median alone {statistics.median(alone) * 1000:.1f} ms, with the pool busy "
          f"{statistics.median(busy) * 1000:.1f} ms: ratio {ratio:.3f} (target <= 1.10); {evals_done} evals finished")
    return {"step_ms_alone": statistics.median(alone) * 1000, "step_ms_pool_busy": statistics.median(busy) * 1000,
            "step_ratio": ratio, "train_cores": train_cores, "eval_cores": eval_cores}


def bench_fid_curve(train_steps: int, eval_every: int, eval_samples: int, eval_steps: int, out_dir: Path) -> dict:
    """The quickstart recipe trained in this process (plain torch loop; the real one is `dip train`), its
    EMA checkpoints handed to the pool as the trainer does; results logged to MLflow at their steps."""
    import dataclasses

    import ray
    from mlflow.tracking import MlflowClient

    from data.synthetic import reference_images
    from models.ema import EMA
    from models.registry import create_model
    from models.transport import FlowMatching
    from trainer.eval.datasets import DatasetRequest, build_reference
    from trainer.eval.pool import EvalPool
    from trainer.eval.tracking import log_eval_result

    cores = sorted(os.sched_getaffinity(0))
    train_cores, eval_cores = (cores[: len(cores) // 2], cores[len(cores) // 2:]) if len(cores) > 1 else (cores, cores)
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    res, classes = QUICKSTART["resolution"], QUICKSTART["num_classes"]
    # Held-out synthetic images (indices from 100000 on) are the reference; training uses 0..1999.
    reference_path = out_dir / "ref.npz"
    if not reference_path.is_file():  # kept between runs: it is a pure function of these arguments
        request = DatasetRequest("synthetic", num_samples=500, image_size=res, num_classes=classes, start=100_000)
        build_reference(request, reference_path)
    images, labels = reference_images(2000, res, classes)
    data = images.float() / 127.5 - 1.0                                      # (2000, 3, 32, 32) in [-1, 1]
    os.sched_setaffinity(0, train_cores)
    torch.set_num_threads(len(train_cores))
    torch.manual_seed(0)
    model = create_model(QUICKSTART["model"], num_classes=classes)
    ema = EMA(model, decay=0.99)
    objective = FlowMatching(num_classes=classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    client = MlflowClient(tracking_uri=f"sqlite:///{out_dir / 'mlflow.db'}")
    experiment = client.create_experiment(f"eval-curve-{int(time.time())}",
                                          artifact_location=(out_dir / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    spec = sampling_spec(eval_samples, eval_steps)
    generator = torch.Generator().manual_seed(0)
    curve, step_times = [], []
    ray.init(num_cpus=len(cores), include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False)
    try:
        with EvalPool(1, {"num_cpus": len(eval_cores)}, reference_path) as pool:
            for pid in pool.actor_pids():
                os.sched_setaffinity(pid, eval_cores)

            def hand_over(step):
                target = out_dir / "checkpoints" / f"step-{step}"
                target.mkdir(parents=True, exist_ok=True)
                torch.save({"model_config": dataclasses.asdict(ema.module.config),
                            "state_dict": ema.module.state_dict()}, target / "ema.pt")
                pool.submit(target, step, spec)

            def collect():
                for result in pool.poll():
                    log_eval_result(result, run_id, client)
                    curve.append(result)
                    print(f"  step {result.step:4d}: FID {result.fid:7.2f}  sFID {result.sfid:7.2f}  "
                          f"precision {result.precision:.3f}  recall {result.recall:.3f}  ({result.seconds:.0f} s)")

            hand_over(0)
            for step in range(1, train_steps + 1):
                start = time.perf_counter()
                index = torch.randint(0, len(data), (16,), generator=generator)
                loss, _ = objective.loss(model, data[index], labels[index], generator=generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                ema.update(model)
                step_times.append(time.perf_counter() - start)
                if step % eval_every == 0:
                    hand_over(step)
                collect()
            pool.wait_idle()
            collect()
            dropped = list(pool.dropped_steps)
    finally:
        ray.shutdown()
    logged = [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/fid")]
    print(f"FID curve ({train_steps} steps, eval every {eval_every}, {eval_samples} samples x {eval_steps} steps; "
          f"dropped as stale: {dropped}); MLflow run {run_id} in {out_dir / 'mlflow.db'}: {logged}")
    return {"curve": [(r.step, r.fid, r.sfid, r.precision, r.recall) for r in curve], "dropped_steps": dropped,
            "median_step_ms": statistics.median(step_times) * 1000, "mlflow_run": run_id}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images for the feature throughput")
    parser.add_argument("--resolution", type=int, default=256, help="input resolution for the feature throughput")
    parser.add_argument("--fid-samples", type=int, default=128, help="samples measured for the FID-10K estimate")
    parser.add_argument("--fid-steps", type=int, default=20, help="sampler steps in the FID-10K measurement")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--full-fid10k", action="store_true")
    parser.add_argument("--step-time", action="store_true", help="also measure step time with the pool busy")
    parser.add_argument("--step-count", type=int, default=40)
    parser.add_argument("--fid-curve", action="store_true", help="also train in-process with evals on")
    parser.add_argument("--fid-curve-only", action="store_true")
    parser.add_argument("--curve-steps", type=int, default=300)
    parser.add_argument("--curve-every", type=int, default=100)
    parser.add_argument("--curve-samples", type=int, default=200)
    parser.add_argument("--curve-dir", default="runs/eval_bench")
    parser.add_argument("--sections", default="features,scoring,fid10k",
                        help="comma-separated: features, scoring, fid10k")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    if args.fid_curve_only:
        results = {"fid_curve": bench_fid_curve(args.curve_steps, args.curve_every, args.curve_samples,
                                                args.fid_steps, Path(args.curve_dir))}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        return 0
    sections = set(args.sections.split(","))
    results = {}
    if "features" in sections:
        results["features"] = bench_features(args.images, 8, args.resolution)
    if "scoring" in sections:
        results["scoring"] = bench_scoring(10_000)
    if "fid10k" in sections:
        measured = {k: v["wall_s"] for k, v in results.get("scoring", {}).items()}
        # FID and sFID each need the statistics and a distance; precision/recall once.
        scoring_s = (2 * measured.get("mean + covariance (np.cov, float64)", 0.0)
                     + 2 * measured.get("FID, fid_method=eigh (reusing the root)", 0.0)
                     + measured.get("precision/recall (k=3, float64)", 0.0))
        results["fid10k"] = bench_fid10k(args.fid_samples, args.fid_steps, args.actors, args.full_fid10k,
                                         scoring_s)
    if args.step_time:
        results["step_time"] = bench_step_time(args.step_count, 64)
    if args.fid_curve:
        results["fid_curve"] = bench_fid_curve(args.curve_steps, args.curve_every, args.curve_samples,
                                               args.fid_steps, Path(args.curve_dir))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
