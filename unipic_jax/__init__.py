"""unipic-jax: a JAX/Flax NNX reimplementation of Skywork UniPic-1."""

__version__ = "0.1.0"
