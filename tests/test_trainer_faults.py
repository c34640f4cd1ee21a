"""Kill-and-resume on a real Ray cluster: 2 workers, DeepSpeed ZeRO 1/2/3 on CPU, real SIGKILLs.

Each killed run must finish by itself (Ray's FailureConfig restarts the worker group, which resumes
from the last committed checkpoint) and end with model and EMA weights bit-identical
(torch.equal) to an uninterrupted run of the same config, with the same loss at every step.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from tests.goodput_checks import assert_killed_run_goodput
from tests.test_trainer_support import (assert_bit_identical, final_weights, metric_history, ray_cluster,  # noqa: F401
                                        tiny_config)

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A driver with an eval in flight that never ends by itself (each chunk sleeps 600 s): whatever waits
# on it must be bounded. One more logical CPU for the eval actor beside the two workers.
SLOW_EVAL = ["eval.enabled=true", "eval.every_steps=4", "eval.ref_stats=synthetic", "eval.ref_samples=8",
             "eval.num_samples=8", "eval.steps=1", "cluster.num_cpus=3"]
GRACE_S = 30  # SIGTERM to SIGKILL: Kubernetes' default; what `dip jobs stop` gives is --stop-grace-s


@pytest.fixture(scope="module")
def reference(ray_cluster, request):  # noqa: F811
    """The uninterrupted run of a ZeRO stage: the session's (tests/conftest.py), computed once per `make test`."""
    return lambda stage: request.getfixturevalue(f"zero{stage}_reference")


def _assert_same_training(run, ref) -> None:
    from trainer.checkpoint.store import CheckpointStore

    assert run.status == "FINISHED" and run.steps == ref.steps == 12
    run_store, ref_store = CheckpointStore(run.checkpoint_dir), CheckpointStore(ref.checkpoint_dir)
    assert run_store.latest_committed() == ref_store.latest_committed() == 12
    model, ema = final_weights(run_store.step_path(12))
    ref_model, ref_ema = final_weights(ref_store.step_path(12))
    assert_bit_identical(model, ref_model, "model weights")
    assert_bit_identical(ema, ref_ema, "EMA weights")
    losses = metric_history(run.tracking_uri, run.mlflow_run_id)
    ref_losses = metric_history(ref.tracking_uri, ref.mlflow_run_id)
    assert sorted(losses) == sorted(ref_losses) == list(range(1, 13))
    for step, values in losses.items():  # steps re-run after a resume are logged again: same values
        assert values == [ref_losses[step][0]] * len(values), f"loss at step {step}: {values} vs {ref_losses[step]}"


def _kill_when_committed(store_dir: str, step: int, pid_file: str, delay_s: float, fired: list,
                         run_over: threading.Event) -> threading.Thread:
    """From outside the worker: SIGKILL the process in pid_file shortly after step-N is committed. Watches
    until it fires or the run is over (no time window: on a loaded machine step-N may take many minutes)."""
    from trainer.checkpoint.store import CheckpointStore

    def watch():
        store = CheckpointStore(store_dir)
        while not run_over.is_set():
            if store.verify(step).ok and os.path.exists(pid_file):
                time.sleep(delay_s)
                pid = int(open(pid_file).read())
                os.kill(pid, signal.SIGKILL)
                fired.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# ZeRO-2 and ZeRO-3, not ZeRO-1: ZeRO-1 and ZeRO-2 are one code path here (DeepSpeed's
# DeepSpeedZeroOptimizer, the same zero_pp_rank_*_optim_states.pt layout, the same branch of our
# checkpoint I/O and re-partitioning: stage <= 2); ZeRO-1's exact state resume is checked at the loop
# level in tests/test_elastic_resume.py. One kill per stage, each on its own code path: at ZeRO-2 a rank
# dies mid-run, SIGKILLed from outside by pid at whatever moment the kill lands (the resume from the
# last committed step); at ZeRO-3 the committer dies while writing a checkpoint asynchronously (an
# uncommitted step, cleared and written again). Each run is restarted by Ray once and must end
# bit-identical to the uninterrupted run.
@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_mid_run_or_during_a_checkpoint_write_resumes_bit_identically(stage, tmp_path, reference,
                                                                               monkeypatch):
    from cluster.driver.launch import launch
    from trainer.checkpoint.store import CheckpointStore

    ref = reference(stage)
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv("DIP_FAULT_DIR", str(faults))
    cfg = tiny_config(tmp_path, f"killed{stage}", [f"train.zero_stage={stage}", "checkpoint.async_save=true"])
    watcher, fired, run_over = None, [], threading.Event()
    if stage == 2:  # rank 1 SIGKILLed from outside, by pid, just after step-4 is committed
        monkeypatch.setenv("DIP_FAULT_STEP_SLEEP_S", "0.5")
        from cluster.driver.prepare import run_paths

        watcher = _kill_when_committed(run_paths(cfg).checkpoint_uri, 4, str(faults / "rank-1.pid"), 0.2, fired,
                                       run_over)
    else:  # rank 0, the committer, SIGKILLed by itself while writing step-8 (after its first file)
        monkeypatch.setenv("DIP_FAULT_KILL_IN_CHECKPOINT", "8:0")
    try:
        run = launch(cfg)
    finally:
        run_over.set()
    if watcher is not None:
        watcher.join(timeout=30)
        assert fired, "the outside SIGKILL never fired"
    else:
        assert (faults / "fired-kill-in-checkpoint-8-0").exists()
    _assert_same_training(run, ref)
    # the attempt resumed from step-4. The outside kill lands 0.2 s after step-4's commit: steps 5-7 at
    # most were redone, none when it struck before step 5 was done (a loaded machine). The kill in the
    # write of step-8: steps 5-8 and what ran on while it was written (async) were redone (a dying rank's
    # last reports may never reach MLflow: at least one is seen).
    assert_killed_run_goodput(run, ref, steps=12, redone_steps_at_most=3 if stage == 2 else 7,
                              redone_steps_at_least=0 if stage == 2 else 1)
    if stage == 3:  # the attempt that died mid-write left step-8 uncommitted; the next one cleared and rewrote it
        assert CheckpointStore(run.checkpoint_dir).verify(8).ok


