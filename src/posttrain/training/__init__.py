"""Training: the one loop, experience building, token log-probs, checkpoints."""
