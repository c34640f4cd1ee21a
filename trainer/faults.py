"""Fault injection (and a sample ledger) for the kill-and-resume tests. Inert unless a DIP_FAULT_*
variable is set.

Each fault fires once per run: it leaves a `fired-*` file in DIP_FAULT_DIR first, so the worker
group that Ray restarts afterwards runs clean. A fault is a real SIGKILL of the worker process:
no cleanup, no flush, exactly what a lost node or an OOM kill does.

  DIP_FAULT_DIR                  where the fired-* notes and rank-R.pid files go (required)
  DIP_FAULT_KILL_AT=S:R          rank R kills itself right after optimizer step S
  DIP_FAULT_KILL_IN_CHECKPOINT=S:R   rank R kills itself while writing checkpoint step-S
                                     (after its first file, before it reports its files done)
  DIP_FAULT_STEP_SLEEP_S=X       sleep X s after every step (so an outside kill lands mid-run)
  DIP_FAULT_STEP_SLEEP_AT=W:X    a group of W workers sleeps X s after every step instead (a shrunk run
                                 stays shrunk long enough for a returning node to be seen)
  DIP_FAULT_STEP_SLEEP_FRESH_S=X a group that started from step 0 sleeps X s after every step; one that
                                 resumed runs at full speed (a run slowed only until its fault)
  DIP_FAULT_NAN_AT=STEPS:RANKS   a poisoned batch: the pixels of the global batches STEPS (e.g. 6,10-12) of the
                                 data stream on ranks RANKS (e.g. 1, 0,1 or *) are NaN, every time those batches
                                 are read (not once). Batch S is step S's until a rollback: the rewound steps
                                 after it read the next batches (TrainProgress.data_step)
  DIP_FAULT_SAMPLE_LEDGER=DIR    every rank appends {"step", "data_step", "rank", "world_size", "attempt", "keys",
                                 "time"} of each micro-batch to DIR/ledger-<pid>.jsonl (which samples made up each
                                 step; "step" is the step before the optimizer step, rewound by a rollback,
                                 "data_step" the global batches the stream dealt before it, never rewound)
  DIP_FAULT_EVAL_SLEEP_S=X       an eval actor sleeps X s before each chunk (an eval slower than any wait)
"""
from __future__ import annotations

import json
import os
import signal
import time

ENV_KEYS = ("DIP_FAULT_DIR", "DIP_FAULT_KILL_AT", "DIP_FAULT_KILL_IN_CHECKPOINT", "DIP_FAULT_STEP_SLEEP_S",
            "DIP_FAULT_STEP_SLEEP_AT", "DIP_FAULT_STEP_SLEEP_FRESH_S", "DIP_FAULT_SAMPLE_LEDGER",
            "DIP_FAULT_EVAL_SLEEP_S", "DIP_FAULT_NAN_AT")


def forwarded_env() -> dict[str, str]:
    """The fault variables of the driver, to hand to the Ray workers."""
    return {k: os.environ[k] for k in ENV_KEYS if k in os.environ}


def _target(name: str) -> tuple[int, int] | None:
    spec = os.environ.get(name)
    if not spec:
        return None
    step, rank = spec.split(":")
    return int(step), int(rank)


def _fire_once(tag: str) -> bool:
    """True the first time in this run (across restarts): records that the fault fired."""
    directory = os.environ["DIP_FAULT_DIR"]
    note = os.path.join(directory, f"fired-{tag}")
    try:
        fd = os.open(note, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached: SIGKILL cannot be handled


def record_pid(rank: int) -> None:
    directory = os.environ.get("DIP_FAULT_DIR")
    if directory:
        with open(os.path.join(directory, f"rank-{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))


def after_step(step: int, rank: int, world_size: int, resumed: bool = False) -> None:
    sleep_s = os.environ.get("DIP_FAULT_STEP_SLEEP_S")
    if not resumed and os.environ.get("DIP_FAULT_STEP_SLEEP_FRESH_S"):
        sleep_s = os.environ["DIP_FAULT_STEP_SLEEP_FRESH_S"]
    at_world, _, at_sleep_s = os.environ.get("DIP_FAULT_STEP_SLEEP_AT", "").partition(":")
    if at_world and int(at_world) == world_size:
        sleep_s = at_sleep_s
    if sleep_s:
        time.sleep(float(sleep_s))
    target = _target("DIP_FAULT_KILL_AT")
    if target == (step, rank) and _fire_once(f"kill-at-{step}-{rank}"):
        _die()


def in_checkpoint_write(step: int, rank: int) -> None:
    target = _target("DIP_FAULT_KILL_IN_CHECKPOINT")
    if target == (step, rank) and _fire_once(f"kill-in-checkpoint-{step}-{rank}"):
        _die()


def _numbers(text: str) -> set[int]:
    """'6,10-12' -> {6, 10, 11, 12}."""
    found: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        found.update(range(int(lo), int(hi or lo) + 1))
    return found


def poison_pixels(step: int, rank: int, pixels):
    """The micro-batch of optimizer step `step` on `rank`, as NaN when DIP_FAULT_NAN_AT names them."""
    spec = os.environ.get("DIP_FAULT_NAN_AT")
    if not spec:
        return pixels
    steps, ranks = spec.split(":")
    if step in _numbers(steps) and (ranks == "*" or rank in _numbers(ranks)):
        return pixels * float("nan")
    return pixels


def record_samples(step: int, rank: int, world_size: int, attempt: str, keys: list[str],
                   data_step: int | None = None) -> None:
    directory = os.environ.get("DIP_FAULT_SAMPLE_LEDGER")
    if not directory:
        return
    line = json.dumps({"step": step, "data_step": step if data_step is None else data_step, "rank": rank,
                       "world_size": world_size, "attempt": attempt, "keys": list(keys), "time": time.time()})
    with open(os.path.join(directory, f"ledger-{os.getpid()}.jsonl"), "a") as f:
        f.write(line + "\n")


def read_ledger(directory: str) -> list[dict]:
    """Every line every rank wrote to the sample ledger in `directory`."""
    entries = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("ledger-") and name.endswith(".jsonl"):
            with open(os.path.join(directory, name)) as f:
                entries += [json.loads(line) for line in f if line.strip()]
    return entries


def in_eval_chunk() -> None:
    if "DIP_FAULT_EVAL_SLEEP_S" in os.environ:
        time.sleep(float(os.environ["DIP_FAULT_EVAL_SLEEP_S"]))
