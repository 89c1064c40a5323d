"""pytest-safemerge: Hypothesis strategies, fixtures and a conformance suite for merge code."""
