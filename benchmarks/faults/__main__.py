"""``python -m benchmarks.faults [--quick] [--scenarios a,b] [--seed N] [--markdown]``.

Each scenario gets its own redis-server (a free port, no persistence) and its own processes,
all stopped afterwards; it prints its seed, criterion, figures and PASS/FAIL. Exit code 0 when
every scenario passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import traceback
from collections.abc import Sequence
from functools import partial

from rich.console import Console
from rich.table import Table

from benchmarks.faults import SCENARIOS, Scenario
from benchmarks.faults.harness import FaultEnv, Outcome
from benchmarks.faults.soak import soak
from benchmarks.processes import machine_info
from tokenbridge.store.embedded import EmbeddedRedis


async def run_scenario(
    scenario: Scenario, seed: int, soak_s: float = 60.0
) -> tuple[Outcome, float, str]:
    """Run one scenario on a Redis of its own; (outcome, seconds, redis version)."""
    with EmbeddedRedis(extra_args=list(scenario.redis_args)) as redis:
        env = FaultEnv(redis.url, server=redis)
        run = partial(soak, duration_s=soak_s) if scenario.run is soak else scenario.run
        started = time.monotonic()
        try:
            outcome = await run(env, seed)
        except Exception as exc:  # a bound hit, a process that died: the scenario fails
            detail = "".join(traceback.format_exception_only(exc)).strip()
            outcome = Outcome(False, {}, f"{type(exc).__name__}: {detail}"[:300])
        finally:
            await env.aclose()
        return outcome, time.monotonic() - started, redis.version


def _figures(outcome: Outcome) -> str:
    return ", ".join(f"{k}={v}" for k, v in outcome.figures.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__)
    parser.add_argument("--scenarios", help="comma-separated names (default: all)")
    parser.add_argument("--quick", action="store_true", help="only the quick scenarios")
    parser.add_argument("--seed", type=int, default=1, help="seed of every scenario's RNG")
    parser.add_argument("--soak-s", type=float, default=60.0, help="soak duration")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    options = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not options.quick or s.quick]
    if options.scenarios:
        names = set(options.scenarios.split(","))
        chosen = [s for s in SCENARIOS if s.name in names]
    console = Console()
    rows: list[tuple[Scenario, Outcome, float]] = []
    version = "unknown"
    for scenario in chosen:
        console.print(f"[bold]{scenario.name}[/] (seed {options.seed}) ...")
        outcome, seconds, version = asyncio.run(
            run_scenario(scenario, options.seed, options.soak_s)
        )
        rows.append((scenario, outcome, seconds))
        verdict = "[green]PASS[/]" if outcome.passed else "[red]FAIL[/]"
        console.print(f"  {verdict} {seconds:.1f}s {_figures(outcome)} {outcome.note}")
    table = Table(title=f"fault suite, seed {options.seed}", title_justify="left")
    for column in ("scenario", "criterion", "figures", "s", "result"):
        table.add_column(column)
    for scenario, outcome, seconds in rows:
        result = "PASS" if outcome.passed else f"FAIL {outcome.note}"
        table.add_row(scenario.name, scenario.criterion, _figures(outcome), f"{seconds:.1f}",
                      result)  # fmt: skip
    console.print(table)
    machine = Table(title="machine", title_justify="left", show_header=False)
    for name, value in machine_info(version):
        machine.add_row(name, value)
    console.print(machine)
    if options.markdown:
        print("| scenario | criterion | figures | s | result |\n|---|---|---|---|---|")
        for scenario, outcome, seconds in rows:
            result = "PASS" if outcome.passed else f"FAIL {outcome.note}"
            print(f"| {scenario.name} | {scenario.criterion} | {_figures(outcome)} | "
                  f"{seconds:.1f} | {result} |")  # fmt: skip
        print("\n| machine | |\n|---|---|")
        for name, value in machine_info(version):
            print(f"| {name} | {value} |")
    return 0 if all(outcome.passed for _, outcome, _ in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
