"""``tokenbridge bench``: run ``python -m benchmarks`` of this source checkout.

``benchmarks/`` sits beside ``src/`` and is not in the wheel, so the command works from a
checkout (an editable install) only. Every argument is handed to the benchmark as is:
``tokenbridge bench --quick``, ``tokenbridge bench --help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from tokenbridge.cli.app import app
from tokenbridge.exceptions import ConfigurationError

_CHECKOUT = Path(__file__).resolve().parents[3]


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Measure throughput, latency and fan-out (benchmarks/README.md); --help for options."""
    if not (_CHECKOUT / "benchmarks" / "__main__.py").is_file():
        raise ConfigurationError(
            f"no benchmarks/ next to {_CHECKOUT / 'src'}: the benchmark ships with the source "
            "checkout, not the wheel; clone the repository and `pip install -e .` it"
        )
    if str(_CHECKOUT) not in sys.path:
        sys.path.insert(0, str(_CHECKOUT))
    from benchmarks.__main__ import main

    sys.exit(main(ctx.args))
