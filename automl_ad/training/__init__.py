"""The generic training loop (no Ray) and its data-parallel helper."""
