"""Experiments: plain functions over a loaded run that return result objects (never print)."""
