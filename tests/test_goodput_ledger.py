"""trainer.tracking.goodput.GoodputLedger on fake clocks: every cause, the sums, and what carries over a
crash, a clean re-run and a rollback."""
import json

import pytest

from trainer.tracking.goodput import CAUSES, GoodputLedger, newest, to_tag


class FakeClocks:
    """One timeline for the monotonic and the wall clock (wall = monotonic + 1e9)."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1e9 + self.now


def ledger(clocks: FakeClocks, world_size: int = 2) -> GoodputLedger:
    return GoodputLedger(world_size, clock=clocks.monotonic, wall_clock=clocks.wall)


def run_steps(book: GoodputLedger, clocks: FakeClocks, n: int, step_s: float = 1.0, wait_s: float = 0.25,
              applied: bool = True) -> None:
    for _ in range(n):
        clocks.now += step_s
        book.step(step_s, wait_s, applied)


def first_attempt(clocks: FakeClocks, steps: int, world_size: int = 2, wait_s: float = 0.25) -> GoodputLedger:
    """A run's first attempt, started now from nothing, after `steps` steps."""
    book = ledger(clocks, world_size)
    book.begin(process_start=clocks.wall(), previous=None, restored=None)
    run_steps(book, clocks, steps, wait_s=wait_s)
    return book


def assert_adds_up(book: GoodputLedger, wall_s: float) -> None:
    assert book.total_s == pytest.approx(wall_s * book.world_size, rel=1e-9)
    assert book.productive_s + sum(book.badput_s[c] for c in CAUSES) == pytest.approx(book.total_s, rel=1e-12)


def test_a_fresh_run_splits_its_worker_seconds_by_cause():
    clocks = FakeClocks()
    clocks.now = 5.0                                  # 5 s of start-up since the process began at 0
    book = ledger(clocks)
    book.begin(process_start=clocks.wall() - 5.0, previous=None, restored=None)
    run_steps(book, clocks, 4)                        # 4 x (0.75 compute + 0.25 data wait)
    clocks.now += 2.0
    book.add("checkpoint", 2.0)
    clocks.now += 1.0
    book.add("eval", 1.0)
    clocks.now += 0.5                                 # the loop's own time: other
    book.settle()
    assert book.badput_s["startup"] == pytest.approx(10.0)    # 5 s x 2 workers
    assert book.productive_s == pytest.approx(6.0)
    assert book.badput_s["data_wait"] == pytest.approx(2.0)
    assert book.badput_s["checkpoint"] == pytest.approx(4.0)
    assert book.badput_s["eval"] == pytest.approx(2.0)
    assert book.badput_s["other"] == pytest.approx(1.0)
    assert_adds_up(book, wall_s=12.5)
    assert book.fraction == pytest.approx(6.0 / 25.0)
    assert [cause for cause, _ in book.largest_causes()] == ["startup", "checkpoint", "data_wait"]
    assert book.summary_text().startswith("goodput 24.0% (startup 40.0%, checkpoint 16.0%")
    metrics = book.metrics()
    assert metrics["goodput/fraction"] == pytest.approx(0.24)
    assert metrics["goodput/total_s"] == pytest.approx(25.0)
    assert {f"badput/{c}_s" for c in CAUSES} <= set(metrics)


def test_a_skipped_step_is_lost_work_and_a_rollback_discards_the_steps_since_its_checkpoint():
    clocks = FakeClocks()
    book = first_attempt(clocks, 2, world_size=1, wait_s=0.0)
    at_checkpoint = book.state_dict(step=2)
    run_steps(book, clocks, 3, wait_s=0.0)            # applied, then discarded by the rollback
    run_steps(book, clocks, 2, wait_s=0.0, applied=False)
    clocks.now += 0.5
    book.rolled_back(json.loads(to_tag(at_checkpoint)), 0.5)
    book.settle()
    assert book.productive_steps == 2 and book.productive_s == pytest.approx(2.0)
    assert book.lost_steps == 5 and book.badput_s["lost_work"] == pytest.approx(5.0)
    assert book.badput_s["recovery"] == pytest.approx(0.5)
    assert_adds_up(book, wall_s=7.5)


def test_a_crash_after_a_checkpoint_carries_the_reported_figures_and_charges_the_redone_steps():
    clocks = FakeClocks()
    first = first_attempt(clocks, 4)
    checkpoint_state = first.state_dict(step=4)
    run_steps(first, clocks, 3)
    reported = first.state_dict(step=7)               # the last interval report before the SIGKILL
    clocks.now += 10.0                                # the unseen tail, detection, Ray's restart, the reload
    second = ledger(clocks)
    previous = newest(checkpoint_state, reported, None)
    assert previous is reported
    second.begin(process_start=clocks.wall() - 4.0, previous=previous, restored=checkpoint_state)
    assert second.failures == 1
    assert second.lost_steps == 3 and second.productive_steps == 4
    assert second.badput_s["lost_work"] == pytest.approx(3 * 0.75 * 2)
    assert second.badput_s["recovery"] == pytest.approx(10.0 * 2)
    assert second.badput_s["startup"] == 0.0          # the restart's start-up is part of the recovery
    run_steps(second, clocks, 3)
    second.settle()
    assert_adds_up(second, wall_s=7 + 10 + 3)
    assert second.fraction == pytest.approx(7 * 0.75 / 20)   # 4 kept + 3 redone steps of 20 s


def test_a_clean_end_then_a_rerun_counts_start_up_not_the_time_between():
    clocks = FakeClocks()
    first = first_attempt(clocks, 2)
    final = first.state_dict(step=2, closed=True)
    clocks.now += 3600.0                              # nobody held the workers in between
    second = ledger(clocks, world_size=4)             # and the re-run has more of them
    second.begin(process_start=clocks.wall() - 3.0, previous=final, restored=final)
    assert second.failures == 0 and second.badput_s["recovery"] == 0.0
    assert second.badput_s["startup"] == pytest.approx(3.0 * 4)
    assert second.productive_steps == 2 and second.lost_steps == 0


def test_a_checkpoint_newer_than_the_last_report_is_the_base():
    clocks = FakeClocks()
    first = first_attempt(clocks, 2)
    reported = first.state_dict(step=2)
    run_steps(first, clocks, 1)
    checkpoint_state = first.state_dict(step=3)
    assert newest(reported, checkpoint_state) is checkpoint_state
    assert newest(None, None) is None


def test_an_unknown_cause_is_one_clear_error():
    book = GoodputLedger(1)
    with pytest.raises(ValueError, match="goodput cause 'evals' is not one of startup, data_wait"):
        book.add("evals", 1.0)


def test_a_restart_with_no_checkpoint_to_resume_redoes_all_the_former_work():
    clocks = FakeClocks()
    first = first_attempt(clocks, 3, world_size=1, wait_s=0.0)
    reported = first.state_dict(step=3)
    clocks.now += 4.0
    second = ledger(clocks, world_size=1)
    second.begin(process_start=clocks.wall() - 1.0, previous=reported, restored=None)
    assert second.productive_steps == 0 and second.lost_steps == 3
    assert second.badput_s["lost_work"] == pytest.approx(3.0) and second.badput_s["recovery"] == pytest.approx(4.0)
    assert_adds_up(second, wall_s=7.0)
