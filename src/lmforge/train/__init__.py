"""The training engine and what plugs into it (objectives, optimizers, checkpoints)."""
