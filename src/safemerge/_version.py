"""The release: one place, read by the public front, the CLI and file provenance."""

__version__ = "0.1.0"
