"""Helpers shared by the tests, importable as ``support.*`` through pytest's pythonpath."""
