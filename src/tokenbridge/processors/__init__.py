"""The processor pipeline: StreamProcessor and its processors (analytics, logging, cache, ...)."""
