"""``python -m tokenbridge``: the CLI."""

from tokenbridge.cli import main

main()