def _read_lines(stream, lines: list) -> None:
    for line in stream:
        lines.append(line)


def _start_driver(tmp_path, cfg, extra_env: dict):
    """`dip train` in its own process (its own local Ray), slowed down and with a never-ending eval;
    returns once step-4 is committed."""
    from cluster.driver.prepare import run_paths
    from trainer.checkpoint.store import CheckpointStore
    from trainer.config import to_dict

    config_file = tmp_path / f"{cfg.run_name}.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(cfg)))
    env = {**os.environ, "DIP_FAULT_STEP_SLEEP_S": "0.5", "DIP_FAULT_EVAL_SLEEP_S": "600", "PYTHONPATH": REPO,
           **extra_env}
    driver = subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", str(config_file), *SLOW_EVAL], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver.lines = []  # its output so far, read as it comes (a test waits on a line of it)
    driver.reader = threading.Thread(target=_read_lines, args=(driver.stdout, driver.lines), daemon=True)
    driver.reader.start()
    store_dir = run_paths(cfg).checkpoint_uri
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        if os.path.isdir(store_dir) and CheckpointStore(store_dir).verify(4).ok:
            break
        time.sleep(0.1)
    return driver, CheckpointStore(store_dir)


def _wait_for_output(driver, text: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in list(driver.lines)):
        if driver.poll() is not None:  # it exited: once its output is all read, it is there or never will be
            driver.reader.join(timeout=30)
            if any(text in line for line in driver.lines):
                return
            pytest.fail(f"the driver exited ({driver.returncode}) without printing {text!r}:\n"
                        f"{''.join(driver.lines)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the driver never printed {text!r} in {timeout_s} s:\n{''.join(driver.lines)[-3000:]}")
        time.sleep(0.05)


def _output_at_exit(driver, timeout_s: float) -> str:
    """Everything the driver printed once it exits; fails the test if it has not within timeout_s."""
    try:
        driver.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait()
        driver.reader.join(timeout=10)
        pytest.fail(f"the driver outlived {timeout_s} s:\n{''.join(driver.lines)[-3000:]}")
    driver.reader.join(timeout=30)
    return "".join(driver.lines)


def _mlflow_status(cfg, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    from cluster.driver.prepare import run_paths

    return MlflowClient(tracking_uri=run_paths(cfg).tracking_uri).get_run(run_id).info.status


def test_sigterm_to_the_driver_checkpoints_stops_and_a_rerun_resumes(tmp_path, reference):
    """Driver side: SIGTERM asks the workers to checkpoint and stop. Within the grace period before the
    SIGKILL that follows it (an eval still in flight), the checkpoint, the model card and the MLflow
    run's end status all land; the same command resumes it."""
    from cluster.driver.launch import launch
    from trainer.checkpoint.manager import load_train_state

    ref = reference(2)
    cfg = tiny_config(tmp_path, "stopped")
    driver, store = _start_driver(tmp_path, cfg, {"RAY_JOB_STOP_WAIT_TIME_S": str(GRACE_S)})
    driver.send_signal(signal.SIGTERM)
    output = _output_at_exit(driver, GRACE_S)  # then the SIGKILL: what Ray's job supervisor does at the end of it
    assert driver.returncode == 0, output[-3000:]
    assert "asking the workers to checkpoint and stop" in output and "stopped on request" in output
    assert "waiting up to" in output  # for the eval: what was left of the grace period, minus the reserve
    stopped_at = store.latest_committed()
    assert 4 < stopped_at < 12, f"stopped at step {stopped_at}"
    assert not store.stop_requested()  # the request does not outlive the run
    stopped_run_id = load_train_state(store, stopped_at)["mlflow_run_id"]
    assert _mlflow_status(cfg, stopped_run_id) == "KILLED"
    card = open(os.path.join(cfg.run_dir, "MODEL_CARD.md")).read()
    assert f"step-{stopped_at} (ema.pt" in card

    rerun = launch(cfg)  # the same command again: resumes, continues the same MLflow run
    assert rerun.mlflow_run_id == stopped_run_id
    _assert_same_training(rerun, ref)


def test_a_second_ctrl_c_aborts_at_once_with_an_eval_in_flight(tmp_path):
    """The first Ctrl-C asks for a checkpoint and a stop; a second one, while the workers are still at
    it, aborts: no wait for the eval (before: up to 600 s), the MLflow run ends KILLED, exit code 130."""
    from trainer.checkpoint.manager import load_train_state

    cfg = tiny_config(tmp_path, "aborted")
    driver, store = _start_driver(tmp_path, cfg, {})
    driver.send_signal(signal.SIGINT)
    # the second once the first is handled; the workers need seconds to checkpoint and stop, and the eval
    # never ends: it lands before they are done
    _wait_for_output(driver, "asking the workers to checkpoint and stop")
    driver.send_signal(signal.SIGINT)
    output = _output_at_exit(driver, 90)  # a second Ctrl-C that did not abort fails here
    assert driver.returncode == 130, output[-3000:]
    assert "dip train: interrupted" in output
    assert _mlflow_status(cfg, load_train_state(store, 4)["mlflow_run_id"]) == "KILLED"
