"""Online RL on the generator: GRPO rollouts, log-probabilities, the objective and its loop."""
