"""Configuration: frozen dataclasses loaded once from a YAML file plus ``PULLGATE_*``
environment variables, and the human units (durations, sizes) they are written in."""
