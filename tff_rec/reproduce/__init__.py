"""Reproduction tables: `python -m experiments.reproduce --table=<name>`."""
