"""Model families. `build_model(config.model)` returns the Flax module a config names."""

from segvit_jax.models.segmentor import SegViT, build_model

__all__ = ["SegViT", "build_model"]
