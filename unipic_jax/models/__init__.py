"""Model parts, one file each: ``qwen2`` (the LLM), ``layers`` (shared blocks)."""
