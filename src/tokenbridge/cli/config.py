"""``tokenbridge config``: the effective configuration, secrets masked, and where each value
came from (flag, variable, config file or default)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from tokenbridge.cli.app import app
from tokenbridge.cli.serve import CONFIG_OPTION, MODEL_OPTION
from tokenbridge.settings import Settings, load_settings
from tokenbridge.settings_sources import masked, read_config_file


@app.command("config")
def show_config(
    config: Path | None = CONFIG_OPTION,
    model: list[str] | None = MODEL_OPTION,
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of lines."),
) -> None:
    """Print the settings serve and worker would use (secrets masked) and their sources."""
    settings = load_settings(config, model or ())
    from_file = set(read_config_file(config, Settings.model_fields)) if config else set()
    values = {
        name: masked(getattr(settings, name))
        for name, field in Settings.model_fields.items()
        if not field.deprecated  # old names: their value is under the new one
    }
    if as_json:
        print(json.dumps(values, indent=2, sort_keys=True))
        return
    for name, value in values.items():
        variable = f"TOKENBRIDGE_{name.upper()}"
        if name == "models" and model:
            source = (
                "--model"
                if variable in os.environ or name not in from_file
                else f"{config} + --model"
            )
        elif variable in os.environ:
            source = variable
        elif name in from_file:
            source = f"{config}"
        else:
            source = "default"
        print(f"{name} = {json.dumps(value)}  # {source}")
