"""Redis access: clients and pools (``client``), the embedded server, Lua scripts."""
