"""Evaluation: the shapes-world benchmark (GenEval-style), editing and understanding scores."""
