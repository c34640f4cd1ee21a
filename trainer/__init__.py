"""Everything below the driver: the run's config (config/), the per-worker loop (loop/), crash-safe
checkpoints (checkpoint/), MLflow tracking (tracking/) and FID evaluation (eval/); `model_io` loads
any checkpoint for sampling, `sampling` draws images from it (`dip sample`), `export` turns a committed
checkpoint into one file to sample with (`dip export`), `faults` holds the test-only fault-injection points."""
