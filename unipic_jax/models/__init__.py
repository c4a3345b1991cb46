"""Model parts, one file each: ``layers`` (shared blocks), ``qwen2`` (the LLM), ``siglip2``
(vision tower), ``understanding`` (SigLIP2 → projector → LLM), ``vae`` (KL-16 tokenizer),
``diffusion`` (Gaussian diffusion maths), ``diffloss`` (MAR's diffusion head), ``mar`` (MAR
encoder/decoder and masking), ``unipic`` (the composite)."""
