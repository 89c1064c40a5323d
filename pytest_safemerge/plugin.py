"""The pytest entry point of safemerge (options, fixtures and the suite grow here).

Imports nothing heavy at module top: pytest loads every installed plugin on every run.
"""

from __future__ import annotations
