"""Sweep definitions: each module defines `BASE` (a `--config` argument) and `RUNS` ({name: {field: value}})."""
