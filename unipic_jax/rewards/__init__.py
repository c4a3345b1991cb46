"""Reward functions: plain callables (prompts, images, metadata) -> scores."""
