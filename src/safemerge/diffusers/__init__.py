"""diffusers: a guarded, all-or-nothing, exactly reversible ``fuse_lora`` / ``unfuse_lora``."""
