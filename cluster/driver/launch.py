"""The driver of a training run, phase by phase: resolve the config and paths, plan the resume
(cluster/driver/prepare.py, resume.py) -> open the MLflow run -> start or attach Ray (ray_start.py) ->
fit with the eval pool (fit.py), stop signals turned into checkpoint-and-stop (signals.py) -> report
(report.py). `launch` below runs them in order and closes everything in its `finally`.

The driver owns nothing heavy: the config, the MLflow run, the checkpoint directory's listing and
(when enabled) the eval pool. Workers do all the training (trainer/loop/run.py).
"""
from __future__ import annotations

import time

from cluster.driver.errors import TrainingFailed
from cluster.driver.fit import build_trainer, fit_until_done, open_tracking
from cluster.driver.prepare import prepare_run
from cluster.driver.ray_start import start_ray
from cluster.driver.report import RunSummary, echo as _echo, format_summary, write_model_card
from cluster.driver.signals import StopOnSignal
from trainer.config import TrainConfig, config_hash

EVAL_WAIT_S = 600.0           # a run that ended well waits this long for its last eval


def launch(cfg: TrainConfig, echo=_echo) -> RunSummary:
    """Run (or resume) a training run to its end. Blocks; returns where everything is.
    prepare -> track -> start Ray -> fit (with the eval pool) -> close everything in `finally`."""
    import ray

    from trainer.eval.hook import EvalHook
    from trainer.tracking.logged_model import log_final_model
    from trainer.tracking.run_logger import finish_run

    started = time.monotonic()
    run = prepare_run(cfg, echo)
    run_id, driver_log = open_tracking(run)
    started_ray = start_ray(cfg, echo)
    eval_hook = None
    status, result, error = "FAILED", None, None
    stopper = StopOnSignal(run.store).install()  # kept through the `finally`: its waits stay interruptible
    try:
        eval_hook = EvalHook(cfg, run.store, driver_log)
        result, stop_requested = fit_until_done(build_trainer(run, run_id), stopper, eval_hook)
        metrics = dict(result.return_value or {}) if result is not None else {}
        if metrics.get("failed"):  # the workers stopped it (e.g. diverged): FAILED, with their reason
            raise TrainingFailed(metrics["failed"])
        status = "STOPPED" if (metrics.get("stopped") or stop_requested) else "FINISHED"
    except KeyboardInterrupt:  # a second Ctrl-C: abort; only what takes no waiting is still done
        status = "ABORTED"
        raise
    except BaseException as err:
        error = err
        raise
    finally:
        # Every wait below is bounded by what is left of a stop's grace period, and a signal ends it.
        if eval_hook is not None:
            eval_wait = 0.0 if error is not None or status == "ABORTED" else stopper.budget(EVAL_WAIT_S)
            if eval_wait > 0 and eval_hook.pool is not None:
                echo(f"dip train: waiting up to {eval_wait:.0f} s for the last eval (Ctrl-C to skip it)")
            stopper.interruptible(lambda: eval_hook.close(wait_s=eval_wait), lambda: eval_hook.close(wait_s=0.0))
        run.store.clear_stop_request()
        latest = run.store.latest_committed(warn=False)
        if status in ("FINISHED", "STOPPED"):
            write_model_card(cfg, run.paths, run_id, latest, result, driver_log)
        if status == "FINISHED":  # a stopped run goes on later: its final model comes then
            log_final_model(cfg, run.paths.tracking_uri, run_id, run.paths.checkpoint_uri, latest, config_hash(cfg))
        flush_s = stopper.budget(min(cfg.tracking.flush_timeout_s, 2.0 if status == "ABORTED" else float("inf")),
                                 keep=stopper.reserve / 5)
        stopper.interruptible(lambda: driver_log.close(flush_s), lambda: driver_log.close(0.0))
        finish_run(run.paths.tracking_uri, run_id,
                   {"FINISHED": "FINISHED", "STOPPED": "KILLED", "ABORTED": "KILLED"}.get(status, "FAILED"))
        stopper.restore()
        if started_ray:
            ray.shutdown()
    metrics = dict(result.return_value or {}) if result is not None else {}
    summary = RunSummary(cfg.run_name, status, int(metrics.get("step", 0)), time.monotonic() - started,
                         run.store.display(), run.store.display(latest) if latest is not None else None,
                         run.paths.tracking_uri, run_id, metrics.get("sample_grid"), metrics)
    echo(format_summary(summary))
    return summary
