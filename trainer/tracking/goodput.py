"""The goodput ledger: where every worker-second of a training run goes, across restarts and resizes.

Goodput = productive / total: the share of the allocated worker-seconds spent computing optimizer steps
that end up in the model. The rest is badput, by cause (`CAUSES`):

  startup    process start -> first step of an attempt that did not follow a failure (model, engine,
             loader, checkpoint load: all of it)
  data_wait  the step waited for the data loader
  checkpoint the blocking part of checkpoint saves (the snapshot; an async write runs beside training)
  eval       the loop waited on in-loop evaluation: sample grids (FID evals run on their own actors and
             never block training, so they cost nothing here)
  lost_work  steps computed and then thrown away: a skipped non-finite step, the steps a rollback
             discards, and the steps a crashed attempt computed after its last committed checkpoint
  recovery   from a failure to the first step after it: a rollback's restore, and for a crashed (or
             resized) attempt the time from its last report to the new attempt's first step (detection,
             Ray's restart, the new attempt's start-up and checkpoint load)
  other      the rest of the measured wall time (logging, stop checks, the loop itself): it is the
             remainder, so productive + badput == total up to float rounding

All figures are worker-seconds: rank 0's wall clock times the world size at that moment (every rank
waits on the same collectives, so one clock speaks for all).

Crash-safety: the ledger's state is part of every checkpoint (TrainProgress.goodput) and is logged as
the MLflow tag `goodput.ledger` at every log interval. A new attempt starts from whichever of the two is
newer; the productive seconds the dead attempt reported after the checkpoint it resumes from become
lost_work. What a worker that dies without a word takes with it: the time and steps since its last report
(at most train.log_every steps, plus MLflow's send queue) are not seen as steps; that time lands in
`recovery` (the gap from the last report to the next first step), so total stays right and lost_work
is short by at most log_every steps' compute.
"""
from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("dip.train")

CAUSES = ("startup", "data_wait", "checkpoint", "eval", "lost_work", "recovery", "other")
LEDGER_TAG = "goodput.ledger"   # the JSON state, rewritten at every report: the newest one wins
GOODPUT_TAG = "goodput"         # the final figure, set when the run ends
STATE_FORMAT = 1


def process_start_time() -> float:
    """When this process started (epoch seconds): a Ray worker's start-up began there, not at our first line."""
    import psutil

    return psutil.Process().create_time()


