"""diffusers: a guarded, all-or-nothing, exactly reversible ``fuse_lora`` / ``unfuse_lora``.

``safemerge.diffusers.fuse_lora(pipe, lora_scale=0.7)`` instead of ``pipe.fuse_lora(...)``:
the same weights diffusers' fuse computes (in float32, rounded once), refused with the
layer's name when any component's merge would not be finite, with nothing changed; and
``safemerge.diffusers.unfuse_lora(pipe)`` gives back every base bit and every adapter's
scaling.
"""

from __future__ import annotations

from safemerge.diffusers.fuse import OFFLOAD_DEVICE, fuse_lora, unfuse_lora

__all__ = ["OFFLOAD_DEVICE", "fuse_lora", "unfuse_lora"]
