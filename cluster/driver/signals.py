"""Stop signals of the driver: SIGTERM / Ctrl-C become a checkpoint-and-stop request to the workers,
and every later wait is cut to what is left of the stop's grace period before the SIGKILL."""
from __future__ import annotations

import os
import signal
import threading
import time

from cluster.driver.report import echo
from trainer.checkpoint.store import CheckpointStore

STOP_GRACE_ENV = ("DIP_STOP_GRACE_S", "RAY_JOB_STOP_WAIT_TIME_S")  # the second: what `dip jobs stop` gives
DEFAULT_STOP_GRACE_S = 30.0   # SIGTERM to SIGKILL of Kubernetes (terminationGracePeriodSeconds) and Slurm (KillWait)


def stop_grace_s(signum: int) -> float | None:
    """Seconds between a stop signal and the SIGKILL that follows it: $DIP_STOP_GRACE_S, else a Ray job's
    $RAY_JOB_STOP_WAIT_TIME_S (`dip submit --stop-grace-s`), else 30 s after a SIGTERM; None after an
    interactive Ctrl-C (nothing kills the driver then)."""
    for name in STOP_GRACE_ENV:
        try:
            return max(0.0, float(os.environ.get(name, "")))
        except ValueError:
            continue
    return DEFAULT_STOP_GRACE_S if signum == signal.SIGTERM else None


class StopOnSignal:
    """SIGTERM / first Ctrl-C: ask the workers (through the checkpoint store) to checkpoint and stop.
    A second Ctrl-C aborts: KeyboardInterrupt wherever the driver waits, `aborted` set.

    A stop signal is followed by SIGKILL once its grace period is over (stop_grace_s): from the signal
    on, every wait of the driver is cut to what is left (`budget`), keeping a reserve for what must
    land before the kill: the model card, the last MLflow flush and the run's end status. During the
    driver's last waits (`interruptible`: the eval, the flush) any signal cuts the wait short."""

    FINISH_RESERVE_S = 15.0  # covers the card, the flush, the status, Ray's shutdown and the exit

    def __init__(self, store: CheckpointStore):
        self.store = store
        self.requested = False
        self.aborted = False
        self.deadline: float | None = None  # time.monotonic() of the expected SIGKILL
        self.reserve = 0.0
        self._previous = {}
        self._in_wait = False

    def install(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self._in_wait:  # training is over: a signal only cuts the last waits short
            self._start_grace(signum)
            raise KeyboardInterrupt
        if self.requested and signum == signal.SIGINT:
            self.aborted = True
            raise KeyboardInterrupt  # a second Ctrl-C aborts without waiting
        if self.requested:
            return  # a repeated SIGTERM: already stopping
        self.requested = True
        grace = self._start_grace(signum)
        echo(f"dip train: {signal.Signals(signum).name}: asking the workers to checkpoint and stop"
              + (f" within the {grace:g} s grace period" if grace is not None else "") + " (Ctrl-C again to abort)")
        self.store.request_stop()

    def _start_grace(self, signum: int) -> float | None:
        grace = stop_grace_s(signum)
        if grace is not None and self.deadline is None:
            self.deadline = time.monotonic() + grace
            self.reserve = min(self.FINISH_RESERVE_S, grace / 3)
        return grace

    def budget(self, wanted: float, keep: float | None = None) -> float:
        """`wanted` seconds of waiting, cut to what the grace period leaves after `keep` (the reserve)."""
        if self.deadline is None:
            return wanted
        keep = self.reserve if keep is None else keep
        return max(0.0, min(wanted, self.deadline - time.monotonic() - keep))

    def out_of_time(self) -> bool:
        """Only the reserve is left of the grace period."""
        return self.deadline is not None and self.budget(1.0) <= 0.0

    def interruptible(self, wait, instead) -> None:
        """A bounded wait that a signal cuts short: then `instead` runs, which must not wait."""
        self._in_wait = True
        try:
            wait()
            return
        except KeyboardInterrupt:
            echo("dip train: signal: not waiting any longer")
        finally:
            self._in_wait = False
        instead()