class GoodputLedger:
    """Cumulative worker-seconds by cause, for one MLflow run. Rank 0's is the one that counts; it is
    cheap, so every rank keeps one and the loop need not ask which rank it is."""

    def __init__(self, world_size: int, clock=time.monotonic, wall_clock=time.time):
        self.world_size = world_size
        self._clock, self._wall = clock, wall_clock
        self.productive_s = 0.0
        self.badput_s = {cause: 0.0 for cause in CAUSES}
        self.productive_steps = 0
        self.lost_steps = 0
        self.failures = 0            # attempts that ended without closing (a crash, a kill, a resize)
        self._settled_at: float | None = None   # monotonic time up to which wall time is accounted
        self._accounted = 0.0        # worker-seconds attributed since then (the rest is `other`)

    # ------------------------------------------------------------------------------------------
    #                                       totals
    # ------------------------------------------------------------------------------------------
    @property
    def total_s(self) -> float:
        return self.productive_s + sum(self.badput_s.values())

    @property
    def fraction(self) -> float | None:
        total = self.total_s
        return self.productive_s / total if total > 0 else None

    def largest_causes(self, n: int = 3) -> list[tuple[str, float]]:
        """The n biggest badput causes with their share of total, biggest first (zero ones left out)."""
        total = self.total_s
        ranked = sorted(((c, s) for c, s in self.badput_s.items() if s > 0), key=lambda item: -item[1])
        return [(cause, seconds / total) for cause, seconds in ranked[:n]] if total > 0 else []

    def summary_text(self) -> str:
        """'goodput 71.2% (startup 12.0%, data_wait 9.1%, checkpoint 4.3%)'."""
        fraction = self.fraction
        if fraction is None:
            return "goodput n/a (no time measured)"
        causes = ", ".join(f"{cause} {100 * share:.1f}%" for cause, share in self.largest_causes())
        return f"goodput {100 * fraction:.1f}%" + (f" ({causes})" if causes else "")

    def metrics(self) -> dict[str, float]:
        """The MLflow figures: goodput/fraction, goodput/productive_s, goodput/total_s, badput/<cause>_s."""
        out = {"goodput/productive_s": self.productive_s, "goodput/total_s": self.total_s,
               "goodput/lost_steps": float(self.lost_steps)}
        if self.fraction is not None:
            out["goodput/fraction"] = self.fraction
        out.update({f"badput/{cause}_s": seconds for cause, seconds in self.badput_s.items()})
        return out

    # ------------------------------------------------------------------------------------------
    #                                 attributing time
    # ------------------------------------------------------------------------------------------
    def begin(self, process_start: float, previous: dict | None, restored: dict | None) -> None:
        """The first step of this attempt is about to start. previous: the newest state a former attempt
        left (the reported tag or the checkpoint's, see `newest`); restored: the state saved in the
        checkpoint this attempt resumed from (None: a fresh start). Takes over the former attempt's
        figures, moves its work after `restored` to lost_work, and charges the time to here to `startup`
        (a fresh start or one after a clean end) or `recovery` (after an attempt that did not close)."""
        now_wall = self._wall()
        if previous is not None:
            self._load(previous)
        if previous is not None:  # no checkpoint restored: all the former work is redone
            kept_s = float(restored["productive_s"]) if restored else 0.0
            kept_steps = int(restored["productive_steps"]) if restored else 0
            redone_s = max(0.0, float(previous["productive_s"]) - kept_s)
            redone_steps = max(0, int(previous["productive_steps"]) - kept_steps)
            self.productive_s -= redone_s
            self.productive_steps -= redone_steps
            self.badput_s["lost_work"] += redone_s
            self.lost_steps += redone_steps
        if previous is not None and not previous.get("closed"):
            self.failures += 1
            # from the dead attempt's last word to now, at this attempt's world size
            gap = max(0.0, now_wall - float(previous["wall_time"]))
            self.badput_s["recovery"] += gap * self.world_size
        else:
            self.badput_s["startup"] += max(0.0, now_wall - process_start) * self.world_size
        self._settled_at, self._accounted = self._clock(), 0.0

    def step(self, seconds: float, data_wait_s: float, applied: bool) -> None:
        """One optimizer step took `seconds` wall time, `data_wait_s` of it waiting for data. A skipped
        (non-finite) step's compute is lost_work at once."""
        compute = max(0.0, seconds - data_wait_s) * self.world_size
        wait = data_wait_s * self.world_size
        self.badput_s["data_wait"] += wait
        if applied:
            self.productive_s += compute
            self.productive_steps += 1
        else:
            self.badput_s["lost_work"] += compute
            self.lost_steps += 1
        self._accounted += compute + wait

    def add(self, cause: str, seconds: float) -> None:
        """Wall seconds the loop spent on one cause (checkpoint, eval, recovery, ...)."""
        if cause not in CAUSES:
            raise ValueError(f"goodput cause {cause!r} is not one of {', '.join(CAUSES)}")
        worker_s = max(0.0, seconds) * self.world_size
        self.badput_s[cause] += worker_s
        self._accounted += worker_s

    def rolled_back(self, restored: dict | None, seconds: float) -> None:
        """A rollback to a checkpoint whose saved ledger state is `restored`: the steps applied since then
        are discarded (lost_work); the restore itself took `seconds` (recovery)."""
        if restored is not None:
            redone_s = max(0.0, self.productive_s - float(restored["productive_s"]))
            redone_steps = max(0, self.productive_steps - int(restored["productive_steps"]))
            self.productive_s -= redone_s
            self.productive_steps -= redone_steps
            self.badput_s["lost_work"] += redone_s
            self.lost_steps += redone_steps
        self.add("recovery", seconds)

    def settle(self) -> None:
        """Close the books up to now: wall time not attributed to a cause since the last settle is `other`."""
        if self._settled_at is None:
            return
        now = self._clock()
        elapsed = (now - self._settled_at) * self.world_size
        self.badput_s["other"] += max(0.0, elapsed - self._accounted)
        self._settled_at, self._accounted = now, 0.0

    # ------------------------------------------------------------------------------------------
    #                                      state
    # ------------------------------------------------------------------------------------------
    def state_dict(self, step: int, closed: bool = False) -> dict:
        """The figures as of now (settled), with the step and wall time they belong to. closed: this attempt
        ended cleanly (a re-run later is a new start, not a recovery)."""
        self.settle()
        return {"format": STATE_FORMAT, "step": int(step), "wall_time": self._wall(), "closed": closed,
                "world_size": self.world_size, "productive_s": self.productive_s,
                "productive_steps": self.productive_steps, "lost_steps": self.lost_steps, "failures": self.failures,
                "badput_s": dict(self.badput_s)}

    def _load(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"goodput ledger state format {state.get('format')!r} is not {STATE_FORMAT}")
        self.productive_s = float(state["productive_s"])
        self.productive_steps = int(state["productive_steps"])
        self.lost_steps = int(state["lost_steps"])
        self.failures = int(state.get("failures", 0))
        self.badput_s = {cause: float(state["badput_s"].get(cause, 0.0)) for cause in CAUSES}


def newest(*states: dict | None) -> dict | None:
    """The most recent of some ledger states (by the wall time they were taken), None if there is none."""
    present = [state for state in states if state]
    return max(present, key=lambda state: float(state["wall_time"])) if present else None


def to_tag(state: dict) -> str:
    return json.dumps(state, sort_keys=True, separators=(",", ":"))


def reported_state(tracking_uri: str, run_id: str) -> dict | None:
    """The ledger state a former attempt last logged to this MLflow run (tag `goodput.ledger`), or None.
    A tag that cannot be read is a warning, not a failure: the checkpoint's copy is used instead."""
    from mlflow.tracking import MlflowClient

    try:
        text = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.tags.get(LEDGER_TAG)
        return json.loads(text) if text else None
    except Exception as err:  # an unreachable server must not stop a restart; the figures are only less exact
        log.warning("goodput: could not read the last reported ledger of run %s (%s: %s); starting from the "
                    "checkpoint's", run_id, type(err).__name__, err)
        return None
