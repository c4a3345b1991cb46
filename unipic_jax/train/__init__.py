"""Training: optimizers and stages, the sharded train step, checkpoints and the loop."""
