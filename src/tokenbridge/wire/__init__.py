"""The wire model: stream entries (``events``) and Redis key names (``keys``)."""
