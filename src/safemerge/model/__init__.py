"""Whole models as one transaction: the rollback and interrupt rules (``transaction``),
the in-memory fuse of a ``torch.nn.Module`` (``in_memory``), the disk-to-disk streaming
fuse (``streaming``), and what both report (``report``, ``memory``). See
``docs/design.md``, "The model transaction".
"""
