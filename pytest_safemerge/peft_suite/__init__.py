"""The PEFT contracts ``pytest --safemerge-peft`` runs against the installed PEFT: its
model-level merge entry points on tiny models, and every tuner other than LoRA that merges."""
