"""Goodput checks on the MLflow runs other tests already make (a clean run, a SIGKILLed one, a rolled-back
one): no run of its own, so they add seconds, not minutes. (No tests here; the trainer test modules call these.)"""
from __future__ import annotations

import json

import pytest

from trainer.tracking.goodput import CAUSES, GOODPUT_TAG, LEDGER_TAG


def final_goodput(tracking_uri: str, run_id: str) -> tuple[dict, dict, dict]:
    """(the closing ledger state, the newest goodput/badput metrics, the run's tags) of a finished run."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    state = json.loads(run.data.tags[LEDGER_TAG])
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("goodput/", "badput/"))}
    return state, metrics, run.data.tags


def assert_books_balance(state: dict, metrics: dict, tags: dict) -> float:
    """Productive plus every badput cause is the total (exact but for float rounding: `other` is the
    remainder of the measured wall time), the figures logged are the closing ledger's, and the `goodput`
    tag holds the fraction. Returns the fraction."""
    assert state["closed"], "the run's last ledger report is not the closing one"
    total = state["productive_s"] + sum(state["badput_s"][cause] for cause in CAUSES)
    assert metrics["goodput/total_s"] == pytest.approx(total, rel=1e-6)
    assert metrics["goodput/productive_s"] == pytest.approx(state["productive_s"], rel=1e-6)
    for cause in CAUSES:
        assert metrics[f"badput/{cause}_s"] == pytest.approx(state["badput_s"][cause], rel=1e-6, abs=1e-9)
        assert state["badput_s"][cause] >= 0.0
    fraction = state["productive_s"] / total
    assert metrics["goodput/fraction"] == pytest.approx(fraction, rel=1e-6)
    assert float(tags[GOODPUT_TAG]) == pytest.approx(fraction, abs=1e-4)
    assert 0.0 < fraction < 1.0
    assert state["badput_s"]["startup"] > 0.0 and state["badput_s"]["checkpoint"] > 0.0
    return fraction


def assert_clean_run_goodput(run, steps: int) -> float:
    """An uninterrupted run: every step it computed is in the model, nothing lost, nothing recovered."""
    state, metrics, tags = final_goodput(run.tracking_uri, run.mlflow_run_id)
    fraction = assert_books_balance(state, metrics, tags)
    assert (state["productive_steps"], state["lost_steps"], state["failures"]) == (steps, 0, 0)
    assert state["badput_s"]["lost_work"] == 0.0 and state["badput_s"]["recovery"] == 0.0
    return fraction


def assert_killed_run_goodput(run, ref, steps: int, redone_steps_at_most: int, redone_steps_at_least: int = 1) -> None:
    """A run whose workers were SIGKILLed after a checkpoint and resumed: the steps in the model are the
    run's steps exactly (each attempt takes over the checkpoint's count); some computed steps were lost and
    at most the ones really redone (a dying rank's last reports may never reach MLflow); their seconds match
    the run's own seconds per step (within a factor of 3: a shared 2-core machine and the first, slower
    steps of each attempt); the failures cost recovery time; and the goodput once started is below the clean
    run's (start-up is left out of both: the two runs start minutes apart on a shared machine, and one
    slow start-up of the clean run, 91% of its time in one run, says nothing about failures)."""
    state, metrics, tags = final_goodput(run.tracking_uri, run.mlflow_run_id)
    assert_books_balance(state, metrics, tags)
    assert state["productive_steps"] == steps
    assert state["failures"] >= 1 and state["badput_s"]["recovery"] > 0.0
    assert redone_steps_at_least <= state["lost_steps"] <= redone_steps_at_most
    if state["lost_steps"]:
        per_step = state["productive_s"] / state["productive_steps"]
        lost_per_step = state["badput_s"]["lost_work"] / state["lost_steps"]
        assert per_step / 3 < lost_per_step < per_step * 3, (lost_per_step, per_step)
    else:
        assert state["badput_s"]["lost_work"] == 0.0
    assert_clean_run_goodput(ref, steps)
    assert _after_startup(state) < _after_startup(final_goodput(ref.tracking_uri, ref.mlflow_run_id)[0])


def _after_startup(state: dict) -> float:
    """Productive seconds over the seconds after each attempt's start-up."""
    total = state["productive_s"] + sum(state["badput_s"][cause] for cause in CAUSES)
    return state["productive_s"] / (total - state["badput_s"]["startup"])
