"""Tables of a run: the machine, the figures against their targets, CPU, Redis commands."""

from __future__ import annotations

import os
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from benchmarks.scenarios import Figure, ScenarioResult

__all__ = ["print_report"]

_PROCESSES = ("gateway", "redis", "producer", "processors", "clients (bench)", "other processes")
_MAIN_COMMANDS = ("xadd", "xread", "xrange", "xrevrange", "evalsha", "eval", "hset", "expire")


def _value(figure: Figure) -> str:
    value = figure.value
    if figure.unit in ("ms", "us", "KB", "MB"):
        text = f"{value:,.2f}"
    elif figure.unit == "%":
        text = f"{value:.1f}"
    elif abs(value) < 10 and value != int(value):
        text = f"{value:.4f}"
    else:
        text = f"{value:,.0f}"
    return f"{text} {figure.unit}".rstrip()


def _met(figure: Figure) -> str:
    if figure.ok is None:
        return ""
    return "[green]yes[/green]" if figure.ok else "[red]no[/red]"


def _figures(results: Sequence[ScenarioResult]) -> Table:
    table = Table(title="Figures (one gateway process)", title_justify="left")
    for name, justify in (("scenario", "left"), ("figure", "left"), ("measured", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("target", justify="right")
    table.add_column("met")
    for result in results:
        for i, figure in enumerate(result.figures):
            table.add_row(
                result.name if i == 0 else "", figure.label, _value(figure), figure.target,
                _met(figure),
            )  # fmt: skip
        for note in result.notes:
            table.add_row("", f"[yellow]note: {note}[/yellow]", "", "", "")
        table.add_section()
    return table


def _cpu(results: Sequence[ScenarioResult]) -> Table:
    table = Table(
        title="CPU over each measurement window (% of one core; "
        f"the machine has {os.cpu_count()} cores; 'other processes' is load not from this run)",
        title_justify="left",
    )
    table.add_column("scenario")
    for name in _PROCESSES:
        table.add_column(name, justify="right")
    for result in results:
        cells = [f"{result.cpu[p]:.0f} %" if p in result.cpu else "-" for p in _PROCESSES]
        table.add_row(result.name, *cells)
    return table


def _per_token(calls: int, tokens: int) -> str:
    if not calls:
        return "-"
    ratio = calls / tokens
    return f"{ratio:.4f}" if ratio >= 0.001 else f"{ratio:.1e}"


def _commands(results: Sequence[ScenarioResult]) -> Table:
    table = Table(
        title="Redis commands per delivered token (INFO commandstats deltas; "
        "a pipeline sends many commands in one round trip)",
        title_justify="left",
    )
    table.add_column("command")
    for result in results:
        table.add_column(result.name, justify="right")
    seen = {name for result in results for name in result.commands}
    shown = [c for c in _MAIN_COMMANDS if c in seen]
    for command in shown:
        cells = []
        for result in results:
            cells.append(_per_token(result.commands.get(command, 0), result.tokens_delivered))
        table.add_row(command, *cells)
    other, total = [], []
    for result in results:
        rest = sum(n for c, n in result.commands.items() if c not in shown)
        other.append(_per_token(rest, result.tokens_delivered))
        total.append(_per_token(sum(result.commands.values()), result.tokens_delivered))
    table.add_row("other", *other)
    table.add_section()
    table.add_row("all commands", *total)
    table.add_row("tokens delivered", *(f"{r.tokens_delivered:,}" for r in results))
    return table


def print_report(
    console: Console,
    machine: Sequence[tuple[str, str]],
    results: Sequence[ScenarioResult],
    failures: Sequence[tuple[str, str]],
) -> None:
    """Print every table; ``failures`` are (scenario, why) of scenarios that did not finish."""
    table = Table(title="Machine", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for row in machine:
        table.add_row(*row)
    console.print(table)
    shown = [r for r in results if r.figures]
    if shown:
        console.print(_figures(shown))
    done = [r for r in results if r.tokens_delivered]  # the idle scenarios deliver none
    if done:
        console.print(_cpu(done))
        console.print(_commands(done))
    for name, why in failures:
        console.print(f"[red]{name}: did not finish: {why}[/red]", highlight=False)
