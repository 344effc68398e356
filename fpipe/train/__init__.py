"""Training: the pure step, the loop, checkpoints."""
