"""The fault suite's scenarios (benchmarks/faults/): the quick ones in every test run, the
long ones (the soak) with ``pytest -m faults``. Each runs on a redis-server of its own."""

from __future__ import annotations

import pytest
from benchmarks.faults import SCENARIOS, Scenario
from benchmarks.faults.__main__ import run_scenario

SEED = 1


def _params() -> list[object]:
    return [
        pytest.param(s, id=s.name, marks=() if s.quick else (pytest.mark.faults,))
        for s in SCENARIOS
    ]


@pytest.mark.parametrize("scenario", _params())
async def test_fault_scenario_meets_its_criterion(scenario: Scenario) -> None:
    outcome, _, _ = await run_scenario(scenario, SEED, soak_s=60.0)
    assert outcome.passed, f"{scenario.criterion}: {outcome.figures} {outcome.note}"


@pytest.mark.faults
@pytest.mark.parametrize("seed", range(1, 11))
async def test_redis_restarted_empty_every_client_gets_gap_and_an_end(seed: int) -> None:
    """Issue 16: 30 clients of 10 sessions, Redis killed and back empty mid-answer: every
    client gets ``gap`` and its stream ends within the documented bound, in 10 seeds of 10."""
    [scenario] = [s for s in SCENARIOS if s.name == "redis-restart-empty"]
    outcome, _, _ = await run_scenario(scenario, seed)
    assert outcome.passed, f"{scenario.criterion}: {outcome.figures} {outcome.note}"
