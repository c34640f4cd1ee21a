"""Start a local Ray cluster or attach to one, and the environment the driver hands its workers."""
from __future__ import annotations

import os

from cluster.driver.prepare import REPO_ROOT
from cluster.driver.report import echo as _echo
from trainer.config import TrainConfig

# Environment every worker gets from the driver (when set here). Never credentials: Ray shows a
# runtime_env in its dashboard and stores it; workers get theirs from their node (instance role,
# pod secret, ~/.aws, or the environment `ray start` ran in): docs/cluster.md, "Credentials".
FORWARDED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT", "OMP_NUM_THREADS", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "AWS_REGION")


def start_ray(cfg: TrainConfig, echo=_echo) -> bool:
    """Start a local Ray cluster or attach to one. True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, include_dashboard=False)
        return True
    context = ray.init(num_cpus=cfg.cluster.num_cpus or os.cpu_count(), include_dashboard=cfg.cluster.dashboard,
                       dashboard_host="127.0.0.1", object_store_memory=cfg.cluster.object_store_mb << 20,
                       _node_ip_address="127.0.0.1")
    if cfg.cluster.dashboard and context.dashboard_url:
        echo(f"ray dashboard: http://{context.dashboard_url}")
    return True


def worker_env() -> dict[str, str]:
    from trainer import faults

    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.update(faults.forwarded_env())
    # the workers import our packages from this checkout when it is not pip-installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return env
