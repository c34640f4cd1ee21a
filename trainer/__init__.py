"""Everything below the driver: the run's config (config/), the per-worker loop (loop/), crash-safe
checkpoints (checkpoint/), MLflow tracking (tracking/) and FID evaluation (eval/); `model_io` loads
any checkpoint for sampling, `faults` holds the test-only fault-injection points."""
